"""mip_server: the TA1 Module Integration REST server (Bottle app served by waitress).

    source env.sh
    python mip_server.py                 # serves on $MIP_HOST:$MIP_PORT (127.0.0.1:8080)
    python mip_server.py --port 0        # any free port; the first output line names it
    python mip_server.py --hash-password # prints a salted hash for MIP_USERS_FILE

Each run is a `mipper.py` subprocess in its own process group; the SQLite journal
(journal.py) holds run, job and module state; JSON is checked against schema/.
"""

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import secrets
import signal
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

import cdr
import journal
import mipper
import openapi
from journal import FINISHED
from journal import Status

VERSION = "0.1.0"
MAX_BODY = 1024 * 1024
LOG_TAIL = 8192
CANCEL_GRACE = 30  # seconds for a cancelled run to stop its containers or tasks
CHUNK = 256 * 1024
YIELD_BYTES = 64 * 1024  # a zip goes to waitress in pieces of about this size
# Already compressed: stored as they are, since deflating them costs time and saves nothing.
STORED_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gz", ".zip", ".gpkg", ".pth",
                   ".cog", ".jp2", ".webp", ".bz2", ".xz", ".7z")
PBKDF2_ITERATIONS = 200_000

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
    threads: int = 8
    users: dict = field(default_factory=dict, repr=False)  # name -> password hash
    auth: bool = True
    password_file: str | None = None
    cdr_settings: cdr.CdrSettings | None = None

    @classmethod
    def from_env(cls, env, host=None, port=None, no_auth=False) -> "Config":
        """Raises mipper.MipError naming the variable that is wrong or missing."""
        settings = mipper.Settings.from_env(env)
        users, password_file = ({}, None) if no_auth else read_users(env)
        port = port if port is not None else mipper.int_setting(env, "MIP_PORT", 8080, 0, 65535)
        return cls(settings=settings, host=host or env.get("MIP_HOST") or "127.0.0.1",
                   port=port, max_runs=mipper.int_setting(env, "MIP_MAX_RUNS", 2, 1, 256),
                   threads=mipper.int_setting(env, "MIP_THREADS", 8, 1, 256),
                   users=users, auth=not no_auth, password_file=password_file,
                   cdr_settings=cdr.CdrSettings.from_env(env, VERSION))


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """`pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>` for a users file."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a hash_password() string."""
    try:
        scheme, iterations, salt, expected = stored.split("$")
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt),
                                     int(iterations))
    except ValueError:
        return False
    return scheme == "pbkdf2_sha256" and hmac.compare_digest(digest.hex(), expected)


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

class ApiError(bottle.HTTPResponse):
    """An answer with the one error shape; raise it anywhere in a request."""

    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(body=error_body(code, message), status=status, headers=headers)
        self.content_type = "application/json"


def error_body(code: str, message: str) -> str:
    return json.dumps({"error": code, "message": message})


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
        log.error("unexpected error on %s %s\n%s", bottle.request.method, bottle.request.path,
                  res.traceback or res.exception)
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
        self.running = {}  # run_id -> (job, mipper pid), while that process is alive
        self.keys = {}  # run_id -> openai key, in memory only, until the run starts
        self.stopping = False

    def submit(self, payload: dict, openai_key: str | None = None) -> str:
        """Check a RunPayload against the catalogue, maps and jobs, record it and start it
        when the limits allow; returns the run id. Raises ApiError (404 unknown map, 409 job
        bound to another map, 422 unknown module)."""
        catalogue, settings = self.catalogue, self.cfg.settings
        try:
            mipper.expand_modules(catalogue, payload["modules"])
        except mipper.UsageError as e:
            raise ApiError(422, "unknown_module", f"modules: {e}") from None
        for name in payload.get("extra_switches") or {}:
            if name not in catalogue:
                raise ApiError(422, "unknown_module",
                               f"extra_switches: unknown module {name!r}; GET /modules lists them")
        try:
            mipper.check_map(settings, payload["map"])
        except mipper.UsageError as e:
            raise ApiError(404, "unknown_map", f"map: {e}") from None
        try:
            run_id = self.db.create_run(payload["job"], payload["map"], payload["modules"],
                                        payload.get("force_rerun", False), payload,
                                        os.path.join(settings.runs_dir, "logs"))
        except journal.JournalError as e:
            raise ApiError(409, "job_bound_to_other_map", str(e)) from None
        log.info("run %s submitted: job %s, map %s, modules %s", run_id, payload["job"],
                 payload["map"], " ".join(payload["modules"]))
        with self.lock:
            if openai_key:
                self.keys[run_id] = openai_key
            self.dispatch()
        return run_id

    def dispatch(self) -> None:
        """Start every queued run that the limits allow, oldest first."""
        with self.lock:
            if self.stopping:
                return
            for run in self.db.runs_with_status(Status.NOT_STARTED):
                if len(self.running) >= self.cfg.max_runs:
                    break
                if run["run_id"] in self.running or any(
                        job == run["job"] for job, _ in self.running.values()):
                    continue
                self.start(run)

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
        key = self.keys.pop(run_id, None) or self.env.get("MIP_OPENAI_KEY")
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
        self.db.set_run_pid(run_id, proc.pid)
        self.running[run_id] = (run["job"], proc.pid)
        log.info("run %s started (job %s, pid %d)", run_id, run["job"], proc.pid)
        threading.Thread(target=self.watch, args=(run_id, proc.wait), daemon=True,
                         name=f"watch-{run_id}").start()

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

    def watch(self, run_id: str, wait) -> None:
        """Wait for the run's process, then make sure the journal says how it ended."""
        code = wait()
        with self.lock:
            self.running.pop(run_id, None)
            run = self.db.run(run_id)
            if run["status"] == Status.CANCELLED:
                self.db.end_running_executions(run_id, Status.CANCELLED, "run cancelled")
            elif run["status"] not in FINISHED:
                why = (f"mipper exited with code {code} before recording the end of the run"
                       if code is not None else "mipper ended before recording the end of the run")
                self.fail(run, why)
            run = self.db.run(run_id)
            log.info("run %s %s", run_id, run["status"])
            self.dispatch()
        for callback in self.finished:
            callback(run)

    def fail(self, run: dict, why: str) -> None:
        """Mark a run whose process is gone failed, saying why in its log."""
        self.db.end_running_executions(run["run_id"], Status.FAILED, why)
        self.db.set_run_status(run["run_id"], Status.FAILED)
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
            self.keys.pop(run_id, None)
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
        gone, and queue again those that never started."""
        for run in self.db.runs_with_status(Status.RUNNING, Status.NOT_STARTED):
            if run["pid"] and process_alive(run["pid"], run["run_id"]):
                self.adopt(run)
            elif run["pid"] or run["status"] == Status.RUNNING:
                self.fail(run, "the server restarted and the run's mipper process was gone")
                log.info("run %s failed: mipper process gone after a restart", run["run_id"])
        self.dispatch()

    def stop(self) -> None:
        """Stop starting runs; running mippers go on and a restarted server adopts them."""
        with self.lock:
            self.stopping = True


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
        with open(path, "rb") as f:
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
    verified = set()  # HMACs of credentials already checked, so pbkdf2 runs once per user
    salt = secrets.token_bytes(16)

    @app.hook("before_request")
    def edges():
        env = bottle.request.environ
        path = env.get("PATH_INFO", "/")
        if len(path) > 1 and path.endswith("/"):
            env["PATH_INFO"] = path.rstrip("/") or "/"
        if "\x00" in env["PATH_INFO"]:
            raise ApiError(400, "bad_path", "the path holds a NUL character")
        length = env.get("CONTENT_LENGTH") or "0"
        if not length.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(length) > MAX_BODY:
            raise ApiError(413, "body_too_large",
                           f"the body has {length} bytes; the limit is {MAX_BODY}")

    def authorized() -> bool:
        header = bottle.request.environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        token = hmac.new(salt, f"{user}:{password}".encode(), "sha256").digest()
        if token in verified:
            return True
        stored = cfg.users.get(user)
        # check a dummy hash for unknown users too, so timing does not reveal names
        ok = check_password(password, stored or DUMMY_HASH) and stored is not None
        if ok and len(verified) < 1024:
            verified.add(token)
        return ok

    def auth_plugin(callback):
        def wrapper(*args, **kwargs):
            if cfg.auth and not authorized():
                raise ApiError(401, "unauthorized",
                               "no or wrong credentials: use basic auth (MIP_CLIENT_USER and "
                               "MIP_CLIENT_PASSWORD for mip_client.py)",
                               headers={"WWW-Authenticate": 'Basic realm="mip"'})
            return callback(*args, **kwargs)
        return wrapper

    def route(method, path, summary="", body=None, answer=None, auth=True, errors=(),
              query=None):
        """Register a route, and its row of the table the OpenAPI document is built from.
        `errors`: the statuses it can answer beyond those openapi.statuses() adds to every
        route (400, 405, 413; 401 and 429 with auth; 404 with a path parameter)."""
        def register(fn):
            routes.append(openapi.Route(method, path, summary or fn.__doc__.split("\n")[0],
                                        body, answer, auth, errors, query))
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
        if not raw.isdigit() or int(raw) > high:
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

    def submit(payload, key):
        run_id = queue.submit(payload, key)
        settled.drop_job(payload["job"])
        bottle.response.set_header("Location", f"/runs/{run_id}")
        return send(run_status(db, db.run(run_id)))

    # ------------------------------------------------------------------ routes

    @route("GET", "/health", auth=False, answer={"type": "object"})
    def health():
        """Liveness: 200 when the server answers (no auth)."""
        return send({"status": "ok"})

    @route("GET", "/", answer={"type": "object"})
    def info():
        """Service info: version, modules, limits, queue."""
        return send({"name": "mip", "version": VERSION, "modules": list(catalogue),
                     "limits": {"max_runs": cfg.max_runs, "workers": settings.workers,
                                "max_body_bytes": MAX_BODY},
                     "runs": {"running": len(db.runs_with_status(Status.RUNNING)),
                              "queued": len(db.runs_with_status(Status.NOT_STARTED))},
                     "cdr": link.status() if link else None,
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
           errors=(404, 409, 422, 503, 507))
    def post_run():
        """Submit a run; answers at once with its RunStatus. 404 unknown map, 409 job bound
        to another map, 422 invalid payload."""
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

    @route("GET", "/runs/{run_id}/log", answer="text/plain")
    def get_run_log(run_id):
        """The whole run log, as text. Raises 404 if unknown."""
        run = get_run(run_id)
        bottle.response.content_type = "text/plain; charset=utf-8"
        try:
            return open(run["log_path"], "rb")
        except OSError:
            return b""

    @route("POST", "/runs/{run_id}/cancel", answer="RunStatus")
    def cancel_run(run_id):
        """Stop a run and every module it runs; a no-op on a finished run."""
        run = get_run(run_id)
        queue.cancel(run["run_id"])
        settled.drop_job(run["job"])
        return send(run_status(db, db.run(run["run_id"])))

    @route("POST", "/runs/{run_id}/rerun", body=openapi.RERUN_BODY, answer="RunStatus",
           errors=(409, 422, 503, 507))
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
        bottle.response.content_type = "application/zip"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="{prefix}.zip"')
        return zip_stream(entries)

    for prefix in ("/modules", "/jobs"):
        for kind in ("logs", "outputs", "temps"):
            route("GET", f"{prefix}/{{job}}/{{module}}/{kind}", answer="application/zip",
                  errors=(502, 503),
                  summary=f"A zip of the module's {kind}, streamed. Raises 404 if none.")(
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

    return app


DUMMY_HASH = hash_password("not a password", b"0" * 16)


def cdr_submitter(queue: RunQueue):
    """queue.submit for the CDR link, which knows MipError rather than HTTP answers."""
    def submit(payload):
        try:
            return queue.submit(payload)
        except ApiError as e:
            raise mipper.MipError(json.loads(e.body)["message"]) from None
    return submit


def read_json_bytes(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------- main

class RequestLog:
    """WSGI middleware: one log line per request (method, path, status, milliseconds),
    handed straight to the LineWriter: a logging record per request cost a tenth of the
    request rate."""

    def __init__(self, app, writer: "LineWriter"):
        self.app = app
        self.writer = writer

    def __call__(self, environ, start_response):
        started = time.monotonic()

        def start(status, headers, exc_info=None):
            self.writer.line(f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')} "
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
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
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
    queue = RunQueue(cfg, db)
    link = None
    if cfg.cdr_settings:
        link = cdr.CdrLink(cfg.cdr_settings, cfg.settings, db, cdr_submitter(queue))
        queue.finished.append(link.run_finished)
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
            outbuf_high_watermark=8 * 1024 * 1024, outbuf_overflow=64 * 1024 * 1024)
    except OSError as e:
        print(f"mip_server: error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror} "
              "(set MIP_PORT or --port)", file=sys.stderr)
        writer.stop()
        return mipper.EXIT_USAGE
    print(f"mip: serving on http://{cfg.host}:{server.effective_port}", flush=True)
    if not cfg.auth:
        log.warning("!!! AUTHENTICATION IS OFF (--no-auth): anyone who reaches this port can "
                    "run modules and read results !!!")
    elif cfg.password_file:
        log.info("basic auth: user %r, password in %s", next(iter(cfg.users)), cfg.password_file)
    else:
        log.info("basic auth: %d user(s)", len(cfg.users))
    queue.recover()
    if link:
        link.start()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        queue.stop()
        if link:
            link.stop()
        server.close()
        log.info("stopped; running runs go on and are adopted at the next start")
        writer.stop()
    return mipper.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
