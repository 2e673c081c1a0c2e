"""Logs followed from an offset (GET /runs/{run_id}/log?offset=N and
GET /modules/{job}/{module}/log?offset=N, with X-Log-Offset), against the real server and
a real run whose module sleeps; then `mip_client.py --follow`, as a user runs it.

Run: .venv/bin/python -m pytest -q tests/test_follow.py
"""

import io
import os
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from conftest import ROOT
from conftest import hold_file
from conftest import payload
from conftest import release

CLIENT = os.path.join(ROOT, "mip_client.py")


def follow(server, path: str, until, timeout: float = 120) -> tuple:
    """Read `path` from offset 0 on, as a follower does, until `until()` is true and one more
    read found nothing new; (the bytes read in order, how many reads brought something)."""
    got, offset, pieces = b"", 0, 0
    deadline = time.monotonic() + timeout
    done = False
    while time.monotonic() < deadline:
        finished = done
        resp = server.get(f"{path}?offset={offset}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        next_offset = int(resp.headers["X-Log-Offset"])
        assert next_offset == offset + len(resp.content)
        if resp.content:
            pieces += 1
        got += resp.content
        offset = next_offset
        if finished and not resp.content:
            return got, pieces
        done = bool(until())
        # mipper records a run's end just before its last log line
        time.sleep(1.0 if done else 0.2)
    raise AssertionError(f"{path} still growing after {timeout} s")


@pytest.fixture
def server(shared_server):
    """One server for the file: each test follows runs of its own job."""
    return shared_server


def sleeping_run(server, job: str, seconds: int = 6, module: str = "map_crop",
                 hold: str | None = None) -> str:
    """A run of `module`, slept `seconds` or, given `hold`, held until release(hold)."""
    extra = {module: ["--hold", hold] if hold else ["--sleep", str(seconds)]}
    resp = server.post("/runs", json=payload(job, module, extra_switches=extra))
    assert resp.status_code == 200, resp.text
    return resp.json()["run_id"]


def test_run_log_followed_from_offsets_is_the_whole_log(server):
    hold = hold_file(server.env, "followed")
    run_id = sleeping_run(server, "followed", hold=hold)
    seen_running = []

    def ended():
        # let the module go once the follower has read the log at least once while it ran
        if seen_running:
            release(hold)
        status = server.get(f"/runs/{run_id}").json()
        if status["module_status"].get("map_crop") == "running":
            seen_running.append(True)
        return status["status"] in ("passed", "failed")

    got, pieces = follow(server, f"/runs/{run_id}/log", ended)
    assert server.get(f"/runs/{run_id}").json()["status"] == "passed"
    whole = server.get(f"/runs/{run_id}/log")
    assert whole.status_code == 200
    assert got == whole.content and b"map_crop passed" in got
    # without ?offset: the whole log, and where a follower would go on from
    assert int(whole.headers["X-Log-Offset"]) == len(whole.content)
    assert pieces >= 2, "the log was read in one piece: it did not grow while followed"


def test_module_log_is_reachable_while_the_module_runs(server):
    hold = hold_file(server.env, "watched")
    run_id = sleeping_run(server, "watched", hold=hold)
    path = "/modules/watched/map_crop/log"

    def running_with_log():
        if server.get("/modules/watched/map_crop").status_code != 200:
            return None
        if server.get("/modules/watched/map_crop").json()["status"] != "running":
            return None
        resp = server.get(path)
        return resp if b"--hold" in resp.content else None

    deadline = time.monotonic() + 60
    early = None
    while early is None and time.monotonic() < deadline:
        early = running_with_log()
        time.sleep(0.2)
    assert early is not None, "the module's log never showed while it ran"
    status = server.get("/modules/watched/map_crop").json()
    assert status["status"] == "running"
    offset = int(early.headers["X-Log-Offset"])
    assert offset == len(early.content) > 0
    release(hold)
    server.wait_run(run_id)
    rest = server.get(f"{path}?offset={offset}")
    assert int(rest.headers["X-Log-Offset"]) == offset + len(rest.content)
    whole = server.get(path).content
    assert early.content + rest.content == whole
    assert b"# map_crop passed" in rest.content


def test_offsets_past_the_end_and_bad_offsets(server):
    run_id = sleeping_run(server, "edges", seconds=0)
    server.wait_run(run_id)
    for path in (f"/runs/{run_id}/log", "/modules/edges/map_crop/log"):
        size = len(server.get(path).content)
        assert size > 0
        for offset in (size, size + 1, 10**12):
            resp = server.get(f"{path}?offset={offset}")
            assert resp.status_code == 200 and resp.content == b""
            assert resp.headers["X-Log-Offset"] == str(size)
        tail = server.get(f"{path}?offset={size - 5}")
        assert len(tail.content) == 5 and tail.headers["X-Log-Offset"] == str(size)
        for bad in ("-1", "abc", "", "1e3", "1.5", "0x10", "%C2%B2", str(10**12 + 1), "9" * 40):
            resp = server.get(f"{path}?offset={bad}")
            assert resp.status_code == 400, (path, bad, resp.text)
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.json()["error"] == "bad_query" and "offset" in resp.json()["message"]
            assert "X-Log-Offset" not in resp.headers


def test_unknown_runs_and_modules_get_404(server):
    run_id = sleeping_run(server, "known", seconds=0)
    server.wait_run(run_id)
    for path, code in (("/runs/20260101-000000-000000-abcd/log", "unknown_run"),
                       ("/modules/nojob/map_crop/log", "unknown_job"),
                       ("/modules/known/nomodule/log", "unknown_module"),
                       ("/modules/known/georeference/log", "module_not_run")):
        resp = server.get(f"{path}?offset=0")
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"] == code
    for path in ("/modules/known/%2e%2e/log", "/modules/%2e%2e/map_crop/log",
                 "/runs/..%2fjournal.db/log"):
        assert server.get(path).status_code in (400, 404)


def test_a_log_linked_elsewhere_is_not_served(server):
    """A module's log replaced by a link to runners.log (how modules were run, kept on the
    host) or to the journal reads as empty, never as the file it leads to."""
    run_id = sleeping_run(server, "linked", seconds=0)
    server.wait_run(run_id)
    runs = server.env["TA1_RUNS_DIR"]
    with open(os.path.join(runs, "runners.log"), "a", encoding="utf-8") as f:
        f.write("RUNNERS-SECRET-LINE\n")
    log_path = os.path.join(server.env["TA1_OUTPUTS_DIR"], "linked", "map_crop.log")
    for target in (os.path.join(runs, "runners.log"), os.path.join(runs, "journal.db")):
        os.remove(log_path)
        os.symlink(target, log_path)
        resp = server.get("/modules/linked/map_crop/log")
        assert resp.status_code == 200
        assert resp.content == b"" and resp.headers["X-Log-Offset"] == "0"
        # nor as the tail in its ModuleStatus, nor in its logs zip
        assert server.get("/modules/linked/map_crop").json()["log"] is None
        logs = server.get("/modules/linked/map_crop/logs")
        if logs.status_code == 200:
            archive = zipfile.ZipFile(io.BytesIO(logs.content))
            assert "linked_map_crop_logs/map_crop.log" not in archive.namelist()
            assert all(b"RUNNERS-SECRET" not in archive.read(n) for n in archive.namelist())
        else:
            assert logs.status_code == 404, logs.text
    assert b"RUNNERS-SECRET" not in server.get(f"/runs/{run_id}/log").content


def test_a_fifo_in_a_logs_place_holds_no_request(server):
    """A module (a container) that puts a FIFO where its log was: opening it to read would
    wait for a writer, holding one of the server's few threads at each poll."""
    run_id = sleeping_run(server, "fifo", seconds=0)
    server.wait_run(run_id)
    log_path = os.path.join(server.env["TA1_OUTPUTS_DIR"], "fifo", "map_crop.log")
    os.remove(log_path)
    os.mkfifo(log_path)
    try:
        resp = server.get("/modules/fifo/map_crop/log", timeout=20)
        assert resp.status_code == 200 and resp.content == b""
        assert server.get("/modules/fifo/map_crop", timeout=20).json()["log"] is None
    finally:
        # a reader stuck on it (the test failing) gets its end of file
        for _ in range(3):
            try:
                os.close(os.open(log_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break


def test_both_routes_are_declared_with_offset_and_header(server):
    spec = server.get("/openapi.json").json()
    for path in ("/runs/{run_id}/log", "/modules/{job}/{module}/log"):
        op = spec["paths"][path]["get"]
        query = {p["name"]: p for p in op["parameters"] if p["in"] == "query"}
        assert query["offset"]["schema"] == {"type": "integer", "minimum": 0,
                                             "maximum": 10**12}
        ok = op["responses"]["200"]
        assert "text/plain" in ok["content"]
        assert ok["headers"]["X-Log-Offset"]["required"] is True
        assert {"400", "404"} <= set(op["responses"])


# ---------------------------------------------------------------- mip_client.py --follow

def client_env(server) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MIP_") and "proxy" not in k.lower()}
    env.update(MIP_CLIENT_USER=server.user, MIP_CLIENT_PASSWORD=server.password)
    return env


def client(server, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLIENT, *args], env=client_env(server),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_follow_prints_the_log_as_it_grows_and_exits_0_when_passed(server, tmp_path):
    hold = hold_file(server.env, "tail")
    data = ('{"map": "WY_CO_Peach", "job": "tail", "modules": ["map_crop"], '
            '"extra_switches": {"map_crop": ["--hold", "' + hold + '"]}}')
    err_file = tmp_path / "stderr"
    with open(err_file, "w") as err_out:
        proc = subprocess.Popen([sys.executable, CLIENT, "--post", "--url", f"{server.url}/runs",
                                 "--data", data, "--follow"], env=client_env(server),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err_out, text=True)
    # communicate() would read the pipe past what readline() buffered: read it all here,
    # bounded by a timer that kills a client that never ends
    killer = threading.Timer(180, proc.kill)
    killer.start()
    try:
        first = proc.stdout.readline()
        # the first lines are out while the run still goes
        assert server.get("/runs?job=tail&status=running").json(), first
        release(hold)
        out = first + proc.stdout.read()
        proc.wait(timeout=10)
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    err = err_file.read_text()
    assert proc.returncode == 0, err
    run_id = server.get("/runs?job=tail").json()[-1]
    whole = server.get(f"/runs/{run_id}/log").text
    assert server.get(f"/runs/{run_id}").json()["status"] == "passed"
    # every line of the log, in order, once
    assert whole and out == whole
    assert out.count("map_crop passed") == 1
    # a host without a GPU warns of it in every run: then the end says the warnings too
    assert f"run {run_id}: passed" in err or f"run {run_id} passed with " in err, err


def test_follow_of_a_failing_run_exits_1(server):
    run = server.post("/runs", json=payload(
        "tailfail", "map_crop", extra_switches={"map_crop": ["--sleep", "3", "--fail"]})).json()
    done = client(server, "--get", "--url", f"{server.url}/runs/{run['run_id']}", "--follow")
    assert done.returncode == 1, done.stderr
    whole = server.get(f"/runs/{run['run_id']}/log").text
    assert done.stdout == whole and "map_crop failed" in whole
    assert f"run {run['run_id']} failed" in done.stderr


def test_follow_needs_a_run_url(server):
    done = client(server, "--get", "--url", f"{server.url}/jobs/x", "--follow")
    assert done.returncode == 2 and "--follow" in done.stderr


@pytest.mark.parametrize("other", [["--wait"], ["--output", "x.json"]])
def test_follow_goes_alone(server, other):
    done = client(server, "--get", "--url", f"{server.url}/runs/x", "--follow", *other)
    assert done.returncode == 2 and "--follow" in done.stderr


def test_follow_gives_up_after_wait_timeout_and_the_run_goes_on(server):
    run = server.post("/runs", json=payload(
        "tailslow", "map_crop", extra_switches={"map_crop": ["--sleep", "60"]})).json()
    try:
        done = client(server, "--get", "--url", f"{server.url}/runs/{run['run_id']}",
                      "--follow", "--wait-timeout", "3")
        assert done.returncode == 1, done.stderr
        assert "--wait-timeout" in done.stderr and "goes on" in done.stderr
        assert server.get(f"/runs/{run['run_id']}").json()["status"] in ("running",
                                                                        "not_started")
        assert done.stdout == server.get(f"/runs/{run['run_id']}/log").text[:len(done.stdout)]
    finally:
        server.post(f"/runs/{run['run_id']}/cancel")
        server.wait_run(run["run_id"])
