"""A full disk is an answer, not a hang: POST answers 507 below MIP_MIN_FREE_MB, the
server keeps answering while its journal's disk is full, and every run's end (and every
module's) is recorded once space is back. Real full file systems: small tmpfs mounts."""

import contextlib
import errno
import os
import subprocess

import pytest
from conftest import Server
from conftest import alive
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import latest
from conftest import payload
from conftest import release
from conftest import wait_for
from test_server import error

from mip import journal


@contextlib.contextmanager
def tmpfs(path: str, megabytes: int):
    """A tmpfs of `megabytes` mounted at `path` (skips the test where mounting is refused)."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mount was refused: "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def fill(folder: str) -> str:
    """Fill the file system of `folder` to its last byte; the filler file's path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:
        for size in (1024 * 1024, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    return path


@pytest.fixture
def small_env(server_env, tmp_path):
    """server_env with MIP_MIN_FREE_MB at 1 (the tmpfs mounts are small)."""
    return dict(server_env, MIP_MIN_FREE_MB="1")


def test_post_answers_507_below_the_free_space_floor(server_env):
    env = dict(server_env, MIP_MIN_FREE_MB=str(10**9))
    srv = Server(env).start()
    try:
        body = error(srv.post("/runs", json=payload("nospace", "georeference")), 507,
                     "insufficient_storage")
        assert "MIP_MIN_FREE_MB" in body["message"]
        assert srv.get("/runs").json() == []
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_journal_disk_full_then_freed(small_env):
    env = small_env
    with tmpfs(env["TA1_RUNS_DIR"], 16):
        srv = Server(env).start()
        # the module runs until the journal's disk is full: its end is what cannot be kept
        hold = hold_file(env, "jfull")
        try:
            run = srv.post("/runs", json=payload("jfull", "georeference",
                                                 extra_switches={"georeference": ["--hold", hold]}))
            assert run.status_code == 200, run.text
            run_id = run.json()["run_id"]
            wait_for(lambda: latest(env, "jfull"))  # the module has started
            filler = fill(env["TA1_RUNS_DIR"])
            release(hold)
            db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
            pid = wait_for(lambda: db.run(run_id)["pid"])
            # mipper's last journal writes fail; it ends without recording the run's end
            wait_for(lambda: not alive(pid), timeout=60)
            assert srv.get("/health").status_code == 200
            assert srv.get(f"/runs/{run_id}").json()["status"] == "running"
            error(srv.post("/runs", json=payload("jfull2", "georeference")), 507,
                  "insufficient_storage")
            error(srv.post(f"/runs/{run_id}/rerun"), 507, "insufficient_storage")
            os.remove(filler)
            final = srv.wait_run(run_id, timeout=60)
            assert final["status"] == "failed"
            assert "before recording the end of the run" in final["log"]
            module = latest(env, "jfull")["georeference"]
            assert module["status"] != "running" and module["message"]
            assert "cannot record its end yet" in srv.output()
            # the watcher thread lived on: the next run is watched to its end
            nxt = srv.post("/runs", json=payload("jfull3", "georeference")).json()
            assert srv.wait_run(nxt["run_id"])["status"] == "passed"
            db.close()
        finally:
            release(hold)
            srv.stop()
            kill_leftover_runs(env)


def test_outputs_disk_full_leaves_no_module_running(small_env):
    env = small_env
    with tmpfs(env["TA1_OUTPUTS_DIR"], 16):
        srv = Server(env).start()
        # both modules are held running until the disk is full, then write their outputs
        hold = hold_file(env, "ofull")
        try:
            both = {"legend_segment": ["--hold", hold], "georeference": ["--hold", hold]}
            run = srv.post("/runs", json=payload("ofull", "legend_segment", "georeference",
                                                 extra_switches=both))
            assert run.status_code == 200, run.text
            run_id = run.json()["run_id"]
            wait_for(lambda: len(latest(env, "ofull")) == 2)
            filler = fill(env["TA1_OUTPUTS_DIR"])
            release(hold)
            final = srv.wait_run(run_id, timeout=60)
            assert final["status"] == "failed"
            modules = latest(env, "ofull")
            assert {m: r["status"] for m, r in modules.items()} == {
                "legend_segment": "failed", "georeference": "failed"}
            assert all(r["message"] for r in modules.values())
            os.remove(filler)
        finally:
            release(hold)
            srv.stop()
            kill_leftover_runs(env)
