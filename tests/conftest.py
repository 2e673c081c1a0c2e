"""Fixtures: a private set of data folders with the sample map, mipper as a subprocess,
the real server (waitress on a free loopback port) with bounded waits, and the same app
called in process (`inproc`) for tests that need no process and no socket."""

import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests
from requests.structures import CaseInsensitiveDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "modules"))

import sample_map  # noqa: E402

from mip import journal  # noqa: E402

MAP = "WY_CO_Peach"
# the zero-work catalogue: the real graph and options, modules that only write their outputs
ZERO_CONFIG = os.path.join(ROOT, "tests", "config.yml")
FINISHED = ("passed", "failed", "cancelled")
# an open console page's polls (MIP_CONSOLE_POLL_MS, 1500 outside the tests): a browser
# test that waits "a poll or two" waits a fifth as long
CONSOLE_POLL_MS = 300


@pytest.fixture(autouse=True)
def clean_proxy_environ(monkeypatch):
    """Requests to loopback must never go through a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def sample_tif(tmp_path_factory):
    """The sample map, generated once per test session."""
    path = tmp_path_factory.mktemp("map") / f"{MAP}.tif"
    sample_map.write_sample_map(str(path))
    return str(path)


@pytest.fixture
def mip_env(tmp_path, sample_tif):
    """Environment variables for mipper and the server, with folders under tmp_path and
    the sample map in place."""
    return data_env(tmp_path, sample_tif)


def data_env(base, sample_tif: str) -> dict:
    """mip_env's variables, with the data folders under `base`."""
    data = base / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIP_", "TA1_"))}
    env.update({
        "TA1_INPUTS_DIR": str(data / "inputs"),
        "TA1_OUTPUTS_DIR": str(data / "outputs"),
        "TA1_TEMPS_DIR": str(data / "temps"),
        "TA1_RUNS_DIR": str(data / "runs"),
        "TA1_REPOS_DIR": str(data / "repos"),
        "MIP_CONFIG": os.path.join(ROOT, "config.yml"),
        "MIP_WORKERS": "4",
        "PYTHONUNBUFFERED": "1",
    })
    add_map(env, MAP, sample_tif)
    return env


def zero_work(env: dict) -> dict:
    """`env` with the zero-work catalogue, for tests of the API and the journal's state,
    not of what a module computes."""
    return dict(env, MIP_CONFIG=ZERO_CONFIG)


def add_map(env: dict, name: str, source: str) -> str:
    folder = os.path.join(env["TA1_INPUTS_DIR"], "maps", name)
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{name}.tif")
    shutil.copyfile(source, dest)
    return dest


def mipper(env: dict, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run mipper.py as a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "mipper.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


class Server:
    """`python mip_server.py --port 0` as a subprocess; its output is kept in `lines`."""

    def __init__(self, env: dict, *args: str):
        self.env = env
        self.args = args
        self.user = env.get("MIP_USER")
        self.password = env.get("MIP_PASSWORD")
        self.lines = []
        self.proc = None
        self.url = None

    @property
    def auth(self):
        return (self.user, self.password)

    def start(self, timeout: float = 20) -> "Server":
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "mip_server.py"), "--port", "0", *self.args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = threading.Event()
        threading.Thread(target=self._read, args=(self.proc, first), daemon=True).start()
        if not first.wait(timeout) or not self.lines:
            self.kill()
            raise AssertionError("server printed nothing")
        match = re.search(r"http://([\d.]+):(\d+)", self.lines[0])
        if not match:
            self.proc.wait(timeout)
            self.stop()
            raise AssertionError(f"server did not start: {self.lines}")
        self.url = f"http://{match.group(1)}:{match.group(2)}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("server never answered /health")

    def _read(self, proc, first):
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            first.set()
        first.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("auth", self.auth)
        kw.setdefault("timeout", 10)
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("auth", self.auth)
        kw.setdefault("timeout", 10)
        return requests.post(self.url + path, **kw)

    def wait_run(self, run_id: str, timeout: float = 120, until=FINISHED) -> dict:
        """Poll a run until its status is in `until`; its RunStatus."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get(f"/runs/{run_id}").json()
            if status["status"] in until:
                return status
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} still {status['status']} after {timeout} s")

    def stop(self, timeout: float = 10) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server_env(mip_env):
    """mip_env plus credentials for the server."""
    return dict(mip_env, MIP_USER="tester", MIP_PASSWORD=secrets.token_urlsafe(12),
                MIP_CONSOLE_POLL_MS=str(CONSOLE_POLL_MS))


@pytest.fixture
def fresh_server(server_env):
    """The real server on a free loopback port, its own for one test (restarts, kills, full
    disks, its environment, GPUs), stopped after the test with any run processes it left
    behind."""
    srv = Server(server_env).start()
    yield srv
    srv.stop()
    kill_leftover_runs(server_env)


@pytest.fixture
def server(fresh_server):
    """fresh_server, under the name most test files use; a file whose tests each keep to
    their own job names overrides it with shared_server."""
    return fresh_server


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, sample_tif):
    """One real server for all the tests of a module, each with its own job names: a start
    and stop (about 1.3 s of interpreter and imports) per module, not per test. On the
    zero-work catalogue: sharing is for API and state tests."""
    env = dict(zero_work(data_env(tmp_path_factory.mktemp("shared"), sample_tif)),
               MIP_USER="tester", MIP_PASSWORD=secrets.token_urlsafe(12))
    srv = Server(env).start()
    yield srv
    srv.stop()
    kill_leftover_runs(env)


class AppClient:
    """mip_server.make_app(cfg, db, queue) called as a WSGI app in process, as bottle's own
    tests and sapporo's TestClient(create_app()) do: no subprocess, no socket. Requests are
    prepared by requests itself and the answers are requests.Response objects, so a test
    reads them as it reads the real server's. What waitress adds around the app (the request
    log, its own limits) is not here: tests of those keep the real server."""

    url = "http://127.0.0.1:8080"  # what the app sees as its address (Host, Origin checks)

    def __init__(self, env: dict):
        import mip_server

        self.env = env
        self.user = env.get("MIP_USER")
        self.password = env.get("MIP_PASSWORD")
        from mip.web import auth

        self.cfg = mip_server.Config.from_env(env, auth.hash_password)
        self.cfg.settings.make_dirs()
        self.db = journal.Journal(self.cfg.settings.journal_path)
        self.db.migrate()
        self.queue = mip_server.RunQueue(self.cfg, self.db, env)
        self.app = mip_server.make_app(self.cfg, self.db, self.queue)
        self.session = requests.Session()

    @property
    def auth(self):
        return (self.user, self.password)

    def request(self, method: str, path: str, remote_addr: str = "127.0.0.1",
                **kw) -> requests.Response:
        """requests.request(method, url + path, **kw) as the app answers it, sent from
        `remote_addr`."""
        kw.setdefault("auth", self.auth)
        for unused in ("timeout", "stream", "allow_redirects", "verify"):
            kw.pop(unused, None)
        prepared = self.session.prepare_request(requests.Request(method, self.url + path, **kw))
        return self.call(prepared, remote_addr)

    def call(self, prepared: requests.PreparedRequest, remote_addr: str) -> requests.Response:
        url = urllib.parse.urlsplit(prepared.url)
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        environ = {
            "REQUEST_METHOD": prepared.method, "SCRIPT_NAME": "",
            # PEP 3333: the percent-decoded path's bytes, as latin-1 (what waitress gives)
            "PATH_INFO": urllib.parse.unquote_to_bytes(url.path).decode("latin-1"),
            "QUERY_STRING": url.query, "SERVER_NAME": url.hostname,
            "SERVER_PORT": str(url.port), "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": remote_addr, "HTTP_HOST": url.netloc,
            "wsgi.version": (1, 0), "wsgi.url_scheme": url.scheme,
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        for name, value in prepared.headers.items():
            key = name.upper().replace("-", "_")
            if isinstance(value, bytes):  # requests sends bytes as they are; WSGI has latin-1
                value = value.decode("latin-1")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value
            else:
                environ["HTTP_" + key] = value
        if body and "CONTENT_LENGTH" not in environ:
            environ["CONTENT_LENGTH"] = str(len(body))
        started = {}

        def start_response(status, headers, exc_info=None):
            started["status"], started["headers"] = status, headers

        out = self.app(environ, start_response)
        try:
            content = b"".join(out)
        finally:
            if hasattr(out, "close"):
                out.close()
        resp = requests.Response()
        code, _, reason = started["status"].partition(" ")
        resp.status_code, resp.reason = int(code), reason
        headers = CaseInsensitiveDict()
        for name, value in started["headers"]:
            # repeated headers are joined, as urllib3 gives them to requests
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        resp.headers = headers
        resp._content = b"" if prepared.method == "HEAD" else content
        resp.encoding = requests.utils.get_encoding_from_headers(headers)
        resp.url, resp.request = prepared.url, prepared
        return resp

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return self.request("DELETE", path, **kw)

    wait_run = Server.wait_run

    def close(self) -> None:
        """Start no more runs, kill those still going and let the queue's watchers record
        their ends before the journal closes under them."""
        self.queue.stop()
        kill_leftover_runs(self.env)
        wait_for(lambda: not self.queue.running, timeout=30)
        self.session.close()
        self.db.close()


@pytest.fixture
def inproc(server_env):
    """The app in process over fresh data folders, closed after the test (with any run
    processes it started)."""
    client = AppClient(server_env)
    yield client
    client.close()


def kill_leftover_runs(env: dict) -> None:
    """Kill the process groups of runs a test left running, so none outlives the test."""
    path = os.path.join(env["TA1_RUNS_DIR"], "journal.db")
    if not os.path.exists(path):
        return
    db = journal.Journal(path)
    for run in db.runs_with_status(journal.Status.RUNNING, journal.Status.NOT_STARTED):
        if run["pid"]:
            try:
                os.killpg(run["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    db.close()


def wait_for(predicate, timeout: float = 30, step: float = 0.05):
    """Poll `predicate` until it gives something true, which is returned; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def answers(url: str) -> bool:
    """True once something answers HTTP at `url`."""
    try:
        requests.get(url, timeout=1)
        return True
    except requests.ConnectionError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Terminate, wait a while, then kill."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def latest(env: dict, job: str) -> dict:
    """{module: its latest execution row} in a job, from the journal."""
    db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
    try:
        return {m: db.latest_execution(job, m) for m in db.job_modules(job)}
    finally:
        db.close()


def payload(job: str, *modules: str, **extra) -> dict:
    return {"job": job, "modules": list(modules), "map": MAP, **extra}


def hold_file(env: dict, job: str, name: str = "hold") -> str:
    """A file under the job's temp folder (the only place an extra switch may name, and
    one mipper leaves alone) for `["--hold", path]`: the module waits while it exists, so
    a test holds a module running exactly until it calls release(path)."""
    path = os.path.join(env["TA1_TEMPS_DIR"], job, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    return path


def release(path: str) -> None:
    """Let a module held by `--hold path` go on."""
    if os.path.exists(path):
        os.remove(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's standalone server (S3, ECS, CloudWatch Logs...), as a process on loopback."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(url + "/moto-api/"))
    except AssertionError:
        stop_process(proc)
        raise AssertionError("moto server did not start") from None
    yield url
    stop_process(proc)
    log.close()


@pytest.fixture
def s3_env(server_env, moto_endpoint, tmp_path):
    """server_env set to copy results to a fresh bucket name (not yet created)."""
    return dict(server_env, AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                AWS_CONFIG_FILE=str(tmp_path / "none"),
                AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                MIP_S3_BUCKET=f"mip-{secrets.token_hex(6)}", MIP_S3_PREFIX="results")


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on its test (`item.rep_call`), so that a fixture can act on
    a failure: the browser tests save a screenshot."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
