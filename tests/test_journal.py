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
