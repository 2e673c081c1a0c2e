% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="job-summary" data-live>
<dl class="facts">
<dt>Status</dt><dd><span class="state st-{{latest['status']}}" id="job-status">{{latest['status']}}</span> (its latest run, <a href="/ui/runs/{{latest['run_id']}}">{{latest['run_id']}}</a>)</dd>
<dt>Map</dt><dd>{{map}}</dd>
<dt>Runs</dt><dd>{{total}} · <a href="/ui/runs?job={{job}}">all its runs</a></dd>
</dl>
<p class="actions">
<button type="button" id="rerun" data-post="/runs/{{latest['run_id']}}/rerun" data-confirm="Submit run {{latest['run_id']}} again? What passed is skipped." data-then="open">Rerun</button>
<a id="edit-rerun" href="/ui/new?from={{latest['run_id']}}">Edit and rerun</a>
</p>
<h2>Final product</h2>
% if product:
<p id="product">The GeoPackage, <b>{{product['name']}}</b>: <a href="{{product['href']}}" download>GeoPackage (outputs zip)</a>. In the zip it is <code>{{product['in_zip']}}</code>; on the server, <code>{{product['on_server']}}</code>.</p>
% else:
<p id="product" class="empty">No GeoPackage yet: the geopackage module has not passed in this job. When it does, it is here, and on the server under $TA1_OUTPUTS_DIR/{{job}}/geopackage/.</p>
% end
</section>
<section id="job-modules" data-live>
% include('warnings', warnings=warnings)
<h2>Modules (latest state)</h2>
<table class="cards">
<thead><tr><th>Module</th><th>State</th><th>Started</th><th>Ended</th><th>Exit code</th><th>Message</th><th>Resources</th><th>Downloads</th></tr></thead>
<tbody>
% for m in modules:
<tr data-module="{{m['name']}}">
<td data-label="Module">{{m['name']}}</td>
<td data-label="State"><span class="state st-{{m['state']}}">{{m['label']}}</span></td>
<td data-label="Started">{{!time_tag(m['started'])}}</td>
<td data-label="Ended">{{!time_tag(m['ended'])}}</td>
<td data-label="Exit code">{{'' if m['exit_code'] is None else m['exit_code']}}</td>
<td data-label="Message" class="message">{{m['message']}}</td>
<td data-label="Resources" class="resources">{{m['resources']}}</td>
<td data-label="Downloads">
% if m['ran']:
% include('downloads', job=job, name=m['name'], log_size=m['log_size'])
% end
</td>
</tr>
% end
</tbody>
</table>
<h2>Latest runs</h2>
% include('run_table', rows=runs)
</section>
