"""mip_server: the TA1 Module Integration REST server (Bottle app served by waitress).

    source env.sh
    python mip_server.py                 # serves on $MIP_HOST:$MIP_PORT (127.0.0.1:8080)
    python mip_server.py --port 0        # any free port; the first output line names it
    python mip_server.py --hash-password # prints a salted hash for MIP_USERS_FILE

Each run is a `mipper.py` subprocess in its own process group; the SQLite journal
(journal.py) holds run, job and module state; JSON is checked against schema/.
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
from dataclasses import dataclass

import bottle
import waitress

from mip import VERSION
from mip import errors
from mip import idempotency
from mip import journal
from mip import keystore
from mip import maps
from mip import sanitize
from mip.catalogue import check_name
from mip.catalogue import load_catalogue
from mip.errors import EXIT_OK
from mip.errors import EXIT_USAGE
from mip.errors import MipError
from mip.errors import UsageError
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
from mip.web import auth
from mip.web import console
from mip.web import follow
from mip.web import metrics
from mip.web import openapi
from mip.web import proxy
from mip.web import swagger
from mip.web.apierror import ApiError
from mip.web.apierror import error_body
from mip.web.auth import hash_password
from mip.web.requestlog import RequestLog
from mip.web.requestlog import setup_logging

VERSION = VERSION
MAX_BODY = 1024 * 1024
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
    cfg = Config.from_env(env, hash_password, host, port, no_auth)
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


# ---------------------------------------------------------------------------- validation

def checked_name(kind: str, value: str) -> str:
    """Refuse a path parameter that is not a plain name, before anything touches the disk."""
    try:
        return check_name(kind, value)
    except UsageError as e:
        raise ApiError(400, f"bad_{kind}_name", str(e)) from None


# ---------------------------------------------------------------------------- run queue

# ---------------------------------------------------------------------------- app

def make_app(cfg: Config, db: journal.Journal, queue: RunQueue,
             link: cdr.CdrLink | None = None) -> bottle.Bottle:
    """The Bottle app with every route, the auth plugin and the JSON error shape."""
    app = bottle.Bottle()
    app.default_error_handler = render_http_error
    routes = []  # openapi.Route rows, which GET /openapi.json is built from
    catalogue = queue.catalogue
    schemas = load_schemas()
    settings = cfg.settings
    cache_bytes = cfg.answer_cache_mb * 2**20
    done_runs = AnswerCache(None, cache_bytes)  # runs over, their process gone: never change
    # a job's or a module's status only changes when a new run of the job starts, which a
    # poller sees at most a second late (it could not see the start any sooner anyway)
    settled = AnswerCache(1.0, cache_bytes)
    credentials = auth.Credentials(cfg.users, cfg.auth_failures)
    downloads = auth.Slots(cfg.max_downloads, "too_many_downloads", "zip downloads")

    @app.hook("before_request")
    def edges():
        env = bottle.request.environ
        try:
            sanitize.decoded_path(env.get("bottle.raw_path", ""))
        except ValueError as e:
            raise ApiError(400, "bad_path", str(e)) from None
        path = env.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/"):
            env["PATH_INFO"] = path.rstrip("/") or "/"
        if "\x00" in env["PATH_INFO"]:
            raise ApiError(400, "bad_path", "the path holds a NUL character")
        length = env.get("CONTENT_LENGTH") or "0"
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise ApiError(413, "body_too_large",
                           f"the body has {length} bytes; the limit is {MAX_BODY}")
        try:
            # a journal deleted or replaced under the server: every answer says so
            db.check_file()
        except errors.MipError as e:
            raise answer(e) from None

    def auth_plugin(callback):
        def wrapper(*args, **kwargs):
            if cfg.auth:
                env = bottle.request.environ
                try:
                    ok = credentials.check(env.get("HTTP_AUTHORIZATION", ""),
                                           env.get("REMOTE_ADDR", ""))
                except auth.Refused as e:
                    raise refused(429, e) from None
                if not ok:
                    raise ApiError(401, "unauthorized",
                                   "no or wrong credentials: use basic auth (MIP_CLIENT_USER "
                                   "and MIP_CLIENT_PASSWORD for mip_client.py)",
                                   headers={"WWW-Authenticate": 'Basic realm="mip"'})
            return callback(*args, **kwargs)
        return wrapper

    def route(method, path, summary="", body=None, answer=None, auth=True, errors=(),
              query=None, headers=None, answer_headers=None):
        """Register a route, and its row of the table the OpenAPI document is built from.
        `errors`: the statuses it can answer beyond those openapi.statuses() adds to every
        route (400, 405, 413; 401 and 429 with auth; 404 with a path parameter).
        `headers`: the request headers it reads (name -> OpenAPI parameter fields);
        `answer_headers`: those of its 200 answer (name -> OpenAPI header object)."""
        def register(fn):
            routes.append(openapi.Route(method, path, summary or fn.__doc__.split("\n")[0],
                                        body, answer, auth, errors, query, headers,
                                        answer_headers))
            app.route(path.replace("{", "<").replace("}", ">"), method, fn,
                      apply=[core_errors, auth_plugin] if auth else [core_errors])
            return fn
        return register

    def send(data, status=200):
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(data)

    def read_body() -> bytes:
        """The raw body; raises 413 past MAX_BODY (for a body sent without a length)."""
        raw = bottle.request.body.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"the body is over the {MAX_BODY} byte limit")
        return raw

    def read_json(optional: bool = False):
        """The body as JSON, whatever the Content-Type says (None for an optional empty
        one). Raises 400 for an empty or malformed body."""
        raw = read_body()
        if not raw.strip():
            if optional:
                return None
            raise ApiError(400, "empty_body", "the body is empty; send a JSON object")
        return read_json_bytes(raw)

    def query_int(name, default, high):
        raw = bottle.request.query.get(name)
        if raw is None:
            return default
        # isascii: isdigit() is also true of "²", which int() refuses
        if not (raw.isascii() and raw.isdigit()) or int(raw) > high:
            raise ApiError(400, "bad_query", f"?{name}= must be a whole number from 0 to {high}")
        return int(raw)

    def get_run(run_id):
        run = db.run(checked_name("run", run_id))
        if run is None:
            raise ApiError(404, "unknown_run", f"no run {run_id!r}; GET /runs lists them")
        return run

    def get_job(job):
        checked_name("job", job)
        if db.job_map(job) is None:
            raise ApiError(404, "unknown_job", f"no job {job!r}; GET /jobs lists them")
        return job

    def get_module(job, module):
        checked_name("module", module)
        execution = db.latest_execution(checked_name("job", job), module)
        if execution is not None:
            return execution
        get_job(job)
        if module not in catalogue:
            raise ApiError(404, "unknown_module",
                           f"no module {module!r}; GET /modules lists them")
        raise ApiError(404, "module_not_run", f"module {module!r} has not run in job {job!r}")

    keys = idempotency.Keys(db, queue.keystore.derived_key("idempotency"))

    def submit(payload, key):
        run_id = keys.submit(payload, key, lambda: queue.submit(payload, key))
        settled.drop_job(payload["job"])
        # a replayed key's run may have been deleted since: a 404 says so
        run = get_run(run_id)
        bottle.response.set_header("Location", f"/runs/{run_id}")
        return send(run_status(db, run))

    # ------------------------------------------------------------------ routes

    @route("GET", "/health", auth=False, answer={"type": "object"})
    def health():
        """Liveness: 200 when the server answers (no auth); 503 journal_unavailable once
        its journal was deleted or replaced."""
        return send({"status": "ok"})

    @route("GET", "/", answer=({"type": "object", "required": ["tls"], "properties": {
        "tls": {"type": "boolean", "description": "this request came over HTTPS (at the "
                "proxy named by MIP_TRUSTED_PROXY, if any)"}}}, "text/html"))
    def info():
        """Service info: version, modules, limits, queue (a browser gets the console)."""
        return send({"name": "mip", "version": VERSION, "modules": list(catalogue),
                     "limits": {"max_runs": cfg.max_runs, "max_queued": cfg.max_queued,
                                "workers": settings.workers,
                                "max_body_bytes": MAX_BODY,
                                "max_downloads": cfg.max_downloads},
                     "runs": {"running": len(db.run_ids(status=Status.RUNNING.value)),
                              "queued": len(db.waiting_runs())},
                     "cdr": link.status() if link else None,
                     "tls": proxy.over_tls(bottle.request.environ),
                     "free_mb": retention.free_space(settings),
                     "openapi": "/openapi.json"})

    @route("GET", "/openapi.json", answer={"type": "object"})
    def openapi_json():
        """This API as an OpenAPI 3 document."""
        return send(openapi.document(routes, {n: d for n, (d, _) in schemas.items()},
                                     VERSION, list(catalogue)))

    @route("GET", "/schema/{name}", answer={"type": "object"})
    def schema(name):
        """One JSON Schema of schema/ (RunPayload, RunStatus, ...). Raises 404 if unknown."""
        name = name.removesuffix(".json")
        if name not in schemas:
            raise ApiError(404, "unknown_schema",
                           f"no schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
        return send(schemas[name][0])

    @route("POST", "/runs", body="RunPayload", answer="RunStatus",
           errors=(404, 409, 422, 503, 507), headers=idempotency.HEADERS)
    def post_run():
        """Submit a run; answers at once with its RunStatus. 404 unknown map, 409 job bound
        to another map, 422 invalid payload, a map GDAL cannot read (unreadable_map) or
        GPU modules on a host without a GPU under MIP_REQUIRE_GPU=1 (gpu_required)."""
        payload = read_json()
        validate(schemas, "RunPayload", payload)
        key = payload.pop("openai_key", None)
        payload.setdefault("force_rerun", False)
        return submit(payload, key)

    @route("GET", "/runs", answer={"type": "array", "items": {"type": "string"}},
           query={"job": openapi.NAME, "status": {"enum": [s.value for s in Status]},
                  "limit": openapi.whole(10**9), "offset": openapi.whole(10**12)})
    def list_runs():
        """Run ids, oldest first; ?job= ?status= ?limit= ?offset=."""
        job = bottle.request.query.get("job")
        status = bottle.request.query.get("status")
        if job is not None:
            checked_name("job", job)
        if status is not None and status not in {s.value for s in Status}:
            raise ApiError(400, "bad_query",
                           f"?status= must be one of {', '.join(s.value for s in Status)}")
        bottle.response.content_type = "application/json"
        return db.run_ids_json(job, status, query_int("limit", None, 10**9),
                               query_int("offset", 0, 10**12))

    @route("GET", "/runs/{run_id}", answer="RunStatus")
    def get_run_status(run_id):
        """A run's RunStatus. Raises 404 if unknown."""
        bottle.response.content_type = "application/json"
        body = done_runs.get(("run", run_id))
        if body is None:
            run = get_run(run_id)
            status = run_status(db, run)
            body = json.dumps(status)
            if (run["status"] in FINISHED and run_id not in queue.running
                    and all(s in FINISHED for s in status["module_status"].values())):
                done_runs.put(("run", run_id), body)
        return body

    @route("POST", "/runs/{run_id}/cancel", answer="RunStatus")
    def cancel_run(run_id):
        """Stop a run and every module it runs; a no-op on a finished run."""
        run = get_run(run_id)
        queue.cancel(run["run_id"])
        settled.drop_job(run["job"])
        return send(run_status(db, db.run(run["run_id"])))

    @route("POST", "/runs/{run_id}/rerun", body=openapi.RERUN_BODY, answer="RunStatus",
           errors=(409, 422, 503, 507), headers=idempotency.HEADERS)
    def rerun(run_id):
        """Submit a new run with the same payload: what failed or was cancelled runs again,
        what passed is skipped. Optional body: {"openai_key": ...}."""
        run = get_run(run_id)
        body = read_json(optional=True)
        body = {} if body is None else body
        if not isinstance(body, dict) or set(body) - {"openai_key"}:
            raise ApiError(422, "invalid_payload", 'body: optional, {"openai_key": "<key>"} only')
        # the key obeys RunPayload's rule here too (a 100 KB key was taken)
        validate(schemas, "RunPayload", dict(run["payload"], **body))
        return submit(dict(run["payload"], force_rerun=False), body.get("openai_key"))

    @route("GET", "/jobs", answer={"type": "array", "items": {"type": "string"}},
           query={"limit": openapi.whole(10**9), "offset": openapi.whole(10**12)})
    def list_jobs():
        """Job names; ?limit= ?offset=."""
        offset = query_int("offset", 0, 10**12)
        bottle.response.content_type = "application/json"
        return db.jobs_json(query_int("limit", None, 10**9), offset)

    @route("GET", "/jobs/{job}", answer="JobStatus")
    def job_status(job):
        """A job's JobStatus (that of its latest run). Raises 404 if unknown."""
        bottle.response.content_type = "application/json"
        body = settled.get(("job", job))
        if body is not None:
            return body
        run = db.latest_run(checked_name("job", job))
        if run is None:
            get_job(job)  # raises the 404
            # the job was being deleted: its record outlived its runs for a moment
            raise ApiError(404, "unknown_job", f"no job {job!r}; GET /jobs lists them")
        finished = run["status"] in FINISHED
        answer = {
            "status": run["status"], "job": job, "modules": run["modules"],
            "start_time": run["start_time"], "stop_time": run["stop_time"],
            "log": log_tail(run["log_path"]) if finished else None,
            "force_rerun": run["force_rerun"], "map": run["map"], "run_id": run["run_id"],
            "module_status": db.job_module_status(job),
            "cdr": {kind: {k: row[k] for k in ("status", "result_id", "cdr_job_id", "message",
                                               "time")}
                    for kind, row in db.publications(job).items()} or None,
        }
        body = json.dumps(answer)
        if (finished and run["run_id"] not in queue.running
                and all(s in FINISHED for s in answer["module_status"].values())
                and all(p["status"] != "pending" for p in (answer["cdr"] or {}).values())):
            settled.put(("job", job), body)
        return body

    @route("GET", "/modules", answer={"type": "array", "items": "ModuleDescription"})
    def list_modules():
        """The catalogue: ModuleDescription of every module."""
        return send([{"module_name": m.name, "version": m.version, "requires": list(m.requires)}
                     for m in catalogue.values()])

    @route("GET", "/modules/{job}", answer={"type": "array", "items": {"type": "string"}})
    def job_modules(job):
        """Names of the modules run in a job. Raises 404 if the job is unknown."""
        return send(db.job_modules(get_job(job)))

    @route("GET", "/modules/{job}/{module}", answer="ModuleStatus")
    def get_module_status(job, module):
        """The latest execution of a module in a job. Raises 404 if none."""
        bottle.response.content_type = "application/json"
        body = settled.get(("module", job, module))
        if body is not None:
            return body
        execution = get_module(job, module)
        body = json.dumps(module_status(execution))
        uploading = (settings.s3_bucket and execution["status"] == Status.PASSED
                     and execution["upload_status"] is None)
        if execution["status"] in FINISHED and not uploading:
            settled.put(("module", job, module), body)
        return body

    s3 = {}  # the S3 client, made on first use

    def s3_entries(job, module, kind, prefix):
        """(archive name, opener) of the module's objects of that kind in S3.
        Raises 502 when the store cannot be listed."""
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError

        folder = f"{s3_key_prefix(settings, job, module)}/{kind}/"
        try:
            if "client" not in s3:
                s3["client"] = s3_client()
            client = s3["client"]
            return [(f"{prefix}/{obj['Key'][len(folder):]}",
                     s3_opener(client, settings.s3_bucket, obj))
                    for obj in list_objects(client, settings.s3_bucket, folder)]
        except (BotoCoreError, ClientError) as e:
            log.warning("S3 listing of %s failed: %s", folder, e)
            raise ApiError(502, "storage_unavailable",
                           f"the local copy is gone and S3 could not be read: {e}") from None

    def download(job, module, kind):
        """A zip of the module's logs, outputs or temps, streamed as it is written; from S3
        when the local copy has been cleaned away."""
        execution = get_module(job, module)
        prefix = f"{job}_{module}_{kind}"
        files = kind_files(settings, job, module, kind)
        entries = []
        if files is not None:
            # lazily: the first bytes go out before a big folder is fully listed
            entries = ((f"{prefix}/{name}", local_opener(f)) for name, f in files)
        elif settings.s3_bucket and execution["upload_status"] == "uploaded":
            entries = s3_entries(job, module, kind, prefix)
        # an empty temps folder is a fine answer; no folder at all is not
        if files is None and not entries:
            raise ApiError(404, f"no_{kind}", f"module {module!r} of job {job!r} has no {kind} "
                                              "(not produced, or cleaned away)")
        try:
            body = downloads.hold(zip_stream(entries))
        except auth.Refused as e:
            raise refused(503, e) from None
        bottle.response.content_type = "application/zip"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="{prefix}.zip"')
        return body

    for prefix in ("/modules", "/jobs"):
        for kind in ("logs", "outputs", "temps"):
            route("GET", f"{prefix}/{{job}}/{{module}}/{kind}", answer="application/zip",
                  errors=(502, 503),
                  summary=f"A zip of the module's {kind}, streamed. Raises 404 if none, "
                          "503 when MIP_MAX_DOWNLOADS zips are being sent.")(
                lambda job, module, kind=kind: download(job, module, kind))

    # ------------------------------------------------------------------ CDR

    def need_link():
        if link is None:
            raise ApiError(404, "cdr_not_configured",
                           "the CDR link is off: set MIP_CDR_URL, MIP_CDR_TOKEN, MIP_CDR_SECRET "
                           "and MIP_CDR_CALLBACK_URL")
        return link

    @route("POST", "/cdr", auth=False, body={"type": "object"}, answer={"type": "object"},
           errors=(403, 404, 422, 503))
    def cdr_webhook():
        """The CDR's webhook: signed with x-cdr-signature-256 instead of basic auth.
        Raises 403 for a missing or wrong signature, 404 when the CDR link is off, 503
        (with Retry-After) when MIP_CDR_INBOX_MAX events already wait."""
        need_link()
        raw = read_body()
        if not cdr.verify(cfg.cdr_settings.secret, raw,
                          bottle.request.get_header("x-cdr-signature-256")):
            raise ApiError(403, "bad_signature",
                           "missing or wrong x-cdr-signature-256 (HMAC-SHA256 of the body)")
        try:
            link.deliver(read_json_bytes(raw))
        except cdr.BadEvent as e:
            raise ApiError(422, "bad_event", str(e)) from None
        return send({"ok": "success"})

    @route("POST", "/cdr/cogs/{cog_id}", answer={"type": "object"}, errors=(422, 502, 503))
    def cdr_cog(cog_id):
        """Process a CDR cog by hand: its URL is looked up in the CDR, then as a delivery.
        Raises 404 for a cog the CDR does not know, 502 when the CDR cannot be asked, 503
        when the CDR inbox is full."""
        need_link()
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

    @route("GET", "/cdr/events", answer={"type": "array", "items": {"type": "object"}},
           errors=(404,), query={"limit": openapi.whole(10000)})
    def cdr_events():
        """CDR events received, newest first; ?limit= (default 100)."""
        need_link()
        return send(db.events_page(query_int("limit", 100, 10000)))

    @route("POST", "/jobs/{job}/publish", answer="JobStatus", errors=(409,))
    def publish_job(job):
        """Publish a passed job's results to the CDR again (in the background); its JobStatus.
        Raises 404 if unknown, 409 if its latest run has not passed."""
        need_link()
        get_job(job)
        if db.latest_run(job)["status"] != Status.PASSED:
            raise ApiError(409, "job_not_passed", f"job {job!r} has not passed; nothing to publish")
        link.queue_publish(job)
        settled.drop_job(job)
        return job_status(job)

    @route("GET", "/maps", answer={"type": "array", "items": {"type": "string"}})
    def map_names():
        """Names of the maps on the server."""
        return send(maps.list_maps(settings))

    # What a concern kept in its own file needs to add its routes and hooks: each such file
    # has an add_routes(api), called below, so make_app stays the core API.
    api = Api(app=app, route=route, send=send, read_body=read_body, read_json=read_json,
              query_int=query_int, get_run=get_run, get_job=get_job, get_module=get_module,
              submit=submit, cfg=cfg, db=db, queue=queue, link=link, catalogue=catalogue,
              schemas=schemas, settled=settled, done_runs=done_runs)
    console.add_routes(api)
    follow.add_routes(api)
    swagger.add_routes(api)
    notices.add_routes(api)
    retention.add_routes(api)
    metrics.add_routes(api)  # last: it wraps the app as a whole
    return app


@dataclass(frozen=True)
class Api:
    """The app and make_app's request helpers, for the files that add routes of their own.
    Errors are answered by raising errors.ApiError (status, code, message)."""
    app: bottle.Bottle
    route: object
    send: object
    read_body: object
    read_json: object
    query_int: object
    get_run: object
    get_job: object
    get_module: object
    submit: object
    cfg: "Config"
    db: journal.Journal
    queue: "RunQueue"
    link: object
    catalogue: dict
    schemas: dict
    settled: "AnswerCache"
    done_runs: "AnswerCache"


def read_json_bytes(raw: bytes):
    """The body as JSON. Raises 400: bad_json when nested too deep, malformed_json when
    not JSON at all."""
    try:
        return sanitize.parse_json(raw)
    except sanitize.TooDeep as e:
        raise ApiError(400, "bad_json", str(e)) from None
    except ValueError as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


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
    db = journal.Journal(cfg.settings.journal_path)
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
    # the links hook into the queue, which never imports them: a payload's notify_url is
    # checked before the run is recorded, and its notices are recorded with it
    queue.checks.append(functools.partial(notices.check_payload, cfg.notify))
    queue.submitted.append(functools.partial(notices.record, db, cfg.notify))
    link = None
    if cfg.cdr_settings:
        link = cdr.CdrLink(cfg.cdr_settings, cfg.settings, db, queue.submit)
        queue.finished.append(link.run_finished)
    notifier = notices.Notifier(cfg.notify, db, lambda run_id: notice_status(db, run_id),
                                queue.running)
    queue.finished.append(notifier.run_ended)
    app = make_app(cfg, db, queue, link)
    # nothing is logged before the port line below, which must come first
    writer = setup_logging()
    files_warning = open_files_for(cfg.connection_limit)
    try:
        server = waitress.create_server(
            RequestLog(app, writer), host=cfg.host, port=cfg.port, threads=cfg.threads,
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
    sweeper = app.config["retention.sweeper"]
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
