% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<form class="filter" method="get" action="/ui/runs">
<label>Status
<select name="status">
<option value="">any</option>
% for s in statuses:
<option value="{{s}}"{{' selected' if s == status else ''}}>{{s}}</option>
% end
</select>
</label>
<label>Job <input name="job" value="{{job}}" maxlength="64" pattern="[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}" placeholder="any"></label>
<button type="submit">Filter</button>
</form>
<section id="runs" data-live>
<p class="count">{{total}} run{{'' if total == 1 else 's'}}{{', page %d of %d' % (page, pages) if pages > 1 else ''}}</p>
% include('run_table', rows=rows)
% if pages > 1:
<nav class="pages">
% if page > 1:
<a href="/ui/runs?page={{page - 1}}{{link_args}}" rel="prev">newer</a>
% end
% if page < pages:
<a href="/ui/runs?page={{page + 1}}{{link_args}}" rel="next">older</a>
% end
</nav>
% end
</section>
