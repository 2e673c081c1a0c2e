"""The sweeper on the real server: temps, outputs and runs removed by age (the journal's
times set in the past), runners.log trimmed, and below MIP_SWEEP_FREE_MB the temps of the
jobs that ended first, then outputs already in S3 (small real tmpfs mounts). A running
job's files are never touched."""

import os
import subprocess
import sys
import threading
import time
import types

import pytest
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import payload
from conftest import read
from conftest import release
from conftest import s3_client
from conftest import wait_for
from test_delete import passed_run
from test_delete import paths
from test_full_disk import tmpfs
from test_server import ok
from test_server import slow

from mip import journal
from mip.links import retention
from mip.settings import Settings

MB = 1024 * 1024


def days_ago(days: float) -> str:
    then = time.time() - days * 86400
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(then))


def set_stop_time(env: dict, stop_time: str, *run_ids: str) -> None:
    """Make runs look as if they ended at `stop_time`, straight in the journal."""
    db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
    try:
        with db.transaction() as c:
            for run_id in run_ids:
                c.execute("UPDATE runs SET stop_time = ? WHERE run_id = ?", (stop_time, run_id))
    finally:
        db.close()


def start_server(env: dict, **settings) -> Server:
    return Server(dict(env, MIP_SWEEP_SECONDS="1", **settings)).start()


def test_start_is_refused_with_a_floor_not_above_min_free(server_env):
    for settings, words in (({"MIP_MIN_FREE_MB": "100", "MIP_SWEEP_FREE_MB": "100"},
                             "MIP_SWEEP_FREE_MB=100 must be above MIP_MIN_FREE_MB=100"),
                            ({"MIP_SWEEP_OUTPUTS": "yes"}, "MIP_SWEEP_OUTPUTS='yes'"),
                            ({"MIP_RETAIN_TEMPS_DAYS": "-1"}, "MIP_RETAIN_TEMPS_DAYS=-1"),
                            ({"MIP_SWEEP_SECONDS": "0"}, "MIP_SWEEP_SECONDS=0")):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"), "--port",
                               "0"], env=dict(server_env, **settings), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.startswith("mip_server: error: ") and words in done.stderr, done.stderr


def test_old_temps_outputs_and_runs_go_by_age(server_env):
    srv = start_server(server_env, MIP_RETAIN_TEMPS_DAYS="1", MIP_RETAIN_OUTPUTS_DAYS="5",
                       MIP_RETAIN_RUNS_DAYS="3")
    env = srv.env
    try:
        info = ok(srv.get("/"))
        assert set(info["free_mb"]) == {"runs", "outputs", "temps"}
        assert all(isinstance(v, int) and v > 0 for v in info["free_mb"].values())
        first = passed_run(srv, "aged", "georeference")["run_id"]
        second = passed_run(srv, "aged", "georeference", force_rerun=True)["run_id"]
        fresh = passed_run(srv, "fresh", "georeference")["run_id"]
        # a job running now, whose earlier run ended long ago
        live_old = passed_run(srv, "live", "georeference")["run_id"]
        live = ok(srv.post("/runs", json=payload("live", "map_crop",
                                                 extra_switches=slow("map_crop", 60))))
        wait_for(lambda: srv.get(f"/runs/{live['run_id']}").json()["module_status"].get(
            "map_crop") == "running", 90, 0.2)
        set_stop_time(env, days_ago(10), live_old)
        runners_log = os.path.join(env["TA1_RUNS_DIR"], "runners.log")
        with open(runners_log, encoding="utf-8") as f:
            recent = f.read()  # empty with the inline runner: a line of now is added
        recent += time.strftime("%Y-%m-%dT%H:%M:%S.000Z live a recent line\n", time.gmtime())
        with open(runners_log, "w", encoding="utf-8") as f:
            f.write("2001-01-01T00:00:00.000Z aged an old line\n" + recent)

        set_stop_time(env, days_ago(4), first, second)
        aged = paths(env, "aged", "georeference")
        wait_for(lambda: not os.path.exists(aged["temps"]), 30, 0.2)
        wait_for(lambda: srv.get(f"/runs/{first}").status_code == 404, 30, 0.2)
        assert not os.path.exists(os.path.join(env["TA1_RUNS_DIR"], "logs", f"{first}.log"))
        # the latest run carries the job's state; outputs are younger than 5 days
        assert srv.get(f"/runs/{second}").json()["status"] == "passed"
        assert os.path.exists(aged["outputs"]) and os.path.exists(aged["log"])
        assert ok(srv.get("/modules/aged/georeference"))["status"] == "passed"
        # runners.log keeps its recent lines only; it is trimmed once no run is running
        ok(srv.post(f"/runs/{live['run_id']}/cancel"))
        srv.wait_run(live["run_id"])
        wait_for(lambda: "an old line" not in read(runners_log), 30, 0.2)
        assert recent in read(runners_log)

        set_stop_time(env, days_ago(6), second)
        wait_for(lambda: not os.path.exists(aged["outputs"]), 30, 0.2)
        assert not os.path.exists(aged["log"])
        status = ok(srv.get("/modules/aged/georeference"), "ModuleStatus")
        assert status["status"] == "not_started" and "sweeper" in status["message"]
        assert srv.get("/jobs/aged").json()["module_status"] == {"georeference": "not_started"}
        out = srv.output()
        assert "sweep: removed temps/aged" in out and "MIP_RETAIN_TEMPS_DAYS" in out
        assert f"sweep: removed run {first}" in out
        assert "module georeference now not_started" in out
        # the next run executes it again
        assert passed_run(srv, "aged", "georeference")["module_status"] == {
            "georeference": "passed"}
        # what is young stays
        assert srv.get(f"/runs/{fresh}").json()["status"] == "passed"
        assert all(os.path.exists(p) for p in paths(env, "fresh", "georeference").values())
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_a_running_job_is_never_swept(server_env):
    """Its earlier run ended long ago, and everything is old enough to go: while a run of
    it runs, the job's files stay."""
    srv = start_server(server_env, MIP_RETAIN_TEMPS_DAYS="0", MIP_RETAIN_OUTPUTS_DAYS="0",
                       MIP_RETAIN_RUNS_DAYS="0")
    env = srv.env
    try:
        hold = hold_file(env, "busy")
        run = ok(srv.post("/runs", json=payload("busy", "map_crop", extra_switches={
            "map_crop": ["--hold", hold]})))
        wait_for(lambda: srv.get(f"/runs/{run['run_id']}").json()["module_status"].get(
            "map_crop") == "running", 90, 0.2)
        # legend_segment passed in this run; map_crop is running: none of it may go
        done = paths(env, "busy", "legend_segment")
        for _ in range(4):
            assert all(os.path.exists(p) for p in done.values())
            assert os.path.isdir(paths(env, "busy", "map_crop")["temps"])
            time.sleep(1)  # a sweep a second (MIP_SWEEP_SECONDS=1)
        release(hold)
        assert srv.wait_run(run["run_id"])["status"] == "passed"
        # once it has ended, days 0 means at once
        wait_for(lambda: not os.path.exists(done["outputs"]), 30, 0.2)
    finally:
        srv.stop()
        kill_leftover_runs(env)


def fill_to(folder: str, free_mb: int) -> None:
    """Write a filler file so that `free_mb` MB stay free on `folder`'s file system."""
    st = os.statvfs(folder)
    size = st.f_bavail * st.f_frsize - free_mb * MB
    with open(os.path.join(folder, "filler"), "wb") as f:
        for _ in range(size // MB):
            f.write(b"\0" * MB)


def pad(folder: str, megabytes: int) -> None:
    with open(os.path.join(folder, "pad"), "wb") as f:
        for _ in range(megabytes):
            f.write(b"\1" * MB)


@pytest.mark.skipif(os.geteuid() != 0, reason="a small tmpfs needs root")
def test_floor_removes_the_temps_of_the_jobs_that_ended_first(server_env):
    env = dict(server_env, MIP_MIN_FREE_MB="1")
    with tmpfs(env["TA1_TEMPS_DIR"], 48):
        srv = start_server(env, MIP_SWEEP_FREE_MB="16")
        try:
            for job in ("first", "second"):
                passed_run(srv, job, "georeference")
                pad(paths(env, job, "georeference")["temps"], 10)
            fill_to(env["TA1_TEMPS_DIR"], 8)
            wait_for(lambda: not os.path.exists(os.path.join(env["TA1_TEMPS_DIR"], "first")),
                     30, 0.2)
            time.sleep(2)  # two more sweeps: the floor is met, nothing else goes
            assert os.path.exists(paths(env, "second", "georeference")["temps"])
            for job in ("first", "second"):
                assert os.path.exists(paths(env, job, "georeference")["outputs"])
                assert ok(srv.get(f"/modules/{job}/georeference"))["status"] == "passed"
            assert "free space below MIP_SWEEP_FREE_MB=16" in srv.output()
            # below it again, with no temps left: outputs stay (MIP_SWEEP_OUTPUTS=0)
            os.unlink(os.path.join(env["TA1_TEMPS_DIR"], "filler"))
            fill_to(env["TA1_TEMPS_DIR"], 4)
            wait_for(lambda: not os.path.exists(os.path.join(env["TA1_TEMPS_DIR"], "second")),
                     30, 0.2)
            wait_for(lambda: "outputs stay: MIP_SWEEP_OUTPUTS=0" in srv.output(), 30, 0.2)
            assert os.path.exists(paths(env, "second", "georeference")["outputs"])
        finally:
            srv.stop()
            kill_leftover_runs(env)


@pytest.mark.skipif(os.geteuid() != 0, reason="a small tmpfs needs root")
def test_floor_removes_outputs_only_when_allowed_and_in_s3(s3_env):
    env = dict(s3_env, MIP_MIN_FREE_MB="1")
    client = s3_client(env)
    client.create_bucket(Bucket=env["MIP_S3_BUCKET"])
    with tmpfs(env["TA1_OUTPUTS_DIR"], 48):
        srv = start_server(env, MIP_SWEEP_FREE_MB="16", MIP_SWEEP_OUTPUTS="1")
        try:
            for job in ("notins3", "ins3"):
                passed_run(srv, job, "georeference")
                pad(paths(env, job, "georeference")["outputs"], 10)
            # as if notins3's upload had failed
            db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
            with db.transaction() as c:
                c.execute("UPDATE executions SET upload_status = 'failed' WHERE job = 'notins3'")
            db.close()
            fill_to(env["TA1_OUTPUTS_DIR"], 8)
            wait_for(lambda: not os.path.exists(paths(env, "ins3", "georeference")["outputs"]),
                     30, 0.2)
            assert os.path.exists(paths(env, "notins3", "georeference")["outputs"])
            status = ok(srv.get("/modules/ins3/georeference"), "ModuleStatus")
            assert status["status"] == "not_started" and status["upload_status"] == "uploaded"
            # the zip still comes, from S3
            resp = srv.get("/jobs/ins3/georeference/outputs")
            assert resp.status_code == 200 and resp.content[:2] == b"PK"
            assert "sweep: removed outputs/ins3/georeference" in srv.output()
        finally:
            srv.stop()
            kill_leftover_runs(env)


def test_a_run_whose_notice_is_still_to_send_is_not_swept(tmp_path):
    """MIP_RETAIN_RUNS_DAYS does not take a run whose completion notice is still waiting
    or being retried: the receiver would never get it."""
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    runs = [db.create_run("nt", "m", ["a"], False, {}, str(tmp_path)) for _ in range(3)]
    for run_id in runs:
        assert db.set_run_status(run_id, journal.Status.RUNNING, pid=1)
        assert db.set_run_status(run_id, journal.Status.PASSED)
    now = journal.utcnow()
    with db.transaction() as c:
        for i, state in enumerate(("pending", "delivered")):
            c.execute("INSERT INTO deliveries (id, run_id, url, source, state, attempts,"
                      " created, updated) VALUES (?, ?, 'https://hooks.example/', 'payload',"
                      " ?, 1, ?, ?)", (f"d{i}", runs[i], state, now, now))

    def old():
        return [r["run_id"] for r in db.old_runs("9999-01-01T00:00:00.000Z")]

    assert old() == [runs[1]]  # runs[2] is the job's latest: it holds its state
    with db.transaction() as c:
        c.execute("UPDATE deliveries SET state = 'failed' WHERE id = 'd0'")
    assert old() == runs[:2]
    db.close()


def test_a_job_run_again_during_a_sweep_is_not_old_any_more(mip_env, monkeypatch):
    """A long sweep works from the list of old jobs read at its start; a job that ran again
    meanwhile keeps its fresh outputs and temps (its latest run is checked again, under the
    queue's lock, before each removal)."""
    settings = Settings.from_env(mip_env)
    settings.make_dirs()
    db = journal.Journal(settings.journal_path)
    db.migrate()
    run_id = db.create_run("again", "m", ["georeference"], False, {}, settings.runs_dir)
    db.set_run_status(run_id, journal.Status.RUNNING, pid=1)
    exec_id = db.start_execution(run_id, "again", "georeference", "x.log")
    db.finish_execution(exec_id, journal.Status.PASSED, 0, None)
    db.set_run_status(run_id, journal.Status.PASSED)  # it ended just now
    where = paths(mip_env, "again", "georeference")
    for folder in (where["outputs"], where["temps"]):
        os.makedirs(folder)
    queue = types.SimpleNamespace(lock=threading.Lock(), running={})
    remover = retention.Remover(types.SimpleNamespace(settings=settings), db, queue)
    sweeper = retention.Sweeper(retention.RetentionSettings(temps_days=1, outputs_days=1),
                                remover)
    # the job as the sweep's list saw it, before this latest run
    monkeypatch.setattr(sweeper, "ended_before", lambda cutoff: ["again"])
    sweeper.sweep()
    assert os.path.isdir(where["outputs"]) and os.path.isdir(where["temps"])
    assert db.latest_execution("again", "georeference")["status"] == "passed"
    # a day later the same sweep removes them
    sweeper.sweep(now=time.time() + 2 * 86400)
    assert not os.path.exists(where["outputs"]) and not os.path.exists(where["temps"])
    assert db.latest_execution("again", "georeference")["status"] == "not_started"
    db.close()


def test_maps_the_cdr_link_fetched_go_with_the_temps(mip_env):
    """MIP_RETAIN_TEMPS_DAYS removes the maps the CDR link downloaded once their events
    and runs have ended; a map it did not download, or whose event still waits, stays."""
    settings = Settings.from_env(mip_env)
    settings.make_dirs()
    db = journal.Journal(settings.journal_path)
    db.migrate()
    for cog, status, fetched in (("ran", "submitted", True), ("failed", "failed", True),
                                 ("waits", "received", True), ("own", "failed", False)):
        db.add_event(f"ev-{cog}", "map.process", cog, "https://x", status)
        db.set_event(f"ev-{cog}", status, fetched=fetched)
        os.makedirs(os.path.join(settings.inputs_dir, "maps", cog))
    run_id = db.create_run("ran", "ran", ["a"], False, {}, settings.runs_dir)
    db.set_run_status(run_id, journal.Status.RUNNING, pid=1)
    db.set_run_status(run_id, journal.Status.PASSED)
    queue = types.SimpleNamespace(lock=threading.Lock(), running={})
    remover = retention.Remover(types.SimpleNamespace(settings=settings), db, queue)
    sweeper = retention.Sweeper(retention.RetentionSettings(temps_days=1), remover)
    sweeper.sweep()  # all ended just now
    assert sorted(os.listdir(os.path.join(settings.inputs_dir, "maps"))) == [
        MAP, "failed", "own", "ran", "waits"]
    sweeper.sweep(now=time.time() + 2 * 86400)
    assert sorted(os.listdir(os.path.join(settings.inputs_dir, "maps"))) == [
        MAP, "own", "waits"]
    assert db.fetched_maps() == []  # the next event for them downloads them again
    db.close()
