"""The docker runner (through a stand-in docker program) and the luigid central scheduler."""

import json
import os
import subprocess
import sys

import pytest
import requests
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import alive
from conftest import answers
from conftest import free_port
from conftest import kill_leftover_runs
from conftest import latest
from conftest import mipper
from conftest import payload
from conftest import read
from conftest import stop_process
from conftest import wait_for

from mip import journal

MODULES = ["legend_segment", "georeference", "legend_item_segment", "map_crop",
           "legend_item_description", "polygon_extract", "line_extract", "point_extract",
           "geopackage"]
KEY = "sk-docker-" + "K3Y" * 6


@pytest.fixture
def docker_env(mip_env, tmp_path):
    """mip_env running every module through the stand-in `docker` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT}/tests/docker_standin.py \"$@\"\n")
    docker.chmod(0o755)
    (tmp_path / "docker_state").mkdir()
    return dict(mip_env, PATH=f"{bin_dir}:{os.environ['PATH']}", MIP_RUNNER="docker",
                MIP_DOCKER_USER="1000:1000", MIP_OPENAI_KEY=KEY,
                DOCKER_STANDIN_LOG=str(tmp_path / "docker.log"),
                DOCKER_STANDIN_STATE=str(tmp_path / "docker_state"))


def docker_calls(env):
    try:
        with open(env["DOCKER_STANDIN_LOG"]) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def test_whole_graph_through_docker(docker_env):
    result = mipper(docker_env, "--job", "dk", "--map", MAP, "--module", "ALL")
    assert result.returncode == 0, result.stderr
    runs = [c for c in docker_calls(docker_env) if c["cmd"] == "run"]
    assert sorted(c["image"] for c in runs) == sorted(f"inferlink/ta1_{m}" for m in MODULES)
    host = [docker_env[k] for k in ("TA1_INPUTS_DIR", "TA1_OUTPUTS_DIR", "TA1_TEMPS_DIR",
                                    "TA1_REPOS_DIR")]
    for call in runs:
        # no GPU on this host (mip_env leaves MIP_GPUS unset, and NVML finds none): no --gpus
        assert call["rm"] and call["gpus"] is None and call["user"] == "1000:1000"
        # inputs and module sources read-only: a module writes only outputs and temps
        assert call["mounts"] == [[h, c, m] for h, c, m in zip(
            host, ["/ta1/inputs", "/ta1/outputs", "/ta1/temps", "/ta1/repos"],
            ["ro", "rw", "rw", "ro"], strict=True)]
        assert call["env"] == ["OPENAI_API_KEY"]
        assert KEY not in json.dumps(call)
        # the switches name the container's paths
        assert any(a.startswith("/ta1/outputs/dk/") for a in call["command"])
        assert not any(docker_env["TA1_OUTPUTS_DIR"] in a for a in call["command"])
    assert len({c["name"] for c in runs}) == len(MODULES)
    assert all(r["status"] == "passed" for r in latest(docker_env, "dk").values())
    log = read(os.path.join(docker_env["TA1_OUTPUTS_DIR"], "dk", "legend_item_description.log"))
    assert "OPENAI_API_KEY" in log and KEY not in log
    assert "docker" not in log and "inferlink" not in log
    runner_log = read(os.path.join(docker_env["TA1_RUNS_DIR"], "runners.log"))
    assert "inferlink/ta1_map_crop" in runner_log and KEY not in runner_log


def test_failing_container_fails_its_module(docker_env):
    result = mipper(docker_env, "--job", "dkf", "--map", MAP, "--module", "map_crop",
                    "--extra-switch", "map_crop=--fail")
    assert result.returncode == 1
    row = latest(docker_env, "dkf")["map_crop"]
    assert row["status"] == "failed" and row["exit_code"] == 1


def test_missing_image_and_engine_down_say_so(docker_env):
    env = dict(docker_env, DOCKER_STANDIN_MISSING="inferlink/ta1_georeference")
    assert mipper(env, "--job", "dki", "--map", MAP, "--module", "georeference").returncode == 1
    row = latest(env, "dki")["georeference"]
    assert row["exit_code"] == 125 and "could not run the container" in row["message"]
    assert "Unable to find image 'inferlink/ta1_georeference" in read(row["log_path"])

    env = dict(docker_env, DOCKER_STANDIN_NO_ENGINE="1")
    assert mipper(env, "--job", "dke", "--map", MAP, "--module", "georeference").returncode == 1
    row = latest(env, "dke")["georeference"]
    assert "Is the docker daemon running?" in read(row["log_path"])


def test_missing_docker_program_fails_clearly(docker_env):
    env = dict(docker_env, MIP_DOCKER="/nonexistent/docker")
    result = mipper(env, "--job", "dkm", "--map", MAP, "--module", "georeference")
    assert result.returncode == 1
    row = latest(env, "dkm")["georeference"]
    assert row["status"] == "failed"
    assert "'/nonexistent/docker' program" in row["message"]
    assert "No such file" in row["message"]


def test_cancel_reaches_docker_kill(docker_env):
    env = dict(docker_env, MIP_USER="tester", MIP_PASSWORD="pw-for-tests")
    srv = Server(env).start()
    try:
        body = payload("dkc", "georeference", extra_switches={"georeference": ["--sleep", "60"]})
        run_id = srv.post("/runs", json=body).json()["run_id"]
        pid_file = wait_for(lambda: [n for n in os.listdir(env["DOCKER_STANDIN_STATE"])
                                     if n.endswith(".pid")])[0]
        name = pid_file.removesuffix(".pid")
        container_pid = int(read(os.path.join(env["DOCKER_STANDIN_STATE"], pid_file)))
        status = srv.post(f"/runs/{run_id}/cancel").json()
        assert status["status"] == "cancelled"
        kills = [c for c in docker_calls(env) if c["cmd"] == "kill"]
        assert kills and kills[0]["names"] == [name]
        assert not alive(container_pid)
        module = srv.get("/modules/dkc/georeference").json()
        assert module["status"] == "cancelled"
        # (the test's own folder name has "docker" in it, so look for the image and flags)
        for answer in (module, status):
            assert "inferlink" not in json.dumps(answer) and "--gpus" not in json.dumps(answer)
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_luigid_shares_one_job_between_two_mippers(mip_env, tmp_path):
    port = free_port()
    luigid = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "luigid"), "--address", "127.0.0.1",
         "--port", str(port), "--state-path", str(tmp_path / "luigid.pickle"),
         "--logdir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: answers(url))
        env = dict(mip_env, MIP_LUIGI_SCHEDULER_URL=url)
        args = [sys.executable, os.path.join(ROOT, "mipper.py"), "--job", "shared", "--map",
                MAP, "--module", "ALL"]
        for module in MODULES:
            args += ["--extra-switch", f"{module}=--sleep", "--extra-switch", f"{module}=0.5"]
        both = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outcomes = [p.communicate(timeout=120) for p in both]
        assert [p.returncode for p in both] == [0, 0], "\n".join(o[1] for o in outcomes)
        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        rows = db.connect().execute(
            "SELECT module, COUNT(*) FROM executions WHERE job = 'shared' GROUP BY module")
        counts = dict(rows.fetchall())
        db.close()
        assert counts == dict.fromkeys(MODULES, 1)
        # the scheduler's own API (its web page's source) knows the graph
        tasks = requests.get(url + "api/task_list", params={"data": json.dumps(
            {"status": "DONE"})}, timeout=10).json()["response"]
        assert len(tasks) == len(MODULES)
    finally:
        stop_process(luigid)
