"""The SQLite journal of runs, jobs and module executions, shared by mip_server.py and mipper.py.

Not run directly: `journal.Journal(path).migrate()` creates or upgrades the file (the schema
and its migrations are in migrations.py). ALL the project's SQL on the journal is here: the
idempotency keys, completion notices and metrics queries too, as methods named for what
they do. One connection per thread and per process (luigi forks a process per task), the
file in WAL mode (set by migrate()), every write a method that runs inside
`with self.transaction() as db:` and is tried again (retried()) while the file is locked.
"""

import contextlib
import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from datetime import UTC
from datetime import datetime
from enum import Enum

from mip import migrations
from mip.errors import JournalUnavailable
from mip.errors import MipError


class Status(str, Enum):
    """States of a run or a module execution; the values are the wire values."""

    NOT_STARTED = "not_started"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (Status.PASSED, Status.FAILED, Status.CANCELLED)
# why a module execution is closed when its run ended first (its worker or mipper died)
LOST_EXECUTION = "the run ended before this module recorded its end"

# Legal moves; anything else (such as mipper marking a cancelled run failed) is refused.
TRANSITIONS = {
    Status.NOT_STARTED: {Status.RUNNING, Status.FAILED, Status.CANCELLED},
    Status.RUNNING: {Status.PASSED, Status.FAILED, Status.CANCELLED},
}

# How long a write waits for the journal: the server's answer 503 within seconds (a
# request thread must not wait for minutes), mipper's wait minutes, since a mipper that
# gives up loses its run's work. busy_timeout is SQLite's wait for the lock in one try.
BUSY_TIMEOUT = 1.0
WRITE_FOR = 4.0
MIPPER_BUSY_TIMEOUT = 30.0
MIPPER_WRITE_FOR = 15 * 60.0
MAX_DELAY = 5.0  # the longest pause between two tries of a write
RETRY_AFTER = 5  # seconds a client is told to wait when the journal cannot be written
# what a later try may overcome: a lock held elsewhere, a file read-only or failing for
# a while (a full disk is not among them: it answers 507 at once)
TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY,
             sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}

log = logging.getLogger("mip.journal")


class JournalError(MipError):
    """A write the journal refuses (unknown row, illegal state change, job bound elsewhere),
    or a file that is not the journal this code expects."""


def utcnow() -> str:
    """Now as ISO 8601 UTC text with a Z, to the millisecond."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_last_micros = 0
_id_lock = threading.Lock()


def new_run_id() -> str:
    """A unique id that sorts by submission time: UTC time to the microsecond (strictly
    increasing within a process) plus a random tail."""
    global _last_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    seconds, fraction = divmod(micros, 1_000_000)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds))
    return f"{stamp}-{fraction:06d}-{secrets.token_hex(2)}"


def _retried(method):
    """A Journal write method, tried again as Journal.retried() says."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        return self.retried(lambda: method(self, *args, **kwargs))
    return write


class Journal:
    """The journal file at `path`; safe to share between threads (one connection each).

    A write that meets a locked, read-only or failing file is tried again, with a wait
    that doubles up to `write_for` seconds in all, each try waiting up to `busy_timeout`
    for the lock; then it raises JournalUnavailable. The server keeps both short, so that
    a request is answered 503 in seconds; mipper takes minutes (MIPPER_* below), since
    giving up loses a run's work. The file is never made anew while in use: only
    migrate() creates it, and once opened, a write or check_file() on a path that was
    deleted or replaced raises JournalUnavailable naming it.
    """

    def __init__(self, path: str, busy_timeout: float = BUSY_TIMEOUT,
                 write_for: float = WRITE_FOR):
        self.path = path
        self.busy_timeout = busy_timeout
        self.write_for = write_for
        self.identity = None  # (st_dev, st_ino) of the file first opened
        self._local = threading.local()

    def connect(self, create: bool = False) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a forked child).
        Raises JournalUnavailable when the file is gone (unless `create`)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            mode = "rwc" if create else "rw"
            uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode={mode}"
            try:
                db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout,
                                     isolation_level=None, check_same_thread=False)
            except sqlite3.OperationalError as e:
                raise self.unavailable(str(e)) from None
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            if self.identity is None:
                st = os.stat(self.path)
                self.identity = (st.st_dev, st.st_ino)
            local.db, local.pid = db, os.getpid()
        return local.db

    def check_file(self) -> None:
        """Raises JournalUnavailable if the file opened first was deleted or replaced since:
        this process's connections would go on writing to the old one."""
        if self.identity is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise JournalUnavailable(
                f"the journal {self.path} was deleted while in use; put it back (or move "
                "the data away) and restart the server: it is never made anew while running",
                retry_after=RETRY_AFTER) from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise JournalUnavailable(
                f"the journal {self.path} was replaced by another file while in use; restart "
                "the server to use the new one", retry_after=RETRY_AFTER)

    def unavailable(self, why: str) -> JournalUnavailable:
        return JournalUnavailable(f"the journal {self.path} cannot be written now ({why}); "
                                  f"try again in {RETRY_AFTER} s", retry_after=RETRY_AFTER)

    @contextlib.contextmanager
    def transaction(self):
        """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any exception (a failed COMMIT
        too: a connection left inside a transaction could never write again)."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    self.close()  # unusable: the next use opens a new one
            raise

    def retried(self, write):
        """`write()` (which makes its own transaction), tried again while the file is
        locked, read-only or failing, for up to `write_for` seconds. Raises
        JournalUnavailable past that, or when the file was deleted or replaced."""
        deadline = time.monotonic() + self.write_for
        delay = 0.02
        while True:
            self.check_file()
            try:
                return write()
            except sqlite3.OperationalError as e:
                code = getattr(e, "sqlite_errorcode", 0) & 0xFF
                if code not in TRANSIENT:
                    raise
                if code != sqlite3.SQLITE_BUSY:
                    # a connection opened while the file was read-only stays so: reopen
                    self.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("journal %s: a write failed for %.0f s: %s", self.path,
                                self.write_for, e)
                    raise self.unavailable(str(e)) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, MAX_DELAY)

    def migrate(self) -> None:
        """Create the file if need be, switch it to WAL, create the schema and apply pending
        migrations (migrations.py); a no-op when up to date. Raises JournalError for a file
        that is not a journal (corrupt, truncated), naming it and SQLite's reason."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            self.connect(create=True)
            self._use_wal()
            self.retried(lambda: migrations.apply(self))
        except sqlite3.DatabaseError as e:
            self.close()
            raise JournalError(f"{self.path}: not a usable journal: {e}") from None

    def version(self) -> int:
        """The migration the file has had (PRAGMA user_version), read without a write."""
        return self.connect().execute("PRAGMA user_version").fetchone()[0]

    def check_version(self) -> None:
        """Raises JournalError unless the file has exactly the migrations this code
        expects: what a mipper started by the server checks, since the server migrated."""
        try:
            found = self.version()
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{self.path}: not a usable journal: {e}") from None
        if found != migrations.VERSION:
            raise JournalError(f"{self.path} is at version {found}, this mipper expects "
                               f"{migrations.VERSION}: the server that started it runs "
                               "other code; restart the server")

    def _use_wal(self, tries: int = 100) -> None:
        """WAL is a property of the file, set once. Switching fails at once, without the busy
        timeout, while another connection is using the file (two mippers starting on a new
        journal), so it is retried for a while."""
        db = self.connect()
        for _ in range(tries):
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e):
                    raise
                time.sleep(0.05)
        raise JournalError(f"{self.path}: could not switch to WAL; the file stays locked")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local.pid = None

    # ---------------------------------------------------------------- runs and jobs

    @_retried
    def create_run(self, job: str, map_name: str, modules: list, force_rerun: bool,
                   payload: dict, logs_dir: str, sealed_key: str | None = None) -> str:
        """Record a new `not_started` run, binding the job to its map on its first run;
        returns its id (made inside the transaction, so ids sort as runs were recorded).
        The run's log is `<logs_dir>/<run id>.log`. `sealed_key` (an already encrypted
        OpenAI key) is kept with the run until run_key() is forgotten.

        Raises JournalError if the job is bound to another map.
        """
        now = utcnow()
        with self.transaction() as db:
            run_id = new_run_id()
            log_path = os.path.join(logs_dir, f"{run_id}.log")
            bound = db.execute("SELECT map FROM jobs WHERE job = ?", (job,)).fetchone()
            if bound is None:
                db.execute("INSERT INTO jobs (job, map, created) VALUES (?, ?, ?)",
                           (job, map_name, now))
            elif bound["map"] != map_name:
                raise JournalError(f"job {job!r} is bound to map {bound['map']!r}, not "
                                   f"{map_name!r}; use another job name for this map")
            db.execute(
                "INSERT INTO runs (run_id, job, map, modules, force_rerun, payload, status,"
                " submit_time, log_path) VALUES (?, ?, ?, ?, ?, ?, 'not_started', ?, ?)",
                (run_id, job, map_name, json.dumps(modules), int(force_rerun),
                 json.dumps(payload), now, log_path))
            if sealed_key is not None:
                db.execute("INSERT INTO run_keys (run_id, sealed) VALUES (?, ?)",
                           (run_id, sealed_key))
        return run_id

    def run_key(self, run_id: str) -> str | None:
        """The sealed OpenAI key kept for a queued run, or None."""
        row = self.connect().execute("SELECT sealed FROM run_keys WHERE run_id = ?",
                                     (run_id,)).fetchone()
        return row and row[0]

    def runs_with_sealed_keys(self) -> list:
        """Ids of the runs that keep a sealed OpenAI key (queued ones), oldest first."""
        return [r[0] for r in self.connect().execute(
            "SELECT k.run_id FROM run_keys k JOIN runs r ON r.run_id = k.run_id"
            " ORDER BY r.seq")]

    @_retried
    def forget_run_key(self, run_id: str) -> None:
        """Delete a run's sealed key (it started, was cancelled or ended)."""
        with self.transaction() as db:
            db.execute("DELETE FROM run_keys WHERE run_id = ?", (run_id,))

    @_retried
    def set_run_status(self, run_id: str, status: Status, pid: int | None = None) -> bool:
        """Move a run to `status`, stamping start or stop time; False if the move is illegal."""
        with self.transaction() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise JournalError(f"no run {run_id!r}")
            if Status(status) not in TRANSITIONS.get(Status(row["status"]), ()):
                return False
            now = utcnow()
            if status == Status.RUNNING:
                db.execute("UPDATE runs SET status = ?, start_time = ?, pid = ? WHERE run_id = ?",
                           (status.value, now, pid, run_id))
            else:
                db.execute("UPDATE runs SET status = ?, stop_time = ?,"
                           " start_time = COALESCE(start_time, ?) WHERE run_id = ?",
                           (status.value, now, now, run_id))
        return True

    @_retried
    def add_run_warning(self, run_id: str, text: str) -> None:
        """Add one warning to the run's list (once: the same text again is a no-op)."""
        with self.transaction() as db:
            row = db.execute("SELECT warnings FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise JournalError(f"no run {run_id!r}")
            warnings = json.loads(row["warnings"] or "[]")
            if text not in warnings:
                db.execute("UPDATE runs SET warnings = ? WHERE run_id = ?",
                           (json.dumps(warnings + [text]), run_id))

    @_retried
    def set_run_pid(self, run_id: str, pid: int) -> None:
        """Record the run's mipper process, so that a restarted server can find it."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (pid, run_id))

    def run(self, run_id: str) -> dict | None:
        """The run's row as a dict, or None."""
        row = self.connect().execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _run_dict(row)

    def run_ids(self, job: str | None = None, status: str | None = None,
                limit: int | None = None, offset: int = 0) -> list:
        """Run ids oldest first, optionally of one job and/or one status, paged."""
        return json.loads(self.run_ids_json(job, status, limit, offset))

    def run_ids_json(self, job: str | None = None, status: str | None = None,
                     limit: int | None = None, offset: int = 0) -> str:
        """run_ids() as JSON text, made by SQLite: a list answer needs no Python objects."""
        where, args = _run_filter(job, status)
        sql = "SELECT run_id FROM runs" + where + " ORDER BY seq LIMIT ? OFFSET ?"
        args += [-1 if limit is None else limit, offset]
        # one row holding a JSON array: a step per run releases and retakes the GIL per row
        sql = f"SELECT json_group_array(run_id) FROM ({sql})"
        return self.connect().execute(sql, args).fetchone()[0]

    def runs_page(self, job: str | None = None, status: str | None = None, limit: int = 50,
                  offset: int = 0) -> list:
        """Rows of runs newest first, optionally of one job and/or one status, paged; without
        payloads (up to a MiB each), so that a page costs the same with any history."""
        where, args = _run_filter(job, status)
        rows = self.connect().execute(
            "SELECT run_id, job, map, modules, status, submit_time, start_time, stop_time"
            f" FROM runs{where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*args, limit, offset])
        return [dict(r, modules=json.loads(r["modules"])) for r in rows]

    def count_runs(self, job: str | None = None, status: str | None = None) -> int:
        """How many runs there are, optionally of one job and/or one status."""
        where, args = _run_filter(job, status)
        return self.connect().execute(f"SELECT COUNT(*) FROM runs{where}", args).fetchone()[0]

    def waiting_runs(self) -> list:
        """(run_id, job) of every `not_started` run, oldest first: what the dispatcher
        needs, without the payloads (up to a MiB each), whose decoding made every
        submission slower as the queue grew."""
        return [tuple(row) for row in self.connect().execute(
            "SELECT run_id, job FROM runs WHERE status = 'not_started' ORDER BY seq")]

    def runs_with_status(self, *statuses: Status) -> list:
        """Rows of every run in one of `statuses`, oldest first."""
        marks = ",".join("?" * len(statuses))
        rows = self.connect().execute(
            f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY seq",
            [Status(s).value for s in statuses])
        return [_run_dict(r) for r in rows]

    def latest_run(self, job: str) -> dict | None:
        """The job's most recently submitted run, or None."""
        row = self.connect().execute(
            "SELECT * FROM runs WHERE job = ? ORDER BY seq DESC LIMIT 1", (job,)).fetchone()
        return _run_dict(row)

    def jobs(self) -> list:
        """Job names, in the order they were first run."""
        rows = self.connect().execute("SELECT job FROM jobs ORDER BY created, job")
        return [r[0] for r in rows]

    def jobs_json(self, limit: int | None = None, offset: int = 0) -> str:
        """Job names in the order they were first run, paged, as JSON text made by SQLite
        from the jobs_created index."""
        return self.connect().execute(
            "SELECT json_group_array(job) FROM (SELECT job FROM jobs"
            " ORDER BY created, job LIMIT ? OFFSET ?)",
            (-1 if limit is None else limit, offset)).fetchone()[0]

    def jobs_page(self, limit: int = 50, offset: int = 0) -> list:
        """Jobs newest first (jobs_json() reversed), paged: job, map, and the id, status and
        times of its latest run. The page is cut from the jobs_created index first, so that
        only its own jobs look up their latest run; CROSS JOIN keeps it the outer loop, so
        the rows come in its order with no sort."""
        rows = self.connect().execute(
            "SELECT j.job, j.map, r.run_id, r.status, r.submit_time, r.stop_time FROM"
            " (SELECT job FROM jobs ORDER BY created DESC, job DESC LIMIT ? OFFSET ?) p"
            " CROSS JOIN jobs j ON j.job = p.job"
            " LEFT JOIN runs r ON r.seq = (SELECT MAX(seq) FROM runs WHERE job = j.job)",
            (limit, offset))
        return [dict(r) for r in rows]

    def count_jobs(self) -> int:
        return self.connect().execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def has_jobs(self) -> bool:
        """Whether any job is recorded: one row read, where count_jobs() reads them all."""
        return bool(self.connect().execute("SELECT EXISTS (SELECT 1 FROM jobs)").fetchone()[0])

    def jobs_of_maps(self, map_names: list) -> dict:
        """{map: names of the jobs bound to it, in the order they were first run} for some
        maps (a page of them), in one query on the jobs_map index; a map without jobs is
        left out."""
        found = {}
        for start in range(0, len(map_names), 500):  # SQLite's bound on ? in one statement
            some = map_names[start:start + 500]
            rows = self.connect().execute(
                f"SELECT map, job FROM jobs WHERE map IN ({','.join('?' * len(some))})"
                " ORDER BY map, created, job", some)
            for map_name, job in rows:
                found.setdefault(map_name, []).append(job)
        return found

    def job_map(self, job: str) -> str | None:
        """The map a job is bound to, or None for an unknown job."""
        row = self.connect().execute("SELECT map FROM jobs WHERE job = ?", (job,)).fetchone()
        return row and row[0]

    # ---------------------------------------------------------------- module executions

    @_retried
    def start_execution(self, run_id: str, job: str, module: str, log_path: str) -> int:
        """Record a module starting to run; returns the execution id."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO executions (run_id, job, module, status, start_time, log_path)"
                " VALUES (?, ?, ?, 'running', ?, ?)", (run_id, job, module, utcnow(), log_path))
            return cur.lastrowid

    @_retried
    def finish_execution(self, exec_id: int, status: Status, exit_code: int | None,
                         message: str | None, resources: dict | None = None,
                         warnings: list | None = None) -> bool:
        """Record how a module execution ended (what it used of the host, the warnings it
        logged); False if it had already ended (cancelled)."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE executions SET status = ?, stop_time = ?, exit_code = ?, message = ?,"
                " resources = COALESCE(?, resources), warnings = ?"
                " WHERE id = ? AND status = 'running'",
                (Status(status).value, utcnow(), exit_code, message,
                 None if resources is None else json.dumps(resources),
                 json.dumps(warnings) if warnings else None, exec_id))
            return cur.rowcount == 1

    @_retried
    def set_execution_progress(self, exec_id: int, message: str | None,
                               resources: dict | None = None, started: bool = False) -> None:
        """A running execution's message (such as "waiting for a GPU") and, when given, what
        it uses so far; with `started`, its start time becomes now (it has waited for a GPU,
        and its time runs from when it got one). No change once it has ended."""
        with self.transaction() as db:
            db.execute("UPDATE executions SET message = ?, resources = COALESCE(?, resources),"
                       " start_time = CASE WHEN ? THEN ? ELSE start_time END"
                       " WHERE id = ? AND status = 'running'",
                       (message, None if resources is None else json.dumps(resources),
                        started, utcnow(), exec_id))

    @_retried
    def set_upload(self, exec_id: int, status: str, uri: str, message: str | None) -> None:
        """Record the outcome of copying an execution's data to S3."""
        with self.transaction() as db:
            db.execute("UPDATE executions SET upload_status = ?, upload_uri = ?,"
                       " upload_message = ? WHERE id = ?", (status, uri, message, exec_id))

    @_retried
    def end_running_executions(self, run_id: str, status: Status, message: str) -> int:
        """Mark the run's running modules `status` (cancel, lost process); returns how many."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE executions SET status = ?, stop_time = ?, message = ?"
                " WHERE run_id = ? AND status = 'running'",
                (Status(status).value, utcnow(), message, run_id))
            return cur.rowcount

    def latest_execution(self, job: str, module: str) -> dict | None:
        """The module's most recent execution in the job, or None."""
        row = self.connect().execute(
            "SELECT * FROM executions WHERE job = ? AND module = ? ORDER BY id DESC LIMIT 1",
            (job, module)).fetchone()
        return dict(row) if row else None

    def last_pass(self, job: str, module: str) -> int:
        """The id of the module's latest passed execution in the job (0 when none)."""
        row = self.connect().execute(
            "SELECT MAX(id) FROM executions WHERE job = ? AND module = ? AND status = 'passed'",
            (job, module)).fetchone()
        return row[0] or 0

    def executions(self, run_id: str) -> list:
        """Every module execution of a run, in start order."""
        rows = self.connect().execute(
            "SELECT * FROM executions WHERE run_id = ? ORDER BY id", (run_id,))
        return [dict(r) for r in rows]

    def job_module_status(self, job: str) -> dict:
        """{module: status of its latest execution} in a job, in the order they first ran."""
        rows = self.connect().execute(
            "SELECT e.module, e.status FROM executions e JOIN (SELECT MAX(id) AS last,"
            " MIN(id) AS first FROM executions WHERE job = ? GROUP BY module) m"
            " ON e.id = m.last ORDER BY m.first", (job,))
        return dict(rows.fetchall())

    def job_modules(self, job: str) -> list:
        """Names of the modules executed in a job, in the order they first ran."""
        rows = self.connect().execute(
            "SELECT module FROM executions WHERE job = ? GROUP BY module ORDER BY MIN(id)",
            (job,))
        return [r[0] for r in rows]

    def passes_before(self, job: str, run_id: str) -> dict:
        """{module: its latest execution in the job before run `run_id`}, for those whose
        latest one then had passed: what that run found done and skipped (run ids sort as
        runs were recorded)."""
        rows = self.connect().execute(
            "SELECT e.* FROM executions e JOIN (SELECT MAX(id) AS last FROM executions"
            " WHERE job = ? AND run_id < ? GROUP BY module) m ON e.id = m.last"
            " WHERE e.status = 'passed'", (job, run_id))
        return {r["module"]: dict(r) for r in rows}

    # ---------------------------------------------------------------- deleting (retention.py)

    def job_busy(self, job: str) -> bool:
        """True while a run of the job is queued or running."""
        row = self.connect().execute(
            "SELECT 1 FROM runs WHERE job = ? AND status IN ('not_started', 'running') LIMIT 1",
            (job,)).fetchone()
        return row is not None

    @_retried
    def reset_module(self, job: str, module: str, why: str, forget_upload: bool) -> int:
        """The module's outputs are gone: its latest execution, and every one that passed,
        become `not_started` (with `why` as message), so that no record says it passed and
        the next run executes it. `forget_upload`: its S3 copies are gone too. Returns how
        many executions changed."""
        upload = (", upload_status = NULL, upload_uri = NULL, upload_message = NULL"
                  if forget_upload else "")
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE executions SET status = 'not_started', message = ?{upload}"
                " WHERE job = ? AND module = ? AND (status = 'passed' OR id = (SELECT MAX(id)"
                " FROM executions WHERE job = ? AND module = ?))",
                (why, job, module, job, module))
            return cur.rowcount

    @_retried
    def delete_job(self, job: str) -> list:
        """Delete the job, its runs and every row that refers to them; the runs' log paths."""
        with self.transaction() as db:
            rows = db.execute("SELECT run_id, log_path FROM runs WHERE job = ?", (job,)).fetchall()
            _delete_rows(db, "jobs", "job", [job])
            _delete_run_mentions(db, [r[0] for r in rows])
        return [r[1] for r in rows]

    def holds_job_state(self, run_id: str) -> bool:
        """True if the run is its job's latest, or one of its executions is the latest of
        its module: deleting it would change what the job's status says."""
        return bool(self.connect().execute(
            "SELECT r.seq = (SELECT MAX(seq) FROM runs WHERE job = r.job) OR EXISTS ("
            " SELECT 1 FROM executions e WHERE e.run_id = r.run_id AND e.id = (SELECT MAX(id)"
            " FROM executions WHERE job = e.job AND module = e.module))"
            " FROM runs r WHERE r.run_id = ?", (run_id,)).fetchone()[0])

    @_retried
    def delete_run(self, run_id: str) -> None:
        """Delete a run and every row that refers to it (its executions, its key)."""
        with self.transaction() as db:
            _delete_rows(db, "runs", "run_id", [run_id])
            _delete_run_mentions(db, [run_id])

    def old_runs(self, before: str) -> list:
        """Rows of the finished runs that stopped before `before` (utcnow() text), oldest
        first, except those holding their job's state (holds_job_state) and those whose
        completion notice is still to be sent (a receiver down for hours must still get it)."""
        rows = self.connect().execute(
            "SELECT * FROM runs r WHERE status IN ('passed', 'failed', 'cancelled')"
            " AND stop_time < ? AND r.seq < (SELECT MAX(seq) FROM runs WHERE job = r.job)"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.run_id = r.run_id"
            " AND d.state IN ('waiting', 'pending'))"
            " AND NOT EXISTS (SELECT 1 FROM executions e WHERE e.run_id = r.run_id AND e.id ="
            " (SELECT MAX(id) FROM executions WHERE job = e.job AND module = e.module))"
            " ORDER BY seq", (before,))
        return [_run_dict(r) for r in rows]

    def job_ended(self, job: str) -> str | None:
        """The stop time of the job's latest run if that run has ended, else None."""
        row = self.connect().execute(
            "SELECT status, stop_time FROM runs WHERE job = ? ORDER BY seq DESC LIMIT 1",
            (job,)).fetchone()
        return row["stop_time"] if row and row["status"] in FINISHED else None

    def finished_jobs(self) -> list:
        """(job, stop time of its latest run) of the jobs whose latest run has ended,
        the longest ended first."""
        rows = self.connect().execute(
            "SELECT r.job, r.stop_time FROM runs r JOIN (SELECT job, MAX(seq) AS last FROM runs"
            " GROUP BY job) l ON r.seq = l.last"
            " WHERE r.status IN ('passed', 'failed', 'cancelled') ORDER BY r.stop_time, r.job")
        return [tuple(r) for r in rows]


    # ---------------------------------------------------------------- CDR events

    @_retried
    def add_event(self, event_id: str, event: str, cog_id: str, cog_url: str | None,
                  status: str, message: str | None = None) -> bool:
        """Record a delivered event; False if an event with this id was recorded before."""
        now = utcnow()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO cdr_events (event_id, event, cog_id, cog_url, status,"
                " received, updated, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, event, cog_id, cog_url, status, now, now, message))
            return cur.rowcount == 1

    @_retried
    def set_event(self, event_id: str, status: str, run_id: str | None = None,
                  message: str | None = None, retry: bool = False,
                  fetched: bool | None = None) -> None:
        """Move an event to `status`; `retry`: a failure whose reason may pass; `fetched`:
        the link downloaded its map (None leaves that as it was)."""
        with self.transaction() as db:
            db.execute("UPDATE cdr_events SET status = ?, updated = ?, message = ?,"
                       " run_id = COALESCE(?, run_id), retry = ?,"
                       " fetched = COALESCE(?, fetched) WHERE event_id = ?",
                       (status, utcnow(), message, run_id, int(retry),
                        None if fetched is None else int(fetched), event_id))

    def retake_event(self, event_id: str, cog_url: str | None) -> bool:
        """Put a failed event back in the inbox (a delivery again, or a retry); False if
        it is not failed (any more)."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE cdr_events SET status = 'received', updated = ?, message = NULL,"
                " retry = 0, attempts = attempts + 1, cog_url = COALESCE(?, cog_url)"
                " WHERE event_id = ? AND status = 'failed'", (utcnow(), cog_url, event_id))
            return cur.rowcount == 1

    def inbox(self, limit: int) -> list:
        """The oldest `limit` events waiting in the CDR inbox (`received`), in the order
        they came: read through the status index in rowid order, so that this costs the
        same however long the history is."""
        rows = self.connect().execute(
            "SELECT rowid AS seq, * FROM cdr_events WHERE status = 'received' ORDER BY rowid"
            " LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def inbox_size(self) -> int:
        """How many events wait in the CDR inbox."""
        return self.connect().execute(
            "SELECT COUNT(*) FROM cdr_events WHERE status IN ('received', 'downloading')"
        ).fetchone()[0]

    def reset_downloading(self) -> int:
        """Events a server before the inbox left `downloading` go back to `received`;
        how many."""
        with self.transaction() as db:
            return db.execute("UPDATE cdr_events SET status = 'received', updated = ?"
                              " WHERE status = 'downloading'", (utcnow(),)).rowcount

    def events_by_id(self, event_ids: list) -> dict:
        """{event id: row} of those of `event_ids` the journal holds."""
        found = {}
        for start in range(0, len(event_ids), 500):  # SQLite's bound on ? in one statement
            some = event_ids[start:start + 500]
            marks = ",".join("?" * len(some))
            for row in self.connect().execute(
                    f"SELECT * FROM cdr_events WHERE event_id IN ({marks})", some):
                found[row["event_id"]] = dict(row)
        return found

    def newest_event_time(self) -> str | None:
        """When the newest map.process event was received (utcnow() text), or None."""
        return self.connect().execute(
            "SELECT MAX(received) FROM cdr_events WHERE event = 'map.process'").fetchone()[0]

    def retryable_events(self, max_attempts: int) -> list:
        """Failed events whose reason may pass, tried fewer than `max_attempts` times."""
        rows = self.connect().execute(
            "SELECT * FROM cdr_events WHERE status = 'failed' AND retry = 1 AND attempts < ?"
            " ORDER BY rowid", (max_attempts,))
        return [dict(r) for r in rows]

    def fetched_maps(self) -> list:
        """(cog id, when its last event changed) of the cogs whose map the CDR link
        downloaded and none of whose events waits in the inbox."""
        rows = self.connect().execute(
            "SELECT cog_id, MAX(updated) FROM cdr_events GROUP BY cog_id"
            " HAVING MAX(fetched) = 1 AND SUM(status IN ('received', 'downloading')) = 0")
        return [tuple(r) for r in rows]

    def forget_fetched(self, cog_id: str) -> None:
        """The cog's downloaded map is gone: the next event downloads it again."""
        with self.transaction() as db:
            db.execute("UPDATE cdr_events SET fetched = 0 WHERE cog_id = ?", (cog_id,))

    def event(self, event_id: str) -> dict | None:
        row = self.connect().execute("SELECT * FROM cdr_events WHERE event_id = ?",
                                     (event_id,)).fetchone()
        return dict(row) if row else None

    def events(self, *statuses: str) -> list:
        """Events in one of `statuses`, oldest first."""
        marks = ",".join("?" * len(statuses))
        rows = self.connect().execute(
            f"SELECT * FROM cdr_events WHERE status IN ({marks}) ORDER BY received", statuses)
        return [dict(r) for r in rows]

    def events_page(self, limit: int) -> list:
        """The latest `limit` events, newest first (the later recorded first at one time),
        read backwards along the cdr_events_received index."""
        rows = self.connect().execute(
            "SELECT * FROM cdr_events ORDER BY received DESC, rowid DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def unpublished_cdr_jobs(self) -> list:
        """Jobs of submitted CDR events whose run passed and that hold no publication: the
        runs that ended while no server watched them. A CDR run's job is its cog's id
        (CdrLink.process), so the submitted events are read from their index alone; this
        still reads every submitted event, which is why CdrLink runs it in the background."""
        rows = self.connect().execute(
            "SELECT e.cog_id FROM cdr_events e WHERE e.status = 'submitted'"
            " AND NOT EXISTS (SELECT 1 FROM cdr_publications p WHERE p.job = e.cog_id)"
            " AND EXISTS (SELECT 1 FROM runs r WHERE r.run_id = e.run_id"
            " AND r.status = 'passed' AND r.job = e.cog_id) GROUP BY e.cog_id")
        return [r[0] for r in rows]

    def event_for_run(self, run_id: str) -> dict | None:
        row = self.connect().execute("SELECT * FROM cdr_events WHERE run_id = ?",
                                     (run_id,)).fetchone()
        return dict(row) if row else None

    def cog_in_hand(self, cog_id: str) -> bool:
        """True while an event for this cog is being handled (not yet failed or submitted)."""
        row = self.connect().execute(
            "SELECT 1 FROM cdr_events WHERE cog_id = ? AND status IN ('received', 'downloading')",
            (cog_id,)).fetchone()
        return row is not None

    @_retried
    def set_publication(self, job: str, kind: str, status: str, result_id: str | None = None,
                        cdr_job_id: str | None = None, message: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO cdr_publications (job, kind, status, result_id,"
                       " cdr_job_id, message, time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job, kind, status, result_id, cdr_job_id, message, utcnow()))

    def publications(self, job: str) -> dict:
        """{kind: row} of what was published to the CDR for a job."""
        rows = self.connect().execute("SELECT * FROM cdr_publications WHERE job = ?", (job,))
        return {r["kind"]: dict(r) for r in rows}

    # ---------------------------------------------------------------- Idempotency-Keys

    @_retried
    def forget_unbound_idempotency_keys(self) -> int:
        """Delete the keys that have no run yet: their request was being answered when the
        server stopped, so a retry must be free to make the run. Returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM idempotency_keys WHERE run_id IS NULL").rowcount

    @_retried
    def claim_idempotency_key(self, user: str, key: str, digest: str,
                              expired_before: str) -> dict | None:
        """Take `key` of `user` for a new submission whose HMAC is `digest` (None), or
        return the row ({"hmac", "run_id"}) of whoever holds it. In the same transaction,
        keys created before `expired_before` are forgotten, and so is this key if the run
        it made was deleted since. BEGIN IMMEDIATE: of two requests with one key, one
        inserts, the other sees it."""
        with self.transaction() as db:
            db.execute("DELETE FROM idempotency_keys WHERE created < ?", (expired_before,))
            row = db.execute("SELECT hmac, run_id, (SELECT 1 FROM runs r WHERE"
                             " r.run_id = k.run_id) AS exists_ FROM idempotency_keys k"
                             " WHERE user = ? AND key = ?", (user, key)).fetchone()
            if row is not None and row["run_id"] and not row["exists_"]:
                db.execute("DELETE FROM idempotency_keys WHERE user = ? AND key = ?",
                           (user, key))
                row = None
            if row is None:
                db.execute("INSERT INTO idempotency_keys (user, key, hmac, run_id, created)"
                           " VALUES (?, ?, ?, NULL, ?)", (user, key, digest, utcnow()))
                return None
            return {"hmac": row["hmac"], "run_id": row["run_id"]}

    @_retried
    def bind_idempotency_key(self, user: str, key: str, run_id: str) -> None:
        """Record the run a claimed key made: a repeat of its submission answers that run."""
        with self.transaction() as db:
            db.execute("UPDATE idempotency_keys SET run_id = ? WHERE user = ? AND key = ?",
                       (run_id, user, key))

    @_retried
    def free_idempotency_key(self, user: str, key: str) -> None:
        """Forget a claimed key whose submission made no run, so that a retry may try again."""
        with self.transaction() as db:
            db.execute("DELETE FROM idempotency_keys WHERE user = ? AND key = ? AND"
                       " run_id IS NULL", (user, key))

    # ---------------------------------------------------------------- completion notices

    @_retried
    def add_deliveries(self, run_id: str, targets: list) -> None:
        """Record, as `waiting` until the run ends, a notice to each (url, source)."""
        now = utcnow()
        with self.transaction() as db:
            for url, source in targets:
                db.execute("INSERT INTO deliveries (id, run_id, url, source, state, attempts,"
                           " created, updated) VALUES (?, ?, ?, ?, 'waiting', 0, ?, ?)",
                           (secrets.token_hex(16), run_id, url, source, now, now))

    def deliveries(self, run_id: str) -> list:
        """Rows of a run's notices, in the order they were recorded."""
        rows = self.connect().execute(
            "SELECT * FROM deliveries WHERE run_id = ? ORDER BY created, source", (run_id,))
        return [dict(r) for r in rows]

    def deliveries_to_promote(self) -> tuple:
        """(run ids with `waiting` notices whose run has ended, ids of unsent notices whose
        run was deleted), without taking the write lock."""
        db = self.connect()
        marks = ",".join("?" * len(FINISHED))
        ended = [r[0] for r in db.execute(
            "SELECT d.run_id FROM deliveries d JOIN runs r ON r.run_id = d.run_id"
            f" WHERE d.state = 'waiting' AND r.status IN ({marks})",
            [s.value for s in FINISHED])]
        orphans = [r[0] for r in db.execute(
            "SELECT id FROM deliveries WHERE state IN ('waiting', 'pending')"
            " AND run_id NOT IN (SELECT run_id FROM runs)")]
        return list(dict.fromkeys(ended)), orphans

    @_retried
    def promote_deliveries(self, ended_runs: list, orphans: list) -> None:
        """Make the waiting notices of `ended_runs` due now, and fail the `orphans`
        (notices of deleted runs), in one transaction."""
        now = utcnow()
        with self.transaction() as db:
            for run_id in ended_runs:
                db.execute("UPDATE deliveries SET state = 'pending', next_try = ?, updated = ?"
                           " WHERE run_id = ? AND state = 'waiting'", (now, now, run_id))
            for delivery_id in orphans:
                db.execute("UPDATE deliveries SET state = 'failed', last_error = 'the run was"
                           " deleted', updated = ? WHERE id = ?", (now, delivery_id))

    def due_deliveries(self, limit: int) -> list:
        """Rows of at most `limit` pending notices due now, the longest due first."""
        rows = self.connect().execute(
            "SELECT * FROM deliveries WHERE state = 'pending' AND next_try <= ?"
            " ORDER BY next_try LIMIT ?", (utcnow(), limit))
        return [dict(r) for r in rows]

    def next_delivery_time(self) -> str | None:
        """When the next pending notice is due (utcnow() text), or None without one."""
        return self.connect().execute(
            "SELECT MIN(next_try) FROM deliveries WHERE state = 'pending'").fetchone()[0]

    @_retried
    def delivery_failed_attempt(self, delivery_id: str, attempts: int, next_try: str,
                                error: str) -> None:
        """Record a failed try of a notice that will be tried again at `next_try`."""
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET attempts = ?, next_try = ?, last_error = ?,"
                       " updated = ? WHERE id = ?",
                       (attempts, next_try, error, utcnow(), delivery_id))

    @_retried
    def end_delivery(self, delivery_id: str, state: str, error: str | None) -> None:
        """Record a notice's last try: `delivered`, or `failed` for good with `error`."""
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, next_try ="
                       " NULL, last_error = ?, updated = ? WHERE id = ?",
                       (state, error, utcnow(), delivery_id))

    # ---------------------------------------------------------------- metrics (web/metrics.py)

    def last_execution_id(self) -> int:
        """The highest execution id so far (0 with none)."""
        return self.connect().execute(
            "SELECT COALESCE(MAX(id), 0) FROM executions").fetchone()[0]

    def executions_from(self, low: int, ended_since: str) -> list:
        """(id, module, status, seconds it took or None) of the executions from id `low` on
        that are running or ended at or after `ended_since`, by id."""
        return [tuple(r) for r in self.connect().execute(
            "SELECT id, module, status,"
            " (julianday(stop_time) - julianday(start_time)) * 86400.0"
            " FROM executions WHERE id >= ? AND (status = 'running' OR stop_time >= ?)"
            " ORDER BY id", (low, ended_since))]

    def run_counts(self) -> dict:
        """{status: how many runs are in it}, for the statuses that have any."""
        return dict(self.connect().execute(
            "SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())


def _run_filter(job: str | None, status: str | None) -> tuple:
    """(" WHERE ...", arguments) of a runs query of one job and/or one status."""
    where, args = [], []
    if job is not None:
        where.append("job = ?")
        args.append(job)
    if status is not None:
        where.append("status = ?")
        args.append(status)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def _run_dict(row) -> dict | None:
    if row is None:
        return None
    run = dict(row)
    run["modules"] = json.loads(run["modules"])
    run["payload"] = json.loads(run["payload"])
    run["force_rerun"] = bool(run["force_rerun"])
    return run


def _delete_run_mentions(db, run_ids: list) -> None:
    """Delete the notices and Idempotency-Keys of deleted runs: they name runs without a
    foreign key, so _delete_rows leaves them, and a notice's URL (which may hold the
    receiver's token) would stay in the journal for good."""
    for start in range(0, len(run_ids), 500):  # SQLite's bound on ? in one statement
        some = run_ids[start:start + 500]
        marks = ",".join("?" * len(some))
        for table in ("deliveries", "idempotency_keys"):
            db.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", some)


def _delete_rows(db, table: str, column: str, values: list) -> None:
    """Delete the rows of `table` whose `column` is in `values`, after every row that
    refers to them by a foreign key, in whatever table a migration added."""
    if not values:
        return
    marks = ",".join("?" * len(values))
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for child in tables:
        for fk in db.execute(f'PRAGMA foreign_key_list("{child}")').fetchall():
            if fk["table"] != table or child == table:
                continue
            key = fk["to"] or next(c["name"] for c in db.execute(
                f'PRAGMA table_info("{table}")') if c["pk"] == 1)
            referred = [r[0] for r in db.execute(
                f'SELECT "{key}" FROM "{table}" WHERE "{column}" IN ({marks})', values)]
            _delete_rows(db, child, fk["from"], referred)
    db.execute(f'DELETE FROM "{table}" WHERE "{column}" IN ({marks})', values)
