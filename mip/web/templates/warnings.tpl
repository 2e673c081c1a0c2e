% # what a run, job or module says even when it passed; one module's list sits in its row
% if warnings:
% if get('of_module'):
<ul class="warnings-of-module">
% for w in warnings:
<li>⚠ {{w}}</li>
% end
</ul>
% else:
<div class="warnings" id="warnings" role="status">
<p><b>{{len(warnings)}} warning{{'' if len(warnings) == 1 else 's'}}</b></p>
<ul>
% for w in warnings:
<li>{{w}}</li>
% end
</ul>
</div>
% end
% end
