"""mip_server: the TA1 Module Integration REST server (Bottle app served by waitress).

    source env.sh
    python mip_server.py                 # serves on $MIP_HOST:$MIP_PORT (127.0.0.1:8080)
    python mip_server.py --port 0        # any free port; the first output line names it
    python mip_server.py --hash-password # prints a salted hash for MIP_USERS_FILE

Each run is a `mipper.py` subprocess in its own process group; the SQLite journal
(journal.py) holds run, job and module state; JSON is checked against schema/.

Sections: config; errors (ERRORS, the core's exceptions as statuses); plugins (install: auth,
CSRF, limits, request log, metrics, in one place); app (make_app); handlers; routes
(route_table: every route of the API and the console, one row each, which /openapi.json is
made from); main.
"""

import argparse
import functools
import getpass
import json
import logging
import logging.handlers
import os
import re
import resource
import secrets
import signal
import sys
import time

import bottle
import waitress

from mip import VERSION
from mip import errors
from mip import idempotency
from mip import journal
from mip import keystore
from mip import maps
from mip import sanitize
from mip.catalogue import load_catalogue
from mip.errors import EXIT_OK
from mip.errors import EXIT_USAGE
from mip.errors import MipError
from mip.files import kind_files
from mip.files import local_opener
from mip.files import s3_opener
from mip.files import zip_stream
from mip.journal import FINISHED
from mip.journal import Status
from mip.links import cdr
from mip.links import notices
from mip.links import retention
from mip.queue import RunQueue
from mip.queue import journal_warnings
from mip.s3 import list_objects
from mip.s3 import s3_client
from mip.s3 import s3_key_prefix
from mip.schemas import SCHEMA_NAMES
from mip.schemas import load_schemas
from mip.schemas import validate
from mip.settings import ServerSettings
from mip.status import AnswerCache
from mip.status import log_tail
from mip.status import module_status
from mip.status import notice_status
from mip.status import run_status
from mip.status import run_warnings
from mip.web import auth
from mip.web import console
from mip.web import follow
from mip.web import guards
from mip.web import metrics
from mip.web import openapi
from mip.web import proxy
from mip.web import swagger
from mip.web.apierror import ApiError
from mip.web.apierror import error_body
from mip.web.auth import hash_password
from mip.web.context import MAX_BODY
from mip.web.context import Context
from mip.web.context import checked_name
from mip.web.context import get_job
from mip.web.context import get_module
from mip.web.context import get_run
from mip.web.context import query_int
from mip.web.context import read_body
from mip.web.context import read_json
from mip.web.context import read_json_bytes
from mip.web.context import send
from mip.web.requestlog import LineWriter
from mip.web.requestlog import setup_logging

VERSION = VERSION
LOG_TAIL = 8192
CANCEL_GRACE = 30  # seconds for a cancelled run to stop its containers or tasks
QUEUE_RETRY_AFTER = 30  # seconds a client is told to wait when the queue is full
RETRY_START = 5  # seconds before queued runs that could not start are tried again
RETRY_END_MAX = 10  # longest wait between two tries at recording a run's end
CHUNK = 256 * 1024
YIELD_BYTES = 64 * 1024  # a zip goes to waitress in pieces of about this size
# Already compressed: stored as they are, since deflating them costs time and saves nothing.
STORED_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gz", ".zip", ".gpkg", ".pth",
                   ".cog", ".jp2", ".webp", ".bz2", ".xz", ".7z")
# an OpenAI key reaches a module's environment: printable ASCII, nothing that could break it
OPENAI_KEY_RE = re.compile(r"[!-~]{1,512}")

log = logging.getLogger("mip.server")

# Bodies up to our own limit stay in memory; bottle would spill larger ones to a temp file.
bottle.BaseRequest.MEMFILE_MAX = MAX_BODY + 1


# ---------------------------------------------------------------------------- config

# the server's settings are read in mip/settings.py, with every other variable; the tests
# build `mip_server.Config(settings=..., users=...)`
Config = ServerSettings


def read_config(env, host=None, port=None, no_auth=False) -> Config:
    """The server's settings, checked; raises MipError naming the variable that is wrong."""
    # MIP_PASSWORD is hashed at the first credential check, not here (auth.LaterHash)
    cfg = Config.from_env(env, auth.LaterHash, host, port, no_auth)
    notices.check_settings(cfg.notify)
    return cfg


def open_files_for(connections: int) -> str | None:
    """Raise this process's soft limit on open files to what `connections` need, as far as
    the hard limit allows (systemd's unit sets it; a login shell often gives 1024); a
    warning when the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + 256  # the journal, logs, mippers' pipes, zips being read
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < need:
        return (f"open files are limited to {soft}, too few for MIP_CONNECTION_LIMIT="
                f"{connections}: lower it, or raise the limit (LimitNOFILE= in the unit)")
    return None


# ---------------------------------------------------------------------------- errors

def refused(status: int, e: auth.Refused) -> ApiError:
    """A throttle's refusal (429, 503) with the seconds to wait in Retry-After."""
    return ApiError(status, e.code, e.message, headers={"Retry-After": str(e.retry_after)})


# The core's errors (mip/errors.py) as answers: the first class in this list that an error
# is an instance of gives its status; its `code` and message give the body.
ERRORS = [
    (errors.Invalid, 422),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Busy, 503),
    (errors.DiskFull, 507),
    (errors.Unavailable, 502),
    (errors.UsageError, 400),
]


def answer(e: errors.MipError) -> ApiError:
    """The HTTP answer for a core error; one the table does not name is a 500."""
    status = next((s for cls, s in ERRORS if isinstance(e, cls)), 500)
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return ApiError(status, e.code, e.message, headers=headers)


def core_errors(callback):
    """A route's callback whose core errors become answers through ERRORS."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except errors.MipError as e:
            raise answer(e) from None
    return wrapper


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "body_too_large",
              422: "invalid_payload", 500: "internal_error", 502: "storage_unavailable"}


def render_http_error(res: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, 405, crashes) in the one JSON shape."""
    bottle.response.content_type = "application/json"
    code = res.status_code
    if code == 404:
        message = (f"no route {bottle.request.method} {bottle.request.path}; "
                   "GET /openapi.json lists them")
    elif code == 405:
        message = (f"{bottle.request.method} is not allowed on {bottle.request.path}; "
                   f"allowed: {res.headers.get('Allow', '')}")
    elif code >= 500:
        log.error("unexpected error on %s %s", bottle.request.method, bottle.request.path,
                  exc_info=res.exception)
        message = "internal error; the server log has the details"
    else:
        message = str(res.body or res.status_line)
    return error_body(HTTP_CODES.get(code, "error"), message)


# ---------------------------------------------------------------------------- plugins

class RoutePlugin:
    """What wraps each route's callback, decided once per route when bottle applies it:
    basic auth, unless its row says auth=False (bottle's route.config) or the server runs
    with --no-auth, which answers 401 with WWW-Authenticate, or 429 while the address has
    spent its failed logins; then the route, whose core errors become answers through
    ERRORS. One wrapper for both: each plugin's wrapper was one more call a request."""

    name = "route"
    api = 2

    def __init__(self, credentials: auth.Credentials, on: bool):
        self.credentials = credentials
        self.on = on

    def apply(self, callback, route):
        if not (self.on and route.config.get("auth", True)):
            return core_errors(callback)
        check = self.credentials.check

        def wrapper(*args, **kwargs):
            env = bottle.request.environ
            try:
                ok = check(env.get("HTTP_AUTHORIZATION", ""), env.get("REMOTE_ADDR", ""))
            except auth.Refused as e:
                raise refused(429, e) from None
            if not ok:
                raise ApiError(401, "unauthorized",
                               "no or wrong credentials: use basic auth (MIP_CLIENT_USER "
                               "and MIP_CLIENT_PASSWORD for mip_client.py)",
                               headers={"WWW-Authenticate": 'Basic realm="mip"'})
            try:
                return callback(*args, **kwargs)
            except errors.MipError as e:
                raise answer(e) from None
        return wrapper


def limits(env: dict) -> None:
    """The request's edges, before any route: an undecodable or NUL path and a bad
    Content-Length are 400, a body over MAX_BODY is 413; a trailing slash is dropped."""
    raw = env.get("bottle.raw_path", "")
    if not raw.isascii():  # ASCII is UTF-8 as it stands: only other paths need decoding
        try:
            sanitize.decoded_path(raw)
        except ValueError as e:
            raise ApiError(400, "bad_path", str(e)) from None
    path = env.get("PATH_INFO", "/")
    if len(path) > 1 and path.endswith("/"):
        env["PATH_INFO"] = path = path.rstrip("/") or "/"
    if "\x00" in path:
        raise ApiError(400, "bad_path", "the path holds a NUL character")
    length = env.get("CONTENT_LENGTH") or "0"
    if not (length.isascii() and length.isdigit()):
        raise ApiError(400, "bad_request", "Content-Length is not a number")
    if int(length) > MAX_BODY:
        raise ApiError(413, "body_too_large",
                       f"the body has {length} bytes; the limit is {MAX_BODY}")


def before_routing(db: journal.Journal):
    """The one before_request hook, what a request meets before its route is looked up, in
    this order: the limits (400, 413); the journal guard, which answers 503 once the journal
    was deleted or replaced under the server (one stat a request), rather than let SQLite
    write to a file nobody reads; CSRF on POST and DELETE (403 cross_origin); a browser's
    `/` made the console's home. One hook: bottle calls a list of hooks for every request,
    and each of those checks also read the request's method through bottle's proxies."""
    check_file = db.check_file

    def before() -> None:
        env = bottle.request.environ
        limits(env)
        try:
            check_file()
        except errors.MipError as e:
            raise answer(e) from None
        if env.get("REQUEST_METHOD", "GET").upper() in guards.GUARDED:
            guards.check()
        elif env["PATH_INFO"] == "/":
            console.browser_home()
    return before


NOSNIFF = ("X-Content-Type-Options", "nosniff")


def every_request(wsgi, observe, writer: LineWriter | None):
    """The app's WSGI callable with what every request gets and leaves behind, at its status
    line: the headers every answer carries (nosniff; bottle's own errors, crashes included,
    get them too), its observation for the metrics (`observe`, RequestMetrics.observe) and,
    with a writer (main()'s), its log line (client address, method, path, status,
    milliseconds). One wrapper with one clock read at each end: a hook and two middlewares
    each had their own calls, closures and clock reads, paid by every request. Behind the
    trusted proxy, waitress has already put the client's address in REMOTE_ADDR."""
    perf_counter = time.perf_counter

    def app(environ, start_response):
        started = perf_counter()

        def start(status, headers, exc_info=None):
            seconds = perf_counter() - started
            if NOSNIFF not in headers:  # the console's static files set it themselves
                headers.append(NOSNIFF)
            code = status[:3]
            method = environ.get("REQUEST_METHOD", "")
            observe(method, environ.get("bottle.route"), code, seconds)  # route: once matched
            if writer is not None:
                writer.request(environ.get("REMOTE_ADDR", ""), method,
                               environ.get("PATH_INFO", ""), code, seconds)
            return start_response(status, headers, exc_info)

        return wsgi(environ, start)
    return app


def install(app: bottle.Bottle, ctx: Context, writer: LineWriter | None = None) -> None:
    """The plugins and middleware, all here. A request meets them from the outside in: the
    one middleware (nosniff, metrics, and the request log in main() only), the console's
    error pages (a browser's 401, 404, 500), the before_request hook (limits, the journal
    guard, CSRF, the console's browser home), then the route plugin (auth, the ERRORS
    table)."""
    # every handler answers text or bytes (send() makes the JSON): bottle's JSON plugin,
    # which would turn a returned dict into JSON, was one more wrapper around every route
    app.uninstall("json")
    app.install(RoutePlugin(ctx.credentials, ctx.cfg.auth))        # auth (401, 429), ERRORS
    app.add_hook("before_request", before_routing(ctx.db))         # limits, journal, CSRF
    # bottle has no middleware slot: Bottle.__call__ calls self.wsgi (which bottle lets be
    # set once), so every request of this app passes it, whichever server or test drives it
    wsgi = console.error_pages(app.wsgi)                           # a browser's 401/404/500
    app.wsgi = every_request(wsgi, ctx.metrics.requests.observe, writer)  # nosniff,
    # metrics, request log


# ---------------------------------------------------------------------------- app

def make_context(cfg: Config, db: journal.Journal, queue: RunQueue,
                 link: cdr.CdrLink | None = None) -> Context:
    """What the handlers share, made once per app; hooks the notices into the queue."""
    catalogue = queue.catalogue
    cache_bytes = cfg.answer_cache_mb * 2**20
    done_runs = AnswerCache(None, cache_bytes)  # runs over, their process gone: never change
    # a job's or a module's status only changes when a new run of the job starts, which a
    # poller sees at most a second late (it could not see the start any sooner anyway)
    settled = AnswerCache(1.0, cache_bytes)
    remover = retention.Remover(cfg, db, queue, (settled, done_runs))
    ctx = Context(
        cfg=cfg, db=db, queue=queue, link=link, catalogue=catalogue, schemas=load_schemas(),
        done_runs=done_runs, settled=settled,
        keys=idempotency.Keys(db, queue.keystore.derived_key("idempotency")),
        remover=remover, sweeper=retention.Sweeper(cfg.retention_settings, remover),
        credentials=auth.Credentials(cfg.users, cfg.auth_failures),
        downloads=auth.Slots(cfg.max_downloads, "too_many_downloads", "zip downloads"),
        metrics=metrics.Metrics(db, queue, cfg.settings, catalogue),
        routes=route_table(cfg))
    # a submission's notify_url is checked, and its notices recorded, by the queue's hooks:
    # the core never imports the links
    queue.checks.append(lambda payload: notices.check_payload(cfg.notify, payload))
    queue.submitted.append(
        lambda run_id, payload: notices.record(db, cfg.notify, run_id, payload))
    return ctx


def build_app(ctx: Context, writer: LineWriter | None = None) -> bottle.Bottle:
    """A Bottle app serving ctx.routes, with every plugin of install()."""
    app = bottle.Bottle()
    app.default_error_handler = render_http_error
    for row in ctx.routes:
        app.route(row.path.replace("{", "<").replace("}", ">"), row.method,
                  functools.partial(row.handler, ctx, **(row.bound or {})), auth=row.auth)
    install(app, ctx, writer)
    return app


def make_app(cfg: Config, db: journal.Journal, queue: RunQueue,
             link: cdr.CdrLink | None = None) -> bottle.Bottle:
    """The Bottle app with every route and every check (auth and CSRF included), as a
    WSGI app; main() serves the same app with the request log around it."""
    return build_app(make_context(cfg, db, queue, link))


# ---------------------------------------------------------------------------- handlers

# Each handler is called as handler(ctx, **path_args); its docstring's first line is its
# summary in /openapi.json. Core errors (NotFound, Conflict, ...) become answers by ERRORS.

def submit(ctx: Context, payload: dict, openai_key: str | None) -> str:
    """Submit a checked payload, or replay the run its Idempotency-Key made; the RunStatus."""
    key = idempotency_key()
    user = (bottle.request.auth or ("",))[0] if key else ""  # the auth plugin has checked it
    run_id, replayed = ctx.keys.submit(
        user, key, f"{bottle.request.method} {bottle.request.path}", payload, openai_key,
        lambda: ctx.queue.submit(payload, openai_key))
    if replayed:
        bottle.response.set_header("Idempotent-Replayed", "true")
    ctx.settled.drop_job(payload["job"])
    # a replayed key's run may have been deleted since: a 404 says so
    run = get_run(ctx, run_id)
    bottle.response.set_header("Location", f"/runs/{run_id}")
    return send(run_status(ctx.db, run))


def idempotency_key() -> str | None:
    """The request's Idempotency-Key, or None without one. Raises 400 when it is not 1 to
    255 printable ASCII characters (the message does not repeat it)."""
    key = bottle.request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is None:
        return None
    if not idempotency.KEY_RE.fullmatch(key):
        raise ApiError(400, "bad_idempotency_key",
                       f"{idempotency.HEADER} must be 1 to 255 printable ASCII characters "
                       "without spaces (a UUID will do)")
    return key


def want_s3() -> bool:
    """?s3= of a delete: 1 deletes the S3 copies too. Raises 400 for another value."""
    raw = bottle.request.query.get("s3", "0")
    if raw not in ("0", "1"):
        raise ApiError(400, "bad_query", "?s3= must be 0 (keep S3 copies) or 1 (delete them)")
    return raw == "1"


def need_link(ctx: Context) -> cdr.CdrLink:
    """The CDR link. Raises 404 when it is off."""
    if ctx.link is None:
        raise ApiError(404, "cdr_not_configured",
                       "the CDR link is off: set MIP_CDR_URL, MIP_CDR_TOKEN, MIP_CDR_SECRET "
                       "and MIP_CDR_CALLBACK_URL")
    return ctx.link


def health(ctx):
    """Liveness: 200 when the server answers (no auth); 503 journal_unavailable once
    its journal was deleted or replaced."""
    return send({"status": "ok"})


def info(ctx):
    """Service info: version, modules, limits, queue (a browser gets the console)."""
    cfg, db, link = ctx.cfg, ctx.db, ctx.link
    return send({"name": "mip", "version": VERSION, "modules": list(ctx.catalogue),
                 "limits": {"max_runs": cfg.max_runs, "max_queued": cfg.max_queued,
                            "workers": cfg.settings.workers,
                            "max_body_bytes": MAX_BODY,
                            "max_downloads": cfg.max_downloads},
                 "runs": {"running": len(db.run_ids(status=Status.RUNNING.value)),
                          "queued": len(db.waiting_runs())},
                 "cdr": link.status() if link else None,
                 "tls": proxy.over_tls(bottle.request.environ),
                 "free_mb": retention.free_space(cfg.settings),
                 "openapi": "/openapi.json"})


def openapi_json(ctx):
    """This API as an OpenAPI 3 document."""
    return send(openapi.document(ctx.routes, {n: d for n, (d, _) in ctx.schemas.items()},
                                 VERSION, list(ctx.catalogue)))


def schema(ctx, name):
    """One JSON Schema of schema/ (RunPayload, RunStatus, ...). Raises 404 if unknown."""
    name = name.removesuffix(".json")
    if name not in ctx.schemas:
        raise ApiError(404, "unknown_schema",
                       f"no schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    return send(ctx.schemas[name][0])


def post_run(ctx):
    """Submit a run; answers at once with its RunStatus. 404 unknown map, 409 job bound
    to another map, 422 invalid payload, a map GDAL cannot read (unreadable_map) or
    GPU modules on a host without a GPU under MIP_REQUIRE_GPU=1 (gpu_required)."""
    payload = read_json()
    validate(ctx.schemas, "RunPayload", payload)
    key = payload.pop("openai_key", None)
    payload.setdefault("force_rerun", False)
    return submit(ctx, payload, key)


def list_runs(ctx):
    """Run ids, oldest first; ?job= ?status= ?limit= ?offset=."""
    job = bottle.request.query.get("job")
    status = bottle.request.query.get("status")
    if job is not None:
        checked_name("job", job)
    if status is not None and status not in {s.value for s in Status}:
        raise ApiError(400, "bad_query",
                       f"?status= must be one of {', '.join(s.value for s in Status)}")
    bottle.response.content_type = "application/json"
    return ctx.db.run_ids_json(job, status, query_int("limit", None, 10**9),
                               query_int("offset", 0, 10**12))


def get_run_status(ctx, run_id):
    """A run's RunStatus. Raises 404 if unknown."""
    bottle.response.content_type = "application/json"
    body = ctx.done_runs.get(("run", run_id))
    if body is None:
        run = get_run(ctx, run_id)
        status = run_status(ctx.db, run)
        # bytes: waitress is handed the cached answer with no encoding per request
        body = json.dumps(status).encode()
        if (run["status"] in FINISHED and run_id not in ctx.queue.running
                and all(s in FINISHED for s in status["module_status"].values())):
            ctx.done_runs.put(("run", run_id), body)
    return body


def cancel_run(ctx, run_id):
    """Stop a run and every module it runs; a no-op on a finished run."""
    run = get_run(ctx, run_id)
    ctx.queue.cancel(run["run_id"])
    ctx.settled.drop_job(run["job"])
    return send(run_status(ctx.db, ctx.db.run(run["run_id"])))


def rerun(ctx, run_id):
    """Submit a new run with the same payload: what failed or was cancelled runs again,
    what passed is skipped. Optional body: {"openai_key": ...}."""
    run = get_run(ctx, run_id)
    body = read_json(optional=True)
    body = {} if body is None else body
    if not isinstance(body, dict) or set(body) - {"openai_key"}:
        raise ApiError(422, "invalid_payload", 'body: optional, {"openai_key": "<key>"} only')
    # the key obeys RunPayload's rule here too (a 100 KB key was taken)
    validate(ctx.schemas, "RunPayload", dict(run["payload"], **body))
    return submit(ctx, dict(run["payload"], force_rerun=False), body.get("openai_key"))


def run_notices(ctx, run_id):
    """The run's completion notices: where each goes, its state, tries and last error.
    Raises 404 if the run is unknown."""
    run = get_run(ctx, run_id)
    bottle.response.set_header("Cache-Control", "no-store")
    return send(notices.deliveries(ctx.db, run["run_id"]))


def delete_run(ctx, run_id):
    """Remove a finished run's record and log. Raises 404 if unknown, 409 while a run
    of its job is queued or running, or if the run holds its job's state (its latest
    run, or a module's latest execution): DELETE the job or the module instead."""
    return send(ctx.remover.delete_run(get_run(ctx, run_id)))


def list_jobs(ctx):
    """Job names; ?limit= ?offset=."""
    offset = query_int("offset", 0, 10**12)
    bottle.response.content_type = "application/json"
    return ctx.db.jobs_json(query_int("limit", None, 10**9), offset)


def job_status(ctx, job):
    """A job's JobStatus (that of its latest run). Raises 404 if unknown."""
    bottle.response.content_type = "application/json"
    body = ctx.settled.get(("job", job))
    if body is not None:
        return body
    db = ctx.db
    run = db.latest_run(checked_name("job", job))
    if run is None:
        get_job(ctx, job)  # raises the 404
        # the job was being deleted: its record outlived its runs for a moment
        raise ApiError(404, "unknown_job", f"no job {job!r}; GET /jobs lists them")
    finished = run["status"] in FINISHED
    status = {
        "status": run["status"], "job": job, "modules": run["modules"],
        "start_time": run["start_time"], "stop_time": run["stop_time"],
        "log": log_tail(run["log_path"]) if finished else None,
        "force_rerun": run["force_rerun"], "map": run["map"], "run_id": run["run_id"],
        "module_status": db.job_module_status(job),
        "warnings": run_warnings(run, db.executions(run["run_id"])),
        "cdr": {kind: {k: row[k] for k in ("status", "result_id", "cdr_job_id", "message",
                                           "time")}
                for kind, row in db.publications(job).items()} or None,
    }
    body = json.dumps(status).encode()
    if (finished and run["run_id"] not in ctx.queue.running
            and all(s in FINISHED for s in status["module_status"].values())
            and all(p["status"] != "pending" for p in (status["cdr"] or {}).values())):
        ctx.settled.put(("job", job), body)
    return body


def delete_job(ctx, job):
    """Remove a whole job: its outputs, temps, runs' records and logs. ?s3=1 deletes
    its S3 copies too. Raises 404 if unknown, 409 while a run of it is queued or
    running, 502 if S3 cannot be reached."""
    s3 = want_s3()
    return send(ctx.remover.delete_job(get_job(ctx, job), s3))


def delete_module(ctx, job, module):
    """Remove a module's outputs, temps and log; it reads not_started and runs again
    next time. ?s3=1 deletes its S3 copies too. Raises 404 if it has not run in the
    job, 409 while a run of the job is queued or running, 502 if S3 cannot be reached."""
    s3 = want_s3()
    execution = get_module(ctx, job, module)
    return send(ctx.remover.delete_module(execution["job"], execution["module"], s3))


def publish_job(ctx, job):
    """Publish a passed job's results to the CDR again (in the background); its JobStatus.
    Raises 404 if unknown, 409 if its latest run has not passed."""
    link = need_link(ctx)
    get_job(ctx, job)
    if ctx.db.latest_run(job)["status"] != Status.PASSED:
        raise ApiError(409, "job_not_passed", f"job {job!r} has not passed; nothing to publish")
    link.queue_publish(job)
    ctx.settled.drop_job(job)
    return job_status(ctx, job)


def list_modules(ctx):
    """The catalogue: ModuleDescription of every module."""
    return send([{"module_name": m.name, "version": m.version, "requires": list(m.requires)}
                 for m in ctx.catalogue.values()])


def job_modules(ctx, job):
    """Names of the modules run in a job. Raises 404 if the job is unknown."""
    return send(ctx.db.job_modules(get_job(ctx, job)))


def get_module_status(ctx, job, module):
    """The latest execution of a module in a job. Raises 404 if none."""
    bottle.response.content_type = "application/json"
    body = ctx.settled.get(("module", job, module))
    if body is not None:
        return body
    execution = get_module(ctx, job, module)
    body = json.dumps(module_status(execution)).encode()
    uploading = (ctx.cfg.settings.s3_bucket and execution["status"] == Status.PASSED
                 and execution["upload_status"] is None)
    if execution["status"] in FINISHED and not uploading:
        ctx.settled.put(("module", job, module), body)
    return body


def s3_entries(ctx, job, module, kind, prefix):
    """(archive name, opener) of the module's objects of that kind in S3.
    Raises 502 when the store cannot be listed."""
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    settings = ctx.cfg.settings
    folder = f"{s3_key_prefix(settings, job, module)}/{kind}/"
    try:
        if "client" not in ctx.s3:
            ctx.s3["client"] = s3_client()
        client = ctx.s3["client"]
        return [(f"{prefix}/{obj['Key'][len(folder):]}",
                 s3_opener(client, settings.s3_bucket, obj))
                for obj in list_objects(client, settings.s3_bucket, folder)]
    except (BotoCoreError, ClientError) as e:
        log.warning("S3 listing of %s failed: %s", folder, e)
        raise ApiError(502, "storage_unavailable",
                       f"the local copy is gone and S3 could not be read: {e}") from None


def download(ctx, job, module, kind):
    """A zip of the module's logs, outputs or temps, streamed as it is written; from S3
    when the local copy has been cleaned away."""
    settings = ctx.cfg.settings
    execution = get_module(ctx, job, module)
    prefix = f"{job}_{module}_{kind}"
    files = kind_files(settings, job, module, kind)
    entries = []
    if files is not None:
        # lazily: the first bytes go out before a big folder is fully listed
        entries = ((f"{prefix}/{name}", local_opener(f)) for name, f in files)
    elif settings.s3_bucket and execution["upload_status"] == "uploaded":
        entries = s3_entries(ctx, job, module, kind, prefix)
    # an empty temps folder is a fine answer; no folder at all is not
    if files is None and not entries:
        raise ApiError(404, f"no_{kind}", f"module {module!r} of job {job!r} has no {kind} "
                                          "(not produced, or cleaned away)")
    try:
        body = ctx.downloads.hold(zip_stream(entries))
    except auth.Refused as e:
        raise refused(503, e) from None
    bottle.response.content_type = "application/zip"
    bottle.response.set_header("Content-Disposition", f'attachment; filename="{prefix}.zip"')
    return body


def map_names(ctx):
    """Names of the maps on the server."""
    return send(maps.list_maps(ctx.cfg.settings))


def cdr_webhook(ctx):
    """The CDR's webhook: signed with x-cdr-signature-256 instead of basic auth.
    Raises 403 for a missing or wrong signature, 404 when the CDR link is off, 503
    (with Retry-After) when MIP_CDR_INBOX_MAX events already wait."""
    link = need_link(ctx)
    raw = read_body()
    if not cdr.verify(ctx.cfg.cdr_settings.secret, raw,
                      bottle.request.get_header("x-cdr-signature-256")):
        raise ApiError(403, "bad_signature",
                       "missing or wrong x-cdr-signature-256 (HMAC-SHA256 of the body)")
    try:
        link.deliver(read_json_bytes(raw))
    except cdr.BadEvent as e:
        raise ApiError(422, "bad_event", str(e)) from None
    return send({"ok": "success"})


def cdr_cog(ctx, cog_id):
    """Process a CDR cog by hand: its URL is looked up in the CDR, then as a delivery.
    Raises 404 for a cog the CDR does not know, 502 when the CDR cannot be asked, 503
    when the CDR inbox is full."""
    link = need_link(ctx)
    checked_name("cog", cog_id)
    try:
        url = link.client.cog_url(cog_id)
    except cdr.CdrError as e:
        if e.status == 404:
            raise ApiError(404, "unknown_cog", f"the CDR has no cog {cog_id!r}") from None
        raise ApiError(502, "cdr_unavailable", f"the CDR could not be asked: {e}") from None
    event_id = f"manual-{secrets.token_hex(8)}"
    try:
        status = link.take(event_id, cog_id, url, again=True)
    except cdr.BadEvent as e:
        raise ApiError(422, "bad_cog", str(e)) from None
    return send({"cog_id": cog_id, "event_id": event_id, "status": status})


def cdr_events(ctx):
    """CDR events received, newest first; ?limit= (default 100)."""
    need_link(ctx)
    return send(ctx.db.events_page(query_int("limit", 100, 10000)))


# ---------------------------------------------------------------------------- routes

INFO = ({"type": "object", "required": ["tls"], "properties": {
    "tls": {"type": "boolean", "description": "this request came over HTTPS (at the proxy "
            "named by MIP_TRUSTED_PROXY, if any)"}}}, "text/html")
STRINGS = {"type": "array", "items": {"type": "string"}}
PAGING = {"limit": openapi.whole(10**9), "offset": openapi.whole(10**12)}
S3_QUERY = {"s3": {"type": "integer", "enum": [0, 1]}}
KINDS = ("logs", "outputs", "temps")


def route(method: str, path: str, handler, summary: str | None = None,
          **fields) -> openapi.Route:
    """One row of the route table; its summary is the handler's docstring's first line.
    `errors`: the statuses it can answer beyond those openapi.statuses() adds to every
    route (400, 405, 413; 401 and 429 with auth; 404 with a path parameter; 403 on POST
    and DELETE). `headers`: the request headers it reads (name -> OpenAPI parameter
    fields); `answer_headers`: those of its 200 answer; `bound`: fixed handler arguments."""
    return openapi.Route(method, path, summary or openapi.first_sentence(handler.__doc__),
                         handler=handler, **fields)


def route_table(cfg: Config) -> list:
    """Every route of the server, API and console, one row each; GET /openapi.json is made
    from these rows, and build_app registers them."""
    return [
        # the service
        route("GET", "/health", health, auth=False, answer={"type": "object"}),
        route("GET", "/", info, answer=INFO),
        route("GET", "/openapi.json", openapi_json, answer={"type": "object"}),
        route("GET", "/schema/{name}", schema, answer={"type": "object"}),
        route("GET", "/metrics", metrics.get_metrics, answer="text/plain",
              auth=not cfg.metrics_open),
        # runs
        route("POST", "/runs", post_run, body="RunPayload", answer="RunStatus",
              errors=(404, 409, 422, 503, 507), headers=idempotency.HEADERS),
        route("GET", "/runs", list_runs, answer=STRINGS,
              query={"job": openapi.NAME, "status": {"enum": [s.value for s in Status]},
                     **PAGING}),
        route("GET", "/runs/{run_id}", get_run_status, answer="RunStatus"),
        route("DELETE", "/runs/{run_id}", delete_run, answer=retention.REMOVED, errors=(409,)),
        route("POST", "/runs/{run_id}/cancel", cancel_run, answer="RunStatus"),
        route("POST", "/runs/{run_id}/rerun", rerun, body=openapi.RERUN_BODY,
              answer="RunStatus", errors=(409, 422, 503, 507), headers=idempotency.HEADERS),
        route("GET", "/runs/{run_id}/log", follow.run_log, answer="text/plain",
              query=follow.OFFSET_QUERY, answer_headers=follow.OFFSET_HEADER),
        route("GET", "/runs/{run_id}/notices", run_notices,
              answer={"type": "array", "items": notices.NOTICE}),
        # jobs
        route("GET", "/jobs", list_jobs, answer=STRINGS, query=PAGING),
        route("GET", "/jobs/{job}", job_status, answer="JobStatus"),
        route("DELETE", "/jobs/{job}", delete_job, answer=retention.REMOVED,
              errors=(409, 502), query=S3_QUERY),
        route("DELETE", "/jobs/{job}/{module}", delete_module, answer=retention.REMOVED,
              errors=(409, 502), query=S3_QUERY),
        route("POST", "/jobs/{job}/publish", publish_job, answer="JobStatus", errors=(409,)),
        # modules
        route("GET", "/modules", list_modules,
              answer={"type": "array", "items": "ModuleDescription"}),
        route("GET", "/modules/{job}", job_modules, answer=STRINGS),
        route("GET", "/modules/{job}/{module}", get_module_status, answer="ModuleStatus"),
        route("GET", "/modules/{job}/{module}/log", follow.module_log, answer="text/plain",
              query=follow.OFFSET_QUERY, answer_headers=follow.OFFSET_HEADER),
        *(route("GET", f"{prefix}/{{job}}/{{module}}/{kind}", download, bound={"kind": kind},
                answer="application/zip", errors=(502, 503),
                summary=f"A zip of the module's {kind}, streamed. Raises 404 if none, "
                        "503 when MIP_MAX_DOWNLOADS zips are being sent.")
          for prefix in ("/modules", "/jobs") for kind in KINDS),
        # maps
        route("GET", "/maps", map_names, answer=STRINGS),
        # the CDR
        route("POST", "/cdr", cdr_webhook, auth=False, body={"type": "object"},
              answer={"type": "object"}, errors=(403, 404, 422, 503)),
        route("POST", "/cdr/cogs/{cog_id}", cdr_cog, answer={"type": "object"},
              errors=(422, 502, 503)),
        route("GET", "/cdr/events", cdr_events, answer={"type": "array",
                                                        "items": {"type": "object"}},
              errors=(404,), query={"limit": openapi.whole(10000)}),
        # the console (mip/web/console.py)
        *(route("GET", path, console.runs_page, answer="text/html", query=console.RUNS_QUERY)
          for path in ("/ui", "/ui/runs")),
        route("GET", "/ui/runs/{run_id}", console.run_page, answer="text/html"),
        route("GET", "/ui/jobs", console.jobs_page, answer="text/html",
              query={"page": console.PAGE}),
        route("GET", "/ui/jobs/{job}", console.job_page, answer="text/html"),
        route("GET", "/ui/maps", console.maps_page, answer="text/html",
              query={"page": console.PAGE}),
        route("GET", "/ui/modules", console.modules_page, answer="text/html"),
        route("GET", "/ui/modules/{job}/{module}/log", console.module_log_page,
              answer="text/html"),
        route("GET", "/ui/new", console.new_page, answer="text/html", query=console.NEW_QUERY,
              errors=(404,)),
        *(route("GET", f"/ui/{name}", console.static, bound={"name": name, "media": media},
                answer=media.split(";")[0], auth=False,
                summary=f"Console: its {name} (no auth: public code)")
          for name, media in console.STATIC_FILES.items()),
        # Swagger UI (mip/web/swagger.py)
        route("GET", "/docs", swagger.docs, answer="text/html"),
        route("GET", "/docs/static/{file}", swagger.docs_static, answer=swagger.STATIC_TYPES),
    ]


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mip_server.py", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="address to bind (default $MIP_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default $MIP_PORT or 8080; 0: any free)")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve WITHOUT authentication (only on a trusted host)")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password and print its hash for MIP_USERS_FILE")
    parser.add_argument("--version", action="version", version=f"mip_server {VERSION}")
    args = parser.parse_args(argv)
    if args.hash_password:
        password = (getpass.getpass("password: ") if sys.stdin.isatty()
                    else sys.stdin.readline().rstrip("\n"))
        if not password:
            print("mip_server: error: empty password", file=sys.stderr)
            return EXIT_USAGE
        print(hash_password(password))
        return EXIT_OK
    try:
        cfg = read_config(os.environ, args.host, args.port, args.no_auth)
        cfg.settings.make_dirs()
        load_catalogue(cfg.settings.config_path)
    except MipError as e:
        print(f"mip_server: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    db = journal.Journal(cfg.settings.journal_path, write_for=cfg.journal_write_seconds)
    try:
        db.migrate()
    except journal.JournalError as e:
        print(f"mip_server: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    key_file_found = os.path.exists(cfg.settings.key_file)
    try:
        queue = RunQueue(cfg, db)
    except keystore.KeyStoreError as e:
        print(f"mip_server: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    found = journal_warnings(cfg.settings, db, key_file_found)
    link = None
    if cfg.cdr_settings:
        link = cdr.CdrLink(cfg.cdr_settings, cfg.settings, db, queue.submit)
        queue.finished.append(link.run_finished)
    notifier = notices.Notifier(cfg.notify, db, lambda run_id: notice_status(db, run_id),
                                queue.running)
    queue.finished.append(notifier.run_ended)
    ctx = make_context(cfg, db, queue, link)
    # lines are only queued until the port line below, which must come first, is printed
    writer = setup_logging()
    files_warning = open_files_for(cfg.connection_limit)
    app = build_app(ctx, writer)
    try:
        server = waitress.create_server(
            app, host=cfg.host, port=cfg.port, threads=cfg.threads,
            expose_tracebacks=False, ident="mip",
            # bodies over MAX_BODY get our JSON 413; far larger ones are refused by waitress
            # itself (plain text) before it buffers them
            max_request_body_size=16 * MAX_BODY,
            # keep streamed zips in memory (bounded by the high watermark), never in temp files
            outbuf_high_watermark=8 * 1024 * 1024, outbuf_overflow=64 * 1024 * 1024,
            # a flood of idle or slow connections must not fill every slot; poll(), since
            # select() cannot watch a descriptor at or above 1024
            connection_limit=cfg.connection_limit, channel_timeout=cfg.channel_timeout,
            cleanup_interval=cfg.cleanup_interval, asyncore_use_poll=True,
            **proxy.waitress_settings(cfg.trusted_proxy))
    except OSError as e:
        print(f"mip_server: error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror} "
              "(set MIP_PORT or --port)", file=sys.stderr)
        writer.stop()
        return EXIT_USAGE
    print(f"mip: serving on http://{cfg.host}:{server.effective_port}", flush=True)
    for warning in [*proxy.start_warnings(cfg.host, cfg.trusted_proxy), *found]:
        log.warning("%s", warning)
    if files_warning:
        log.warning("%s", files_warning)
    if not cfg.settings.gpu_settings.devices and any(m.gpu for m in queue.catalogue.values()):
        log.warning("this host has no GPU (MIP_GPUS=none, or none found): the catalogue's GPU "
                    "modules run without one")
    if cfg.trusted_proxy:
        log.info("behind a TLS proxy: X-Forwarded-For, -Proto and -Host believed from %s only",
                 cfg.trusted_proxy)
    if not cfg.auth:
        log.warning("!!! AUTHENTICATION IS OFF (--no-auth): anyone who reaches this port can "
                    "run modules and read results !!!")
    elif cfg.password_file:
        log.info("basic auth: user %r, password in %s", next(iter(cfg.users)), cfg.password_file)
    else:
        log.info("basic auth: %d user(s)", len(cfg.users))
    queue.recover()
    notifier.start()
    if link:
        link.start()
    sweeper = ctx.sweeper
    sweeper.start()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        queue.stop()
        notifier.stop()
        sweeper.stop()
        if link:
            link.stop()
        server.close()
        log.info("stopped; running runs go on and are adopted at the next start")
        writer.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
