"""A run whose mipper dies (SIGKILL, the OOM killer) leaves nothing running: its luigi
workers, inline modules, containers and ECS tasks are stopped before its job is freed,
so a rerun never runs a module twice at once."""

import os
import signal
import threading
import time

from conftest import Server
from conftest import alive
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import payload
from conftest import read
from conftest import release
from conftest import wait_for
from test_ecs import Cluster
from test_ecs import aws
from test_ecs import ecs_env  # noqa: F401
from test_runners import docker_calls
from test_runners import docker_env  # noqa: F401
from test_server import module_processes
from test_server import slow

from mip import journal


def processes_naming(text: str) -> list:
    """Live processes whose command line holds `text` (mipper and its luigi workers carry
    their run id there)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read() and alive(int(pid)):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def mipper_pid(env: dict, run_id: str) -> int:
    db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
    try:
        return wait_for(lambda: (db.run(run_id) or {}).get("pid"))
    finally:
        db.close()


class Sampler:
    """Counts, every few milliseconds, the live module processes whose command line holds
    `marker`; `most` is the largest count seen."""

    def __init__(self, marker: str):
        self.marker = marker
        self.most = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.done.is_set():
            self.most = max(self.most, len(module_processes(self.marker)))
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(10)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def test_sigkill_of_mipper_then_rerun_never_runs_a_module_twice(server):
    env = server.env
    # held until the dead run's module is seen gone; the rerun, with the same switches,
    # then runs through
    hold = hold_file(env, "dead")
    first = server.post("/runs", json=payload("dead", "georeference", extra_switches={
        "georeference": ["--hold", hold]})).json()
    marker = os.path.join(env["TA1_OUTPUTS_DIR"], "dead", "georeference")
    orphans = wait_for(lambda: module_processes(marker))
    pid = mipper_pid(env, first["run_id"])
    workers = [p for p in processes_naming(first["run_id"]) if p != pid]
    with Sampler(marker) as sampler:
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        again = server.post(f"/runs/{first['run_id']}/rerun")
        assert again.status_code == 200, again.text
        sleep_until(killed + 2)
        assert not [p for p in orphans if alive(p)], "the dead run's module still runs"
        assert not processes_naming(first["run_id"]), "the dead run's luigi workers still run"
        release(hold)
        final = server.wait_run(again.json()["run_id"], timeout=60)
    assert final["status"] == "passed", final["log"]
    assert sampler.most == 1, f"{sampler.most} copies of georeference ran at once"
    assert workers, "MIP_WORKERS=4: luigi forks a worker per task"
    dead = server.get(f"/runs/{first['run_id']}").json()
    assert dead["status"] == "failed"
    assert "before recording the end of the run" in dead["log"]
    assert "stopped process" in server.output()


def test_restart_stops_what_a_dead_run_left(server_env):
    srv = Server(server_env).start()
    try:
        run = srv.post("/runs", json=payload("gone", "georeference",
                                             extra_switches=slow("georeference", 60))).json()
        marker = os.path.join(server_env["TA1_OUTPUTS_DIR"], "gone", "georeference")
        orphans = wait_for(lambda: module_processes(marker))
        pid = mipper_pid(server_env, run["run_id"])
        # the server and the run's mipper die together (the OOM killer); the module lives
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), timeout=10)
        assert all(alive(p) for p in orphans)
        srv.start()
        lost = srv.wait_run(run["run_id"], timeout=30)
        assert lost["status"] == "failed"
        assert "server restarted" in lost["log"]
        assert not [p for p in orphans if alive(p)]
        assert not processes_naming(run["run_id"])
    finally:
        srv.stop()
        kill_leftover_runs(server_env)


def test_sigkill_of_mipper_kills_its_containers(docker_env):  # noqa: F811
    env = dict(docker_env, MIP_USER="tester", MIP_PASSWORD="pw-for-tests")
    srv = Server(env).start()
    try:
        body = payload("dkd", "georeference", extra_switches=slow("georeference", 60))
        run_id = srv.post("/runs", json=body).json()["run_id"]
        state = env["DOCKER_STANDIN_STATE"]
        pid_file = wait_for(lambda: [n for n in os.listdir(state) if n.endswith(".pid")])[0]
        container = int(read(os.path.join(state, pid_file)))
        os.kill(mipper_pid(env, run_id), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not alive(container), timeout=10)
        assert time.monotonic() - killed < 2
        assert srv.wait_run(run_id, timeout=30)["status"] == "failed"
        ps = [c for c in docker_calls(env) if c["cmd"] == "ps"]
        assert ps and ps[0]["args"][-1] == f"label=mip.run_id={run_id}"
        runs = [c for c in docker_calls(env) if c["cmd"] == "run"]
        assert runs[0]["labels"] == {"mip.run_id": run_id}
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_sigkill_of_mipper_stops_its_ecs_tasks(ecs_env):  # noqa: F811
    env = dict(ecs_env, MIP_USER="tester", MIP_PASSWORD="pw-for-tests")
    ecs = aws(env, "ecs")
    srv = Server(env).start()
    try:
        with Cluster(env, hang={"georeference"}) as cluster:
            run_id = srv.post("/runs", json=payload("ecsd", "georeference")).json()["run_id"]
            arn = wait_for(lambda: list(cluster.seen))[0]
            assert cluster.seen[arn]["startedBy"] == run_id
            os.kill(mipper_pid(env, run_id), signal.SIGKILL)
            assert srv.wait_run(run_id, timeout=30)["status"] == "failed"
            task = ecs.describe_tasks(cluster="mip-test", tasks=[arn])["tasks"][0]
            assert task["desiredStatus"] == "STOPPED"
            assert "mipper process died" in task.get("stoppedReason", "")
    finally:
        srv.stop()
        kill_leftover_runs(env)
