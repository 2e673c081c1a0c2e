% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="error" class="error">
<p class="notice">{{message}}</p>
<p class="count">HTTP {{status}} · {{code}}</p>
% if status == 401:
<p>Reload the page to log in again.</p>
% end
<p class="actions"><button type="button" data-back hidden>Back</button> <a href="/ui">The runs</a></p>
</section>
