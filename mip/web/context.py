"""context: what every handler shares, the server's state and the few steps of a request.

Used by the handlers of mip_server.py's route table and by the view functions of console.py
and follow.py. A handler is called as `handler(ctx, **path_args)`: `Context` holds the
journal, the queue, the caches and the other objects made once per app (mip_server's
make_context makes it); the functions below read the body, a query number or a name in the
path, look up a run, job or module (NotFound otherwise), and send JSON. Nothing here
registers a route or installs a plugin; that is mip_server.py's alone.
"""

import json
from dataclasses import dataclass
from dataclasses import field

import bottle

from mip import sanitize
from mip.catalogue import check_name
from mip.errors import NotFound
from mip.errors import UsageError
from mip.web.apierror import ApiError

MAX_BODY = 1024 * 1024


@dataclass
class Context:
    """The server's state, made once per app; handlers read it, never replace its parts."""

    cfg: object  # mip_server.Config
    db: object  # journal.Journal
    queue: object  # queue.RunQueue
    link: object  # cdr.CdrLink, or None when the CDR link is off
    catalogue: dict
    schemas: dict
    done_runs: object  # status.AnswerCache of runs over, their process gone
    settled: object  # status.AnswerCache of job and module answers, kept a second
    keys: object  # idempotency.Keys
    remover: object  # retention.Remover
    sweeper: object  # retention.Sweeper, which main() starts and stops
    credentials: object  # auth.Credentials
    downloads: object  # auth.Slots of the zip downloads
    metrics: object  # metrics.Metrics: the registry and the request counting
    routes: list = field(default_factory=list)  # the route table, for GET /openapi.json
    s3: dict = field(default_factory=dict)  # the S3 client, made on first use


# ---------------------------------------------------------------------------- reading

def read_body() -> bytes:
    """The raw body; raises 413 past MAX_BODY (for a body sent without a length)."""
    raw = bottle.request.body.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body is over the {MAX_BODY} byte limit")
    return raw


def read_json_bytes(raw: bytes):
    """The body as JSON. Raises 400: bad_json when nested too deep, malformed_json when
    not JSON at all."""
    try:
        return sanitize.parse_json(raw)
    except sanitize.TooDeep as e:
        raise ApiError(400, "bad_json", str(e)) from None
    except ValueError as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


def read_json(optional: bool = False):
    """The body as JSON, whatever the Content-Type says (None for an optional empty
    one). Raises 400 for an empty or malformed body."""
    raw = read_body()
    if not raw.strip():
        if optional:
            return None
        raise ApiError(400, "empty_body", "the body is empty; send a JSON object")
    return read_json_bytes(raw)


def query_int(name: str, default, high: int):
    """?name= as a whole number from 0 to `high`, or `default` when absent. Raises 400."""
    raw = bottle.request.query.get(name)
    if raw is None:
        return default
    # isascii: isdigit() is also true of "²", which int() refuses
    if not (raw.isascii() and raw.isdigit()) or int(raw) > high:
        raise ApiError(400, "bad_query", f"?{name}= must be a whole number from 0 to {high}")
    return int(raw)


def checked_name(kind: str, value: str) -> str:
    """Refuse a path parameter that is not a plain name, before anything touches the disk."""
    try:
        return check_name(kind, value)
    except UsageError as e:
        raise ApiError(400, f"bad_{kind}_name", str(e)) from None


# ---------------------------------------------------------------------------- lookups

def get_run(ctx: Context, run_id: str) -> dict:
    """The run's journal row. Raises 400 for a bad id, NotFound (404) if unknown."""
    run = ctx.db.run(checked_name("run", run_id))
    if run is None:
        raise NotFound(f"no run {run_id!r}; GET /runs lists them", "unknown_run")
    return run


def get_job(ctx: Context, job: str) -> str:
    """The job's name. Raises 400 for a bad name, NotFound (404) if unknown."""
    checked_name("job", job)
    if ctx.db.job_map(job) is None:
        raise NotFound(f"no job {job!r}; GET /jobs lists them", "unknown_job")
    return job


def get_module(ctx: Context, job: str, module: str) -> dict:
    """The latest execution of a module in a job. Raises 400 for a bad name, NotFound
    (404) for an unknown job or module, or one that has not run in the job."""
    checked_name("module", module)
    execution = ctx.db.latest_execution(checked_name("job", job), module)
    if execution is not None:
        return execution
    get_job(ctx, job)
    if module not in ctx.catalogue:
        raise NotFound(f"no module {module!r}; GET /modules lists them", "unknown_module")
    raise NotFound(f"module {module!r} has not run in job {job!r}", "module_not_run")


# ---------------------------------------------------------------------------- answers

def send(data, status: int = 200) -> str:
    """`data` as the JSON answer."""
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps(data)
