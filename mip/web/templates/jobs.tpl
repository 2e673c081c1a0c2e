% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="jobs" data-live>
<p class="count">{{total}} job{{'' if total == 1 else 's'}}{{', page %d of %d' % (page, pages) if pages > 1 else ''}}</p>
% if not jobs:
<p class="empty">No jobs yet: a job is made by its first run.</p>
% else:
<table class="cards">
<thead><tr><th>Job</th><th>Map</th><th>Latest run</th><th>Status</th><th>Submitted</th><th>Ended</th></tr></thead>
<tbody>
% for j in jobs:
<tr data-job="{{j['job']}}">
<td data-label="Job"><a href="/ui/jobs/{{j['job']}}">{{j['job']}}</a></td>
<td data-label="Map">{{j['map']}}</td>
<td data-label="Latest run">
% if j['run_id']:
<a href="/ui/runs/{{j['run_id']}}">{{j['run_id']}}</a>
% end
</td>
<td data-label="Status"><span class="state st-{{j['status'] or 'not_run'}}">{{j['status'] or ''}}</span></td>
<td data-label="Submitted">{{!time_tag(j['submit_time'])}}</td>
<td data-label="Ended">{{!time_tag(j['stop_time'])}}</td>
</tr>
% end
</tbody>
</table>
% end
% if pages > 1:
<nav class="pages">
% if page > 1:
<a href="/ui/jobs?page={{page - 1}}" rel="prev">newer</a>
% end
% if page < pages:
<a href="/ui/jobs?page={{page + 1}}" rel="next">older</a>
% end
</nav>
% end
</section>
