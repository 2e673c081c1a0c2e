"""mip_server: the TA1 Module Integration REST server (Bottle app served by waitress).

    source env.sh
    python mip_server.py                 # serves on $MIP_HOST:$MIP_PORT (127.0.0.1:8080)
    python mip_server.py --port 0        # any free port; the first output line names it
    python mip_server.py --hash-password # prints a salted hash for MIP_USERS_FILE

Each run is a `mipper.py` subprocess in its own process group; the SQLite journal
(journal.py) holds run, job and module state; JSON is checked against schema/.
"""

import argparse
import errno
import getpass
import json
import logging
import logging.handlers
import os
import re
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from dataclasses import field
from queue import SimpleQueue

import bottle
import jsonschema
import waitress

import access
import cdr
import console
import docs_ui
import front
import gpus
import idempotency
import journal
import keystore
import logs
import mapcheck
import metrics
import mipper
import notices
import openapi
import retention
import runners
import switches
import untrusted
from access import hash_password
from errors import ApiError
from errors import error_body
from journal import FINISHED
from journal import Status
from retention import free_mb

VERSION = mipper.VERSION
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

@dataclass(frozen=True)
class Config:
    """Server settings, read once from the environment and the command line."""

    settings: mipper.Settings
    host: str = "127.0.0.1"
    port: int = 8080
    max_runs: int = 2
    max_queued: int = 200
    threads: int = 8
    users: dict = field(default_factory=dict, repr=False)  # name -> password hash
    auth: bool = True
    password_file: str | None = None
    cdr_settings: cdr.CdrSettings | None = None
    max_downloads: int = 4  # zip downloads at once; below `threads`
    auth_failures: int = 10  # wrong credentials per minute from one address
    metrics_open: bool = False  # GET /metrics without credentials (MIP_METRICS_OPEN=1)
    notify: notices.NoticeSettings = field(default_factory=notices.NoticeSettings)
    retention_settings: retention.RetentionSettings = field(
        default_factory=retention.RetentionSettings)
    trusted_proxy: str | None = None  # the TLS proxy's address (MIP_TRUSTED_PROXY), or "*"

    @classmethod
    def from_env(cls, env, host=None, port=None, no_auth=False) -> "Config":
        """Raises mipper.MipError naming the variable that is wrong or missing."""
        settings = mipper.Settings.from_env(env)
        users, password_file = ({}, None) if no_auth else read_users(env)
        port = port if port is not None else mipper.int_setting(env, "MIP_PORT", 8080, 0, 65535)
        threads = mipper.int_setting(env, "MIP_THREADS", 8, 1, 256)
        # downloads stay below the request threads, so that some always answer the rest
        max_downloads = mipper.int_setting(env, "MIP_MAX_DOWNLOADS", max(1, threads // 2), 1,
                                           max(1, threads - 1))
        return cls(settings=settings, host=host or env.get("MIP_HOST") or "127.0.0.1",
                   port=port, max_runs=mipper.int_setting(env, "MIP_MAX_RUNS", 2, 1, 256),
                   max_queued=mipper.int_setting(env, "MIP_MAX_QUEUED", 200, 1, 100_000),
                   threads=threads, max_downloads=max_downloads,
                   auth_failures=mipper.int_setting(env, "MIP_AUTH_FAILURES", 10, 1, 10000),
                   users=users, auth=not no_auth, password_file=password_file,
                   metrics_open=metrics.open_setting(env),
                   cdr_settings=cdr.CdrSettings.from_env(env, VERSION),
                   notify=notices.NoticeSettings.from_env(env),
                   retention_settings=retention.RetentionSettings.from_env(
                       env, settings.min_free_mb),
                   trusted_proxy=front.trusted_proxy_setting(env))


def read_users(env) -> tuple:
    """({user: hash}, password file or None) from MIP_USERS_FILE, MIP_PASSWORD or
    MIP_PASSWORD_FILE; a missing MIP_PASSWORD_FILE is created with a random password.
    Raises mipper.MipError when no credentials are configured."""
    users, password_file = {}, None
    user = env.get("MIP_USER") or "mip"
    if env.get("MIP_PASSWORD"):
        users[user] = hash_password(env["MIP_PASSWORD"])
    elif env.get("MIP_PASSWORD_FILE"):
        password_file = os.path.abspath(env["MIP_PASSWORD_FILE"])
        users[user] = hash_password(read_or_make_password(password_file))
    if env.get("MIP_USERS_FILE"):
        users.update(read_users_file(env["MIP_USERS_FILE"]))
    if not users:
        raise mipper.MipError("no credentials: set MIP_USER and MIP_PASSWORD (or MIP_USERS_FILE, "
                              "or MIP_PASSWORD_FILE), e.g. `source env.sh`; or start with "
                              "--no-auth to serve without authentication")
    return users, password_file


def read_or_make_password(path: str) -> str:
    """The password kept in `path`, made once (owner-only) when the file does not exist."""
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(18) + "\n")
    with open(path, encoding="utf-8") as f:
        password = f.read().strip()
    if not password:
        raise mipper.MipError(f"MIP_PASSWORD_FILE {path} is empty")
    return password


def read_users_file(path: str) -> dict:
    """`user:hash` lines (blank lines and # comments skipped); raises mipper.MipError."""
    users = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise mipper.MipError(f"MIP_USERS_FILE {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith("pbkdf2_sha256$"):
            raise mipper.MipError(f"MIP_USERS_FILE {path} line {number}: expected "
                                  "user:pbkdf2_sha256$... (see --hash-password)")
        users[name] = stored
    return users


# ---------------------------------------------------------------------------- errors

def refused(status: int, e: access.Refused) -> ApiError:
    """A throttle's refusal (429, 503) with the seconds to wait in Retry-After."""
    return ApiError(status, e.code, e.message, headers={"Retry-After": str(e.retry_after)})


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

SCHEMA_NAMES = ("RunPayload", "RunStatus", "JobStatus", "ModuleStatus", "ModuleDescription",
                "Error", "Catalogue")


def load_schemas() -> dict:
    """Every schema/*.json, checked once; {name: (document, validator)}."""
    out = {}
    for name in SCHEMA_NAMES:
        with open(os.path.join(mipper.SCHEMA_DIR, f"{name}.json"), encoding="utf-8") as f:
            doc = json.load(f)
        jsonschema.Draft202012Validator.check_schema(doc)
        out[name] = (doc, jsonschema.Draft202012Validator(doc))
    return out


def validate(schemas: dict, name: str, data) -> None:
    """Raises ApiError 422 naming the failing field."""
    error = jsonschema.exceptions.best_match(schemas[name][1].iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        where = where.lstrip(".") or "body"
        message = error.message
        if error.schema.get("writeOnly"):  # a secret: never echoed back
            message = f"does not satisfy {error.validator} {json.dumps(error.validator_value)}"
        elif error.validator == "pattern":
            message = (f"{json.dumps(error.instance)[:80]} is not a valid name: use letters, "
                       "digits, '_', '.', '-', at most 64, not starting with '.'")
        elif error.validator == "additionalProperties" and not error.absolute_path:
            message += f"; {name} allows {', '.join(schemas[name][0]['properties'])}"
        raise ApiError(422, "invalid_payload", f"{where}: {message}")


def check_map_readable(settings: mipper.Settings, map_name: str) -> None:
    """Refuse a map GDAL cannot read (422 unreadable_map, with GDAL's reason) before any
    module meets it."""
    shown = f"$TA1_INPUTS_DIR/maps/{map_name}/{map_name}.tif"
    reason = mapcheck.unreadable(mipper.map_file(settings, map_name), shown)
    if reason:
        raise ApiError(422, "unreadable_map",
                       f"map {map_name!r}: GDAL cannot read {shown}: {reason}")


def checked_name(kind: str, value: str) -> str:
    """Refuse a path parameter that is not a plain name, before anything touches the disk."""
    try:
        return mipper.check_name(kind, value)
    except mipper.UsageError as e:
        raise ApiError(400, f"bad_{kind}_name", str(e)) from None


# ---------------------------------------------------------------------------- run queue

class RunQueue:
    """Starts queued runs as mipper subprocesses: at most `max_runs` at once, one per job."""

    def __init__(self, cfg: Config, db: journal.Journal, env=None):
        self.cfg = cfg
        self.db = db
        self.catalogue = mipper.load_catalogue(cfg.settings.config_path)
        self.finished = []  # callbacks(run) called when a run's process has ended
        self.env = dict(os.environ if env is None else env)
        self.lock = threading.RLock()
        self.running = {}  # run_id -> (job, mipper pid), until its end is recorded
        # a queued run's OpenAI key waits in the journal, sealed, until the run starts
        self.keystore = keystore.KeyStore(cfg.settings.key_file)
        # where a dead run's containers or tasks may be: the runners this host uses
        self.runners = {mipper.module_runner(cfg.settings, m) for m in self.catalogue.values()}
        self.retry = None  # the timer that dispatches again after a run could not start
        self.stopping = False

    def submit(self, payload: dict, openai_key: str | None = None) -> str:
        """Check a RunPayload against the catalogue, maps and jobs, record it and start it
        when the limits allow; returns the run id. Raises ApiError (404 unknown map, 409 job
        bound to another map, 422 bad name, unknown module, refused switch or a map GDAL
        cannot read, 503 queue full, 507 too little free disk space)."""
        self.check(payload, openai_key)
        self.check_space()
        sealed = self.keystore.seal(openai_key) if openai_key else None
        with self.lock:
            # under the lock, so that two submissions cannot both take the last place
            if self.queued() >= self.cfg.max_queued:
                raise ApiError(503, "queue_full",
                               f"{self.cfg.max_queued} runs are already waiting to start "
                               f"(MIP_MAX_QUEUED); try again in {QUEUE_RETRY_AFTER} s",
                               headers={"Retry-After": str(QUEUE_RETRY_AFTER)})
            try:
                run_id = self.db.create_run(payload["job"], payload["map"], payload["modules"],
                                            payload.get("force_rerun", False), payload,
                                            os.path.join(self.cfg.settings.runs_dir, "logs"),
                                            sealed)
            except journal.JournalError as e:
                raise ApiError(409, "job_bound_to_other_map", str(e)) from None
            except (sqlite3.Error, OSError) as e:
                if not disk_full(e):
                    raise
                raise insufficient_storage("the journal's disk is full") from None
            notices.record(self.db, self.cfg.notify, run_id, payload)
            log.info("run %s submitted: job %s, map %s, modules %s", run_id, payload["job"],
                     payload["map"], " ".join(payload["modules"]))
            self.dispatch()
        return run_id

    def check(self, payload: dict, openai_key: str | None) -> None:
        """Everything of a payload that reaches a module's command line or environment:
        names (matched whole, so no trailing newline), modules, the map, extra switches
        (the rule of switches.py) and the key. Raises ApiError."""
        catalogue, settings = self.catalogue, self.cfg.settings
        for kind in ("job", "map"):
            try:
                mipper.check_name(kind, payload[kind])
            except mipper.UsageError as e:
                raise ApiError(422, "invalid_payload", f"{kind}: {e}") from None
        try:
            targets = mipper.expand_modules(catalogue, payload["modules"])
        except mipper.UsageError as e:
            raise ApiError(422, "unknown_module", f"modules: {e}") from None
        refusal = mipper.gpu_refusal(settings, catalogue, targets)
        if refusal:
            raise ApiError(422, "gpu_required", f"modules: {refusal}")
        extra = payload.get("extra_switches") or {}
        for name in extra:
            if name not in catalogue:
                raise ApiError(422, "unknown_module",
                               f"extra_switches: unknown module {name!r}; GET /modules lists them")
        try:
            mipper.check_extra(settings, catalogue, payload["job"], extra)
        except switches.Refused as e:
            raise ApiError(422, e.code, str(e)) from None
        if openai_key and not OPENAI_KEY_RE.fullmatch(openai_key):
            raise ApiError(422, "invalid_payload",
                           "openai_key: expected printable ASCII without spaces")
        try:
            mipper.check_map(settings, payload["map"])
        except mipper.UsageError as e:
            raise ApiError(404, "unknown_map", f"map: {e}") from None
        check_map_readable(settings, payload["map"])
        notices.check_payload(self.cfg.notify, payload)

    def queued(self) -> int:
        """Runs recorded but not started yet (those being started do not count)."""
        return len([r for r, _ in self.db.waiting_runs() if r not in self.running])

    def check_space(self) -> None:
        """Raises ApiError 507 when a data folder has less free space than MIP_MIN_FREE_MB:
        a run started there would fail, or could not even record its end."""
        settings = self.cfg.settings
        for name, path in (("runs", settings.runs_dir), ("outputs", settings.outputs_dir),
                           ("temps", settings.temps_dir)):
            free = free_mb(path)
            if free is not None and free < settings.min_free_mb:
                raise insufficient_storage(
                    f"the {name} folder has {free} MB free; a run needs at least "
                    f"{settings.min_free_mb} MB (MIP_MIN_FREE_MB)")

    def dispatch(self) -> None:
        """Start every queued run that the limits allow, oldest first. Never raises: a run
        that cannot start now (a full disk) stays queued and is tried again later."""
        with self.lock:
            if self.stopping:
                return
            try:
                queued = self.db.waiting_runs()
            except sqlite3.Error as e:
                log.error("cannot read the queue (%s); trying again in %d s", e, RETRY_START)
                self.dispatch_later()
                return
            for run_id, job in queued:
                if len(self.running) >= self.cfg.max_runs:
                    break
                if run_id in self.running or any(j == job for j, _ in self.running.values()):
                    continue
                try:
                    self.start(self.db.run(run_id))
                except Exception as e:  # noqa: BLE001 - the other runs and the caller go on
                    log.error("run %s could not start (%s); it stays queued, tried again in "
                              "%d s", run_id, e, RETRY_START)
                    self.dispatch_later()

    def dispatch_later(self) -> None:
        """dispatch() again in RETRY_START seconds (once, however often it is asked)."""
        with self.lock:
            if self.retry is None:
                self.retry = threading.Timer(RETRY_START, self.dispatch_again)
                self.retry.daemon = True
                self.retry.start()

    def dispatch_again(self) -> None:
        with self.lock:
            self.retry = None
        self.dispatch()

    def start(self, run: dict) -> None:
        run_id = run["run_id"]
        argv = [sys.executable, os.path.join(mipper.HERE, "mipper.py"), "--run-id", run_id,
                "--job", run["job"], "--map", run["map"]]
        for name in run["modules"]:
            argv += ["--module", name]
        if run["force_rerun"]:
            argv.append("--force-rerun")
        for name, args in (run["payload"].get("extra_switches") or {}).items():
            argv += [f"--extra-switch={name}={arg}" for arg in args]
        env = {k: v for k, v in self.env.items()
               if k not in mipper.SERVER_SECRETS and k != "MIP_OPENAI_KEY"}
        # every process of the run inherits this, so that a dead run's leftovers are found
        env[runners.RUN_ENV] = run_id
        try:
            key = self.run_key(run_id) or self.env.get("MIP_OPENAI_KEY")
        except keystore.KeyStoreError as e:
            self.fail(run, str(e))
            return
        if key:
            env["MIP_OPENAI_KEY"] = key
        os.makedirs(os.path.dirname(run["log_path"]), exist_ok=True)
        with open(run["log_path"], "ab") as out:
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        cwd=self.cfg.settings.runs_dir, start_new_session=True)
            except OSError as e:
                out.write(f"could not start mipper: {e}\n".encode())
                self.db.set_run_status(run_id, Status.FAILED)
                log.error("run %s failed: could not start mipper: %s", run_id, e)
                return
        self.running[run_id] = (run["job"], proc.pid)
        log.info("run %s started (job %s, pid %d)", run_id, run["job"], proc.pid)
        threading.Thread(target=self.watch, args=(run_id, proc.wait), daemon=True,
                         name=f"watch-{run_id}").start()
        try:
            self.db.forget_run_key(run_id)
            self.db.set_run_pid(run_id, proc.pid)
        except sqlite3.Error as e:
            # mipper records its pid itself; the key goes when the run's end is recorded
            log.error("run %s: cannot record its start yet: %s", run_id, e)

    def run_key(self, run_id: str) -> str | None:
        """The OpenAI key given with a queued run, opened; None if it has none."""
        sealed = self.db.run_key(run_id)
        return self.keystore.open(sealed) if sealed else None

    def adopt(self, run: dict) -> None:
        """Watch a run whose mipper outlived a previous server."""
        run_id = run["run_id"]
        with self.lock:
            self.running[run_id] = (run["job"], run["pid"])
        log.info("run %s: mipper (pid %d) still alive after restart; watching it", run_id,
                 run["pid"])

        def wait():
            while process_alive(run["pid"], run_id):
                time.sleep(0.2)

        threading.Thread(target=self.watch, args=(run_id, wait), daemon=True,
                         name=f"watch-{run_id}").start()

    def watch(self, run_id: str, wait, why: str | None = None) -> None:
        """Wait for the run's process; then stop what it left running if it died, and make
        sure the journal says how it ended, trying again (with backoff) until it does.
        The job stays busy until then. Never raises."""
        code = wait()
        if why is None:
            why = (f"mipper exited with code {code} before recording the end of the run"
                   if code is not None else "mipper ended before recording the end of the run")
        pid = self.running.get(run_id, (None, None))[1]
        try:
            recorded = self.db.run(run_id)["status"] in (Status.PASSED, Status.FAILED)
        except sqlite3.Error:
            recorded = False
        if not recorded:
            self.stop_leftovers(run_id, pid)
        delay = 0.1
        while True:
            try:
                run = self.record_end(run_id, why)
                break
            except Exception as e:  # noqa: BLE001 - a full disk passes; the end must be kept
                log.error("run %s: cannot record its end yet (%s); trying again in %.1f s",
                          run_id, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_END_MAX)
        log.info("run %s %s", run_id, run["status"])
        with self.lock:
            self.running.pop(run_id, None)
        self.dispatch()
        for callback in self.finished:
            try:
                callback(run)
            except Exception:
                log.exception("run %s: a run-end callback failed", run_id)

    def record_end(self, run_id: str, why: str) -> dict:
        """Fail a run whose process ended without recording its end, close any of its
        module executions still `running`, forget its key; the run's row."""
        with self.lock:
            run = self.db.run(run_id)
            if run["status"] not in FINISHED:
                self.fail(run, why)
            elif run["status"] == Status.CANCELLED:
                self.db.end_running_executions(run_id, Status.CANCELLED, "run cancelled")
            else:
                self.db.end_running_executions(run_id, Status.FAILED, journal.LOST_EXECUTION)
            self.db.forget_run_key(run_id)
            return self.db.run(run_id)

    def stop_leftovers(self, run_id: str, pid: int | None) -> None:
        """Stop what a run whose mipper died left running (processes, containers, tasks),
        before its job is freed for another run."""
        try:
            stopped = runners.stop_run(run_id, pid, self.runners,
                                       self.cfg.settings.runner_settings)
        except Exception as e:  # noqa: BLE001 - a docker or AWS failure must not keep the job busy
            log.error("run %s: its mipper died and what it started may still run: %s",
                      run_id, e)
            return
        if stopped:
            log.info("run %s: its mipper died; stopped %s", run_id, ", ".join(stopped))

    def fail(self, run: dict, why: str) -> None:
        """Mark a run whose process is gone failed, saying why in its log."""
        self.db.end_running_executions(run["run_id"], Status.FAILED, why)
        self.db.set_run_status(run["run_id"], Status.FAILED)
        self.db.forget_run_key(run["run_id"])
        append_log(run["log_path"], f"{journal.utcnow()} run failed: {why}\n")

    def cancel(self, run_id: str) -> None:
        """Stop a run and its whole process tree; a no-op on a finished run."""
        with self.lock:
            run = self.db.run(run_id)
            if run["status"] in FINISHED:
                return
            # logged before the status changes: a finished run's status answer is cached
            append_log(run["log_path"], f"{journal.utcnow()} run cancelled on request\n")
            if not self.db.set_run_status(run_id, Status.CANCELLED):
                append_log(run["log_path"], "(it had just ended)\n")
                return
            self.db.forget_run_key(run_id)
            pid = self.running.get(run_id, (None, None))[1]
            log.info("run %s cancelled", run_id)
        if pid is not None:
            # the run's process group holds mipper, luigi's workers and every local module;
            # SIGTERM lets mipper stop containers and ECS tasks too, SIGKILL ends stragglers
            for sig, grace in ((signal.SIGTERM, CANCEL_GRACE), (signal.SIGKILL, 5)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                if self.wait_gone(run_id, grace):
                    break
        self.db.end_running_executions(run_id, Status.CANCELLED, "run cancelled")

    def wait_gone(self, run_id: str, timeout: float) -> bool:
        """True once the run's process has been seen to end, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if run_id not in self.running:
                    return True
            time.sleep(0.02)
        return False

    def recover(self) -> None:
        """At start-up: watch runs whose mipper is still alive, fail those whose process is
        gone (after stopping what they left running), and queue again those that never
        started."""
        for run in self.db.runs_with_status(Status.RUNNING, Status.NOT_STARTED):
            if run["pid"] and process_alive(run["pid"], run["run_id"]):
                self.adopt(run)
            elif run["pid"] or run["status"] == Status.RUNNING:
                log.info("run %s: mipper process gone after a restart", run["run_id"])
                with self.lock:
                    self.running[run["run_id"]] = (run["job"], run["pid"])
                threading.Thread(
                    target=self.watch, daemon=True, name=f"watch-{run['run_id']}",
                    args=(run["run_id"], lambda: None,
                          "the server restarted and the run's mipper process was gone")).start()
        self.dispatch()

    def stop(self) -> None:
        """Stop starting runs; running mippers go on and a restarted server adopts them."""
        with self.lock:
            self.stopping = True


def insufficient_storage(why: str) -> ApiError:
    return ApiError(507, "insufficient_storage",
                    f"{why}; no run can start until space is freed on the server")


def disk_full(e: Exception) -> bool:
    """True for the errors a full disk gives SQLite and the file system."""
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def process_alive(pid: int, run_id: str) -> bool:
    """True if `pid` is a live (not zombie) mipper process of this run."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z" and b"mipper.py" in cmdline and run_id.encode() in cmdline


def append_log(path: str, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        log.warning("cannot write to run log %s", path)


def log_tail(path: str | None, size: int = LOG_TAIL) -> str | None:
    """The last `size` bytes of a log file, from a line start; None if there is none."""
    if not path:
        return None
    try:
        # not through a link, nor waiting on a FIFO: a module (a container) may have put
        # either in its log's place
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return None
    if end > size and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace")


# ---------------------------------------------------------------------------- zips

class _Sink:
    """A write-only, unseekable file that zipfile writes into and the response drains."""

    def __init__(self):
        self.parts = []
        self.size = 0
        self.pending = 0

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        self.pending += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts, self.pending = b"".join(self.parts), [], 0
        return data


def incompressible(name: str, head: bytes) -> bool:
    """Stored, not deflated: known compressed formats, and files whose first 64 KiB
    deflate by less than a tenth."""
    if name.lower().endswith(STORED_SUFFIXES):
        return True
    sample = head[:65536]
    return len(sample) >= 4096 and len(zlib.compress(sample, 1)) > 0.9 * len(sample)


def zip_stream(entries):
    """Yield a zip of (archive name, opener) pairs as it is written, in pieces of about
    YIELD_BYTES: nothing on disk, memory bounded by a few chunks, incompressible files
    stored. An opener returns (file, mtime, size) and raises FileNotFoundError for a file
    that vanished since the listing."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for arcname, opener in entries:
            try:
                src, mtime, size = opener()
            except FileNotFoundError:
                continue
            with src:
                info = zipfile.ZipInfo(arcname, time.localtime(max(mtime, 315532800))[:6])
                info.external_attr = 0o644 << 16
                chunk = src.read(CHUNK)
                info.compress_type = (zipfile.ZIP_STORED if incompressible(arcname, chunk)
                                      else zipfile.ZIP_DEFLATED)
                with zf.open(info, "w", force_zip64=size > 2**31) as dst:
                    while chunk:
                        dst.write(chunk)
                        if sink.pending >= YIELD_BYTES:
                            yield sink.take()
                        chunk = src.read(CHUNK)
    yield sink.take()


def local_opener(path: str):
    def opener():
        f = open(path, "rb")
        info = os.fstat(f.fileno())
        return f, info.st_mtime, info.st_size
    return opener


def s3_opener(client, bucket: str, obj: dict):
    def opener():
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"]
        return body, obj["LastModified"].timestamp(), obj["Size"]
    return opener


# ---------------------------------------------------------------------------- views

class AnswerCache:
    """JSON bodies of status answers that only a new run can change, kept `ttl` seconds
    (None: for good). Status polling under load then costs no journal or log reads, which
    under contention cost far more than their few microseconds: each one gives up the GIL
    and waits to get it back."""

    def __init__(self, ttl: float | None, size: int = 4096):
        self.ttl = ttl
        self.size = size
        self.items = {}

    def get(self, key):
        item = self.items.get(key)
        if item and (self.ttl is None or time.monotonic() - item[0] < self.ttl):
            return item[1]
        return None

    def put(self, key, body: str) -> str:
        if len(self.items) >= self.size:
            self.items.clear()
        self.items[key] = (time.monotonic(), body)
        return body

    def drop_job(self, job: str) -> None:
        """Forget the job's answers (a run of it was just submitted or cancelled here)."""
        for key in list(self.items):
            if key[1] == job:
                self.items.pop(key, None)


def run_status(db: journal.Journal, run: dict) -> dict:
    """The RunStatus of a journal row."""
    finished = run["status"] in FINISHED
    return {
        "status": run["status"],
        "run_id": run["run_id"],
        "payload": run["payload"],
        "submit_time": run["submit_time"],
        "start_time": run["start_time"],
        "stop_time": run["stop_time"],
        "log": log_tail(run["log_path"]) if finished else None,
        "module_status": {e["module"]: e["status"] for e in db.executions(run["run_id"])},
    }


def notice_status(db: journal.Journal, run_id: str) -> dict | None:
    """The RunStatus a completion notice carries; None once the run is deleted."""
    run = db.run(run_id)
    return run and run_status(db, run)


def module_status(execution: dict) -> dict:
    """The ModuleStatus of an execution row."""
    finished = execution["status"] in FINISHED
    return {
        "status": execution["status"],
        "job": execution["job"],
        "module": execution["module"],
        "start_time": execution["start_time"],
        "stop_time": execution["stop_time"],
        "log": log_tail(execution["log_path"]) if finished else None,
        "run_id": execution["run_id"],
        "exit_code": execution["exit_code"],
        "message": execution["message"],
        "s3_uri": execution["upload_uri"] if execution["upload_status"] == "uploaded" else None,
        "upload_status": execution["upload_status"],
        "upload_message": execution["upload_message"],
        "resources": gpus.resources(**json.loads(execution.get("resources") or "{}")),
    }


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
    done_runs = AnswerCache(None)  # runs over, their process gone: they never change again
    # a job's or a module's status only changes when a new run of the job starts, which a
    # poller sees at most a second late (it could not see the start any sooner anyway)
    settled = AnswerCache(1.0)
    credentials = access.Credentials(cfg.users, cfg.auth_failures)
    downloads = access.Slots(cfg.max_downloads, "too_many_downloads", "zip downloads")

    @app.hook("before_request")
    def edges():
        env = bottle.request.environ
        try:
            untrusted.decoded_path(env.get("bottle.raw_path", ""))
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

    def auth_plugin(callback):
        def wrapper(*args, **kwargs):
            if cfg.auth:
                env = bottle.request.environ
                try:
                    ok = credentials.check(env.get("HTTP_AUTHORIZATION", ""),
                                           env.get("REMOTE_ADDR", ""))
                except access.Refused as e:
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
                      apply=[auth_plugin] if auth else [])
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
        """Liveness: 200 when the server answers (no auth)."""
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
                     "tls": front.over_tls(bottle.request.environ),
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
        jobs = db.jobs()
        offset = query_int("offset", 0, 10**12)
        limit = query_int("limit", None, 10**9)
        return send(jobs[offset:None if limit is None else offset + limit])

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

        folder = f"{mipper.s3_key_prefix(settings, job, module)}/{kind}/"
        try:
            if "client" not in s3:
                s3["client"] = mipper.s3_client()
            client = s3["client"]
            return [(f"{prefix}/{obj['Key'][len(folder):]}",
                     s3_opener(client, settings.s3_bucket, obj))
                    for obj in mipper.list_objects(client, settings.s3_bucket, folder)]
        except (BotoCoreError, ClientError) as e:
            log.warning("S3 listing of %s failed: %s", folder, e)
            raise ApiError(502, "storage_unavailable",
                           f"the local copy is gone and S3 could not be read: {e}") from None

    def download(job, module, kind):
        """A zip of the module's logs, outputs or temps, streamed as it is written; from S3
        when the local copy has been cleaned away."""
        execution = get_module(job, module)
        prefix = f"{job}_{module}_{kind}"
        files = mipper.kind_files(settings, job, module, kind)
        entries = []
        if files is not None:
            # lazily: the first bytes go out before a big folder is fully listed
            entries = ((f"{prefix}/{name}", local_opener(path)) for name, path in files)
        elif settings.s3_bucket and execution["upload_status"] == "uploaded":
            entries = s3_entries(job, module, kind, prefix)
        # an empty temps folder is a fine answer; no folder at all is not
        if files is None and not entries:
            raise ApiError(404, f"no_{kind}", f"module {module!r} of job {job!r} has no {kind} "
                                              "(not produced, or cleaned away)")
        try:
            body = downloads.hold(zip_stream(entries))
        except access.Refused as e:
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
           errors=(403, 404, 422))
    def cdr_webhook():
        """The CDR's webhook: signed with x-cdr-signature-256 instead of basic auth.
        Raises 403 for a missing or wrong signature, 404 when the CDR link is off."""
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

    @route("POST", "/cdr/cogs/{cog_id}", answer={"type": "object"}, errors=(422, 502))
    def cdr_cog(cog_id):
        """Process a CDR cog by hand: its URL is looked up in the CDR, then as a delivery.
        Raises 404 for a cog the CDR does not know, 502 when the CDR cannot be asked."""
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
        limit = query_int("limit", 100, 10000)
        rows = db.events("received", "downloading", "submitted", "failed", "duplicate")
        return send(list(reversed(rows))[:limit])

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
    def list_maps():
        """Names of the maps on the server."""
        return send(mipper.list_maps(settings))

    # What a concern kept in its own file needs to add its routes and hooks: each such file
    # has an add_routes(api), called below, so make_app stays the core API.
    api = Api(app=app, route=route, send=send, read_body=read_body, read_json=read_json,
              query_int=query_int, get_run=get_run, get_job=get_job, get_module=get_module,
              submit=submit, cfg=cfg, db=db, queue=queue, link=link, catalogue=catalogue,
              schemas=schemas, settled=settled, done_runs=done_runs)
    console.add_routes(api)
    logs.add_routes(api)
    docs_ui.add_routes(api)
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


def cdr_submitter(queue: RunQueue):
    """queue.submit for the CDR link, which knows MipError rather than HTTP answers."""
    def submit(payload):
        try:
            return queue.submit(payload)
        except ApiError as e:
            raise mipper.MipError(json.loads(e.body)["message"]) from None
    return submit


def read_json_bytes(raw: bytes):
    """The body as JSON. Raises 400: bad_json when nested too deep, malformed_json when
    not JSON at all."""
    try:
        return untrusted.parse_json(raw)
    except untrusted.TooDeep as e:
        raise ApiError(400, "bad_json", str(e)) from None
    except ValueError as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- main

class RequestLog:
    """WSGI middleware: one log line per request (client address, method, path, status,
    milliseconds), handed straight to the LineWriter: a logging record per request cost a
    tenth of the request rate. Behind the trusted proxy, waitress has already put the
    client's address the proxy passed on in REMOTE_ADDR."""

    def __init__(self, app, writer: "LineWriter"):
        self.app = app
        self.writer = writer

    def __call__(self, environ, start_response):
        started = time.monotonic()

        def start(status, headers, exc_info=None):
            # all three may come from a client (the address through X-Forwarded-For):
            # escaped, so they cannot forge a line
            self.writer.line(f"{untrusted.escape(environ.get('REMOTE_ADDR', ''))} "
                             f"{untrusted.escape(environ.get('REQUEST_METHOD', ''))} "
                             f"{untrusted.escape(environ.get('PATH_INFO', ''))} "
                             f"{status[:3]} {(time.monotonic() - started) * 1000:.1f} ms")
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


class LineWriter:
    """One thread that writes the log lines request threads queue (formatted by logging's
    QueueHandler), as many as are waiting in one write: under load, request threads that
    each wrote and flushed their own line fought over the stream and the GIL, and halved
    the request rate."""

    def __init__(self, stream):
        self.stream = stream
        self.lines = SimpleQueue()
        self.second = (0, "")  # the last second's time stamp, made once a second
        self.thread = threading.Thread(target=self.run, daemon=True, name="log-writer")
        self.thread.start()

    def run(self) -> None:
        while True:
            batch = [self.lines.get()]
            while not self.lines.empty():
                batch.append(self.lines.get())
            done = None in batch
            self.stream.write("".join((r if isinstance(r, str) else r.msg) + "\n"
                                      for r in batch if r is not None))
            self.stream.flush()
            if done:
                return

    def line(self, text: str) -> None:
        """Queue an INFO line, stamped like logging's lines."""
        now = time.time()
        if int(now) != self.second[0]:
            self.second = (int(now), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)))
        self.lines.put(f"{self.second[1]},{int(now % 1 * 1000):03d} INFO {text}")

    def stop(self, timeout: float = 5) -> None:
        """Write what is queued, then end the thread."""
        self.lines.put(None)
        self.thread.join(timeout)


def setup_logging() -> LineWriter:
    """The server's log lines to stdout through a LineWriter; returns it, to stop at exit."""
    writer = LineWriter(sys.stdout)
    handler = logging.handlers.QueueHandler(writer.lines)
    handler.setFormatter(untrusted.OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("mip").addHandler(handler)
    logging.getLogger("mip").setLevel(logging.INFO)
    # waitress warns on every queued request under load, which costs time and says nothing
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    return writer


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
            return mipper.EXIT_USAGE
        print(hash_password(password))
        return mipper.EXIT_OK
    try:
        cfg = Config.from_env(os.environ, args.host, args.port, args.no_auth)
        cfg.settings.make_dirs()
        mipper.load_catalogue(cfg.settings.config_path)
    except mipper.MipError as e:
        print(f"mip_server: error: {e}", file=sys.stderr)
        return mipper.EXIT_USAGE
    db = journal.Journal(cfg.settings.journal_path)
    db.migrate()
    try:
        queue = RunQueue(cfg, db)
    except keystore.KeyStoreError as e:
        print(f"mip_server: error: {e}", file=sys.stderr)
        return mipper.EXIT_USAGE
    link = None
    if cfg.cdr_settings:
        link = cdr.CdrLink(cfg.cdr_settings, cfg.settings, db, cdr_submitter(queue))
        queue.finished.append(link.run_finished)
    notifier = notices.Notifier(cfg.notify, db, lambda run_id: notice_status(db, run_id),
                                queue.running)
    queue.finished.append(notifier.run_ended)
    app = make_app(cfg, db, queue, link)
    # nothing is logged before the port line below, which must come first
    writer = setup_logging()
    try:
        server = waitress.create_server(
            RequestLog(app, writer), host=cfg.host, port=cfg.port, threads=cfg.threads,
            expose_tracebacks=False, ident="mip",
            # bodies over MAX_BODY get our JSON 413; far larger ones are refused by waitress
            # itself (plain text) before it buffers them
            max_request_body_size=16 * MAX_BODY,
            # keep streamed zips in memory (bounded by the high watermark), never in temp files
            outbuf_high_watermark=8 * 1024 * 1024, outbuf_overflow=64 * 1024 * 1024,
            **front.waitress_settings(cfg.trusted_proxy))
    except OSError as e:
        print(f"mip_server: error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror} "
              "(set MIP_PORT or --port)", file=sys.stderr)
        writer.stop()
        return mipper.EXIT_USAGE
    print(f"mip: serving on http://{cfg.host}:{server.effective_port}", flush=True)
    for warning in front.start_warnings(cfg.host, cfg.trusted_proxy):
        log.warning("%s", warning)
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
    return mipper.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
