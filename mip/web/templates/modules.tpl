% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<table class="cards">
<thead><tr><th>Module</th><th>Version</th><th>Requires</th><th>Required by</th><th>GPU</th></tr></thead>
<tbody>
% for m in modules:
<tr id="module-{{m.name}}" data-module="{{m.name}}">
<td data-label="Module">{{m.name}}</td>
<td data-label="Version">{{m.version}}</td>
<td data-label="Requires">
% for r in m.requires:
<a href="#module-{{r}}">{{r}}</a>
% end
</td>
<td data-label="Required by">
% for r in needed_by[m.name]:
<a href="#module-{{r}}">{{r}}</a>
% end
</td>
<td data-label="GPU">{{'yes' if m.gpu else 'no'}}</td>
</tr>
% end
</tbody>
</table>
