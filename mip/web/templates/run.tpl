% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="summary" data-live data-finished="{{'yes' if finished else 'no'}}">
<dl class="facts">
<dt>Status</dt><dd><span class="state st-{{run['status']}}" id="run-status">{{run['status']}}</span></dd>
<dt>Job</dt><dd><a href="/ui/jobs/{{run['job']}}">{{run['job']}}</a></dd>
<dt>Map</dt><dd>{{run['map']}}</dd>
<dt>Modules</dt><dd>{{run['modules']}}</dd>
<dt>Submitted</dt><dd>{{!time_tag(run['submitted'])}}</dd>
<dt>Started</dt><dd>{{!time_tag(run['started'])}}</dd>
<dt>Ended</dt><dd>{{!time_tag(run['ended'])}}</dd>
<dt>Duration</dt><dd>{{run['duration']}}</dd>
</dl>
% include('warnings', warnings=warnings)
<p class="actions">
% if not finished:
<button type="button" id="cancel" data-post="/runs/{{run['run_id']}}/cancel" data-confirm="Cancel run {{run['run_id']}}? Its running modules are stopped.">Cancel</button>
% end
<button type="button" id="rerun" data-post="/runs/{{run['run_id']}}/rerun" data-confirm="Submit run {{run['run_id']}} again? What passed is skipped." data-then="open">Rerun</button>
<a id="edit-rerun" href="/ui/new?from={{run['run_id']}}">Edit and rerun</a>
</p>
</section>
<h2>Modules</h2>
<section id="graph" data-live>
% include('graph', g=graph)
<table class="cards">
<thead><tr><th>Module</th><th>State</th><th>Started</th><th>Ended</th><th>Duration</th><th>Exit code</th><th>Message</th><th>Resources</th><th>Downloads</th></tr></thead>
<tbody>
% for m in modules:
<tr data-module="{{m['name']}}">
<td data-label="Module">{{m['name']}}</td>
<td data-label="State"><span class="state st-{{m['state']}}">{{m['label']}}</span>
% if m['earlier']:
<a class="earlier" href="/ui/runs/{{m['earlier']}}" title="this run found it passed and skipped it">in run {{m['earlier']}}</a>
% end
</td>
<td data-label="Started">{{!time_tag(m['started'])}}</td>
<td data-label="Ended">{{!time_tag(m['ended'])}}</td>
<td data-label="Duration">{{m['duration']}}</td>
<td data-label="Exit code">{{'' if m['exit_code'] is None else m['exit_code']}}</td>
<td data-label="Message" class="message">{{m['message']}}
% include('warnings', warnings=m['warnings'], of_module=True)
</td>
<td data-label="Resources" class="resources">{{m['resources']}}</td>
<td data-label="Downloads">
% if m['ran']:
% include('downloads', job=run['job'], name=m['name'], log_size=m['log_size'])
% end
</td>
</tr>
% end
</tbody>
</table>
</section>
<h2>Run log</h2>
<pre id="log" class="log" data-log="/runs/{{run['run_id']}}/log" aria-live="polite"></pre>
<h2>Payload</h2>
<pre class="payload">{{payload}}</pre>
