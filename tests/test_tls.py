"""The server behind the real Caddy (Debian's caddy, /usr/bin/caddy), as on the real host:
HTTPS verified against Caddy's internal CA, the client addresses Caddy passes on, and
forwarded headers believed from the proxy only (MIP_TRUSTED_PROXY, proxy.py).

Run: .venv/bin/python -m pytest -q tests/test_tls.py

Caddy runs deploy/Caddyfile's site block as shipped, with three test-only changes that a
test below checks are the only ones: a global block (no admin endpoint, no trust-store
install, its storage under tmp_path, free ports), `bind 127.0.0.1` and `tls internal`. Each
client has its own loopback source address (127.0.0.2, 127.0.0.3), as distinct hosts would.
"""

import base64
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import zipfile

import jsonschema
import pytest
import requests
from conftest import ROOT
from conftest import Server
from conftest import free_port
from conftest import kill_leftover_runs
from conftest import payload
from conftest import read
from conftest import wait_for
from requests.adapters import HTTPAdapter
from test_client import A_JSON
from test_client import WALKTHROUGH
from test_client import argv
from test_client import client
from test_client import client_env
from test_client import commands

from mip import settings
from mip.errors import EXIT_USAGE
from mip.errors import MipError
from mip.web import proxy

pytestmark = pytest.mark.tls

CADDY = shutil.which("caddy") or "/usr/bin/caddy"
SHIPPED = os.path.join(ROOT, "deploy", "Caddyfile")
OPTIONS_LINE = "\n{\n"  # the global options block
SITE_LINE = "{$MIP_DOMAIN} {\n"
UPSTREAM_LINE = "\treverse_proxy 127.0.0.1:8080 {\n"
FAILURES = 3  # MIP_AUTH_FAILURES: a small budget, so a flood is short


# ---------------------------------------------------------------------------- Caddy

def caddyfile_for_test(shipped: str, https_port: int, upstream_port: int, storage: str) -> str:
    """deploy/Caddyfile made runnable on loopback: only these lines are added or changed."""
    assert shipped.count(SITE_LINE) == 1 and shipped.count(UPSTREAM_LINE) == 1
    assert shipped.count(OPTIONS_LINE) == 1
    site = shipped.replace(SITE_LINE, SITE_LINE + "\tbind 127.0.0.1\n\ttls internal\n")
    site = site.replace(UPSTREAM_LINE, f"\treverse_proxy 127.0.0.1:{upstream_port} {{\n")
    return site.replace(OPTIONS_LINE, OPTIONS_LINE + (
        f"\tadmin off\n\tskip_install_trust\n\tlocal_certs\n"
        f"\tauto_https disable_redirects\n"
        f"\thttp_port {free_port()}\n\thttps_port {https_port}\n"
        f"\tstorage file_system {{\n\t\troot {storage}\n\t}}\n"))


class Caddy:
    """`caddy run` in front of a server, on a free loopback port, with its own CA."""

    def __init__(self, folder, upstream_url: str):
        self.folder = folder
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.storage = str(folder / "storage")
        self.root_ca = os.path.join(self.storage, "pki", "authorities", "local", "root.crt")
        upstream_port = int(upstream_url.rsplit(":", 1)[1])
        self.config = folder / "Caddyfile"
        self.config.write_text(caddyfile_for_test(read(SHIPPED), self.port, upstream_port,
                                                  self.storage))
        self.log_path = folder / "caddy.log"
        self.proc = None

    def env(self) -> dict:
        """Caddy's environment: every folder it writes to under the test's own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MIP_", "XDG_"))}
        env.update(HOME=str(self.folder / "home"), XDG_DATA_HOME=str(self.folder / "data"),
                   XDG_CONFIG_HOME=str(self.folder / "config"), MIP_DOMAIN=self.url)
        return env

    def start(self, timeout: float = 60) -> "Caddy":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [CADDY, "run", "--config", str(self.config), "--adapter", "caddyfile"],
                env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"caddy exited {self.proc.returncode}: {self.log()}")
            if os.path.exists(self.root_ca):
                try:
                    requests.get(self.url + "/health", verify=self.root_ca, timeout=2)
                    return self
                except requests.ConnectionError:  # SSLError included: no certificate yet
                    pass
            time.sleep(0.1)
        raise AssertionError(f"caddy did not answer in {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 10) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


class Front:
    """A server and the Caddy in front of it."""

    def __init__(self, server: Server, caddy: Caddy):
        self.server = server
        self.caddy = caddy

    def session(self, source: str) -> requests.Session:
        """A session whose connections leave from the loopback address `source`, checking
        HTTPS against Caddy's CA only."""
        session = requests.Session()
        session.trust_env = False
        session.verify = self.caddy.root_ca
        session.mount("https://", SourceAdapter(source))
        session.mount("http://", SourceAdapter(source))
        return session

    def log_lines(self, address: str, method: str, path: str) -> list:
        """The server's request-log lines for `method path` from `address`."""
        pattern = re.compile(rf" INFO {re.escape(address)} {method} {re.escape(path)} \d{{3}} ")
        return [line for line in self.server.lines if pattern.search(line)]


class SourceAdapter(HTTPAdapter):
    """requests' adapter with every connection bound to one source address."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def start_front(tmp_path, env: dict) -> Front:
    server = Server(env).start()
    (tmp_path / "caddy").mkdir()
    caddy = Caddy(tmp_path / "caddy", server.url)
    try:
        caddy.start()
    except BaseException:
        caddy.stop()
        server.stop()
        kill_leftover_runs(env)
        raise
    return Front(server, caddy)


@pytest.fixture
def behind_caddy(tmp_path, server_env):
    """The server trusting 127.0.0.1 (Caddy's address towards it), Caddy in front; both
    stopped after the test, whatever happens."""
    env = dict(server_env, MIP_TRUSTED_PROXY="127.0.0.1", MIP_AUTH_FAILURES=str(FAILURES))
    started = start_front(tmp_path, env)
    try:
        yield started
    finally:
        started.caddy.stop()
        started.server.stop()
        kill_leftover_runs(env)


def basic(user: str, password: str, scheme: str = "Basic") -> dict:
    """An Authorization header; another `scheme` spelling makes a header the server has
    not cached, so that its check really runs."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"{scheme} {token}"}


def direct(url: str, path: str, source: str, headers: dict) -> tuple:
    """(status, body) of a GET sent straight to the server from `source`."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the deploy file

def test_shipped_caddyfile_is_valid_for_both_kinds_of_certificate(tmp_path):
    """deploy/Caddyfile as an operator installs it, for a public name: automatic
    certificates, and with the commented `tls cert key` line taken for their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIP_", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "data"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), MIP_DOMAIN="ta1.example.org")
    adapted = subprocess.run([CADDY, "adapt", "--config", SHIPPED, "--adapter", "caddyfile"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert adapted.returncode == 0, adapted.stderr
    server = json.loads(adapted.stdout)["apps"]["http"]["servers"]["srv0"]
    assert server["listen"] == [":443"]
    route = server["routes"][0]
    assert route["match"] == [{"host": ["ta1.example.org"]}]
    handlers = route["handle"][0]["routes"][0]["handle"]
    proxy = [h for h in handlers if h["handler"] == "reverse_proxy"]
    assert proxy and proxy[0]["upstreams"] == [{"dial": "127.0.0.1:8080"}]
    # no trusted_proxies: what a client sends as X-Forwarded-* is replaced, never passed on
    assert "trusted_proxies" not in proxy[0]
    # slow or idle clients are cut off: headers within 10 s, 2 minutes idle at most
    assert server["read_header_timeout"] == 10 * 10**9 and server["idle_timeout"] == 120 * 10**9
    # an idle connection to the server is let go before the server's own timeout drops it
    keepalive = proxy[0]["transport"]["keep_alive"]["idle_timeout"]
    assert keepalive < settings.VARS["MIP_CHANNEL_TIMEOUT"].default * 10**9
    assert "tls" not in json.loads(adapted.stdout)["apps"]  # automatic: nothing to load

    # the operator's certificate: caddy validate loads the files
    cert, key = tmp_path / "mip.crt", tmp_path / "mip.key"
    make_certificate("ta1.example.org", cert, key)
    commented = "\t# tls /etc/caddy/certs/mip.crt /etc/caddy/certs/mip.key\n"
    shipped = read(SHIPPED)
    assert shipped.count(commented) == 1
    own = tmp_path / "Caddyfile"
    own.write_text(shipped.replace(commented, f"\ttls {cert} {key}\n"))
    checked = subprocess.run([CADDY, "validate", "--config", str(own), "--adapter",
                              "caddyfile"], env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Valid configuration" in checked.stdout + checked.stderr


def make_certificate(name: str, cert_path, key_path) -> None:
    """A self-signed certificate for `name`, as an operator might bring."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


# ---------------------------------------------------------------------------- through Caddy

def test_walkthrough_over_https(behind_caddy, tmp_path):
    """The seed's walk-through (docs/client.md, command by command), with
    mip_client.py talking HTTPS to Caddy and checking it against Caddy's CA."""
    front_url = behind_caddy.caddy.url
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.json").write_text(A_JSON)
    env = client_env(behind_caddy.server, REQUESTS_CA_BUNDLE=behind_caddy.caddy.root_ca)
    cmds = iter(commands(WALKTHROUGH))
    proc = client(*argv(next(cmds), front_url), env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    for command in cmds:
        proc = client(*argv(command, front_url, RUN_ID=run_id), env=env, cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((work / "c.json").read_text())["run_id"] == run_id
    with zipfile.ZipFile(work / "e.zip") as zf:
        assert zf.namelist() and all(n.startswith("alpha_map_crop_outputs/")
                                     for n in zf.namelist())
    with zipfile.ZipFile(work / "d.zip") as zf:
        assert "alpha_map_crop_logs/map_crop.log" in zf.namelist()

    # the same CA is needed: without it the client refuses the certificate
    proc = client(*argv(commands(WALKTHROUGH)[2], front_url), env=client_env(
        behind_caddy.server, REQUESTS_CA_BUNDLE=None), cwd=work)
    assert proc.returncode != 0 and "certificate" in proc.stderr.lower()
    # at once: no later try would change the certificate
    assert "trying again" not in proc.stderr and "REQUESTS_CA_BUNDLE" in proc.stderr


def test_location_stays_relative_and_info_says_tls(behind_caddy):
    """POST /runs through Caddy: Location is the relative path the server sent; GET / says
    tls true through Caddy and false straight to the server."""
    srv = behind_caddy.server
    with behind_caddy.session("127.0.0.2") as session:
        resp = session.post(behind_caddy.caddy.url + "/runs", json=payload("loc", "map_crop"),
                            auth=srv.auth, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.headers["Location"] == f"/runs/{resp.json()['run_id']}"
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
        info = session.get(behind_caddy.caddy.url + "/", auth=srv.auth, timeout=10).json()
        assert info["tls"] is True
        spec = session.get(behind_caddy.caddy.url + "/openapi.json", auth=srv.auth,
                           timeout=10).json()
        declared = spec["paths"]["/"]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]
        jsonschema.validate(info, declared)
        assert declared["properties"]["tls"]["type"] == "boolean"
        srv.wait_run(resp.json()["run_id"])
    assert srv.get("/").json()["tls"] is False
    # a client claiming HTTPS straight to the server is not believed
    status, body = direct(srv.url, "/", "127.0.0.3",
                          dict(basic(*srv.auth), **{"X-Forwarded-Proto": "https"}))
    assert status == 200 and json.loads(body)["tls"] is False


def test_origin_check_and_console_see_the_public_origin(behind_caddy):
    """origin.py compares a POST's Origin with the request's own origin, which through Caddy
    is the public https one (waitress applied X-Forwarded-Proto and -Host); straight to the
    server, forged forwarded headers do not change it. A POST that passes the check is
    answered 422 here (an empty payload), a refused one 403."""
    srv = behind_caddy.server
    public = behind_caddy.caddy.url
    inner = srv.url  # http://127.0.0.1:<server port>: what the server is without the proxy
    with behind_caddy.session("127.0.0.2") as session:
        def post(origin):
            return session.post(public + "/runs", json={}, auth=srv.auth, timeout=10,
                                headers={"Origin": origin})
        assert post(public).status_code == 422
        for foreign in (inner, public.replace("https:", "http:"), "https://evil.example"):
            resp = post(foreign)
            assert resp.status_code == 403 and resp.json()["error"] == "cross_origin", foreign
        # the console through Caddy: its links are relative, never the inner address
        page = session.get(public + "/", auth=srv.auth, timeout=10,
                           headers={"Accept": "text/html"})
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "Content-Security-Policy" in page.headers
        assert inner not in page.text
        assert not re.search(r'(href|src|action)="https?:', page.text)

    def direct_post(origin, forged):
        host, port = inner.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10,
                                          source_address=("127.0.0.3", 0))
        try:
            conn.request("POST", "/runs", body=b"{}", headers=dict(
                basic(*srv.auth), Origin=origin, **forged))
            return conn.getresponse().status
        finally:
            conn.close()

    claims = {"X-Forwarded-Proto": "https",
              "X-Forwarded-Host": public.removeprefix("https://")}
    assert direct_post(inner, {}) == 422
    assert direct_post(public, claims) == 403  # the claims were dropped: not this origin
    assert direct_post(inner, claims) == 422


def test_a_flood_through_caddy_throttles_its_sender_only(behind_caddy):
    """Wrong passwords through Caddy from 127.0.0.2: that address gets 429, 127.0.0.3 does
    not; the request log names each address, not Caddy's."""
    srv = behind_caddy.server
    url = behind_caddy.caddy.url + "/jobs"
    wrong = basic(srv.user, "wrong")
    with behind_caddy.session("127.0.0.2") as flood, behind_caddy.session("127.0.0.3") as other:
        # what a client says in X-Forwarded-For through Caddy is replaced by Caddy
        spoof = dict(wrong, **{"X-Forwarded-For": "127.0.0.3"})
        statuses = [flood.get(url, headers=spoof, timeout=10).status_code
                    for _ in range(FAILURES + 1)]
        assert statuses == [401] * FAILURES + [429]
        refused = flood.get(url, headers=basic(srv.user, srv.password, "basic"), timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"]
        assert refused.json()["error"] == "too_many_failures"
        # the other client is untouched: its right password works, a wrong one is a 401
        assert other.get(url, headers=basic(srv.user, srv.password), timeout=10).ok
        assert other.get(url, headers=wrong, timeout=10).status_code == 401
    assert wait_for(lambda: len(behind_caddy.log_lines("127.0.0.2", "GET", "/jobs")) == 5)
    assert wait_for(lambda: len(behind_caddy.log_lines("127.0.0.3", "GET", "/jobs")) == 2)
    assert not behind_caddy.log_lines("127.0.0.1", "GET", "/jobs")
    assert any("believed from 127.0.0.1 only" in line for line in srv.lines)


def test_forwarded_headers_straight_to_the_server_are_ignored(behind_caddy):
    """X-Forwarded-For from 127.0.0.3, which is not the proxy: the log shows 127.0.0.3 and
    the throttle counts 127.0.0.3, whatever address each request claims."""
    srv = behind_caddy.server
    wrong = basic(srv.user, "wrong")
    statuses = []
    for n in range(FAILURES + 1):
        forged = dict(wrong, **{"X-Forwarded-For": f"10.0.0.{n + 1}",
                                "X-Forwarded-Host": "evil.example",
                                "X-Forwarded-Proto": "https"})
        statuses.append(direct(srv.url, "/jobs", "127.0.0.3", forged)[0])
    assert statuses == [401] * FAILURES + [429]
    assert wait_for(lambda: len(behind_caddy.log_lines("127.0.0.3", "GET", "/jobs")) == 4)
    assert not any(" INFO 10.0.0." in line for line in srv.lines)
    # the throttle is 127.0.0.3's alone: through Caddy, 127.0.0.2 still gets in
    with behind_caddy.session("127.0.0.2") as session:
        resp = session.get(behind_caddy.caddy.url + "/jobs", auth=srv.auth, timeout=10)
        assert resp.status_code == 200


def test_without_a_trusted_proxy_every_client_is_caddy(tmp_path, server_env):
    """The control: with MIP_TRUSTED_PROXY unset, the server sees Caddy's 127.0.0.1 for
    everyone, so one client's flood locks out the other, and GET / cannot tell HTTPS.
    This is what MIP_TRUSTED_PROXY fixes."""
    env = dict(server_env, MIP_AUTH_FAILURES=str(FAILURES))
    started = start_front(tmp_path, env)
    try:
        srv = started.server
        url = started.caddy.url + "/jobs"
        with started.session("127.0.0.2") as flood, started.session("127.0.0.3") as other:
            for _ in range(FAILURES):
                assert flood.get(url, headers=basic(srv.user, "wrong"),
                                 timeout=10).status_code == 401
            resp = other.get(url, headers=basic(srv.user, srv.password), timeout=10)
            assert resp.status_code == 429
            info = other.get(started.caddy.url + "/", headers=basic(srv.user, srv.password),
                             timeout=10)
            assert info.status_code == 429
        assert wait_for(lambda: len(started.log_lines("127.0.0.1", "GET", "/jobs")) == 4)
        assert not started.log_lines("127.0.0.2", "GET", "/jobs")
        assert not any("behind a TLS proxy" in line for line in srv.lines)
    finally:
        started.caddy.stop()
        started.server.stop()
        kill_leftover_runs(env)


# ---------------------------------------------------------------------------- settings, warning

def trusted_proxy(env: dict):
    return settings.read(env, "MIP_TRUSTED_PROXY")


def test_trusted_proxy_setting():
    assert trusted_proxy({}) is None
    assert trusted_proxy({"MIP_TRUSTED_PROXY": " 127.0.0.1 "}) == "127.0.0.1"
    assert trusted_proxy({"MIP_TRUSTED_PROXY": "[::1]"}) == "::1"
    assert trusted_proxy({"MIP_TRUSTED_PROXY": "*"}) == "*"
    for bad in ("localhost", "127.0.0.1,10.0.0.1", "10.0.0.0/8", "127.0.0.1:2019"):
        with pytest.raises(MipError, match="MIP_TRUSTED_PROXY"):
            trusted_proxy({"MIP_TRUSTED_PROXY": bad})


def test_a_bad_trusted_proxy_stops_the_server(server_env):
    srv = Server(dict(server_env, MIP_TRUSTED_PROXY="caddy.local"))
    with pytest.raises(AssertionError, match="did not start"):
        srv.start()
    assert "mip_server: error: MIP_TRUSTED_PROXY='caddy.local'" in srv.output()
    assert srv.proc.returncode == EXIT_USAGE


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "ta1.invalid"])
def test_clear_text_warning_beyond_loopback(host):
    """Binding beyond loopback with no proxy trusted: one loud warning naming the fix. (The
    tests keep to loopback, so this is the check main() calls, given other hosts.)"""
    warnings = proxy.start_warnings(host, None)
    assert len(warnings) == 1
    assert "UNENCRYPTED" in warnings[0] and host in warnings[0]
    assert "MIP_TRUSTED_PROXY=127.0.0.1" in warnings[0] and "deploy/Caddyfile" in warnings[0]
    assert proxy.start_warnings(host, "10.1.2.4") == []  # a proxy on another host
    assert "any client" in proxy.start_warnings(host, "*")[0]
    # the proxy on this host, but the server reachable beside it
    beside = proxy.start_warnings(host, "127.0.0.1")
    assert len(beside) == 1 and "MIP_HOST=127.0.0.1" in beside[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "::1", "[::1]", "localhost",
                                  "::ffff:127.0.0.1"])
def test_no_warning_on_loopback(host):
    assert proxy.start_warnings(host, None) == []
    assert proxy.start_warnings(host, "*") == []
    assert proxy.start_warnings(host, "127.0.0.1") == []


def test_the_server_warns_at_start_only_beyond_loopback(server_env):
    """The real server on loopback, without a proxy: no warning, and its log line carries
    the client's address."""
    srv = Server(server_env).start()
    try:
        assert srv.get("/jobs").ok
        wait_for(lambda: any(" INFO 127.0.0.1 GET /jobs 200 " in line for line in srv.lines))
        assert not any("UNENCRYPTED" in line for line in srv.lines)
    finally:
        srv.stop()


def test_own_https_check_is_real(behind_caddy):
    """The CA really is checked: Caddy's certificate fails against the system's roots."""
    context = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", behind_caddy.caddy.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(sock, server_hostname="127.0.0.1")
