% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="maps" data-live>
% if not maps:
<p class="empty">No maps: put one at $TA1_INPUTS_DIR/maps/&lt;map&gt;/&lt;map&gt;.tif</p>
% else:
<table class="cards">
<thead><tr><th>Map</th><th>Jobs</th></tr></thead>
<tbody>
% for name, jobs in maps:
<tr data-map="{{name}}">
<td data-label="Map">{{name}}</td>
<td data-label="Jobs">
% for j in jobs:
<a href="/ui/jobs/{{j}}">{{j}}</a>
% end
</td>
</tr>
% end
</tbody>
</table>
% end
</section>
