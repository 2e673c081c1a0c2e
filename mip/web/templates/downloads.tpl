<a href="/modules/{{job}}/{{name}}/log" title="the module's own log, as text">module log</a>
<a href="/modules/{{job}}/{{name}}/logs" download>logs (zip)</a>
<a href="/modules/{{job}}/{{name}}/outputs" download>outputs (zip)</a>
<a href="/modules/{{job}}/{{name}}/temps" download>temps (zip)</a>
