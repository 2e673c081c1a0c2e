"""console: the browser's pages under /ui: runs, a run with its module graph and live log,
jobs, maps and the module catalogue.

View functions of mip_server.py's route table, whose rows for /ui name them. Pages are
rendered by the server with bottle's SimpleTemplate (templates/, which escapes every
{{value}}); static/ holds the one script and style sheet, served from here (nothing from
the internet, no build step). The
script polls the JSON API and, when an answer changes, swaps in the page's fresh regions; it
never writes except through the API's own POST routes (cancel, rerun), which guards.py
guards. A browser asking for `/` (Accept: text/html) gets the console's home; API clients
keep their JSON. Pages never show a secret: a payload is shown without its keys and tokens.
"""

import json
import math
import os
import re
from datetime import datetime

import bottle

from mip.catalogue import ALL
from mip.catalogue import ancestors
from mip.catalogue import check_name
from mip.errors import UsageError
from mip.journal import FINISHED
from mip.journal import Status
from mip.maps import listed_maps
from mip.maps import map_file
from mip.web import openapi
from mip.web.apierror import ApiError
from mip.web.context import get_job
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
# the query of the runs page (/ui, /ui/runs)
RUNS_QUERY = {"status": {"enum": ["", *(s.value for s in Status)]}, "job": OPTIONAL_NAME,
              "page": PAGE}
SECRET_KEY = re.compile(r"key|secret|token|password|credential", re.I)
# the graph: one row per dependency level, at most this many boxes a row
BOX_W, BOX_H, GAP_X, GAP_Y = 186, 78, 14, 40


# ---------------------------------------------------------------------------- pages

def runs_page(ctx):
    """Console: the runs, newest first, filtered by ?status= and ?job=, paged by ?page="""
    db = ctx.db
    status = query_status()
    job = query_job()
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
    modules = [module_row(name, executions.get(name), run["status"]) for name in names]
    finished = run["status"] in FINISHED
    # an ended run changes no more: its open page stops polling
    watch = [] if finished else [f"/runs/{run['run_id']}"]
    return render(ctx, "run", f"Run {run['run_id']}", watch,
                  run=run_row(run), finished=finished, modules=modules,
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
    statuses = db.job_module_status(job)
    modules = [module_row(name, db.latest_execution(job, name), latest["status"])
               for name in statuses]
    runs = [run_row(r) for r in db.runs_page(job, None, 10, 0)]
    return render(ctx, "job", f"Job {job}", [f"/jobs/{job}"], job=job, map=db.job_map(job),
                  modules=modules, runs=runs, total=db.count_runs(job))


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


def query_job() -> str | None:
    """?job=, None when absent or empty. Raises 400 for one that is not a name."""
    job = bottle.request.query.get("job") or None
    if job is not None:
        try:
            check_name("job", job)
        except UsageError as e:
            raise ApiError(400, "bad_query", f"?job=: {e}") from None
    return job


def paging(total: int, page: int) -> tuple:
    """(number of pages, the asked page number kept within them)."""
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return pages, min(max(page, 1), pages)


def render(ctx, name: str, title: str, watch: list, **values) -> str:
    """A page in the base layout, with the headers every page carries; its script polls
    `watch` every MIP_CONSOLE_POLL_MS."""
    response = bottle.response
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Content-Security-Policy", CSP)
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Referrer-Policy", "same-origin")
    response.set_header("Cache-Control", "no-store")
    return bottle.template(name, template_lookup=LOOKUP, title=title,
                           watch=" ".join(watch), poll_ms=ctx.cfg.console_poll_ms, **values)


def static(ctx, name: str, media: str) -> bytes:
    """Console: one of its static files (no auth: public code)."""
    with open(os.path.join(STATIC, name), "rb") as f:
        body = f.read()
    bottle.response.content_type = media
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    bottle.response.set_header("Cache-Control", "max-age=60")
    return body


# ---------------------------------------------------------------------------- views

def shown(value):
    """A payload as the console shows it: no key, secret, token or password, and a URL by
    its origin only (a webhook's token may ride in its credentials, its query or its path,
    as Slack's and Discord's do)."""
    if isinstance(value, dict):
        return {k: ("(hidden)" if SECRET_KEY.search(str(k)) else shown(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [shown(v) for v in value]
    if isinstance(value, str) and re.match(r"(?i)https?://", value):
        scheme, _, rest = value.partition("://")
        authority, path = re.match(r"([^/?#]*)(.*)", rest, re.S).groups()
        if "@" in authority:
            authority = "(hidden)@" + authority.rpartition("@")[2]
        return f"{scheme}://{authority}" + ("/(hidden)" if path.strip("/") else "")
    return value


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


def module_row(name: str, execution: dict | None, run_status: str) -> dict:
    """A module of a run or job: its state (`not_run` when it never started in a run that
    is over, `waiting` while its run may still start it), times, exit code and message."""
    if execution is None:
        state = "not_run" if run_status in FINISHED else "waiting"
        return {"name": name, "state": state, "started": "", "ended": "", "duration": "",
                "exit_code": None, "message": "", "resources": "", "ran": False}
    return {"name": name, "state": execution["status"],
            "started": short_time(execution["start_time"]),
            "ended": short_time(execution["stop_time"]),
            "duration": duration(execution["start_time"], execution["stop_time"]),
            "exit_code": execution["exit_code"], "message": execution["message"] or "",
            "resources": usage(execution.get("resources")), "ran": True}


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
