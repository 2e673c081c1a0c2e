% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
<section id="summary" data-live data-finished="{{'yes' if finished else 'no'}}">
<dl class="facts">
<dt>State</dt><dd><span class="state st-{{row['state']}}">{{row['label']}}</span></dd>
<dt>Run</dt><dd><a href="/ui/runs/{{run_id}}">{{run_id}}</a></dd>
<dt>Job</dt><dd><a href="/ui/jobs/{{job}}">{{job}}</a></dd>
<dt>Started</dt><dd>{{!time_tag(row['started'])}}</dd>
<dt>Ended</dt><dd>{{!time_tag(row['ended'])}}</dd>
<dt>Duration</dt><dd>{{row['duration']}}</dd>
<dt>Exit code</dt><dd>{{'' if row['exit_code'] is None else row['exit_code']}}</dd>
<dt>Message</dt><dd class="message">{{row['message']}}</dd>
</dl>
<p class="downloads"><a href="/modules/{{job}}/{{module}}/log" title="the module's own log, as plain text">raw text</a>
% if row['log_size']:
<span class="size">({{row['log_size']}})</span>
% end
</p>
</section>
<pre id="log" class="log" data-log="/modules/{{job}}/{{module}}/log" aria-live="polite"></pre>
