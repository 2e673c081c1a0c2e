% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="maps" data-live>
<p class="count">{{total}} map{{'' if total == 1 else 's'}}{{', page %d of %d' % (page, pages) if pages > 1 else ''}}</p>
% if not maps:
<p class="empty">No maps: put one at $TA1_INPUTS_DIR/maps/&lt;map&gt;/&lt;map&gt;.tif</p>
% else:
<table class="cards">
<thead><tr><th>Map</th><th>Jobs</th><th>Run</th></tr></thead>
<tbody>
% for name, jobs in maps:
<tr data-map="{{name}}">
<td data-label="Map">{{name}}</td>
<td data-label="Jobs">
% for j in jobs:
<a href="/ui/jobs/{{j}}">{{j}}</a>
% end
</td>
<td data-label="Run"><a href="/ui/new?map={{name}}">New run</a></td>
</tr>
% end
</tbody>
</table>
% end
% if pages > 1:
<nav class="pages">
% if page > 1:
<a href="/ui/maps?page={{page - 1}}" rel="prev">previous</a>
% end
% if page < pages:
<a href="/ui/maps?page={{page + 1}}" rel="next">next</a>
% end
</nav>
% end
</section>
