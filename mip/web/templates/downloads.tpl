<span class="download"><a href="/ui/modules/{{job}}/{{name}}/log" title="the module's own log, followed live">module log</a>
% if log_size:
<span class="size">({{log_size}})</span>
% end
· <a href="/modules/{{job}}/{{name}}/log" title="the module's own log, as plain text">raw</a></span>
<span class="download"><a href="/modules/{{job}}/{{name}}/logs" download>logs (zip)</a></span>
<span class="download"><a href="/modules/{{job}}/{{name}}/outputs" download>outputs (zip)</a></span>
<span class="download"><a href="/modules/{{job}}/{{name}}/temps" download>temps (zip)</a></span>
