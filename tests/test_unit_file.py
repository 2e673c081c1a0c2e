"""deploy/mip.service and deploy/mip.env.example: the unit passes `systemd-analyze verify`
with its paths rewritten to this checkout, the server runs on the env file alone, and a
server stopped as systemd stops it (SIGTERM to it alone) leaves its runs to the next one."""

import grp
import os
import pwd
import re
import shutil
import subprocess

import pytest
from conftest import ROOT
from conftest import Server
from conftest import alive
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import payload
from conftest import release
from conftest import wait_for
from conftest import zero_work
from docpages import page

import mip_server
from mip import journal

UNIT = os.path.join(ROOT, "deploy", "mip.service")
ENV_EXAMPLE = os.path.join(ROOT, "deploy", "mip.env.example")
INSTALL = "/opt/mip"  # where the unit and the example expect the checkout


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def settings(text: str) -> dict:
    """{key: [values]} of a unit file's or env file's `key=value` lines."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, val = line.partition("=")
            out.setdefault(key.strip(), []).append(val.strip())
    return out


def local_unit(tmp_path, text: str) -> str:
    """The unit as this checkout would install it: paths, user and env file rewritten."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    env_file = tmp_path / "mip.env"
    env_file.write_text(read(ENV_EXAMPLE).replace(INSTALL, ROOT))
    text = (text.replace(INSTALL, ROOT).replace("/etc/mip/mip.env", str(env_file))
            .replace("User=mip", f"User={user}").replace("Group=mip", f"Group={group}"))
    assert INSTALL not in text and "/etc/mip" not in text
    folder = tmp_path / "units"
    folder.mkdir(exist_ok=True)
    (folder / "mip.service").write_text(text)
    return str(folder / "mip.service")


def verify(path: str) -> str:
    """What `systemd-analyze verify` says of a unit file (nothing when all is well)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (`make test` "
                    "does, through the Makefile's DEBIAN_PACKAGES)")
    done = subprocess.run([tool, "verify", path], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0
                                                   else f"\nexit code {done.returncode}")


def test_unit_file_verifies_clean(tmp_path):
    text = read(UNIT)
    unit = settings(text)
    assert unit["KillMode"] == ["process"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"] and int(unit["TimeoutStopSec"][0]) > 0
    assert unit["EnvironmentFile"] == ["/etc/mip/mip.env"]
    assert unit["ExecStart"] == [f"{INSTALL}/.venv/bin/python {INSTALL}/mip_server.py"]
    assert unit["WorkingDirectory"] == [INSTALL] and unit["User"] == ["mip"]
    assert "env.sh" not in unit["ExecStart"][0]
    assert verify(local_unit(tmp_path, text)) == ""


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: systemd-analyze speaks up about a bad value and a missing
    program, and both show in what verify() returns."""
    assert "kill mode" in verify(local_unit(tmp_path, read(UNIT).replace(
        "KillMode=process", "KillMode=proces")))
    assert "not executable" in verify(local_unit(tmp_path, read(UNIT).replace(
        "/.venv/bin/python", "/.venv/bin/no-python")))


def test_server_runs_on_the_env_file_alone(tmp_path):
    """What the unit gives the server: systemd's PATH and the env file, no env.sh."""
    values = {k: v[-1] for k, v in settings(read(ENV_EXAMPLE)).items()}
    assert all(re.fullmatch(r"(MIP|TA1)_[A-Z0-9_]+", k) for k in values), values
    commented = re.findall(r"^# ((?:MIP|TA1)_[A-Z0-9_]+)=", read(ENV_EXAMPLE), re.M)
    readme = page("settings.md")
    assert [k for k in [*values, *commented] if f"`{k}`" not in readme] == []
    for name in ("TA1_INPUTS_DIR", "TA1_OUTPUTS_DIR", "TA1_TEMPS_DIR", "TA1_RUNS_DIR",
                 "TA1_REPOS_DIR", "MIP_CONFIG", "MIP_USERS_FILE"):
        assert name in values
    data = tmp_path / "data"
    users = tmp_path / "users"
    users.write_text(f"ops:{mip_server.hash_password('s3cret-pass')}\n")
    env = {k: v.replace(f"{INSTALL}/data", str(data)).replace(INSTALL, ROOT)
           for k, v in values.items()}
    env.update({"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1",
                "MIP_USERS_FILE": str(users)})
    srv = Server(env).start()
    try:
        assert srv.get("/", auth=("ops", "s3cret-pass")).status_code == 200
        assert srv.get("/", auth=None).status_code == 401
        assert os.path.isfile(data / "runs" / "journal.db")
    finally:
        srv.stop()


def test_sigterm_leaves_a_running_run_to_the_next_server(server_env):
    """systemd with KillMode=process sends SIGTERM to the server alone: it exits at once,
    the run's mipper goes on, and the next server adopts the run and sees it to its end.
    (tests/test_server.py's test_restart_after_sigkill_reconciles_runs does the same after
    a SIGKILL, which is what TimeoutStopSec comes to.) The module is held running until the
    next server has adopted the run, on the zero-work catalogue."""
    env = dict(zero_work(server_env), MIP_MAX_RUNS="1")
    hold = hold_file(env, "kept")
    srv = Server(env).start()
    try:
        run = srv.post("/runs", json=payload(
            "kept", "georeference", extra_switches={"georeference": ["--hold", hold]})).json()
        srv.wait_run(run["run_id"], until=("running",))
        wait_for(lambda: srv.get("/modules/kept/georeference").status_code == 200)
        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        pid = db.run(run["run_id"])["pid"]
        srv.stop(timeout=20)
        assert srv.proc.returncode == 0, srv.output()
        assert "running runs go on" in srv.output()
        assert alive(pid), "the mipper died with the server"
        assert db.run(run["run_id"])["status"] == "running"
        db.close()

        srv.start()
        assert srv.get(f"/runs/{run['run_id']}").json()["status"] == "running"
        wait_for(lambda: f"run {run['run_id']}: mipper (pid {pid}) still alive"
                 in srv.output())
        release(hold)
        assert srv.wait_run(run["run_id"], timeout=120)["status"] == "passed"
        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        assert [e["status"] for e in db.executions(run["run_id"])] == ["passed"]
        db.close()
        # the module ended under the new server, which read its end from the journal
        metrics = srv.get("/metrics").text
        assert re.search(r'^mip_module_duration_seconds_count\{module="georeference",'
                         r'status="passed"\} 1\.0$', metrics, re.M), metrics
    finally:
        release(hold)
        srv.stop()
        kill_leftover_runs(env)
