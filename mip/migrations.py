"""migrations: the journal's schema (step 0) and its numbered changes since.

Not run directly: `Journal.migrate()` (journal.py) applies them at the server's start, and
mipper's when it is run by hand. Step 0 is a script of `CREATE ... IF NOT EXISTS`; each
later change is a function of the connection, applied in the same transaction as the bump
of `PRAGMA user_version` that records it (sqlite-utils' migrations.py), so a change that
fails halfway leaves neither itself nor its record. VERSION is what the code expects: a
mipper started by the server only reads it (check_version) and never migrates.
"""

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


def _add_cdr_inbox(db) -> None:
    """8: the CDR inbox. `attempts`: deliveries taken of the event (a failed event delivered
    again is tried again); `retry`: 1 when it failed for a reason that may pass (a download,
    a full queue or disk), so that it is worth asking the CDR to resend; `fetched`: 1 when
    the link downloaded the event's map, which retention may then remove. Failures recorded
    before this migration of those kinds are marked retry."""
    db.execute("ALTER TABLE cdr_events ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE cdr_events ADD COLUMN retry INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE cdr_events ADD COLUMN fetched INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX cdr_events_status ON cdr_events(status)")
    db.execute("UPDATE cdr_events SET retry = 1 WHERE status = 'failed' AND (message LIKE"
               " 'download of %' OR message LIKE 'run not submitted:%MIP_MAX_QUEUED%'"
               " OR message LIKE 'run not submitted:%free%')")


def _add_page_indexes(db) -> None:
    """9: indexes, so that the lists growing with every map received are paged and sorted
    in SQL, and start-up reads no history: jobs in the order made (GET /jobs, /ui/jobs) and
    by map (/ui/maps); events by arrival (GET /cdr/events) and by state, with the cog and
    run of each (those a restart takes up, the check for unpublished runs); Idempotency-Keys
    by run (the start-up DELETE of those without one, and deleting runs). The inbox's index
    on the state alone (8) becomes the one on state, cog and run."""
    db.execute("CREATE INDEX jobs_created ON jobs(created, job)")
    db.execute("CREATE INDEX jobs_map ON jobs(map, created, job)")
    db.execute("CREATE INDEX cdr_events_received ON cdr_events(received)")
    db.execute("DROP INDEX IF EXISTS cdr_events_status")
    db.execute("CREATE INDEX cdr_events_status ON cdr_events(status, cog_id, run_id)")
    db.execute("CREATE INDEX idempotency_keys_run ON idempotency_keys(run_id)")


def _add_warnings(db) -> None:
    """10: what a run or a module execution that passed (or not) should still tell people,
    as a JSON list of one-line texts: a module's WARNING lines, an empty final product, a
    host without a GPU (status.py serves them as `warnings`)."""
    db.execute("ALTER TABLE runs ADD COLUMN warnings TEXT")
    db.execute("ALTER TABLE executions ADD COLUMN warnings TEXT")


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
    (8, _add_cdr_inbox),
    (9, _add_page_indexes),
    (10, _add_warnings),
]


VERSION = MIGRATIONS[-1][0]


def apply(journal, migrations: list = MIGRATIONS) -> None:
    """Create the schema and apply the migrations the file lacks, each in one transaction
    of `journal` (a journal.Journal) with its record; a no-op when up to date."""
    with journal.transaction() as db:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
    for version, change in migrations:
        with journal.transaction() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < version:
                change(db)
                db.execute(f"PRAGMA user_version = {int(version)}")
