"""A bad day for the journal, through the server: locked by another process, read-only for
a while, deleted or replaced while the server runs, corrupt or out of step with the disk
at start. Writes wait a bounded time and answer 503 journal_unavailable (never 500), and
the server recovers by itself once the journal can be written again."""

import concurrent.futures
import io
import json
import os
import sqlite3
import wsgiref.util

import pytest
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import kill_leftover_runs
from conftest import wait_for

import mip_server
from mip import journal
from mip import queue
from mip.settings import Settings

ZERO_WORK = os.path.join(ROOT, "tests", "zero_work.yml")


@pytest.fixture
def zero_env(server_env):
    return dict(server_env, MIP_CONFIG=ZERO_WORK, MIP_MIN_FREE_MB="0")


@pytest.fixture
def app(zero_env):
    """The app in process on its own journal; its queue starts no run (stopping)."""
    cfg = mip_server.Config(settings=Settings.from_env(zero_env), auth=False)
    cfg.settings.make_dirs()
    db = journal.Journal(cfg.settings.journal_path, busy_timeout=0.1, write_for=0.5)
    db.migrate()
    runs = mip_server.RunQueue(cfg, db)
    runs.stopping = True
    app = mip_server.make_app(cfg, db, runs)
    app.config["test.journal"] = db
    yield app
    db.close()


def call(app, method: str, path: str, body=None) -> tuple:
    """(status, headers, JSON body) of one request to the WSGI app."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    data = b"" if body is None else json.dumps(body).encode()
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, REMOTE_ADDR="127.0.0.1",
                   CONTENT_LENGTH=str(len(data)), CONTENT_TYPE="application/json")
    environ["wsgi.input"] = io.BytesIO(data)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer.update(status=int(status.split()[0]), headers=dict(headers))

    out = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], json.loads(out) if out else None


def run_payload(job: str, *modules: str) -> dict:
    return {"job": job, "map": MAP, "modules": list(modules or ["first"])}


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_journal_deleted_or_replaced_answers_503_everywhere_and_is_not_made_anew(
        app, zero_env, how):
    status, _, _ = call(app, "POST", "/runs", run_payload("j1"))
    assert status == 200
    path = os.path.join(zero_env["TA1_RUNS_DIR"], "journal.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    if how == "replaced":
        journal.Journal(path).migrate()
    for method, route, body in (("GET", "/health", None), ("GET", "/runs", None),
                                ("GET", "/jobs/j1", None), ("GET", "/openapi.json", None),
                                ("POST", "/runs", run_payload("j2"))):
        status, headers, answer = call(app, method, route, body)
        assert status == 503, (route, answer)
        assert answer["error"] == "journal_unavailable"
        assert path in answer["message"] and how in answer["message"]
        assert int(headers["Retry-After"]) > 0
    assert os.path.exists(path) == (how == "replaced")


def test_a_journal_read_only_for_a_while_answers_503_then_recovers(app, monkeypatch):
    """A connection SQLite opens on a file it may not write is read-only, and stays so."""
    real = sqlite3.connect

    def read_only(database, **kw):
        return real(database.replace("mode=rw", "mode=ro"), **kw)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    app.config["test.journal"].close()  # this thread's connection is opened again, read-only
    status, headers, answer = call(app, "POST", "/runs", run_payload("j1"))
    assert (status, answer["error"]) == (503, "journal_unavailable"), answer
    assert "readonly" in answer["message"] and int(headers["Retry-After"]) > 0
    monkeypatch.setattr(sqlite3, "connect", real)
    status, _, run = call(app, "POST", "/runs", run_payload("j1"))
    assert status == 200, run
    status, _, again = call(app, "GET", f"/runs/{run['run_id']}")
    assert (status, again["status"]) == (200, "not_started")



def test_a_journal_locked_by_another_process_answers_503_then_the_queue_moves(zero_env):
    """Another process holds the write lock (`BEGIN IMMEDIATE`) while a run's module ends
    and another run waits: submissions and cancels answer 503 in seconds, never 500; the
    running mipper waits and records its end once the lock goes, and the queued run then
    starts, with no restart."""
    # writes give up after 1 s, not 4: the two 503s come one after the other (the cancel
    # waits for the queue's lock, which the submission holds while it tries)
    env = dict(zero_env, MIP_MAX_RUNS="1", MIP_JOURNAL_WRITE_SECONDS="1")
    hold = os.path.join(env["TA1_INPUTS_DIR"], "hold")
    open(hold, "w").close()
    srv = Server(env).start()
    holder = None
    try:
        first = srv.post("/runs", json=run_payload("a", "held")).json()["run_id"]
        srv.wait_run(first, timeout=60, until=("running",))
        queued = srv.post("/runs", json=run_payload("b")).json()["run_id"]
        wait_for(lambda: srv.get("/modules/a/held").status_code == 200, timeout=60)
        holder = sqlite3.connect(os.path.join(env["TA1_RUNS_DIR"], "journal.db"),
                                 isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        os.remove(hold)  # the module ends while the journal is locked
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda post: post(), (
                lambda: srv.post("/runs", json=run_payload("c"), timeout=30),
                lambda: srv.post(f"/runs/{queued}/cancel", timeout=30))))
        for answer in answers:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "journal_unavailable"
            assert int(answer.headers["Retry-After"]) > 0
        assert srv.get(f"/runs/{first}").json()["status"] == "running"  # reads go on
        holder.execute("COMMIT")
        assert srv.wait_run(first, timeout=90)["status"] == "passed"
        assert srv.get("/modules/a/held").json()["status"] == "passed"
        assert srv.wait_run(queued, timeout=90)["status"] == "passed"
        assert "Traceback" not in srv.output()
    finally:
        if holder is not None:
            holder.close()
        srv.stop()
        kill_leftover_runs(env)


def test_a_corrupt_journal_stops_the_start_in_one_line_naming_file_and_reason(
        zero_env, monkeypatch, capsys):
    for name in [n for n in os.environ if n.startswith(("MIP_", "TA1_"))]:
        monkeypatch.delenv(name)
    for name, value in zero_env.items():
        monkeypatch.setenv(name, value)
    path = os.path.join(zero_env["TA1_RUNS_DIR"], "journal.db")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:  # a journal truncated to 16 KB, header and all
        f.write(b"\0" * 16384)
    assert mip_server.main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert path in err and "not a database" in err, err


def test_start_warns_of_job_folders_the_journal_does_not_know(zero_env):
    settings = Settings.from_env(zero_env)
    settings.make_dirs()
    for job in ("j1", "j2", "j3"):
        os.makedirs(os.path.join(settings.outputs_dir, job, "first"))
    open(settings.journal_path, "wb").close()  # a 0-byte journal
    db = journal.Journal(settings.journal_path)
    db.migrate()
    [warning] = queue.journal_warnings(settings, db, key_file_found=True)
    assert "3 jobs' folders" in warning and settings.journal_path in warning
    db.create_run("j1", MAP, ["first"], False, {}, settings.runs_dir)
    assert queue.journal_warnings(settings, db, key_file_found=True) == []
    db.close()


def test_start_warns_of_runs_whose_sealed_key_the_new_key_file_cannot_open(zero_env):
    settings = Settings.from_env(zero_env)
    settings.make_dirs()
    db = journal.Journal(settings.journal_path)
    db.migrate()
    keyed = db.create_run("j1", MAP, ["first"], False, {}, settings.runs_dir, "sealed")
    db.create_run("j2", MAP, ["first"], False, {}, settings.runs_dir)
    assert queue.journal_warnings(settings, db, key_file_found=True) == []
    [warning] = queue.journal_warnings(settings, db, key_file_found=False)
    assert keyed in warning and settings.key_file in warning and "1 queued run" in warning
    db.close()


def test_the_server_logs_the_start_warnings(zero_env):
    """main() logs what journal_warnings() finds, after its port line."""
    for job in ("j1", "j2"):
        os.makedirs(os.path.join(zero_env["TA1_OUTPUTS_DIR"], job, "first"))
    srv = Server(zero_env).start()
    try:
        wait_for(lambda: "2 jobs' folders" in srv.output(), timeout=10)
        assert "WARNING" in next(line for line in srv.lines if "2 jobs' folders" in line)
    finally:
        srv.stop()
