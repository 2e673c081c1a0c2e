"""The journal on its own (journal.py, migrations.py): migrations, their records, and
what a write does when the file is locked, read-only, deleted or replaced."""

import os
import sqlite3
import threading
import time

import pytest

from mip import errors
from mip import journal
from mip import migrations


def test_a_migration_that_fails_halfway_leaves_neither_its_change_nor_its_record(tmp_path):
    db = journal.Journal(str(tmp_path / "journal.db"))
    db.migrate()
    version = migrations.VERSION

    def half_done(con):
        con.execute("CREATE TABLE half (x INTEGER)")
        con.execute("ALTER TABLE runs ADD COLUMN half TEXT")
        raise sqlite3.OperationalError("the second half of this change failed")

    with pytest.raises(sqlite3.OperationalError, match="second half"):
        migrations.apply(db, [*migrations.MIGRATIONS, (version + 1, half_done)])
    con = sqlite3.connect(db.path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == version
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchall() == []
    assert "half" not in [c[1] for c in con.execute("PRAGMA table_info(runs)")]
    con.close()
    # the journal is still usable, and a later, sound attempt applies the change once
    migrations.apply(db, [*migrations.MIGRATIONS,
                          (version + 1, lambda c: c.execute("CREATE TABLE half (x INTEGER)"))])
    assert db.connect().execute("PRAGMA user_version").fetchone()[0] == version + 1
    db.close()


def test_migrate_twice_is_a_no_op_and_reaches_the_version_the_code_expects(tmp_path):
    db = journal.Journal(str(tmp_path / "journal.db"))
    db.migrate()
    db.migrate()
    assert db.version() == migrations.VERSION
    db.check_version()
    db.close()


def new_journal(tmp_path, **kw) -> journal.Journal:
    db = journal.Journal(str(tmp_path / "journal.db"), **kw)
    db.migrate()
    return db


def test_a_write_under_another_process_lock_is_bounded_then_goes_through(tmp_path):
    db = new_journal(tmp_path, busy_timeout=0.1, write_for=0.5)
    holder = sqlite3.connect(db.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(errors.JournalUnavailable, match="journal.db cannot be written") as e:
        db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    assert time.monotonic() - started < 3
    assert e.value.retry_after and e.value.code == "journal_unavailable"
    holder.execute("COMMIT")
    # the same Journal, without a restart: its connection was left usable
    run_id = db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    assert db.run(run_id)["status"] == "not_started"
    holder.close()
    db.close()


def test_a_lock_released_within_the_bound_costs_nothing_but_the_wait(tmp_path):
    db = new_journal(tmp_path, busy_timeout=0.1, write_for=10)
    holder = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, holder.execute, ("COMMIT",)).start()
    run_id = db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    assert db.run(run_id) is not None
    holder.close()
    db.close()


def test_a_connection_opened_while_the_file_was_read_only_is_opened_again(tmp_path):
    """SQLite opens a file it cannot write read-only, and such a connection stays so
    after the file is writable again: today's POST /runs then answers 500 for good."""
    db = new_journal(tmp_path, busy_timeout=0.1, write_for=5)
    db.close()
    stuck = sqlite3.connect(f"file:{db.path}?mode=ro", uri=True, isolation_level=None,
                            check_same_thread=False)
    stuck.row_factory = sqlite3.Row
    db._local.db, db._local.pid = stuck, os.getpid()
    run_id = db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    assert db.run(run_id)["status"] == "not_started"
    db.close()


def test_a_journal_read_only_for_a_while_is_unavailable_then_recovers(tmp_path, monkeypatch):
    db = new_journal(tmp_path, busy_timeout=0.1, write_for=0.5)
    db.close()
    real = sqlite3.connect

    def read_only(database, **kw):  # what SQLite does with a file it may not write
        return real(database.replace("mode=rw", "mode=ro"), **kw)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(errors.JournalUnavailable, match="readonly"):
        db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    monkeypatch.setattr(sqlite3, "connect", real)
    assert db.run(db.create_run("j", "m", ["a"], False, {}, str(tmp_path))) is not None
    db.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_journal_deleted_or_replaced_is_never_written_nor_made_anew(tmp_path, how):
    db = new_journal(tmp_path)
    db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db.path + suffix):
            os.remove(db.path + suffix)
    if how == "replaced":
        sqlite3.connect(db.path).close()
        open(db.path, "wb").close()
    with pytest.raises(errors.JournalUnavailable, match=f"journal.db was {how}"):
        db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    with pytest.raises(errors.JournalUnavailable, match=f"journal.db was {how}"):
        db.check_file()
    if how == "deleted":
        # another thread's first connection does not create the file either
        failures = []
        thread = threading.Thread(target=lambda: failures.append(catch(db.run_ids)))
        thread.start()
        thread.join(10)
        assert isinstance(failures[0], errors.JournalUnavailable)
        assert not os.path.exists(db.path)
    db.close()


def catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    return None


def test_a_corrupt_file_is_refused_in_one_line_naming_it(tmp_path):
    path = tmp_path / "journal.db"
    path.write_bytes(b"not SQLite at all " * 1000)
    with pytest.raises(journal.JournalError) as e:
        journal.Journal(str(path)).migrate()
    assert str(path) in str(e.value) and "not a database" in str(e.value)
    assert "\n" not in str(e.value)


def test_the_notice_and_metrics_methods_keep_their_rows(tmp_path):
    """notices.py and web/metrics.py reach these tables only through these methods."""
    db = new_journal(tmp_path)
    run_id = db.create_run("j", "m", ["a"], False, {}, str(tmp_path))
    gone = db.create_run("k", "m", ["a"], False, {}, str(tmp_path))
    db.add_deliveries(run_id, [("http://a.example/", "payload"), ("http://b.example", "server")])
    db.add_deliveries(gone, [("http://a.example/", "payload")])
    assert [d["state"] for d in db.deliveries(run_id)] == ["waiting", "waiting"]
    assert db.deliveries_to_promote() == ([], [])
    db.delete_run(gone)  # its notice goes with it (_delete_run_mentions)
    assert db.deliveries(gone) == []
    db.set_run_status(run_id, journal.Status.FAILED)
    ended, orphans = db.deliveries_to_promote()
    assert (ended, orphans) == ([run_id], [])
    db.promote_deliveries(ended, orphans)
    due = db.due_deliveries(10)
    assert [d["url"] for d in due] == ["http://a.example/", "http://b.example"]
    assert db.next_delivery_time() == min(d["next_try"] for d in due)
    db.delivery_failed_attempt(due[0]["id"], 1, "2999-01-01T00:00:00.000Z", "answered 500")
    db.end_delivery(due[1]["id"], "delivered", None)
    rows = {d["id"]: d for d in db.deliveries(run_id)}
    assert (rows[due[0]["id"]]["attempts"], rows[due[0]["id"]]["last_error"]) == (1, "answered 500")
    assert (rows[due[1]["id"]]["state"], rows[due[1]["id"]]["attempts"]) == ("delivered", 1)
    assert db.due_deliveries(10) == []
    exec_id = db.start_execution(run_id, "j", "a", str(tmp_path / "a.log"))
    assert db.last_execution_id() == exec_id
    [(found, module, status, seconds)] = db.executions_from(0, "2000-01-01T00:00:00.000Z")
    assert (found, module, status, seconds) == (exec_id, "a", "running", None)
    assert db.run_counts() == {"failed": 1}
    db.close()
