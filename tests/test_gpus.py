"""GPU slots shared by the whole host, and what each module used (gpus.py).

The host has no GPU: MIP_GPUS names devices for the slots, and the stand-in modules log
the device they were given (CUDA_VISIBLE_DEVICES inline, NVIDIA_VISIBLE_DEVICES as the
NVIDIA container toolkit sets it from `--gpus device=N`) with their start and stop times,
so the tests read from the modules themselves who held which device when."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from conftest import MAP
from conftest import Server
from conftest import alive
from conftest import kill_leftover_runs
from conftest import latest
from conftest import mipper
from conftest import payload
from conftest import read
from conftest import wait_for
from conftest import zero_work
from test_client import client
from test_client import client_env
from test_dead_runs import mipper_pid
from test_dead_runs import processes_naming
from test_ecs import Cluster
from test_ecs import ecs_env  # noqa: F401
from test_runners import docker_calls
from test_runners import docker_env  # noqa: F401
from test_server import module_processes

from mip import gpus
from mip import journal
from mip import runners

MODULES = ["legend_segment", "georeference", "legend_item_segment", "map_crop",
           "legend_item_description", "polygon_extract", "line_extract", "point_extract",
           "geopackage"]
MB = 1024 * 1024
START = re.compile(r"gpu: CUDA_VISIBLE_DEVICES=(\S+) NVIDIA_VISIBLE_DEVICES=(\S+) "
                   r"start=(\S+Z)")
STOP = re.compile(r"gpu: stop=(\S+Z)")


def gpu_env(env: dict, devices: str, **more) -> dict:
    return dict(env, MIP_GPUS=devices, **more)


def seen_by_module(env: dict, job: str, module: str) -> tuple:
    """(CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, start, stop) from the module's log."""
    text = read(os.path.join(env["TA1_OUTPUTS_DIR"], job, f"{module}.log"))
    start, stop = START.search(text), STOP.search(text)
    assert start and stop, text
    return (start.group(1), start.group(2), epoch(start.group(3)), epoch(stop.group(1)))


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def resources(srv: Server, job: str, module: str) -> dict:
    answer = srv.get(f"/modules/{job}/{module}")
    assert answer.status_code == 200, answer.text
    return answer.json()["resources"]


def test_settings():
    assert gpus.GpuSettings.from_env({"MIP_GPUS": "none"}).devices == ()
    assert gpus.GpuSettings.from_env({"MIP_GPUS": " 1, 0 "}).devices == ("1", "0")
    # "²" and "٣" are digits to str.isdigit(); "0,00" names device 0 twice
    for bad in ("0,x", "0,0", "-1", "64", "0;1", "../0", "²", "٣", "0,00", "0" * 5000):
        with pytest.raises(ValueError, match="MIP_GPUS"):
            gpus.GpuSettings.from_env({"MIP_GPUS": bad})
    with pytest.raises(ValueError, match="MIP_REQUIRE_GPU"):
        gpus.GpuSettings.from_env({"MIP_GPUS": "none", "MIP_REQUIRE_GPU": "yes"})
    # this host has no driver: NVML raises, nvidia-smi is absent, so the default is none
    assert gpus.nvml_count() is None and not os.path.exists(gpus.DRIVER)
    assert gpus.GpuSettings.from_env({}).devices == ()


def test_bad_gpus_setting_stops_mipper(mip_env):
    result = mipper(gpu_env(mip_env, "0,gpu"), "--list-modules")
    assert result.returncode == 1
    assert "MIP_GPUS='0,gpu': expected device ids" in result.stderr


def test_two_runs_never_share_a_gpu(server_env):
    """Two ALL runs at 4 workers each on two devices: at no moment more than two GPU
    modules, and never two on one device. On the zero-work catalogue: what is asserted
    is who held which device when, which --sleep makes last, not what a module computes."""
    env = gpu_env(zero_work(server_env), "0,1", MIP_WORKERS="4", MIP_MAX_RUNS="2")
    srv = Server(env).start()
    try:
        # long enough that the two runs overlap and modules wait (asserted below); the 18
        # modules on two devices take at least 9 of these, one after another
        slow = {m: ["--sleep", "0.75"] for m in MODULES}
        ids = [srv.post("/runs", json=payload(job, "ALL", extra_switches=slow)).json()["run_id"]
               for job in ("ga", "gb")]
        for run_id in ids:
            final = srv.wait_run(run_id, timeout=300)
            assert final["status"] == "passed", final["log"]
        spans = []
        for job in ("ga", "gb"):
            for module in MODULES:
                cuda, nvidia, start, stop = seen_by_module(env, job, module)
                used = resources(srv, job, module)
                assert cuda in ("0", "1") and nvidia == "unset"
                assert used["gpu_device"] == cuda, (job, module, used)
                assert used["waited_for_gpu_seconds"] is not None
                spans.append((start, stop, cuda, f"{job}/{module}"))
        # the catalogue's $GPU_ID reaches the module as 0, the only device it sees
        georef = read(os.path.join(env["TA1_OUTPUTS_DIR"], "ga", "georeference.log"))
        assert "--gpu_id 0" in georef and "--gpu_id 3" not in georef
        most = 0
        for start, _stop, device, name in spans:
            # the modules running at the moment this one starts (starts are the only
            # moments the count can grow)
            now = [s for s in spans if s[0] <= start < s[1]]
            most = max(most, len(now))
            assert len(now) <= 2, f"{len(now)} GPU modules at once: {now}"
            clash = [s for s in now if s[2] == device and s[3] != name]
            assert not clash, f"{name} shared GPU {device} with {clash}"
        # the test could fail: both devices were busy at once, and modules had to wait
        assert most == 2
        waits = [resources(srv, job, m)["waited_for_gpu_seconds"]
                 for job in ("ga", "gb") for m in MODULES]
        assert max(waits) > 0.5, waits
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_a_module_waits_for_a_held_gpu(server_env):
    """Another holder of the only device (a mipper of another server on this host, here
    the test itself) keeps the module `running`, waiting, until it lets go."""
    env = gpu_env(server_env, "0")
    path = gpus.lock_path(env["TA1_RUNS_DIR"], "0")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    srv = Server(env).start()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run_id = srv.post("/runs", json=payload("wait", "georeference")).json()["run_id"]
        status = wait_for(lambda: waiting(srv, "wait", "georeference"), timeout=60)
        assert status["status"] == "running" and status["message"] == "waiting for a GPU"
        assert status["resources"]["gpu_device"] is None
        time.sleep(1.5)
        marker = os.path.join(env["TA1_OUTPUTS_DIR"], "wait", "georeference")
        assert not module_processes(marker), "the module started without its GPU"
        assert srv.get("/modules/wait/georeference").json()["message"] == "waiting for a GPU"
        fcntl.flock(fd, fcntl.LOCK_UN)
        final = srv.wait_run(run_id, timeout=120)
        assert final["status"] == "passed", final["log"]
        done = srv.get("/modules/wait/georeference").json()
        assert done["message"] is None
        assert done["resources"]["gpu_device"] == "0"
        assert done["resources"]["waited_for_gpu_seconds"] >= 1.5
    finally:
        os.close(fd)
        srv.stop()
        kill_leftover_runs(env)


def waiting(srv: Server, job: str, module: str) -> dict | None:
    """The module's status once it has a message (waiting, or failed), else None."""
    answer = srv.get(f"/modules/{job}/{module}")
    return answer.json() if answer.status_code == 200 and answer.json()["message"] else None


def test_resources_of_an_inline_module(server_env):
    """--hold-mb 200 shows in peak_rss_bytes (the process's own accounting); the GPU
    figures are null here, where NVML finds no driver."""
    env = gpu_env(server_env, "0")
    srv = Server(env).start()
    try:
        body = payload("mem", "georeference",
                       extra_switches={"georeference": ["--hold-mb", "200"]})
        run_id = srv.post("/runs", json=body).json()["run_id"]
        assert srv.wait_run(run_id, timeout=120)["status"] == "passed"
        status = srv.get("/modules/mem/georeference").json()
        used = status["resources"]
        assert used["peak_rss_bytes"] >= 200 * MB, used
        assert used["peak_rss_bytes"] < 2000 * MB, used
        assert 0 < used["cpu_seconds"] < 60, used
        assert used["gpu_device"] == "0" and used["waited_for_gpu_seconds"] == 0
        assert used["gpu_memory_peak_bytes"] is None and used["gpu_util_mean"] is None
        assert "--hold-mb 200: holding 200 MB for 2 s" in read(
            os.path.join(env["TA1_OUTPUTS_DIR"], "mem", "georeference.log"))
        # the client shows them with the module's status
        shown = client("--get", "--url", "/modules/mem/georeference",
                       env=client_env(srv, MIP_CLIENT_URL=srv.url))
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["resources"] == used
        line = re.search(r"georeference passed: CPU [0-9.]+ s, peak memory (\d+) MB, GPU 0 "
                         r"\(waited 0\.0 s, peak \?, mean use \?\)", shown.stderr)
        assert line and int(line.group(1)) >= 200, shown.stderr
        # a module without --hold-mb stays far below: the figure is the module's own
        body = payload("mem", "map_crop")
        run_id = srv.post("/runs", json=body).json()["run_id"]
        assert srv.wait_run(run_id, timeout=120)["status"] == "passed"
        assert resources(srv, "mem", "map_crop")["peak_rss_bytes"] < 200 * MB
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_docker_gets_its_device_and_stats(docker_env):  # noqa: F811
    env = gpu_env(docker_env, "1")
    result = mipper(env, "--job", "dg", "--map", MAP, "--module", "georeference",
                    "--extra-switch", "georeference=--sleep", "--extra-switch",
                    "georeference=4")
    assert result.returncode == 0, result.stderr
    run = [c for c in docker_calls(env) if c["cmd"] == "run"][0]
    assert run["gpus"] == "device=1"
    argv = run["argv"]
    assert argv[argv.index("--gpus") + 1] == "device=1"
    cuda, nvidia, _, _ = seen_by_module(env, "dg", "georeference")
    assert (cuda, nvidia) == ("unset", "1")
    assert [c for c in docker_calls(env) if c["cmd"] == "stats"]
    used = _journal_resources(env, "dg", "georeference")
    assert used["gpu_device"] == "1"
    assert used["peak_rss_bytes"] > 5 * MB and used["cpu_seconds"] is not None, used
    assert used["gpu_memory_peak_bytes"] is None
    # an engine that cannot tell: unknown, not made up
    env = dict(env, DOCKER_STANDIN_NO_STATS="1")
    result = mipper(env, "--job", "dg", "--map", MAP, "--module", "georeference",
                    "--force-rerun", "--extra-switch", "georeference=--sleep",
                    "--extra-switch", "georeference=2.5")
    assert result.returncode == 0, result.stderr
    used = _journal_resources(env, "dg", "georeference")
    assert used["peak_rss_bytes"] is None and used["cpu_seconds"] is None, used
    assert used["gpu_device"] == "1"


def _journal_resources(env: dict, job: str, module: str) -> dict:
    return json.loads(latest(env, job)[module]["resources"])


def test_ecs_asks_ecs_for_a_gpu_and_holds_no_slot(ecs_env):  # noqa: F811
    env = gpu_env(ecs_env, "0")
    with Cluster(env) as cluster:
        result = mipper(env, "--job", "eg", "--map", MAP, "--module", "georeference")
        assert result.returncode == 0, result.stderr
        task = next(iter(cluster.seen.values()))
    override = task["overrides"]["containerOverrides"][0]
    assert override["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert "--gpu_id" in override["command"]
    assert override["command"][override["command"].index("--gpu_id") + 1] == "0"
    assert _journal_resources(env, "eg", "georeference")["gpu_device"] is None
    assert not os.path.exists(gpus.lock_path(env["TA1_RUNS_DIR"], "0"))


def test_no_gpu_warns_once_or_refuses(server_env):
    env = gpu_env(server_env, "none", MIP_REQUIRE_GPU="1")
    srv = Server(env).start()
    try:
        answer = srv.post("/runs", json=payload("nogpu", "map_crop"))
        assert answer.status_code == 422
        assert answer.json()["error"] == "gpu_required"
        assert "MIP_REQUIRE_GPU=1" in answer.json()["message"]
        assert "legend_segment, map_crop need one" in answer.json()["message"]
        assert srv.get("/runs").json() == []
    finally:
        srv.stop()
    result = mipper(env, "--job", "nogpu", "--map", MAP, "--module", "georeference")
    assert result.returncode == 2 and "has no GPU" in result.stderr
    # without MIP_REQUIRE_GPU, GPU modules run anyway, after one warning
    env = gpu_env(server_env, "none")
    result = mipper(env, "--job", "nogpu", "--map", MAP, "--module", "map_crop")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("has no GPU") == 1, result.stderr
    assert "WARNING" in result.stderr
    cuda, _, _, _ = seen_by_module(env, "nogpu", "map_crop")
    assert cuda == "unset"
    assert _journal_resources(env, "nogpu", "map_crop")["gpu_device"] is None


def start_sleeping_georeference(srv, env: dict, job: str, seconds: int) -> tuple:
    """(run id, module processes) of a run whose georeference (a GPU module) sleeps,
    once the module process is there."""
    body = payload(job, "georeference", extra_switches={"georeference": ["--sleep",
                                                                         str(seconds)]})
    run_id = srv.post("/runs", json=body).json()["run_id"]
    marker = os.path.join(env["TA1_OUTPUTS_DIR"], job, "georeference")
    return run_id, wait_for(lambda: module_processes(marker), timeout=60)


def test_orphan_of_a_dead_mipper_keeps_its_gpu(server_env):
    """The server and the run's mipper die together (the OOM killer); the module lives
    on, and so does its hold on the device, until a restarted server stops it."""
    env = gpu_env(server_env, "0")
    srv = Server(env).start()
    try:
        run_id, orphans = start_sleeping_georeference(srv, env, "orphan", 60)
        assert gpus.held(env["TA1_RUNS_DIR"], "0")
        pid = mipper_pid(env, run_id)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()
        # mipper and its luigi workers too: only the module is left holding the lock
        for p in processes_naming(run_id):
            os.kill(p, signal.SIGKILL)
        wait_for(lambda: not alive(pid) and not processes_naming(run_id), timeout=10)
        assert all(alive(p) for p in orphans)
        assert gpus.held(env["TA1_RUNS_DIR"], "0"), "the orphan's device was freed"
        srv.start()
        lost = srv.wait_run(run_id, timeout=30)
        assert lost["status"] == "failed"
        wait_for(lambda: not [p for p in orphans if alive(p)], timeout=10)
        wait_for(lambda: not gpus.held(env["TA1_RUNS_DIR"], "0"), timeout=10)
        # the device is free for the next run
        again = srv.post("/runs", json=payload("orphan", "georeference")).json()["run_id"]
        assert srv.wait_run(again, timeout=120)["status"] == "passed"
        assert resources(srv, "orphan", "georeference")["gpu_device"] == "0"
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_journal_migration_7_adds_resources(tmp_path):
    db = journal.Journal(str(tmp_path / "journal.db"))
    db.migrate()
    columns = [r[1] for r in db.connect().execute("PRAGMA table_info(executions)")]
    assert "resources" in columns
    assert db.connect().execute("PRAGMA user_version").fetchone()[0] >= 7
    db.close()


def test_lock_files_are_never_followed(tmp_path):
    """Whoever can write in the lock folder could plant `0.lock` as a link to a file of
    mipper's user: taking the slot must not open it (the holder's line truncates it)."""
    runs = str(tmp_path / "runs")
    victim = tmp_path / "journal.db"
    victim.write_text("precious")
    os.makedirs(os.path.join(runs, "gpus"))
    os.symlink(victim, gpus.lock_path(runs, "0"))
    with pytest.raises(OSError):
        gpus.try_take(runs, ["0"], "test")
    assert victim.read_text() == "precious"
    # nor a FIFO or another non-file; a device with a sound lock file is still taken
    os.mkfifo(gpus.lock_path(runs, "1"))
    with pytest.raises(OSError, match="not a regular file"):
        gpus.try_take(runs, ["1"], "test")
    slot = gpus.try_take(runs, ["2"], "test")
    assert slot is not None and slot.device == "2"
    gpus.release(slot)
    # a folder it makes is its own
    fresh = str(tmp_path / "fresh")
    gpus.release(gpus.try_take(fresh, ["0"], "test"))
    assert os.stat(os.path.join(fresh, "gpus")).st_mode & 0o077 == 0


def test_docker_stats_figures_are_finite():
    """What `docker stats` prints becomes JSON in the journal and the API: no NaN or
    infinity (not JSON), no negative share, and no crash of the sampler."""
    assert runners.docker_bytes("12.5MiB") == int(12.5 * MB)
    assert runners.docker_percent("3.25%") == 3.25
    assert runners.docker_bytes("9" * 400 + "GiB") is None  # float() reads it as infinity
    for bad in ("nan%", "NaN", "inf%", "-inf%", "-3%", "--"):
        assert runners.docker_percent(bad) is None, bad


def test_cancel_stops_a_module_waiting_for_a_gpu(server_env):
    """A run cancelled while its modules wait for a device ends at SIGTERM (not after
    the grace before SIGKILL), and nothing of it takes the device afterwards."""
    env = gpu_env(server_env, "0", MIP_WORKERS="4")
    path = gpus.lock_path(env["TA1_RUNS_DIR"], "0")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    srv = Server(env).start()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        body = payload("cw", "georeference", "legend_segment")
        run_id = srv.post("/runs", json=body).json()["run_id"]
        for module in ("georeference", "legend_segment"):
            wait_for(lambda m=module: waiting(srv, "cw", m), timeout=60)
        started = time.monotonic()
        answer = srv.post(f"/runs/{run_id}/cancel")
        took = time.monotonic() - started
        assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
        assert took < 20, f"the cancel took {took:.1f} s: the waiting workers needed SIGKILL"
        wait_for(lambda: not processes_naming(run_id), timeout=10)
        fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(1.5)
        assert not gpus.held(env["TA1_RUNS_DIR"], "0")
        for module in ("georeference", "legend_segment"):
            status = srv.get(f"/modules/cw/{module}").json()
            assert status["status"] == "cancelled", status
            assert status["resources"] == gpus.resources(), status
    finally:
        os.close(fd)
        srv.stop()
        kill_leftover_runs(env)


def test_hold_mb_is_bounded():
    """--hold-mb is an extra switch any API user may give a stand-in: a size beyond the
    bound is refused before anything is allocated."""
    module = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "modules", "georeference.py")
    for bad in ("100000", "-5"):
        result = subprocess.run([sys.executable, module, "--hold-mb", bad],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2
        assert "--hold-mb: expected 0 to 1024 MB" in result.stderr, result.stderr


def test_a_dead_workers_module_is_stopped_and_frees_its_gpu(server_env):
    """A luigi worker dies (the OOM killer) while its module runs: mipper records the run
    failed, and must not leave the module running on the device, where it would hold
    the GPU for a run that has ended, unseen."""
    env = gpu_env(server_env, "0", MIP_WORKERS="2")
    srv = Server(env).start()
    try:
        run_id, orphans = start_sleeping_georeference(srv, env, "lost", 90)
        main = mipper_pid(env, run_id)
        workers = [p for p in processes_naming(run_id) if p != main]
        assert workers, "no luigi worker process"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        final = srv.wait_run(run_id, timeout=60)
        assert final["status"] == "failed", final
        wait_for(lambda: not [p for p in orphans if alive(p)], timeout=30)
        assert "left by lost modules" in final["log"], final["log"]
        wait_for(lambda: not gpus.held(env["TA1_RUNS_DIR"], "0"), timeout=10)
    finally:
        srv.stop()
        kill_leftover_runs(env)
