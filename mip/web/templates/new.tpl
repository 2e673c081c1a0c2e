% rebase('base', title=title, watch=watch, poll_ms=poll_ms)
% if source:
<p id="from-run">Filled from run <a href="/ui/runs/{{source['run_id']}}">{{source['run_id']}}</a>: change what you need and submit it as a new run.</p>
% end
<p class="hint" id="secrets-note">Secrets are never shown or carried over: if the run had an OpenAI key, a notify URL or a secret switch, give it again.
% if form['hidden']:
This run's hidden parts: {{', '.join(form['hidden'])}}.
% end
</p>
% # no name= on any field: were the script missing, a plain submit sends nothing (no key in a URL)
<form id="new-run" class="new-run" data-submit="/runs" novalidate>
<p class="field">
<label for="job">Job name</label>
<input id="job" value="{{form['job']}}" maxlength="64" autocomplete="off" spellcheck="false">
<span class="help">letters, digits, _ . -; a job keeps the map of its first run, and what passed in it is skipped</span>
<span class="field-error" data-error-for="job" hidden></span>
</p>
<p class="field">
<label for="map">Map</label>
% if maps:
<select id="map">
% for name in maps:
<option value="{{name}}"{{' selected' if name == form['map'] else ''}}>{{name}}</option>
% end
</select>
% else:
<select id="map" disabled><option value="">no maps on the server</option></select>
% end
<span class="field-error" data-error-for="map" hidden></span>
</p>
<fieldset class="modules" id="modules">
<legend>Modules and their extra switches</legend>
<p class="help">What a module needs runs first. Extra switches: one argument per line, appended to that module's command line (no shell).</p>
<span class="field-error" data-error-for="modules" hidden></span>
<span class="field-error" data-error-for="extra_switches" hidden></span>
<label class="all"><input type="checkbox" id="all-modules" value="{{all_name}}" data-modules-all{{' checked' if all_name in form['modules'] else ''}}> {{all_name}}: every module</label>
<table class="cards">
<thead><tr><th>Module</th><th>Extra switches</th></tr></thead>
<tbody>
% for name in modules:
<tr data-module="{{name}}">
<td data-label="Module" class="module-name"><label><input type="checkbox" id="module-{{name}}" value="{{name}}" data-module-box{{' checked' if name in form['modules'] else ''}}> {{name}}</label></td>
<td data-label="Extra switches"><textarea rows="1" data-switches="{{name}}" aria-label="extra switches of {{name}}" spellcheck="false">{{form['switches'].get(name, '')}}</textarea>
<span class="field-error" data-error-for="extra_switches.{{name}}" hidden></span></td>
</tr>
% end
</tbody>
</table>
</fieldset>
<p class="field">
<label><input type="checkbox" id="force_rerun"{{' checked' if form['force_rerun'] else ''}}> Force rerun: run the chosen modules again even if they passed in this job</label>
<span class="field-error" data-error-for="force_rerun" hidden></span>
</p>
<p class="field">
<label for="notify_url">Notify URL</label>
<input id="notify_url" type="url" value="{{form['notify_url']}}" maxlength="2048" placeholder="optional: https://..." autocomplete="off" spellcheck="false">
<span class="help">when the run ends, its RunStatus is POSTed here, signed</span>
<span class="field-error" data-error-for="notify_url" hidden></span>
</p>
<p class="field">
<label for="openai_key">OpenAI key</label>
<input id="openai_key" type="password" maxlength="512" placeholder="optional" autocomplete="off">
<span class="help">handed to the modules, never stored in clear or shown</span>
<span class="field-error" data-error-for="openai_key" hidden></span>
</p>
<p class="actions">
<button type="submit" id="submit-run">Start run</button>
<span class="field-error" data-error-for="" hidden></span>
</p>
</form>
