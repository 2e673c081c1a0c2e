% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<p>Map <b>{{map}}</b> · {{total}} run{{'' if total == 1 else 's'}} · <a href="/ui/runs?job={{job}}">all its runs</a></p>
<section id="job-modules" data-live>
% include('warnings', warnings=warnings)
<h2>Modules (latest state)</h2>
% if not modules:
<p class="empty">No module has run in this job yet.</p>
% else:
<table class="cards">
<thead><tr><th>Module</th><th>State</th><th>Started</th><th>Ended</th><th>Exit code</th><th>Message</th><th>Resources</th><th>Downloads</th></tr></thead>
<tbody>
% for m in modules:
<tr data-module="{{m['name']}}">
<td data-label="Module">{{m['name']}}</td>
<td data-label="State"><span class="state st-{{m['state']}}">{{m['label']}}</span></td>
<td data-label="Started">{{m['started']}}</td>
<td data-label="Ended">{{m['ended']}}</td>
<td data-label="Exit code">{{'' if m['exit_code'] is None else m['exit_code']}}</td>
<td data-label="Message" class="message">{{m['message']}}</td>
<td data-label="Resources" class="resources">{{m['resources']}}</td>
<td data-label="Downloads">
% include('downloads', job=job, name=m['name'])
</td>
</tr>
% end
</tbody>
</table>
% end
<h2>Latest runs</h2>
% include('run_table', rows=runs)
</section>
