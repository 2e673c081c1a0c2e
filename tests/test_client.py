"""Tests for mip_client.py, run as a subprocess against the real server (conftest `server`).

Run: .venv/bin/python -m pytest -q tests/test_client.py

The walk-through of docs/client.md (WALKTHROUGH below, the same text) runs
command by command; then --wait on a failing run, downloads, credentials, an unreachable or
silent server, every usage error, and the few pure helpers in-process.
"""

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import zipfile

import pytest
from conftest import MAP
from conftest import ROOT
from conftest import payload

import mip_client

CLIENT = os.path.join(ROOT, "mip_client.py")
README_URL = "http://127.0.0.1:8080"
README_SECTION = "# The client (`mip_client.py`)"
SECRET = "sk-client-test-NEVER-PRINT-7d1e"

# docs/client.md's walk-through, word for word: the tests run every `python mip_client.py`
# line of it, in order, with README_URL replaced by the test server's URL.
A_JSON = '{"map": "WY_CO_Peach", "job": "alpha", "modules": ["map_crop"]}\n'
WALKTHROUGH = """\
export MIP_CLIENT_USER=mip MIP_CLIENT_PASSWORD='the password'
# submit a run; its RunStatus (with run_id) is printed and written to b.json
python mip_client.py --post --url http://127.0.0.1:8080/runs --input a.json --output b.json
RUN_ID=$(python -c 'import json; print(json.load(open("b.json"))["run_id"])')
# the status of the run, and of the job
python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --output c.json
python mip_client.py --get --url http://127.0.0.1:8080/jobs/alpha --output d.json
# wait until the run ends (exit 0 if it passed, 1 if not)
python mip_client.py --get --url http://127.0.0.1:8080/runs/$RUN_ID --wait
# the logs, and the outputs
python mip_client.py --get \\
    --url http://127.0.0.1:8080/modules/alpha/map_crop/logs --output d.zip
python mip_client.py --get \\
    --url http://127.0.0.1:8080/modules/alpha/map_crop/outputs --output e.zip
"""
DAILY = """\
# submit from the command line and wait for the end
python mip_client.py --post --url http://127.0.0.1:8080/runs --wait \\
    --data '{"map": "WY_CO_Peach", "job": "beta", "modules": ["georeference"]}'
# save a zip under the server's name (here beta_georeference_outputs.zip)
python mip_client.py --get --url http://127.0.0.1:8080/jobs/beta/georeference/outputs
"""


# ---------------------------------------------------------------- helpers

@pytest.fixture
def server(shared_server):
    """One server (zero-work catalogue) for the file's walk-throughs, each with its own
    jobs; the tests that look at the whole server or leave a run going get fresh_server."""
    return shared_server


def client_env(server=None, **extra) -> dict:
    """The environment the client runs with: no MIP_* or proxy variables from outside,
    the server's credentials unless overridden (None removes a variable)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MIP_") and k.lower() not in ("http_proxy", "https_proxy",
                                                            "all_proxy", "no_proxy")}
    if server is not None:
        env.update(MIP_CLIENT_USER=server.user, MIP_CLIENT_PASSWORD=server.password)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def client(*args, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run mip_client.py with stdin not a terminal."""
    return subprocess.run([sys.executable, CLIENT, *args], env=env or client_env(), cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def commands(block: str) -> list:
    """The `python mip_client.py` commands of a docs block, continuation lines joined."""
    text = block.replace("\\\n", " ")
    lines = [line.strip().removeprefix("$ ") for line in text.splitlines()]
    return [" ".join(line.split()) for line in lines if line.startswith("python mip_client.py")]


def argv(command: str, url: str, **variables) -> list:
    """A docs command's arguments for the client, with the test server's URL."""
    words = shlex.split(command.replace(README_URL, url))
    assert words[:2] == ["python", "mip_client.py"]
    out = []
    for word in words[2:]:
        for name, value in variables.items():
            word = word.replace(f"${name}", value)
        out.append(word)
    return out


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed client, checked to be the house shape."""
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mip_client: error: "), proc.stderr
    return last


@pytest.fixture
def work(tmp_path):
    """The client's working folder."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the walk-through

def test_readme_walkthrough(server, work):
    """Seed section 6, step by step, as docs/client.md shows it; then the daily-use examples."""
    cmds = iter(commands(WALKTHROUGH))
    env = client_env(server)
    (work / "a.json").write_text(A_JSON)

    # 2. submit: the RunStatus on the screen and in b.json
    proc = client(*argv(next(cmds), server.url), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert json.loads((work / "b.json").read_text()) == run
    assert run["payload"]["job"] == "alpha" and run["status"] in ("not_started", "running")
    run_id = run["run_id"]

    # 3. the run's status, 4. the job's status
    proc = client(*argv(next(cmds), server.url, RUN_ID=run_id), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    c = json.loads((work / "c.json").read_text())
    assert c["run_id"] == run_id and c["status"] in ("not_started", "running", "passed")
    assert json.loads(proc.stdout) == c
    proc = client(*argv(next(cmds), server.url), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    d = json.loads((work / "d.json").read_text())
    assert d["job"] == "alpha" and "status" in d

    # 5. wait for the end: status changes on stderr, the final RunStatus on stdout
    proc = client(*argv(next(cmds), server.url, RUN_ID=run_id), env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "passed"
    assert f"run {run_id}: passed" in proc.stderr
    assert "map_crop: passed" in proc.stderr

    # 5.2 the logs, 6. the outputs: zips, their sizes said on stderr
    for name in ("d.zip", "e.zip"):
        proc = client(*argv(next(cmds), server.url), env=env, cwd=work)
        assert proc.returncode == 0, proc.stderr
        path = work / name
        assert f"wrote {name} ({path.stat().st_size:,} bytes)" in proc.stderr
        assert proc.stdout == ""
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        kind = "logs" if name == "d.zip" else "outputs"
        assert names and all(n.startswith(f"alpha_map_crop_{kind}/") for n in names)
        if kind == "logs":
            assert "alpha_map_crop_logs/map_crop.log" in names
    assert next(cmds, None) is None
    assert sorted(p.name for p in work.iterdir()) == [
        "a.json", "b.json", "c.json", "d.json", "d.zip", "e.zip"]

    # daily use: --data with --wait, and a download named by the server
    post, download = commands(DAILY)
    proc = client(*argv(post, server.url), env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = json.loads(proc.stdout)
    assert final["status"] == "passed" and final["payload"]["job"] == "beta"
    assert "not_started" in proc.stderr or "running" in proc.stderr
    proc = client(*argv(download, server.url), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    saved = work / "beta_georeference_outputs.zip"
    assert f"wrote {saved.name} (" in proc.stderr
    with zipfile.ZipFile(saved) as zf:
        assert f"beta_georeference_outputs/{MAP}.json" in zf.namelist()
    assert not [p for p in os.listdir(work) if p.startswith(".")]  # no temp files left


def test_readme_and_help_show_the_tested_commands():
    """--help shows the commands the walk-through test runs; so does docs/client.md once it
    exists (the docs' other client examples may use other URLs)."""
    proc = client("--help")
    assert proc.returncode == 0
    shown = commands(proc.stdout.replace("\n  ", "\n"))
    for command in commands(WALKTHROUGH) + commands(DAILY):
        assert command in shown
    readme = os.path.join(ROOT, "docs", "client.md")
    text = ""
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
    if README_SECTION not in text:
        pytest.skip(f"docs/client.md has no {README_SECTION!r} section yet")
    in_readme = commands(text)
    for command in commands(WALKTHROUGH) + commands(DAILY):
        assert command in in_readme


# ---------------------------------------------------------------- --wait and downloads

def test_wait_on_failing_run(server, work):
    """A run that fails: --wait exits 1 with the final RunStatus; so does a later GET --wait."""
    env = client_env(server)
    data = json.dumps(payload("gamma", "georeference",
                              extra_switches={"georeference": ["--fail"]}))
    proc = client("--post", "--url", f"{server.url}/runs", "--data", data, "--wait",
                  "--output", "final.json", env=env, cwd=work)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    final = json.loads(proc.stdout)
    assert final["status"] == "failed"
    assert json.loads((work / "final.json").read_text()) == final
    assert "georeference: failed" in proc.stderr
    assert f"run {final['run_id']}: failed" in proc.stderr
    assert f"run {final['run_id']} failed" in error_line(proc)

    proc = client("--get", "--url", f"{server.url}/runs/{final['run_id']}/", "--wait", env=env)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["status"] == "failed"

    # the logs of the failed module say why; a folder as --output keeps the server's name
    (work / "logs").mkdir()
    proc = client("--get", "--url", f"{server.url}/jobs/gamma/georeference/logs",
                  "--output", "logs", env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(work / "logs" / "gamma_georeference_logs.zip") as zf:
        text = zf.read("gamma_georeference_logs/georeference.log").decode()
    assert "asked to fail by --fail" in text


def test_a_run_that_passed_with_warnings_says_them(server, work):
    """A module that logs WARNINGs passes, with them in its ModuleStatus, the run's and the
    job's; --wait exits 0 and its last lines say them."""
    env = client_env(server)
    data = json.dumps(payload("warned", "georeference", extra_switches={
        "georeference": ["--warn", "the scan is faint", "--warn", "no <CRS> tag"]}))
    proc = client("--post", "--url", f"{server.url}/runs", "--data", data, "--wait", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = json.loads(proc.stdout)
    assert final["status"] == "passed"
    ours = ["georeference: the scan is faint", "georeference: no <CRS> tag"]
    assert final["warnings"][-2:] == ours, final["warnings"]
    module = client("--get", "--url", f"{server.url}/modules/warned/georeference", env=env)
    assert json.loads(module.stdout)["warnings"] == ["the scan is faint", "no <CRS> tag"]
    assert "warning: no <CRS> tag" in module.stderr  # the status print says them too
    assert json.loads(client("--get", "--url", f"{server.url}/jobs/warned",
                             env=env).stdout)["warnings"] == final["warnings"]
    tail = proc.stderr[proc.stderr.index(f"run {final['run_id']} passed with "):]
    assert tail.splitlines()[-2:] == [f"  - {w}" for w in ours], proc.stderr


def test_the_end_of_a_run_with_warnings_in_one_line_or_a_list():
    one = {"run_id": "r1", "status": "passed", "warnings": ["the GeoPackage holds no features"]}
    assert mip_client.ended(one) == \
        "run r1 passed with 1 warning: the GeoPackage holds no features"
    two = dict(one, warnings=["a", "b"])
    assert mip_client.ended(two) == "run r1 passed with 2 warnings:\n  - a\n  - b"
    assert mip_client.warnings_of({"warnings": None}) == mip_client.warnings_of([]) == []


def test_wait_timeout(fresh_server, work):
    """--wait-timeout gives up with exit 1 and says the run goes on."""
    server = fresh_server  # its own: its run goes on after the test
    data = json.dumps(payload("slow", "georeference",
                              extra_switches={"georeference": ["--sleep", "30"]}))
    proc = client("--post", "--url", f"{server.url}/runs", "--data", data, "--wait",
                  "--wait-timeout", "1", env=client_env(server))
    assert proc.returncode == 1
    assert "--wait-timeout" in error_line(proc) and "goes on" in error_line(proc)
    assert proc.stdout == ""


def test_openai_key_is_sent_but_never_shown(server, work):
    """MIP_OPENAI_KEY reaches the modules (as OPENAI_API_KEY) and is never printed."""
    env = client_env(server, MIP_OPENAI_KEY=SECRET)
    data = json.dumps(payload("delta", "legend_item_description"))
    proc = client("--post", "--url", f"{server.url}/runs", "--data", data, "--wait", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    proc = client("--get", "--url", f"{server.url}/modules/delta/legend_item_description/logs",
                  "--output", "logs.zip", env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(work / "logs.zip") as zf:
        logs = b"".join(zf.read(n) for n in zf.namelist()).decode()
    assert "OPENAI_API_KEY is set" in logs and SECRET not in logs


def test_download_failure_leaves_no_file(server, work):
    """An error answer to a download writes nothing."""
    proc = client("--get", "--url", f"{server.url}/modules/nojob/map_crop/outputs",
                  "--output", "x.zip", env=client_env(server), cwd=work)
    assert proc.returncode == 1
    assert "no job 'nojob'" in error_line(proc)
    assert os.listdir(work) == []


# ---------------------------------------------------------------- errors

def test_error_answers_print_the_server_message(server, work):
    env = client_env(server)
    proc = client("--get", "--url", f"{server.url}/runs/nope", env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert error_line(proc) == ("mip_client: error: no run 'nope'; GET /runs lists them "
                                "(HTTP 404 unknown_run)")
    (work / "bad.json").write_text(json.dumps({"job": "x", "modules": []}))
    proc = client("--post", "--url", f"{server.url}/runs", "--input", "bad.json", env=env,
                  cwd=work)
    assert proc.returncode == 1
    assert "HTTP 422 invalid_payload" in error_line(proc)
    proc = client("--post", "--url", f"{server.url}/runs",
                  "--data", json.dumps(payload("x", "map_crop", map="NoSuchMap")), env=env)
    assert proc.returncode == 1
    assert "HTTP 404 unknown_map" in error_line(proc)


def test_credentials(fresh_server):
    server = fresh_server  # its own: it asserts on the whole run list
    url = f"{server.url}/runs"
    wrong = client_env(server, MIP_CLIENT_PASSWORD="wrong-password")
    proc = client("--get", "--url", url, env=wrong)
    assert proc.returncode == 1
    assert "no or wrong credentials" in error_line(proc) and "HTTP 401" in error_line(proc)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "wrong-password" not in proc.stderr

    proc = client("--get", "--url", url, env=client_env(MIP_CLIENT_USER=None))
    assert proc.returncode == 1 and "HTTP 401" in error_line(proc)

    # --user NAME:PASSWORD overrides both; --user NAME takes the password from the env
    proc = client("--get", "--url", url, "--user", f"{server.user}:{server.password}", env=wrong)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    env = client_env(server, MIP_CLIENT_USER="somebody-else")
    proc = client("--get", "--url", url, "--user", server.user, env=env)
    assert proc.returncode == 0, proc.stderr
    proc = client("--get", "--url", url, "--user", "somebody-else", env=client_env(server))
    assert proc.returncode == 1 and "HTTP 401" in error_line(proc)
    assert server.password not in proc.stdout + proc.stderr


def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}/runs"
    proc = client("--get", "--url", url, "--timeout", "5", "--tries", "2")
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"cannot reach {url}" in line and "refused" in line.lower()
    assert "trying again in 1 s (try 2 of 2)" in proc.stderr


def test_silent_server_times_out():
    """A server that accepts the connection but never answers: --timeout ends the wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/runs"
        proc = client("--get", "--url", url, "--timeout", "0.5", timeout=30)
    assert proc.returncode == 1
    assert f"no answer from {url} within 0.5 s" in error_line(proc)


URL = "http://127.0.0.1:9/runs"


@pytest.mark.parametrize("args, message", [
    ((), "the following arguments are required: --url"),
    (("--url", URL), "one of the arguments --get --post --delete is required"),
    (("--get", "--post", "--url", URL), "not allowed with argument"),
    (("--get",), "the following arguments are required: --url"),
    (("--get", "--url", URL, "--idempotency-key", "k1"), "--idempotency-key goes with --post"),
    (("--post", "--url", URL, "--idempotency-key", "a b"), "printable ASCII characters"),
    (("--post", "--url", URL, "--idempotency-key", ""), "printable ASCII characters"),
    (("--get", "--url", URL, "--tries", "0"), "--tries must be 1 or more"),
    (("--get", "--url", URL, "--input", "a.json"), "go with --post, not --get"),
    (("--get", "--url", URL, "--data", "{}"), "go with --post, not --get"),
    (("--post", "--url", URL, "--input", "a.json", "--data", "{}"), "not allowed with argument"),
    (("--post", "--url", URL, "--input", "missing.json"), "--input missing.json: No such file"),
    (("--post", "--url", URL, "--data", "{nope"), "--data is not valid JSON"),
    (("--get", "--url", "localhost:8080/runs"), "is not an http(s) URL"),
    (("--get", "--url", "/runs"), "is a path: give a full URL"),
    (("--get", "--url", f"{URL}", "--wait"), "--wait follows a run"),
    (("--get", "--url", f"{URL}/x/log", "--wait"), "--wait follows a run"),
    (("--post", "--url", f"{URL}/x/cancel", "--data", "{}", "--wait"), "--wait follows a run"),
    (("--get", "--url", f"{URL}/x", "--wait-timeout", "5"), "--wait-timeout goes with --wait"),
    (("--get", "--url", URL, "--timeout", "0"), "--timeout must be a positive"),
    (("--get", "--url", URL, "--timeout", "soon"), "invalid float value"),
    (("--get", "--url", URL, "--output", ""), "--output needs a file name"),
    (("--get", "--url", URL, "--user", ":pw"), "--user needs a name"),
    (("--get", "--url", URL, "--bogus"), "unrecognized arguments: --bogus"),
])
def test_usage_errors(tmp_path, args, message):
    proc = client(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in error_line(proc)
    assert proc.stdout == ""


def test_user_without_password_and_no_terminal(tmp_path):
    """No password anywhere and stdin not a terminal: a usage error, not a prompt."""
    proc = client("--get", "--url", URL, "--user", "alice", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no password for user 'alice'" in error_line(proc)
    proc = client("--get", "--url", URL, env=client_env(MIP_CLIENT_USER="alice"), cwd=tmp_path)
    assert proc.returncode == 2


def test_url_as_a_path_with_mip_client_url(server):
    proc = client("--get", "--url", "/maps", env=client_env(server, MIP_CLIENT_URL=server.url))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [MAP]


# ---------------------------------------------------------------- helpers, in-process

def test_with_openai_key():
    body = {"job": "a", "modules": ["x"], "map": MAP}
    assert mip_client.with_openai_key(body, SECRET)["openai_key"] == SECRET
    assert "openai_key" not in body
    own = dict(body, openai_key="mine")
    assert mip_client.with_openai_key(own, SECRET)["openai_key"] == "mine"
    assert mip_client.with_openai_key(body, None) == body
    assert mip_client.with_openai_key(["a"], SECRET) == ["a"]


@pytest.mark.parametrize("header, name", [
    ('attachment; filename="alpha_map_crop_outputs.zip"', "alpha_map_crop_outputs.zip"),
    ("attachment; filename=plain.zip", "plain.zip"),
    ('attachment; filename="../../etc/evil.zip"', "evil.zip"),
    ('attachment; filename="/tmp/abs.zip"', "abs.zip"),
    ('attachment; filename="..\\\\win.zip"', "win.zip"),
    ("attachment; filename*=UTF-8''caf%C3%A9.zip", "caf\u00e9.zip"),
])
def test_disposition_name(header, name):
    assert mip_client.disposition_name(header) == name


@pytest.mark.parametrize("header", [
    None, "", "attachment", 'attachment; filename=".bashrc"', 'attachment; filename="dir/"',
    'attachment; filename="a\\nb.zip"'.replace("\\n", "\n"),
])
def test_disposition_name_refused(header):
    with pytest.raises(mip_client.MipClientError, match="--output"):
        mip_client.disposition_name(header)


class FakeTerminal(io.StringIO):
    def __init__(self, tty=True):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_only_on_a_terminal_and_after_a_moment():
    now = [0.0]
    term = FakeTerminal()
    progress = mip_client.Progress("e.zip", 2_000_000, stream=term, clock=lambda: now[0])
    progress.update(1000)
    assert term.getvalue() == ""  # quick downloads show nothing
    now[0] = 1.0
    progress.update(1_000_000)
    assert "\re.zip [" in term.getvalue() and " 50% 1.0 MB / 2.0 MB" in term.getvalue()
    now[0] = 2.0
    progress.finish(2_000_000)
    assert "100% 2.0 MB / 2.0 MB" in term.getvalue() and term.getvalue().endswith("\n")

    pipe = FakeTerminal(tty=False)
    progress = mip_client.Progress("e.zip", None, stream=pipe, clock=lambda: now[0])
    now[0] = 10.0
    progress.update(5)
    progress.finish(5)
    assert pipe.getvalue() == ""


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def chunks():
        yield b"partial"
        raise mip_client.MipClientError("the download broke off")

    with pytest.raises(mip_client.MipClientError):
        mip_client.atomic_write(str(tmp_path / "e.zip"), chunks())
    assert os.listdir(tmp_path) == []
    assert mip_client.atomic_write(str(tmp_path / "e.zip"), [b"ab", b"c"]) == 3
    assert (tmp_path / "e.zip").read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["e.zip"]


def test_main_returns_exit_codes(capsys):
    assert mip_client.main(["--version"]) == mip_client.EXIT_OK
    assert mip_client.main(["--get"]) == mip_client.EXIT_USAGE
    assert "mip_client: error:" in capsys.readouterr().err
