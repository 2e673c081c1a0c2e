"""console: the browser's pages under /ui: runs, a run with its module graph and live log,
jobs, maps, the module catalogue, the New run form and a module's live log; and a
browser's 401, 404 and 500 as pages (error_pages).

View functions of mip_server.py's route table, whose rows for /ui name them. Pages are
rendered by the server with bottle's SimpleTemplate (templates/, which escapes every
{{value}}); static/ holds the one script and style sheet, served from here (nothing from
the internet, no build step). The
script polls the JSON API and, when an answer changes, swaps in the page's fresh regions; it
never writes except through the API's own POST routes (runs, cancel, rerun), which
guards.py guards. A browser asking for `/` (Accept: text/html) gets the console's home; API
clients keep their JSON. Pages never show a secret: a payload is shown without its keys and tokens.
Times are written in UTC (time_tag), which the script shows in the browser's own zone.
"""

import html
import json
import math
import os
import re
import stat
from datetime import UTC
from datetime import datetime

import bottle

from mip import gpus
from mip.catalogue import ALL
from mip.catalogue import ancestors
from mip.catalogue import check_name
from mip.catalogue import expand_modules
from mip.catalogue import module_outputs
from mip.errors import UsageError
from mip.journal import FINISHED
from mip.journal import Status
from mip.maps import listed_maps
from mip.maps import map_file
from mip.status import listed
from mip.status import run_warnings
from mip.web import openapi
from mip.web.apierror import ApiError
from mip.web.context import get_job
from mip.web.context import get_module
from mip.web.context import get_run
from mip.web.context import query_int

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "templates")
# one list for good: bottle caches compiled templates by the id of their lookup list
LOOKUP = [TEMPLATES]
STATIC = os.path.join(HERE, "static")
PAGE_SIZE = 50
# no inline script or style, nothing from another origin, never framed: a value that slipped
# through escaping could still not run
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATIC_FILES = {"console.js": "text/javascript; charset=utf-8",
                "console.css": "text/css; charset=utf-8",
                "favicon.svg": "image/svg+xml"}
# a filter left empty in the page's form arrives as ?job=&status=, meaning no filter
OPTIONAL_NAME = {"type": "string", "pattern": "^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"}
PAGE = openapi.whole(10**6)
# the query of the New run page (/ui/new)
NEW_QUERY = {"map": OPTIONAL_NAME,
             "from": {"type": "string", "pattern": "^$|" + openapi.RUN_ID["pattern"]}}
# the query of the runs page (/ui, /ui/runs)
RUNS_QUERY = {"status": {"enum": ["", *(s.value for s in Status)]}, "job": OPTIONAL_NAME,
              "page": PAGE}
SECRET_KEY = re.compile(r"key|secret|token|password|credential", re.I)
# a running module still waiting for a device (its message is gpus.WAITING)
WAITING_GPU = "waiting_gpu"
STATE_LABELS = {WAITING_GPU: gpus.WAITING}
# the graph: one row per dependency level, at most this many boxes a row
BOX_W, BOX_H, GAP_X, GAP_Y = 186, 78, 14, 40
# the module whose output is the job's final product, the GeoPackage
FINAL_MODULE = "geopackage"
# what every page carries, error pages too
PAGE_HEADERS = {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                "Cache-Control": "no-store"}
# the answers a browser gets as a console page (error_pages), with the page's title
ERROR_TITLES = {401: "Not logged in", 404: "Not found", 500: "Server error"}


# ---------------------------------------------------------------------------- pages

def runs_page(ctx):
    """Console: the runs, newest first, filtered by ?status= and ?job=, paged by ?page="""
    db = ctx.db
    status = query_status()
    job = query_name("job")
    total = db.count_runs(job, status)
    pages, number = paging(total, query_int("page", 1, 10**6))
    rows = [run_row(r) for r in db.runs_page(job, status, PAGE_SIZE, (number - 1) * PAGE_SIZE)]
    args = "".join(f"&{k}={v}" for k, v in (("job", job), ("status", status)) if v)
    # the status filter stays out of what is polled: every change of state passes
    # through these lists, and /runs?status=passed would be every passed run, each poll
    of_job = f"&job={job}" if job else ""
    watch = [f"/runs?status=not_started{of_job}", f"/runs?status=running{of_job}",
             f"/runs?offset={db.count_runs(job) if status else total}{of_job}"]
    return render(ctx, "runs", "Runs", watch, rows=rows, total=total, page=number, pages=pages,
                  job=job or "", status=status or "", statuses=[s.value for s in Status],
                  link_args=args)


def run_page(ctx, run_id):
    """Console: one run, its module graph, downloads and live log. Raises 404 if unknown."""
    run = get_run(ctx, run_id)
    catalogue = ctx.catalogue
    executions = {e["module"]: e for e in ctx.db.executions(run["run_id"])}
    names = drawn_modules(catalogue, run["modules"], executions)
    earlier = skipped_passes(catalogue, run, ctx.db.passes_before(run["job"], run["run_id"]))
    modules = [module_row(name, executions.get(name), run["status"], earlier.get(name))
               for name in names]
    warnings = run_warnings(run, list(executions.values()))
    finished = run["status"] in FINISHED
    # an ended run changes no more: its open page stops polling
    watch = [] if finished else [f"/runs/{run['run_id']}"]
    return render(ctx, "run", f"Run {run['run_id']}", watch,
                  run=run_row(run), finished=finished, modules=modules, warnings=warnings,
                  graph=graph(catalogue, modules),
                  payload=json.dumps(shown(run["payload"]), indent=2, sort_keys=True))


def jobs_page(ctx):
    """Console: the jobs, newest first, with their latest run; ?page=."""
    total = ctx.db.count_jobs()
    pages, number = paging(total, query_int("page", 1, 10**6))
    jobs = ctx.db.jobs_page(PAGE_SIZE, (number - 1) * PAGE_SIZE)
    return render(ctx, "jobs", "Jobs", ["/runs?status=not_started", "/runs?status=running",
                                   f"/jobs?offset={total}"],
                  jobs=jobs, total=total, page=number, pages=pages)


def job_page(ctx, job):
    """Console: a job's modules (the latest state of each, downloads) and its latest runs.
    Raises 404 if unknown."""
    db = ctx.db
    get_job(ctx, job)
    latest = db.latest_run(job)
    if latest is None:  # the job was deleted since the line above
        raise ApiError(404, "unknown_job", f"no job {job!r}; GET /jobs lists them")
    catalogue = ctx.catalogue
    # every module of the catalogue, run or not, and any the catalogue has dropped since
    names = [*catalogue, *(n for n in db.job_modules(job) if n not in catalogue)]
    # a module the latest run may still start is `waiting`; one outside it, `not run`
    drawn = set(drawn_modules(catalogue, latest["modules"], {}))
    modules = [module_row(name, db.latest_execution(job, name),
                          latest["status"] if name in drawn else Status.PASSED.value)
               for name in names]
    runs = [run_row(r) for r in db.runs_page(job, None, 10, 0)]
    map_name = db.job_map(job)
    return render(ctx, "job", f"Job {job}", [f"/jobs/{job}"], job=job, map=map_name,
                  modules=modules, runs=runs, total=db.count_runs(job),
                  latest=run_row(latest),
                  warnings=run_warnings(latest, db.executions(latest["run_id"])),
                  product=final_product(ctx, job, map_name,
                                        db.latest_execution(job, FINAL_MODULE)))


def new_page(ctx):
    """Console: the New run form (a map, modules, switches, a notify URL), which posts to
    POST /runs; ?map= picks the map, ?from=RUN_ID fills it from that run's payload, its
    secrets left out. Raises 404 for an unknown ?from= run."""
    settings = ctx.cfg.settings
    from_id = bottle.request.query.get("from") or None
    source = get_run(ctx, from_id) if from_id else None
    form = prefill(source["payload"] if source else {}, ctx.catalogue)
    chosen = query_name("map")
    if chosen is not None:
        form["map"] = chosen
    names = listed_maps(settings)
    if form["map"] and form["map"] not in names:  # gone since, or never: POST /runs says so
        names = [form["map"], *names]
    return render(ctx, "new", "New run", [], form=form, maps=names, source=source,
                  modules=list(ctx.catalogue), all_name=ALL)


def prefill(payload: dict, catalogue: dict) -> dict:
    """The New run form's values from a run's payload as the console shows it (shown():
    no key, no token, a URL by its origin): a value with a hidden part is left for the
    person to give again, and `hidden` names those fields."""
    seen = shown(payload)
    modules = [m for m in seen.get("modules", [ALL]) if m == ALL or m in catalogue]
    switches, hidden = {}, []
    for name, args in (seen.get("extra_switches") or {}).items():
        if isinstance(args, list):
            switches[name] = "\n".join(str(a) for a in args)
            if any("(hidden)" in str(a) for a in args):
                hidden.append(f"the extra switches of {name}")
    notify = seen.get("notify_url") or ""
    if "(hidden)" in notify:
        hidden.append(f"the notify URL (it went to {notify.split('/(hidden)')[0]})")
        notify = ""
    return {"job": seen.get("job", ""), "map": seen.get("map", ""),
            "modules": modules or [ALL], "force_rerun": bool(seen.get("force_rerun")),
            "switches": switches, "notify_url": notify, "hidden": hidden}


def maps_page(ctx):
    """Console: the maps on the server, by name, and the jobs bound to each; ?page=."""
    settings = ctx.cfg.settings
    names = listed_maps(settings)
    pages, number = paging(len(names), query_int("page", 1, 10**6))
    # the listing may hold a map removed since: the page checks its own
    shown = [n for n in names[(number - 1) * PAGE_SIZE:number * PAGE_SIZE]
             if os.path.isfile(map_file(settings, n))]
    jobs = ctx.db.jobs_of_maps(shown)
    # new jobs, not GET /maps: that stats every map, each poll
    return render(ctx, "maps", "Maps", [f"/jobs?offset={ctx.db.count_jobs()}"],
                  maps=[(name, jobs.get(name, [])) for name in shown], total=len(names),
                  page=number, pages=pages)


def module_log_page(ctx, job, module):
    """Console: a module's own log in its latest execution, followed live. Raises 404 if
    the module has not run in the job."""
    execution = get_module(ctx, job, module)
    finished = execution["status"] in FINISHED
    return render(ctx, "module_log", f"Log of {module} in job {job}",
                  [] if finished else [f"/modules/{job}/{module}"],
                  job=job, module=module, finished=finished,
                  row=module_row(module, execution, ""), run_id=execution["run_id"])


def modules_page(ctx):
    """Console: the module catalogue, with what each module requires and is required by."""
    catalogue = ctx.catalogue
    needed_by = {name: [m.name for m in catalogue.values() if name in m.requires]
                 for name in catalogue}
    return render(ctx, "modules", "Modules", [], modules=list(catalogue.values()),
                  needed_by=needed_by)


# ---------------------------------------------------------------------------- requests

def browser_home() -> None:
    """A browser asking for `/` gets the console's home instead of the service info."""
    env = bottle.request.environ
    if (env.get("REQUEST_METHOD") == "GET" and env.get("PATH_INFO") == "/"
            and "text/html" in env.get("HTTP_ACCEPT", "")):
        env["PATH_INFO"] = "/ui"


def query_status() -> str | None:
    """?status=, None when absent or empty. Raises 400 for one that is not a status."""
    status = bottle.request.query.get("status") or None
    if status is not None and status not in {s.value for s in Status}:
        raise ApiError(400, "bad_query",
                       f"?status= must be one of {', '.join(s.value for s in Status)}")
    return status


def query_name(key: str) -> str | None:
    """?job= or ?map=, None when absent or empty. Raises 400 for one that is not a name."""
    value = bottle.request.query.get(key) or None
    if value is not None:
        try:
            check_name(key, value)
        except UsageError as e:
            raise ApiError(400, "bad_query", f"?{key}=: {e}") from None
    return value


def paging(total: int, page: int) -> tuple:
    """(number of pages, the asked page number kept within them)."""
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return pages, min(max(page, 1), pages)


def render(ctx, name: str, title: str, watch: list, **values) -> str:
    """A page in the base layout, with the headers every page carries; its script polls
    `watch` every MIP_CONSOLE_POLL_MS."""
    for header, value in PAGE_HEADERS.items():
        bottle.response.set_header(header, value)
    return page_text(name, title, watch, poll_ms=ctx.cfg.console_poll_ms, **values)


def page_text(name: str, title: str, watch: list, poll_ms: int = 0, **values) -> str:
    """A page's text; `poll_ms` matters only to a page that watches something."""
    return bottle.template(name, template_lookup=LOOKUP, title=title, watch=" ".join(watch),
                           poll_ms=poll_ms, time_tag=time_tag, iso_z=iso_z, **values)


def static(ctx, name: str, media: str) -> bytes:
    """Console: one of its static files (no auth: public code)."""
    with open(os.path.join(STATIC, name), "rb") as f:
        body = f.read()
    bottle.response.content_type = media
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    bottle.response.set_header("Cache-Control", "max-age=60")
    return body


# ---------------------------------------------------------------------------- error pages

def error_pages(wsgi):
    """WSGI middleware: a GET whose Accept prefers text/html (a browser's navigation) that
    is answered 401, 404 or 500 in the one JSON error shape gets a console page saying the
    same, with the same status and headers (401 keeps WWW-Authenticate, so the browser still
    asks for the password). Every other request passes through untouched: API clients, curl
    (*/*) and the console's own fetches keep their JSON byte for byte."""
    def app(environ, start_response):
        if (environ.get("REQUEST_METHOD") != "GET"
                or not prefers_html(environ.get("HTTP_ACCEPT", ""))):
            return wsgi(environ, start_response)
        held = {}

        def hold(status, headers, exc_info=None):
            kind = next((v for k, v in headers if k.lower() == "content-type"), "")
            if (not held and int(status[:3]) in ERROR_TITLES
                    and kind.startswith("application/json")):
                # bottle passes a crash's exc_info along with its 500: passed on below
                held.update(status=status, headers=headers, exc_info=exc_info)
                return lambda data: None  # bottle never writes through it
            return start_response(status, headers, exc_info)

        body = wsgi(environ, hold)
        if not held:
            return body
        try:
            data = b"".join(body)
        finally:
            if hasattr(body, "close"):
                body.close()
        status, headers, exc_info = held["status"], held["headers"], held["exc_info"]
        page = error_page(int(status[:3]), data)
        if page is None:  # not the error shape after all: sent as it came
            start_response(status, headers, exc_info)
            return [data]
        kept = [(k, v) for k, v in headers
                if k.lower() not in {"content-length", *(h.lower() for h in PAGE_HEADERS)}]
        start_response(status, kept + list(PAGE_HEADERS.items())
                       + [("Content-Length", str(len(page)))], exc_info)
        return [page]
    return app


def error_page(status: int, data: bytes) -> bytes | None:
    """The console page of an error answer's JSON body, None when it is not
    {"error": code, "message": text}. Only the message the JSON carries is shown: a 500's is
    the generic one, never a traceback."""
    try:
        error = json.loads(data)
    except ValueError:
        return None
    if not (isinstance(error, dict) and isinstance(error.get("error"), str)
            and isinstance(error.get("message"), str)):
        return None
    return page_text("error", ERROR_TITLES[status], [], status=status, code=error["error"],
                     message=error["message"]).encode("utf-8")


def prefers_html(accept: str) -> bool:
    """True when Accept ranks text/html above application/json, as a browser's navigation
    does; no Accept, or */* alone (curl, requests), ranks them even: JSON."""
    return quality(accept, "text/html") > quality(accept, "application/json")


def quality(accept: str, media: str) -> float:
    """The q that Accept gives `media`: that of its most specific matching range (RFC 9110
    12.5.1), 0 when none matches."""
    best, q_best = -1, 0.0
    for item in accept.split(","):
        media_range, *params = (p.strip() for p in item.split(";"))
        media_range = media_range.lower()
        rank = {media: 2, media.split("/")[0] + "/*": 1, "*/*": 0}.get(media_range, -1)
        if rank <= best:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best, q_best = rank, q if 0.0 <= q <= 1.0 else 0.0
    return q_best


# ---------------------------------------------------------------------------- views

def shown(value):
    """A payload as the console shows it: no key, secret, token or password, and a URL by
    its origin only (a webhook's token may ride in its credentials, its query or its path,
    as Slack's and Discord's do)."""
    if isinstance(value, dict):
        return {k: ("(hidden)" if SECRET_KEY.search(str(k)) else shown(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return shown_switches(value)
    if isinstance(value, str) and re.match(r"(?i)https?://", value):
        scheme, _, rest = value.partition("://")
        authority, path = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
        if "@" in authority:
            authority = "(hidden)@" + authority.rpartition("@")[2]
        return f"{scheme}://{authority}" + ("/(hidden)" if path.strip("/") else "")
    return value


def shown_switches(args: list) -> list:
    """A list as shown(): a switch named like a secret (`--api-key=...`, or `--token` and
    the argument after it) has its value hidden, since modules take keys as switches."""
    out, hide_next = [], False
    for arg in args:
        if hide_next and isinstance(arg, str) and not arg.startswith("-"):
            out.append("(hidden)")
            hide_next = False
            continue
        hide_next = False
        if isinstance(arg, str) and arg.startswith("-") and SECRET_KEY.search(arg):
            flag, equals, _ = arg.partition("=")
            out.append(f"{flag}=(hidden)" if equals else arg)
            hide_next = not equals
            continue
        out.append(shown(arg))
    return out


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def duration(start: str | None, stop: str | None) -> str:
    """How long from start to stop (or to now, while it goes), as 1h 02m, 3m 05s or 4.2 s."""
    began = parse_time(start)
    if began is None:
        return ""
    ended = parse_time(stop) or datetime.now(began.tzinfo)
    seconds = max(0.0, (ended - began).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def short_time(text: str | None) -> str:
    """ISO UTC time as `YYYY-MM-DD HH:MM:SS`."""
    return text[:19].replace("T", " ") if text else ""


def utc(text: str | None) -> datetime | None:
    """A journal time (ISO with Z, or short_time's, which is UTC too) as an aware datetime."""
    when = parse_time(text)
    if when is None:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def iso_z(text: str | None) -> str:
    """A journal time as `YYYY-MM-DDTHH:MM:SSZ`, what a <time datetime> and console.js read;
    empty when there is none."""
    when = utc(text)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else ""


def time_tag(text: str | None) -> str:
    """A journal time as `<time>` markup: its text and tooltip the UTC time with its zone
    named, which console.js rewrites into the browser's own zone (keeping the tooltip).
    Escaped here: templates insert it with {{!...}}."""
    when = utc(text)
    if when is None:
        return html.escape(text or "")
    at = when.astimezone(UTC)
    day, clock = at.strftime("%Y-%m-%d"), at.strftime("%H:%M:%S UTC")
    # the day and the clock each whole (console.css): a narrow column breaks between them
    return (f'<time datetime="{iso_z(text)}" title="{day} {clock}"><span class="day">{day}'
            f'</span> <span class="clock">{clock}</span></time>')


def size_text(size: int | None) -> str:
    """A size in bytes as `310 B`, `12 kB`, `4.2 MB` (powers of 1000, as usage() counts);
    empty when unknown."""
    if size is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


def log_size(path: str | None) -> int | None:
    """The size of a module's log, from one lstat (never a read of its folder); None when
    there is none, or it is not a plain file (a link the module put there may point
    anywhere, and the log route would not serve it)."""
    try:
        info = os.lstat(path) if path else None
    except OSError:
        return None
    return info.st_size if info and stat.S_ISREG(info.st_mode) else None


def run_row(run: dict) -> dict:
    return {"run_id": run["run_id"], "status": run["status"], "job": run["job"],
            "map": run["map"], "modules": ", ".join(run["modules"]),
            "submitted": short_time(run["submit_time"]), "started": short_time(run["start_time"]),
            "ended": short_time(run["stop_time"]),
            "duration": duration(run["start_time"], run["stop_time"])}


def drawn_modules(catalogue: dict, asked: list, executions: dict) -> list:
    """The modules a run's graph shows: those asked for, what they need, and anything that
    ran; in catalogue order."""
    names = [n for n in asked if n in catalogue]
    if ALL in asked:
        names = list(catalogue)
    wanted = set(ancestors(catalogue, names)) | set(executions)
    return [n for n in catalogue if n in wanted] + sorted(set(executions) - set(catalogue))


def skipped_passes(catalogue: dict, run: dict, passes: dict) -> dict:
    """{module: its passed execution of an earlier run} for the modules this run found done
    and so never ran: mipper's plan (mipper.plan) replayed on what had passed before it. A
    module forced, not passed, or downstream of one that runs, runs again: not here."""
    targets = [n for n in run["modules"] if n == ALL or n in catalogue]
    if not targets:
        return {}
    targets = expand_modules(catalogue, targets)
    graph = ancestors(catalogue, targets)
    to_run = set()
    changed = True
    while changed:  # until nothing changes: the catalogue need not list requirements first
        changed = False
        for name in graph:
            if name not in to_run and (
                    name not in passes or (run["force_rerun"] and name in targets)
                    or any(r in to_run for r in catalogue[name].requires)):
                to_run.add(name)
                changed = True
    return {n: passes[n] for n in graph if n not in to_run}


def module_row(name: str, execution: dict | None, run_status: str,
               earlier: dict | None = None) -> dict:
    """A module of a run or job: its state (`not_run` when it never started in a run that
    is over, `waiting` while its run may still start it), times, exit code and message.
    `earlier`: the module's pass in an earlier run that this one skipped; the row is that
    pass, linked to its run (`earlier`)."""
    if execution is None and earlier is not None:
        return dict(module_row(name, earlier, run_status), earlier=earlier["run_id"])
    if execution is None:
        state = "not_run" if run_status in FINISHED else "waiting"
        return {"name": name, "state": state, "label": state.replace("_", " "), "started": "",
                "ended": "", "duration": "", "exit_code": None, "message": "",
                "resources": "", "ran": False, "warnings": [],
                "earlier": None, "log_size": ""}
    state = execution["status"]
    if state == Status.RUNNING and execution["message"] == gpus.WAITING:
        # not running yet: its own badge, so that a host's GPU queue reads as one
        state = WAITING_GPU
    return {"name": name, "state": state,
            "label": STATE_LABELS.get(state, state.replace("_", " ")),
            "warnings": listed(execution.get("warnings")),
            "started": short_time(execution["start_time"]),
            "ended": short_time(execution["stop_time"]),
            "duration": duration(execution["start_time"], execution["stop_time"]),
            "exit_code": execution["exit_code"],
            # the badge says it: a waiting module's message is that same wait
            "message": "" if state == WAITING_GPU else execution["message"] or "",
            "resources": usage(execution.get("resources")), "ran": True, "earlier": None,
            "log_size": size_text(log_size(execution.get("log_path")))}


def final_product(ctx, job: str, map_name: str, execution: dict | None) -> dict | None:
    """Where a job's GeoPackage lies, when its module last passed and the file is on disk
    (or in S3): the outputs zip to download, its name inside the zip, its path under
    $TA1_OUTPUTS_DIR. None when the job has none."""
    settings = ctx.cfg.settings
    module = ctx.catalogue.get(FINAL_MODULE)
    if module is None or execution is None or execution["status"] != Status.PASSED:
        return None
    path = next((p for p in module_outputs(settings, module, job, map_name)
                 if p.endswith(".gpkg")), None)
    uploaded = settings.s3_bucket and execution["upload_status"] == "uploaded"
    if path is None or not (os.path.isfile(path) or uploaded):
        return None
    folder = os.path.join(settings.outputs_dir, job, FINAL_MODULE)
    inside = os.path.relpath(path, folder)
    return {"href": f"/modules/{job}/{FINAL_MODULE}/outputs",
            "name": os.path.basename(path),
            "in_zip": f"{job}_{FINAL_MODULE}_outputs/{inside}",
            "on_server": "$TA1_OUTPUTS_DIR/" + os.path.relpath(path, settings.outputs_dir)}


def usage(recorded: str | None) -> str:
    """An execution's `resources` (ModuleStatus) in one line, `CPU 1.2 s · RSS 84 MB ·
    GPU 0 ...`; what is unknown (null, not yet measured) is left out."""
    try:
        used = json.loads(recorded or "{}")
    except ValueError:
        return ""
    if not isinstance(used, dict):
        return ""

    def figures(*wanted) -> list:
        found = []
        for key, text, scale in wanted:
            value = used.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                found.append(text.format(value / scale))
        return found

    parts = figures(("cpu_seconds", "CPU {:.1f} s", 1), ("peak_rss_bytes", "RSS {:.0f} MB", 1e6))
    if used.get("gpu_device") is not None:
        parts += [f"GPU {used['gpu_device']}"] + figures(
            ("gpu_memory_peak_bytes", "GPU memory {:.0f} MB", 1e6),
            ("gpu_util_mean", "GPU use {:.0f}%", 1),
            ("waited_for_gpu_seconds", "waited {:.1f} s", 1))
    return " · ".join(parts)


def graph(catalogue: dict, modules: list) -> dict:
    """The module graph laid out in rows by dependency level: boxes (module rows with x, y)
    and edges (SVG path data), and the drawing's size."""
    shown_names = {m["name"] for m in modules}
    level = {}
    for m in modules:  # catalogue order: every module comes after what it requires
        requires = [r for r in requires_of(catalogue, m["name"]) if r in shown_names]
        level[m["name"]] = 1 + max((level.get(r, 0) for r in requires), default=-1)
    rows = {}
    for m in modules:
        rows.setdefault(level[m["name"]], []).append(m)
    per_row = max((len(r) for r in rows.values()), default=1)
    width = per_row * BOX_W + (per_row + 1) * GAP_X
    boxes, where = [], {}
    for number in sorted(rows):
        row = rows[number]
        left = (width - len(row) * BOX_W - (len(row) - 1) * GAP_X) / 2
        for i, m in enumerate(row):
            x, y = left + i * (BOX_W + GAP_X), GAP_Y / 2 + number * (BOX_H + GAP_Y)
            where[m["name"]] = (x, y)
            boxes.append(dict(m, x=x, y=y))
    edges = []
    for m in modules:
        for r in direct_requires(catalogue, m["name"], shown_names):
            (x1, y1), (x2, y2) = where[r], where[m["name"]]
            x1, y1, x2, y2 = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2, y2 - 3
            # a curve leaves and enters vertically, so that edges into one box fan out
            middle = (y1 + y2) / 2
            edges.append(f"M {x1:g} {y1:g} C {x1:g} {middle:g}, {x2:g} {middle:g}, "
                         f"{x2:g} {y2:g}")
    height = GAP_Y + len(rows) * BOX_H + (len(rows) - 1) * GAP_Y
    return {"boxes": boxes, "edges": edges, "width": width, "height": height,
            "box_w": BOX_W, "box_h": BOX_H}


def direct_requires(catalogue: dict, name: str, shown_names: set) -> list:
    """What a module requires, less what it also needs through another of those (geopackage
    needs legend_segment through point_extract too): the drawing keeps one path each."""
    requires = [r for r in requires_of(catalogue, name) if r in shown_names]
    through = set()
    for r in requires:
        through |= set(ancestors(catalogue, requires_of(catalogue, r)))
    return [r for r in requires if r not in through]


def requires_of(catalogue: dict, name: str) -> tuple:
    module = catalogue.get(name)
    return module.requires if module else ()
