"""Deleting a job, a module's files and a run on the real server: what goes, what stays,
409 while the job is busy, S3 copies kept unless ?s3=1, and a deleted module runs again."""

import os
import subprocess
import sys

import pytest
import requests
from conftest import Server
from conftest import kill_leftover_runs
from conftest import payload
from conftest import s3_client
from conftest import wait_for
from conftest import zero_work
from test_server import error
from test_server import ok
from test_server import slow

from mip import journal


@pytest.fixture
def mip_env(mip_env):
    """The zero-work catalogue (tests/config.yml): these tests check the API and the
    journal's state, not what a module computes."""
    return zero_work(mip_env)


def delete(srv: Server, path: str, **kw) -> requests.Response:
    kw.setdefault("auth", srv.auth)
    kw.setdefault("timeout", 30)
    return requests.delete(srv.url + path, **kw)


def passed_run(srv: Server, job: str, *modules: str, **extra) -> dict:
    run = ok(srv.post("/runs", json=payload(job, *modules, **extra)), "RunStatus")
    final = srv.wait_run(run["run_id"])
    assert final["status"] == "passed", final["log"]
    return final


def paths(env: dict, job: str, module: str) -> dict:
    out, tmp = env["TA1_OUTPUTS_DIR"], env["TA1_TEMPS_DIR"]
    return {"outputs": os.path.join(out, job, module),
            "log": os.path.join(out, job, f"{module}.log"),
            "temps": os.path.join(tmp, job, module)}


def test_delete_a_module_then_it_runs_again(server):
    first = passed_run(server, "dm", "georeference")
    where = paths(server.env, "dm", "georeference")
    assert all(os.path.exists(p) for p in where.values())
    server.get("/modules/dm/georeference")  # cached answers must not outlive the delete
    server.get("/jobs/dm")
    body = ok(delete(server, "/jobs/dm/georeference"))
    assert body["deleted"] == "module" and body["s3_objects"] == 0
    assert sorted(body["removed"]) == ["outputs/dm/georeference", "outputs/dm/georeference.log",
                                       "temps/dm/georeference"]
    assert not any(os.path.lexists(p) for p in where.values())
    status = ok(server.get("/modules/dm/georeference"), "ModuleStatus")
    assert status["status"] == "not_started" and "deleted" in status["message"]
    assert ok(server.get("/jobs/dm"), "JobStatus")["module_status"] == {
        "georeference": "not_started"}
    assert "deleted module georeference of job dm" in server.output()
    # the next run executes it again instead of skipping it
    again = passed_run(server, "dm", "georeference")
    assert again["module_status"] == {"georeference": "passed"}
    assert os.path.exists(where["outputs"])
    assert ok(server.get("/modules/dm/georeference"))["run_id"] == again["run_id"]
    assert first["run_id"] != again["run_id"]
    # without the delete, a third run skips it
    third = passed_run(server, "dm", "georeference")
    assert third["module_status"] == {}


def test_delete_a_job_removes_folders_records_and_logs(server):
    runs = [passed_run(server, "dj", "georeference")["run_id"] for _ in range(2)]
    logs = [os.path.join(server.env["TA1_RUNS_DIR"], "logs", f"{r}.log") for r in runs]
    assert all(os.path.exists(p) for p in logs)
    for r in runs:
        server.get(f"/runs/{r}")
    body = ok(delete(server, "/jobs/dj"))
    assert body["deleted"] == "job" and body["runs"] == runs
    assert "outputs/dj" in body["removed"] and "temps/dj" in body["removed"]
    assert not os.path.exists(os.path.join(server.env["TA1_OUTPUTS_DIR"], "dj"))
    assert not os.path.exists(os.path.join(server.env["TA1_TEMPS_DIR"], "dj"))
    assert not any(os.path.exists(p) for p in logs)
    for r in runs:
        error(server.get(f"/runs/{r}"), 404, "unknown_run")
    error(server.get("/jobs/dj"), 404, "unknown_job")
    assert "dj" not in server.get("/jobs").json()
    assert server.get("/runs?job=dj").json() == []
    error(delete(server, "/jobs/dj"), 404, "unknown_job")
    assert "deleted job dj" in server.output()
    # the name is free again, for any map
    passed_run(server, "dj", "georeference")


def test_delete_a_run_keeps_the_job_state(server):
    old = passed_run(server, "dr", "georeference")["run_id"]
    other = passed_run(server, "dr", "map_crop")["run_id"]
    # the latest run, or one holding a module's latest state, is refused
    for run_id in (old, other):
        error(delete(server, f"/runs/{run_id}"), 409, "run_holds_job_state")
    skipped = passed_run(server, "dr", "georeference", "map_crop")["run_id"]
    error(delete(server, f"/runs/{skipped}"), 409, "run_holds_job_state")
    # force a new pass of georeference: the first run no longer holds any state
    forced = passed_run(server, "dr", "georeference", force_rerun=True)["run_id"]
    log = os.path.join(server.env["TA1_RUNS_DIR"], "logs", f"{old}.log")
    assert os.path.exists(log)
    server.get(f"/runs/{old}")
    body = ok(delete(server, f"/runs/{old}"))
    assert body == {"deleted": "run", "removed": [f"runs/logs/{old}.log"], "runs": [old],
                    "s3_objects": 0}
    assert not os.path.exists(log)
    error(server.get(f"/runs/{old}"), 404, "unknown_run")
    error(delete(server, f"/runs/{old}"), 404, "unknown_run")
    assert server.get("/runs?job=dr").json() == [other, skipped, forced]
    states = ok(server.get("/jobs/dr"))["module_status"]
    assert {"georeference", "map_crop"} <= set(states)
    assert set(states.values()) == {"passed"}
    assert f"deleted run {old}" in server.output()


def test_every_delete_is_refused_while_a_run_of_the_job_is_running(server):
    done = passed_run(server, "busy", "georeference")["run_id"]
    passed_run(server, "busy", "georeference", force_rerun=True)
    run = ok(server.post("/runs", json=payload("busy", "map_crop",
                                                extra_switches=slow("map_crop", 30))))
    wait_for(lambda: server.get(f"/runs/{run['run_id']}").json()["module_status"].get(
        "map_crop") == "running", 90, 0.2)
    for path in ("/jobs/busy", "/jobs/busy/georeference", "/jobs/busy?s3=1",
                 f"/runs/{done}"):
        body = error(delete(server, path), 409, "job_busy")
        assert "cancel" in body["message"]
    # the running job's files are all still there
    for module in ("georeference", "map_crop"):
        assert os.path.isdir(paths(server.env, "busy", module)["temps"])
    assert os.path.exists(paths(server.env, "busy", "georeference")["outputs"])
    ok(server.post(f"/runs/{run['run_id']}/cancel"))
    server.wait_run(run["run_id"])
    wait_for(lambda: delete(server, "/jobs/busy").status_code == 200, 60, 0.5)


def test_bad_names_and_queries_are_refused(server):
    passed_run(server, "names", "georeference")
    error(delete(server, "/jobs/names?s3=2"), 400, "bad_query")
    error(delete(server, "/jobs/.names"), 400, "bad_job_name")
    error(delete(server, "/jobs/names/.georeference"), 400, "bad_module_name")
    error(delete(server, "/jobs/names/..%2f..%2fx"), 404, "not_found")
    error(delete(server, "/jobs/names/nosuch"), 404, "unknown_module")
    error(delete(server, "/jobs/names/map_crop"), 404, "module_not_run")
    error(delete(server, "/runs/nosuch"), 404, "unknown_run")
    error(delete(server, "/jobs/nosuch"), 404, "unknown_job")
    error(delete(server, "/jobs/names", auth=None), 401)
    assert server.get("/jobs/names").status_code == 200


def test_a_symlink_is_removed_never_followed(server, tmp_path):
    passed_run(server, "links", "georeference", "map_crop")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    where = paths(server.env, "links", "georeference")
    os.symlink(outside, os.path.join(where["temps"], "escape"))
    # a job folder that is a symlink: nothing is removed through it
    temps = os.path.join(server.env["TA1_TEMPS_DIR"], "links")
    os.rename(temps, tmp_path / "moved")
    os.symlink(tmp_path / "moved", temps)
    ok(delete(server, "/jobs/links/map_crop"))
    assert os.path.isdir(tmp_path / "moved" / "map_crop")
    # the log is written by a thread of its own, a moment after the answer
    wait_for(lambda: "a folder on its way is a symlink" in server.output(), timeout=5)
    ok(delete(server, "/jobs/links"))
    assert not os.path.lexists(temps)
    assert (outside / "precious").read_text() == "keep me"
    assert os.path.lexists(tmp_path / "moved" / "georeference" / "escape")


def test_s3_copies_stay_unless_asked(s3_env):
    client = s3_client(s3_env)
    bucket = s3_env["MIP_S3_BUCKET"]
    client.create_bucket(Bucket=bucket)

    def keys(prefix):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", ())]

    srv = Server(s3_env).start()
    try:
        passed_run(srv, "s3d", "georeference", "map_crop")
        passed_run(srv, "s3other", "georeference")
        assert keys("results/s3d/georeference/") and keys("results/s3d/map_crop/")
        # without ?s3=1 the copies stay, and the zip still comes from S3
        body = ok(delete(srv, "/jobs/s3d/georeference"))
        assert body["s3_objects"] == 0 and keys("results/s3d/georeference/")
        zipped = srv.get("/jobs/s3d/georeference/outputs")
        assert zipped.status_code == 200 and zipped.content[:2] == b"PK"
        # with ?s3=1 they go too, and nothing else does
        count = len(keys("results/s3d/georeference/"))
        body = ok(delete(srv, "/jobs/s3d/georeference?s3=1"))
        assert body["s3_objects"] == count
        assert keys("results/s3d/georeference/") == [] and keys("results/s3d/map_crop/")
        error(srv.get("/jobs/s3d/georeference/outputs"), 404, "no_outputs")
        status = ok(srv.get("/modules/s3d/georeference"), "ModuleStatus")
        assert status["status"] == "not_started" and status["s3_uri"] is None
        body = ok(delete(srv, "/jobs/s3d?s3=1"))
        assert body["s3_objects"] > 0 and keys("results/s3d/") == []
        assert keys("results/s3other/georeference/")
        ok(delete(srv, "/jobs/s3other"))
        assert keys("results/s3other/georeference/")
    finally:
        srv.stop()
        kill_leftover_runs(s3_env)


def test_client_deletes(server):
    passed_run(server, "cli", "georeference")
    env = dict(server.env, MIP_CLIENT_URL=server.url, MIP_CLIENT_USER=server.user,
               MIP_CLIENT_PASSWORD=server.password)
    client = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "mip_client.py")
    done = subprocess.run([sys.executable, client, "--delete", "--url", "/jobs/cli/georeference"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"deleted": "module"' in done.stdout
    done = subprocess.run([sys.executable, client, "--delete", "--url", "/jobs/cli/nosuch"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "unknown_module" in done.stderr
    done = subprocess.run([sys.executable, client, "--delete", "--url", "/jobs/cli",
                           "--data", "{}"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    done = subprocess.run([sys.executable, client, "--delete", "--url", "/jobs/cli?s3=1"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert server.get("/jobs/cli").status_code == 404



def test_rows_other_tables_keep_of_a_run_go_with_it(tmp_path):
    """Tables that later migrations add (idempotency keys, notices, ...) may refer to runs
    and executions by foreign key: a delete takes their rows too, instead of failing."""
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    with db.transaction() as c:
        c.execute("CREATE TABLE keyed (k TEXT, run_id TEXT NOT NULL REFERENCES runs(run_id))")
        c.execute("CREATE TABLE used (eid INTEGER NOT NULL REFERENCES executions)")
    runs = [db.create_run("fk", "m", ["a"], False, {}, str(tmp_path)) for _ in range(2)]
    for run_id in runs:
        exec_id = db.start_execution(run_id, "fk", "a", "x.log")
        db.finish_execution(exec_id, journal.Status.PASSED, 0, None)
        with db.transaction() as c:
            c.execute("INSERT INTO keyed VALUES ('k', ?)", (run_id,))
            c.execute("INSERT INTO used VALUES (?)", (exec_id,))
    db.delete_run(runs[0])
    assert db.run(runs[0]) is None and db.run(runs[1]) is not None
    c = db.connect()
    assert c.execute("SELECT COUNT(*) FROM keyed").fetchone()[0] == 1
    assert c.execute("SELECT COUNT(*) FROM used").fetchone()[0] == 1
    assert db.delete_job("fk") == [str(tmp_path / f"{runs[1]}.log")]
    assert db.jobs() == [] and db.run_ids() == []
    assert c.execute("SELECT COUNT(*) FROM keyed").fetchone()[0] == 0
    assert c.execute("SELECT COUNT(*) FROM used").fetchone()[0] == 0
    db.close()


def test_s3_that_cannot_be_read_removes_nothing(s3_env):
    """The bucket does not exist: ?s3=1 answers 502 and nothing local goes."""
    srv = Server(s3_env).start()
    try:
        run = ok(srv.post("/runs", json=payload("nob", "georeference")))
        assert srv.wait_run(run["run_id"])["status"] == "failed"  # its upload failed
        where = paths(s3_env, "nob", "georeference")
        for path in ("/jobs/nob/georeference?s3=1", "/jobs/nob?s3=1"):
            body = error(delete(srv, path), 502, "storage_unavailable")
            assert "nothing on the server was removed" in body["message"]
            assert all(os.path.exists(p) for p in where.values())
        assert ok(srv.get("/modules/nob/georeference"))["status"] == "passed"
        ok(delete(srv, "/jobs/nob"))
        assert not os.path.exists(where["outputs"])
    finally:
        srv.stop()
        kill_leftover_runs(s3_env)


def test_a_deleted_runs_notices_and_idempotency_keys_go_with_it(tmp_path):
    """Notices and Idempotency-Keys name their run without a foreign key: they are deleted
    with it, so that a notice's URL (and the token its query may hold) does not stay."""
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    runs = [db.create_run("dn", "m", ["a"], False, {}, str(tmp_path)) for _ in range(3)]
    now = journal.utcnow()
    with db.transaction() as c:
        for i, run_id in enumerate(runs):
            c.execute("INSERT INTO deliveries (id, run_id, url, source, state, attempts,"
                      " created, updated) VALUES (?, ?, 'https://hooks.example/?token=t',"
                      " 'payload', 'delivered', 1, ?, ?)", (f"d{i}", run_id, now, now))
            c.execute("INSERT INTO idempotency_keys (user, key, hmac, run_id, created)"
                      " VALUES ('u', ?, 'h', ?, ?)", (f"k{i}", run_id, now))
    c = db.connect()

    def left(table):
        return [r[0] for r in c.execute(f"SELECT run_id FROM {table} ORDER BY run_id")]

    db.delete_run(runs[0])
    assert left("deliveries") == left("idempotency_keys") == runs[1:]
    db.delete_job("dn")
    assert left("deliveries") == left("idempotency_keys") == []
    db.close()


def test_a_job_named_like_the_servers_own_files_never_removes_them(server_env):
    """With the outputs in the runs folder (an operator's choice), jobs named `logs` and
    `journal.db` name the run logs and the journal: deleting them leaves those alone."""
    env = dict(server_env, TA1_OUTPUTS_DIR=server_env["TA1_RUNS_DIR"])
    srv = Server(env).start()
    try:
        other = passed_run(srv, "other", "georeference")["run_id"]
        other_log = os.path.join(env["TA1_RUNS_DIR"], "logs", f"{other}.log")
        for job in ("logs", "journal.db"):
            srv.wait_run(ok(srv.post("/runs", json=payload(job, "georeference")))["run_id"])
            body = ok(delete(srv, f"/jobs/{job}"))
            assert f"outputs/{job}" not in body["removed"], body
        assert os.path.exists(other_log)
        assert os.path.exists(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        assert ok(srv.get(f"/runs/{other}"))["status"] == "passed"
        assert "which the server needs" in srv.output()
    finally:
        srv.stop()
        kill_leftover_runs(env)
