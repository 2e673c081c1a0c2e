"""The SQLite journal of runs, jobs and module executions, shared by mip_server.py and mipper.py.

Not run directly: `journal.Journal(path).migrate()` creates or upgrades the file.
One connection per thread and per process (luigi forks a process per task), the file in
WAL mode (set by migrate()), every write inside `with journal.transaction() as db:`.
"""

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from datetime import UTC
from datetime import datetime
from enum import Enum


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

STATUS_CHECK = "CHECK (status IN ('not_started', 'running', 'passed', 'failed', 'cancelled'))"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    map TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL UNIQUE,
    job TEXT NOT NULL REFERENCES jobs(job),
    map TEXT NOT NULL,
    modules TEXT NOT NULL,
    force_rerun INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,
    status TEXT NOT NULL {STATUS_CHECK},
    submit_time TEXT NOT NULL,
    start_time TEXT,
    stop_time TEXT,
    pid INTEGER,
    log_path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_job ON runs(job, seq);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, seq);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    job TEXT NOT NULL REFERENCES jobs(job),
    module TEXT NOT NULL,
    status TEXT NOT NULL {STATUS_CHECK},
    start_time TEXT NOT NULL,
    stop_time TEXT,
    exit_code INTEGER,
    log_path TEXT NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS executions_job_module ON executions(job, module, id);
CREATE INDEX IF NOT EXISTS executions_run ON executions(run_id);
"""

def _add_upload_columns(db) -> None:
    """1: where a module's data was copied (S3) and how that went."""
    db.execute("ALTER TABLE executions ADD COLUMN upload_status TEXT"
               " CHECK (upload_status IN ('uploaded', 'failed'))")
    db.execute("ALTER TABLE executions ADD COLUMN upload_uri TEXT")
    db.execute("ALTER TABLE executions ADD COLUMN upload_message TEXT")


def _add_cdr_tables(db) -> None:
    """2: events delivered by the CDR, and what was published to it."""
    db.execute("""CREATE TABLE cdr_events (
        event_id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        cog_id TEXT NOT NULL,
        cog_url TEXT,
        status TEXT NOT NULL CHECK (status IN
            ('received', 'downloading', 'submitted', 'failed', 'duplicate')),
        received TEXT NOT NULL,
        updated TEXT NOT NULL,
        run_id TEXT,
        message TEXT)""")
    db.execute("CREATE INDEX cdr_events_cog ON cdr_events(cog_id, received)")
    db.execute("CREATE INDEX cdr_events_run ON cdr_events(run_id)")
    db.execute("""CREATE TABLE cdr_publications (
        job TEXT NOT NULL REFERENCES jobs(job),
        kind TEXT NOT NULL CHECK (kind IN ('features', 'georef')),
        status TEXT NOT NULL CHECK (status IN ('pending', 'published', 'failed')),
        result_id TEXT,
        cdr_job_id TEXT,
        message TEXT,
        time TEXT NOT NULL,
        PRIMARY KEY (job, kind))""")


def _allow_skipped_publications(db) -> None:
    """3: a publication may be `skipped` on purpose (estimated GCPs are never published).
    SQLite cannot change a CHECK in place: the table is copied into a new one."""
    db.execute("""CREATE TABLE cdr_publications_new (
        job TEXT NOT NULL REFERENCES jobs(job),
        kind TEXT NOT NULL CHECK (kind IN ('features', 'georef')),
        status TEXT NOT NULL CHECK (status IN ('pending', 'published', 'failed', 'skipped')),
        result_id TEXT,
        cdr_job_id TEXT,
        message TEXT,
        time TEXT NOT NULL,
        PRIMARY KEY (job, kind))""")
    db.execute("INSERT INTO cdr_publications_new SELECT job, kind, status, result_id,"
               " cdr_job_id, message, time FROM cdr_publications")
    db.execute("DROP TABLE cdr_publications")
    db.execute("ALTER TABLE cdr_publications_new RENAME TO cdr_publications")


def _add_run_keys(db) -> None:
    """4: the sealed OpenAI key of a queued run (keystore.py), kept until the run starts."""
    db.execute("""CREATE TABLE run_keys (
        run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
        sealed TEXT NOT NULL)""")


def _add_idempotency_keys(db) -> None:
    """5: the Idempotency-Key of each submission (idempotency.py), kept 24 hours: the HMAC
    of what was submitted, never the payload or its key, and the run it made (NULL while
    the first request is still being answered). No foreign key: deleting a run may leave
    its key behind, which is then forgotten."""
    db.execute("""CREATE TABLE idempotency_keys (
        user TEXT NOT NULL,
        key TEXT NOT NULL,
        hmac TEXT NOT NULL,
        run_id TEXT,
        created TEXT NOT NULL,
        PRIMARY KEY (user, key))""")
    db.execute("CREATE INDEX idempotency_keys_created ON idempotency_keys(created)")


def _add_deliveries(db) -> None:
    """6: completion notices (notices.py): one row per run and URL, `waiting` until the run
    ends, then `pending` until `delivered` or `failed`. The receiver's answer is never kept."""
    db.execute("""CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        url TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('payload', 'server')),
        state TEXT NOT NULL CHECK (state IN ('waiting', 'pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try TEXT,
        last_error TEXT,
        created TEXT NOT NULL,
        updated TEXT NOT NULL)""")
    db.execute("CREATE INDEX deliveries_state ON deliveries(state, next_try)")
    db.execute("CREATE INDEX deliveries_run ON deliveries(run_id)")


def _add_resources(db) -> None:
    """7: what each module execution used of the host (gpus.RESOURCE_KEYS), as JSON."""
    db.execute("ALTER TABLE executions ADD COLUMN resources TEXT")


def _add_page_indexes(db) -> None:
    """8: indexes, so that the lists growing with every map received are paged and sorted
    in SQL, and start-up reads no history: jobs in the order made (GET /jobs, /ui/jobs) and
    by map (/ui/maps); events by arrival (GET /cdr/events) and by state, with the cog and
    run of each (those a restart takes up, the check for unpublished runs); Idempotency-Keys
    by run (the start-up DELETE of those without one, and deleting runs)."""
    db.execute("CREATE INDEX jobs_created ON jobs(created, job)")
    db.execute("CREATE INDEX jobs_map ON jobs(map, created, job)")
    db.execute("CREATE INDEX cdr_events_received ON cdr_events(received)")
    db.execute("CREATE INDEX cdr_events_status ON cdr_events(status, cog_id, run_id)")
    db.execute("CREATE INDEX idempotency_keys_run ON idempotency_keys(run_id)")


# Numbered migrations after the initial schema: (version, function(db)). Each runs in
# one transaction with the bump of PRAGMA user_version that records it.
MIGRATIONS: list = [
    (1, _add_upload_columns),
    (2, _add_cdr_tables),
    (3, _allow_skipped_publications),
    (4, _add_run_keys),
    (5, _add_idempotency_keys),
    (6, _add_deliveries),
    (7, _add_resources),
    (8, _add_page_indexes),
]


class JournalError(Exception):
    """A write the journal refuses (unknown row, illegal state change, job bound elsewhere)."""


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


class Journal:
    """The journal file at `path`; safe to share between threads (one connection each)."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()

    def connect(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a forked child)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.db = sqlite3.connect(self.path, timeout=5, isolation_level=None,
                                       check_same_thread=False)
            local.db.row_factory = sqlite3.Row
            local.db.execute("PRAGMA foreign_keys=ON")
            local.pid = os.getpid()
        return local.db

    @contextlib.contextmanager
    def transaction(self):
        """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any exception."""
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def migrate(self) -> None:
        """Switch the file to WAL, create the schema and apply pending migrations; a no-op
        when up to date."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._use_wal()
        with self.transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        for version, apply in MIGRATIONS:
            with self.transaction() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] < version:
                    apply(db)
                    db.execute(f"PRAGMA user_version = {int(version)}")

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

    def forget_run_key(self, run_id: str) -> None:
        """Delete a run's sealed key (it started, was cancelled or ended)."""
        with self.transaction() as db:
            db.execute("DELETE FROM run_keys WHERE run_id = ?", (run_id,))

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

    def start_execution(self, run_id: str, job: str, module: str, log_path: str) -> int:
        """Record a module starting to run; returns the execution id."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO executions (run_id, job, module, status, start_time, log_path)"
                " VALUES (?, ?, ?, 'running', ?, ?)", (run_id, job, module, utcnow(), log_path))
            return cur.lastrowid

    def finish_execution(self, exec_id: int, status: Status, exit_code: int | None,
                         message: str | None, resources: dict | None = None) -> bool:
        """Record how a module execution ended (and what it used of the host); False if
        it had already ended (cancelled)."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE executions SET status = ?, stop_time = ?, exit_code = ?, message = ?,"
                " resources = COALESCE(?, resources) WHERE id = ? AND status = 'running'",
                (Status(status).value, utcnow(), exit_code, message,
                 None if resources is None else json.dumps(resources), exec_id))
            return cur.rowcount == 1

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

    def set_upload(self, exec_id: int, status: str, uri: str, message: str | None) -> None:
        """Record the outcome of copying an execution's data to S3."""
        with self.transaction() as db:
            db.execute("UPDATE executions SET upload_status = ?, upload_uri = ?,"
                       " upload_message = ? WHERE id = ?", (status, uri, message, exec_id))

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

    # ---------------------------------------------------------------- deleting (retention.py)

    def job_busy(self, job: str) -> bool:
        """True while a run of the job is queued or running."""
        row = self.connect().execute(
            "SELECT 1 FROM runs WHERE job = ? AND status IN ('not_started', 'running') LIMIT 1",
            (job,)).fetchone()
        return row is not None

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

    def set_event(self, event_id: str, status: str, run_id: str | None = None,
                  message: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE cdr_events SET status = ?, updated = ?, message = ?,"
                       " run_id = COALESCE(?, run_id) WHERE event_id = ?",
                       (status, utcnow(), message, run_id, event_id))

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
