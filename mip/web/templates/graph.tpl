<svg class="graph" id="module-graph" role="img" aria-label="module graph" viewBox="0 0 {{g['width']}} {{g['height']}}" width="{{g['width']}}" height="{{g['height']}}" xmlns="http://www.w3.org/2000/svg">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>
% for d in g['edges']:
<path class="edge" d="{{d}}" marker-end="url(#arrow)"/>
% end
% for b in g['boxes']:
% if b['earlier']:
<a href="/ui/runs/{{b['earlier']}}" class="earlier">
% end
<g class="node st-{{b['state']}}{{' earlier' if b['earlier'] else ''}}" data-module="{{b['name']}}" data-state="{{b['state']}}" data-earlier="{{b['earlier'] or ''}}" transform="translate({{b['x']}} {{b['y']}})">
<title>{{b['name']}}: {{b['label']}}{{' in an earlier run, ' + b['earlier'] + ' (this run skipped it)' if b['earlier'] else ''}}{{'; started ' + b['started'] + ' UTC' if b['started'] else ''}}{{'; ended ' + b['ended'] + ' UTC' if b['ended'] else ''}}{{'' if b['exit_code'] is None else '; exit code %s' % b['exit_code']}}{{'; ' + b['message'] if b['message'] else ''}}{{''.join('; warning: ' + w for w in b['warnings'])}}</title>
<rect width="{{g['box_w']}}" height="{{g['box_h']}}" rx="6"/>
<text x="8" y="20" class="name">{{b['name']}}</text>
<text x="8" y="38" class="what">{{b['label']}}{{' earlier' if b['earlier'] else ''}}{{' · ' + b['duration'] if b['duration'] else ''}}{{'' if b['exit_code'] is None else ' · exit %s' % b['exit_code']}}</text>
% when = b['ended'] or b['started']
<text x="8" y="55" class="when" data-time="{{iso_z(when)}}">{{when[11:] + ' UTC' if when else ''}}</text>
% if b['message'] or not b['warnings']:
<text x="8" y="71" class="msg">{{b['message'] if len(b['message']) <= 28 else b['message'][:27] + '…'}}</text>
% else:
<text x="8" y="71" class="msg warned">⚠ {{len(b['warnings'])}} warning{{'' if len(b['warnings']) == 1 else 's'}}</text>
% end
</g>
% if b['earlier']:
</a>
% end
% end
</svg>
