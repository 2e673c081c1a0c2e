"""The journal on its own (journal.py, migrations.py): migrations, their records, and
what a write does when the file is locked, read-only, deleted or replaced."""

import sqlite3

import pytest

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
