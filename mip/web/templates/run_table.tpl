% if not rows:
<p class="empty">No runs.</p>
% else:
<table class="cards">
<thead><tr><th>Run</th><th>Status</th><th>Job</th><th>Map</th><th>Modules</th><th>Submitted</th><th>Started</th><th>Ended</th><th>Duration</th></tr></thead>
<tbody>
% for r in rows:
<tr data-run="{{r['run_id']}}">
<td data-label="Run"><a href="/ui/runs/{{r['run_id']}}">{{r['run_id']}}</a></td>
<td data-label="Status"><span class="state st-{{r['status']}}">{{r['status']}}</span></td>
<td data-label="Job"><a href="/ui/jobs/{{r['job']}}">{{r['job']}}</a></td>
<td data-label="Map">{{r['map']}}</td>
<td data-label="Modules">{{r['modules']}}</td>
<td data-label="Submitted">{{!time_tag(r['submitted'])}}</td>
<td data-label="Started">{{!time_tag(r['started'])}}</td>
<td data-label="Ended">{{!time_tag(r['ended'])}}</td>
<td data-label="Duration">{{r['duration']}}</td>
</tr>
% end
</tbody>
</table>
% end
