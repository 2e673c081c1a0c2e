"""GPUs said once and plainly: a host without one warns once at start and once per run (not
with a list of every module), and a module's time runs from when it got its device."""

import time
from datetime import datetime

from conftest import Server
from conftest import payload
from conftest import wait_for

from mip import gpus


def test_a_host_without_a_gpu_says_so_once(server_env):
    srv = Server(dict(server_env, MIP_GPUS="none")).start()
    try:
        assert sum("has no GPU" in line for line in srv.lines) == 1, srv.output()
        run = srv.post("/runs", json=payload("nogpu1", "georeference")).json()
        final = srv.wait_run(run["run_id"])
        assert final["status"] == "passed"
        log = srv.get(f"/runs/{run['run_id']}/log").text
        warnings = [line for line in log.splitlines() if "has no GPU" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], log
        assert "georeference" not in warnings[0] and len(warnings[0]) < 160
        # and once in the run's status, as a warning of the run (not of each module)
        said = [w for w in final["warnings"] if "has no GPU" in w]
        assert len(said) == 1 and said[0].endswith("ran on the CPU"), final["warnings"]
        assert "georeference" not in said[0]
    finally:
        srv.stop()


def test_a_module_waiting_for_a_gpu_starts_when_it_gets_one(server_env):
    env = dict(server_env, MIP_GPUS="0")
    srv = Server(env).start()
    held = gpus.try_take(env["TA1_RUNS_DIR"], ("0",), "the test")  # the host's only device
    assert held is not None
    try:
        run = srv.post("/runs", json=payload("gpuwait", "georeference")).json()
        wait_for(lambda: srv.get("/modules/gpuwait/georeference").status_code == 200)
        wait_for(lambda: srv.get("/modules/gpuwait/georeference").json()["message"]
                 == gpus.WAITING)
        waiting = srv.get("/modules/gpuwait/georeference").json()
        assert waiting["status"] == "running"
        time.sleep(1)
        released = datetime.now().astimezone()
        gpus.release(held)
        held = None
        final = srv.wait_run(run["run_id"])
        assert final["status"] == "passed"
        assert not [w for w in final["warnings"] if "GPU" in w], final["warnings"]
        done = srv.get("/modules/gpuwait/georeference").json()
        started = datetime.fromisoformat(done["start_time"])
        assert started >= released.replace(microsecond=0), (done, released)
        assert started > datetime.fromisoformat(waiting["start_time"])
        assert done["resources"]["waited_for_gpu_seconds"] >= 1
    finally:
        gpus.release(held)
        srv.stop()
