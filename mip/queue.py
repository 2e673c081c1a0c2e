"""queue: runs as processes. Submitted runs wait in the journal; at most MIP_MAX_RUNS start at
once, one per job, each as a `mipper.py` subprocess in its own process group, watched until
its end is recorded; cancel stops the group; at start-up runs whose mipper outlived the
server are adopted and those whose process is gone are failed with the reason.

The server makes one RunQueue and the CDR link submits through it. It raises the core's
errors (mip/errors.py), never HTTP answers; it never imports luigi (mipper runs in the
child process) nor the links, which hook in through the `checks`, `submitted` and
`finished` callbacks.
"""

import errno
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

from mip import journal
from mip import keystore
from mip import maps
from mip import runners
from mip.catalogue import CHECKED
from mip.catalogue import CHECKED_ENV
from mip.catalogue import check_extra
from mip.catalogue import check_name
from mip.catalogue import expand_modules
from mip.catalogue import gpu_refusal
from mip.catalogue import load_catalogue
from mip.catalogue import module_runner
from mip.errors import DiskFull
from mip.errors import Invalid
from mip.errors import JobBoundToOtherMap
from mip.errors import JournalUnavailable
from mip.errors import NotFound
from mip.errors import QueueFull
from mip.errors import UsageError
from mip.files import free_mb
from mip.journal import FINISHED
from mip.journal import Status
from mip.maps import check_map
from mip.settings import HERE
from mip.settings import SERVER_SECRETS

CANCEL_GRACE = 30  # seconds for a cancelled run to stop its containers or tasks
QUEUE_RETRY_AFTER = 30  # seconds a client is told to wait when the queue is full
RETRY_START = 5  # seconds before queued runs that could not start are tried again
RETRY_END_MAX = 10  # longest wait between two tries at recording a run's end
# an OpenAI key reaches a module's environment: printable ASCII, nothing that could break it
OPENAI_KEY_RE = re.compile(r"[!-~]{1,512}")

log = logging.getLogger("mip.server")


class RunQueue:
    """Starts queued runs as mipper subprocesses: at most `max_runs` at once, one per job."""

    def __init__(self, cfg, db: journal.Journal, env=None):
        self.cfg = cfg
        self.db = db
        self.catalogue = load_catalogue(cfg.settings.config_path)
        self.finished = []  # callbacks(run) called when a run's process has ended
        self.checks = []  # callbacks(payload) that may refuse a submission (raise MipError)
        self.submitted = []  # callbacks(run_id, payload) once a run is recorded
        self.env = dict(os.environ if env is None else env)
        self.lock = threading.RLock()
        self.running = {}  # run_id -> (job, mipper pid), until its end is recorded
        # a queued run's OpenAI key waits in the journal, sealed, until the run starts
        self.keystore = keystore.KeyStore(cfg.settings.key_file)
        # where a dead run's containers or tasks may be: the runners this host uses
        self.runners = {module_runner(cfg.settings, m) for m in self.catalogue.values()}
        self.retry = None  # the timer that dispatches again after a run could not start
        self.stopping = False

    def submit(self, payload: dict, openai_key: str | None = None) -> str:
        """Check a RunPayload against the catalogue, maps and jobs, record it and start it
        when the limits allow; returns the run id. Raises NotFound (unknown map),
        JobBoundToOtherMap, Invalid (a bad name, an unknown module, a refused switch or a map
        GDAL cannot read), QueueFull or DiskFull (too little free disk space)."""
        openai_key = openai_key or None  # "" is no key: the original tool's payloads send it
        self.check(payload, openai_key)
        self.check_space()
        sealed = self.keystore.seal(openai_key) if openai_key else None
        with self.lock:
            # under the lock, so that two submissions cannot both take the last place
            if self.queued() >= self.cfg.max_queued:
                raise QueueFull(f"{self.cfg.max_queued} runs are already waiting to start "
                                f"(MIP_MAX_QUEUED); try again in {QUEUE_RETRY_AFTER} s",
                                retry_after=QUEUE_RETRY_AFTER)
            try:
                run_id = self.db.create_run(payload["job"], payload["map"], payload["modules"],
                                            payload.get("force_rerun", False), payload,
                                            os.path.join(self.cfg.settings.runs_dir, "logs"),
                                            sealed)
            except journal.JournalError as e:
                raise JobBoundToOtherMap(str(e)) from None
            except (sqlite3.Error, OSError) as e:
                if not disk_full(e):
                    raise
                raise insufficient_storage("the journal's disk is full") from None
            for callback in self.submitted:
                callback(run_id, payload)
            log.info("run %s submitted: job %s, map %s, modules %s", run_id, payload["job"],
                     payload["map"], " ".join(payload["modules"]))
            self.dispatch()
        return run_id

    def check(self, payload: dict, openai_key: str | None) -> None:
        """Everything of a payload that reaches a module's command line or environment:
        names (matched whole, so no trailing newline), modules, the map, extra switches
        (the rule of switches.py), the key, and whatever the `checks` callbacks refuse.
        Raises Invalid or NotFound."""
        catalogue, settings = self.catalogue, self.cfg.settings
        for kind in ("job", "map"):
            try:
                check_name(kind, payload[kind])
            except UsageError as e:
                raise Invalid(f"{kind}: {e}") from None
        try:
            targets = expand_modules(catalogue, payload["modules"])
        except UsageError as e:
            raise Invalid(f"modules: {e}", "unknown_module") from None
        refusal = gpu_refusal(settings, catalogue, targets)
        if refusal:
            raise Invalid(f"modules: {refusal}", "gpu_required")
        extra = payload.get("extra_switches") or {}
        for name in extra:
            if name not in catalogue:
                raise Invalid(f"extra_switches: unknown module {name!r}; GET /modules lists "
                              "them", "unknown_module")
        check_extra(settings, catalogue, payload["job"], extra)
        if openai_key and not OPENAI_KEY_RE.fullmatch(openai_key):
            raise Invalid("openai_key: expected printable ASCII without spaces")
        try:
            check_map(settings, payload["map"])
        except UsageError as e:
            raise NotFound(f"map: {e}", "unknown_map") from None
        maps.check_readable(settings, payload["map"])
        for check in self.checks:
            check(payload)

    def queued(self) -> int:
        """Runs recorded but not started yet (those being started do not count)."""
        return len([r for r, _ in self.db.waiting_runs() if r not in self.running])

    def check_space(self) -> None:
        """Raises DiskFull when a data folder has less free space than MIP_MIN_FREE_MB:
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
            except (sqlite3.Error, JournalUnavailable) as e:
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
        argv = [sys.executable, os.path.join(HERE, "mipper.py"), "--run-id", run_id,
                "--job", run["job"], "--map", run["map"]]
        for name in run["modules"]:
            argv += ["--module", name]
        if run["force_rerun"]:
            argv.append("--force-rerun")
        for name, args in (run["payload"].get("extra_switches") or {}).items():
            argv += [f"--extra-switch={name}={arg}" for arg in args]
        env = {k: v for k, v in self.env.items()
               if k not in SERVER_SECRETS and k != "MIP_OPENAI_KEY"}
        # every process of the run inherits this, so that a dead run's leftovers are found
        env[runners.RUN_ENV] = run_id
        env[CHECKED_ENV] = " ".join(sorted(CHECKED))
        try:
            key = self.run_key(run_id) or self.cfg.settings.openai_key
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
        except (sqlite3.Error, JournalUnavailable) as e:
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
        except (sqlite3.Error, JournalUnavailable):
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


def journal_warnings(settings, db: journal.Journal, key_file_found: bool) -> list:
    """What start-up finds amiss between the journal and the disk, one line each: a journal
    without jobs while job folders are on disk (it was lost or replaced), and OpenAI keys
    sealed under a key file that was missing (made anew, it cannot open them)."""
    found = []
    if not db.has_jobs():
        try:
            folders = [e for e in os.scandir(settings.outputs_dir) if e.is_dir()]
        except OSError:
            folders = []
        if folders:
            found.append(f"the journal {db.path} holds no jobs, but {len(folders)} jobs' "
                         f"folders are on disk in {settings.outputs_dir}: was the journal "
                         "lost or replaced? This server knows none of their runs")
    sealed = db.runs_with_sealed_keys() if not key_file_found else []
    if sealed:
        found.append(f"the key file {settings.key_file} was missing and is made anew, but the "
                     f"journal holds OpenAI keys sealed under the old one: {len(sealed)} "
                     f"queued runs will fail when they start: {' '.join(sealed)}")
    return found


def insufficient_storage(why: str) -> DiskFull:
    return DiskFull(f"{why}; no run can start until space is freed on the server")


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
