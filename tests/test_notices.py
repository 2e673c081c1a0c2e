"""Completion notices: a real loopback receiver (http.server in a thread) is told of runs'
ends by the real server, signed; addresses on the server's own networks are refused at
submit and again at delivery; redirects are not followed; failed deliveries are retried,
also across a restart; the secret never shows."""

import contextlib
import glob
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from conftest import Server
from conftest import free_port
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import payload
from conftest import release
from conftest import wait_for

from mip import journal
from mip.errors import Invalid
from mip.links import notices

SECRET = "notify-" + secrets.token_hex(12)
ANSWER = "RECEIVER-ANSWER-" + secrets.token_hex(6)  # what a receiver answers: never kept


class Receiver:
    """An HTTP server on a loopback port that records every POST; `status` and `location`
    say what it answers."""

    def __init__(self, port: int = 0, status: int = 204, location: str | None = None):
        self.hits = []  # (path, headers, body)
        self.status = status
        self.location = location
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hits.append((self.path, dict(self.headers), body))
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                answer = ANSWER.encode()
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def notify_env(server_env):
    return dict(server_env, MIP_NOTIFY_ALLOW="127.0.0.1", MIP_NOTIFY_SECRET=SECRET,
                MIP_NOTIFY_BACKOFF="1")


def start(env: dict) -> Server:
    return Server(env).start()


def notices_of(srv: Server, run_id: str) -> list:
    resp = srv.get(f"/runs/{run_id}/notices")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_notice(srv: Server, run_id: str, predicate, timeout: float = 90) -> list:
    return wait_for(lambda: (lambda n: n if n and predicate(n) else None)(
        notices_of(srv, run_id)), timeout=timeout, step=0.2)


def verified(hit) -> dict:
    """The body of a received notice, after checking its signature as a receiver would."""
    _, headers, body = hit
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Mip-Signature-256"], expected)
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)


def file_bytes(pattern: str) -> bytes:
    out = b""
    for path in glob.glob(pattern, recursive=True):
        with open(path, "rb") as f:
            out += f.read()
    return out


def assert_never_shown(srv: Server, *texts: str) -> None:
    """None of `texts` is in the server's log, the journal or the run logs."""
    runs = srv.env["TA1_RUNS_DIR"]
    stored = (file_bytes(os.path.join(runs, "journal.db*"))
              + file_bytes(os.path.join(runs, "**", "*.log")))
    assert b"deliveries" in stored
    for text in texts:
        assert text not in srv.output()
        assert text.encode() not in stored


# ---------------------------------------------------------------------------- delivery

def test_passed_and_failed_runs_are_noticed_signed_to_each_url(notify_env, receiver):
    env = dict(notify_env, MIP_NOTIFY_URL=receiver.url("/every-run?token=abc"))
    srv = start(env)
    try:
        good = srv.post("/runs", json=payload("told", "georeference",
                                              notify_url=receiver.url("/mine"))).json()
        bad = srv.post("/runs", json=payload("told_bad", "map_crop", notify_url=receiver.url(),
                                             extra_switches={"map_crop": ["--fail"]})).json()
        assert srv.wait_run(good["run_id"])["status"] == "passed"
        assert srv.wait_run(bad["run_id"])["status"] == "failed"
        for run in (good, bad):
            done = wait_notice(srv, run["run_id"],
                               lambda n: all(d["state"] == "delivered" for d in n))
            assert {d["source"] for d in done} == {"payload", "server"}
            # the server's own URL is shown by its origin: its query may hold a token
            assert {d["url"] for d in done if d["source"] == "server"} == {receiver.url("")}
            assert all(d["attempts"] == 1 and d["last_error"] is None for d in done)
        wait_for(lambda: len(receiver.hits) == 4)
        by_path = {}
        for hit in receiver.hits:
            by_path.setdefault(hit[0], []).append(verified(hit))
        assert [b["run_id"] for b in by_path["/mine"]] == [good["run_id"]]
        assert [b["run_id"] for b in by_path["/hook"]] == [bad["run_id"]]
        assert sorted(b["run_id"] for b in by_path["/every-run?token=abc"]) == sorted(
            [good["run_id"], bad["run_id"]])
        mine = by_path["/mine"][0]
        assert mine == srv.get(f"/runs/{good['run_id']}").json()
        assert mine["status"] == "passed" and mine["payload"]["notify_url"].endswith("/mine")
        assert by_path["/hook"][0]["status"] == "failed"
        ids = {h[1]["X-Mip-Delivery"] for h in receiver.hits}
        assert ids == {d["delivery_id"] for r in (good, bad) for d in notices_of(srv, r["run_id"])}

        # a rerun keeps the run's notify_url
        again = srv.post(f"/runs/{bad['run_id']}/rerun").json()
        assert again["payload"]["notify_url"] == receiver.url()
        srv.wait_run(again["run_id"])
        wait_notice(srv, again["run_id"], lambda n: all(d["state"] == "delivered" for d in n))
        assert any(verified(h)["run_id"] == again["run_id"] for h in receiver.hits
                   if h[0] == "/hook")
        answers = "".join(srv.get(f"/runs/{r['run_id']}").text + srv.get(
            f"/runs/{r['run_id']}/notices").text for r in (good, bad, again))
        assert SECRET not in answers and "token=abc" not in srv.get(
            f"/runs/{good['run_id']}/notices").text
    finally:
        srv.stop()
        kill_leftover_runs(env)
    assert_never_shown(srv, SECRET, ANSWER, "token=abc")


def test_a_cancelled_queued_run_is_noticed(notify_env, receiver):
    srv = start(dict(notify_env, MIP_MAX_RUNS="1"))
    hold = hold_file(notify_env, "c1")  # the first run keeps the only slot till the end
    try:
        first = srv.post("/runs", json=payload("c1", "georeference", extra_switches={
            "georeference": ["--hold", hold]})).json()
        queued = srv.post("/runs", json=payload("c2", "georeference",
                                                notify_url=receiver.url())).json()
        assert srv.post(f"/runs/{queued['run_id']}/cancel").json()["status"] == "cancelled"
        wait_notice(srv, queued["run_id"], lambda n: n[0]["state"] == "delivered")
        assert verified(receiver.hits[0])["status"] == "cancelled"
        release(hold)
        srv.wait_run(first["run_id"])
    finally:
        release(hold)
        srv.stop()
        kill_leftover_runs(srv.env)


def test_a_lost_run_is_noticed_as_failed(notify_env, receiver):
    """A run whose mipper is killed ends too: failed, and noticed."""
    srv = start(notify_env)
    db = journal.Journal(os.path.join(notify_env["TA1_RUNS_DIR"], "journal.db"))
    try:
        run = srv.post("/runs", json=payload("lost", "georeference", notify_url=receiver.url(),
                                             extra_switches={"georeference": ["--sleep", "30"]}
                                             )).json()
        pid = wait_for(lambda: db.run(run["run_id"])["pid"])
        os.kill(pid, signal.SIGKILL)
        wait_notice(srv, run["run_id"], lambda n: n[0]["state"] == "delivered")
        told = verified(receiver.hits[0])
        assert told["status"] == "failed" and "before recording the end" in told["log"]
    finally:
        db.close()
        srv.stop()
        kill_leftover_runs(notify_env)


def test_a_receiver_that_is_not_http_is_a_failed_try_never_quoted(notify_env):
    """What a receiver answers never reaches the journal, even as an error's text."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)

    def answer_garbage():
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(f"HELLO {ANSWER}\r\n\r\n".encode())

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    env = dict(notify_env, MIP_NOTIFY_ATTEMPTS="1")
    srv = start(env)
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        run = srv.post("/runs", json=payload("garbage", "georeference", notify_url=url)).json()
        notice = wait_notice(srv, run["run_id"], lambda n: n[0]["state"] == "failed")[0]
        assert "not a valid HTTP answer" in notice["last_error"]
    finally:
        srv.stop()
        kill_leftover_runs(env)
        listener.close()
        thread.join(10)
    assert_never_shown(srv, ANSWER, SECRET)


def test_a_receiver_down_then_up_gets_the_notice_also_across_a_restart(notify_env):
    port = free_port()
    srv = start(notify_env)
    receiver = None
    try:
        url = f"http://127.0.0.1:{port}/hook"
        run = srv.post("/runs", json=payload("late", "georeference", notify_url=url)).json()
        srv.wait_run(run["run_id"])
        failed = wait_notice(srv, run["run_id"], lambda n: n[0]["attempts"] >= 1)[0]
        assert failed["state"] == "pending" and "Connection" in failed["last_error"]
        receiver = Receiver(port)
        done = wait_notice(srv, run["run_id"], lambda n: n[0]["state"] == "delivered")[0]
        assert done["attempts"] >= 2
        assert [verified(h)["run_id"] for h in receiver.hits] == [run["run_id"]]
        receiver.stop()

        # down while the server stops: the pending notice is kept and resumed
        second = srv.post("/runs", json=payload("late2", "georeference", notify_url=url)).json()
        srv.wait_run(second["run_id"])
        wait_notice(srv, second["run_id"], lambda n: n[0]["attempts"] >= 1)
        srv.stop()
        receiver = Receiver(port)
        srv = start(notify_env)
        done = wait_notice(srv, second["run_id"], lambda n: n[0]["state"] == "delivered")[0]
        assert [verified(h)["run_id"] for h in receiver.hits] == [second["run_id"]]
        assert receiver.hits[0][1]["X-Mip-Delivery"] == done["delivery_id"]
    finally:
        srv.stop()
        kill_leftover_runs(notify_env)
        if receiver:
            receiver.stop()


def test_a_redirect_is_not_followed_and_the_answer_never_kept(server_env, receiver):
    """Unsigned (no secret): the server warns at start; a 302 is a failed delivery."""
    elsewhere = Receiver()
    receiver.status, receiver.location = 302, elsewhere.url("/elsewhere")
    env = dict(server_env, MIP_NOTIFY_ALLOW="127.0.0.1", MIP_NOTIFY_BACKOFF="1",
               MIP_NOTIFY_ATTEMPTS="2")
    srv = start(env)
    try:
        assert "MIP_NOTIFY_SECRET is not set" in wait_for(
            lambda: "MIP_NOTIFY_SECRET" in srv.output() and srv.output())
        run = srv.post("/runs", json=payload("moved", "georeference",
                                             notify_url=receiver.url())).json()
        srv.wait_run(run["run_id"])
        notice = wait_notice(srv, run["run_id"], lambda n: n[0]["state"] == "failed")[0]
        assert notice["attempts"] == 2 and "302" in notice["last_error"]
        assert [h[0] for h in receiver.hits] == ["/hook", "/hook"]
        assert "X-Mip-Signature-256" not in receiver.hits[0][1]
        assert elsewhere.hits == []
        assert ANSWER not in srv.get(f"/runs/{run['run_id']}/notices").text
    finally:
        srv.stop()
        kill_leftover_runs(env)
        elsewhere.stop()
    assert_never_shown(srv, ANSWER)


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/", "http://[::1]:8080/", "http://localhost:8080/",
    "http://[::ffff:127.0.0.1]/", "http://192.168.1.1/", "http://0.0.0.0/",
    "http://127.1/", "http://2130706433/", "http://[fe80::1%25eth0]/",
    "http://user:pw@93.184.215.14/", "http://no-such-host.invalid/"])
def test_submit_refuses_the_servers_own_networks(server, url):
    resp = server.post("/runs", json=payload("refused", "georeference", notify_url=url))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "notify_url_refused"
    assert "pw" not in resp.json()["message"]
    assert server.get("/runs").json() == []


@pytest.mark.parametrize("url", ["ftp://example.com/", "http://exa mple.com/", "x" * 3000,
                                 "https://" + "a" * 2050])
def test_submit_refuses_what_is_no_http_url(server, url):
    resp = server.post("/runs", json=payload("refused", "georeference", notify_url=url))
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_payload", resp.text


def test_the_allow_list_lets_only_what_it_names(notify_env):
    srv = start(dict(notify_env, MIP_NOTIFY_ALLOW="127.0.0.0/30, 10.1.0.0/16"))
    try:
        for url, code in (("http://127.0.0.2/", 200), ("http://10.1.2.3/", 200),
                          ("http://127.0.0.4/", 422), ("http://10.0.0.1/", 422),
                          ("http://[::1]/", 422)):
            resp = srv.post("/runs", json=payload(f"allow{code}", "georeference",
                                                  notify_url=url))
            assert resp.status_code == code, (url, resp.text)
    finally:
        srv.stop()
        kill_leftover_runs(srv.env)


def test_a_host_resolving_elsewhere_at_delivery_is_refused_then(notify_env, receiver):
    """What was allowed at submit is checked again when the notice goes: here the allow list
    changes across a restart, as a DNS answer could change under a rebinding attack."""
    srv = start(notify_env)
    hold = hold_file(notify_env, "rebound")  # the run ends under the second server
    try:
        run = srv.post("/runs", json=payload("rebound", "georeference", notify_url=receiver.url(),
                                             extra_switches={"georeference": ["--hold", hold]}))
        assert run.status_code == 200, run.text
        run_id = run.json()["run_id"]
        srv.stop()
        srv = start({k: v for k, v in notify_env.items() if k != "MIP_NOTIFY_ALLOW"})
        release(hold)
        srv.wait_run(run_id)
        notice = wait_notice(srv, run_id, lambda n: n[0]["state"] == "failed")[0]
        assert "refused at delivery" in notice["last_error"] and notice["attempts"] == 1
        assert receiver.hits == []
    finally:
        release(hold)
        srv.stop()
        kill_leftover_runs(notify_env)


@pytest.mark.parametrize("env, word", [
    ({"MIP_NOTIFY_URL": "http://10.0.0.1/hook"}, "MIP_NOTIFY_URL"),
    ({"MIP_NOTIFY_URL": "gopher://example.com/"}, "MIP_NOTIFY_URL"),
    ({"MIP_NOTIFY_ALLOW": "127.0.0.1,not-an-address"}, "MIP_NOTIFY_ALLOW"),
    ({"MIP_NOTIFY_ATTEMPTS": "0"}, "MIP_NOTIFY_ATTEMPTS"),
])
def test_bad_settings_stop_the_server_at_start(server_env, env, word):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"), "--port", "0"],
                          env=dict(server_env, **env), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and word in done.stderr, done.stderr


# ---------------------------------------------------------------------------- units

@pytest.mark.parametrize("address, allow, refused", [
    ("93.184.215.14", "", False), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", "", False),
    ("127.0.0.1", "", True), ("127.0.0.1", "127.0.0.1", False), ("169.254.169.254", "", True),
    ("10.0.0.1", "", True), ("172.16.0.1", "", True), ("192.168.0.1", "", True),
    ("100.64.0.1", "", True), ("0.0.0.0", "", True), ("224.0.0.1", "", True),
    ("255.255.255.255", "", True), ("::1", "", True), ("::", "", True), ("fe80::1%eth0", "", True),
    ("fd00::1", "", True), ("ff02::1", "", True), ("::ffff:127.0.0.1", "", True),
    ("::ffff:169.254.169.254", "", True), ("::ffff:127.0.0.1", "127.0.0.1", False),
    ("64:ff9b::a9fe:a9fe", "", True), ("2002:7f00:1::", "", True),
    ("::127.0.0.1", "", True), ("::169.254.169.254", "", True), ("::8.8.8.8", "", True),
    ("::ffff:0:7f00:1", "", True), ("64:ff9b:1::a00:1", "", True),
    ("10.1.2.3", "10.1.0.0/16", False), ("10.2.0.1", "10.1.0.0/16", True)])
def test_address_rule(address, allow, refused):
    nets = tuple(ipaddress.ip_network(a, strict=False) for a in allow.split(",") if a)
    if refused:
        with pytest.raises(notices.Refused):
            notices.check_address(address, nets)
    else:
        notices.check_address(address, nets)


def fake_dns(monkeypatch, answers: dict) -> list:
    """socket.getaddrinfo answering `answers` for names (literal addresses as themselves);
    the list of names looked up."""
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        if notices.is_literal(host):
            found = [host]
        else:
            asked.append(host)
            found = answers[host]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in found]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_every_address_of_a_name_is_checked_and_no_connection_made(monkeypatch):
    """A name with one public and one private address is refused, at submit and at
    delivery, before any connection is opened."""
    fake_dns(monkeypatch, {"rebind.example": ["93.184.215.14", "169.254.169.254"],
                           "fine.example": ["93.184.215.14"]})
    opened = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: opened.append(a))
    settings = notices.NoticeSettings()
    assert notices.checked_addresses("https://fine.example/x", ())[2] == ["93.184.215.14"]
    with pytest.raises(notices.Refused, match="169.254.169.254"):
        notices.checked_addresses("https://rebind.example/x", ())
    with pytest.raises(notices.Refused):
        notices.post("https://rebind.example/x", b"{}", {}, settings)
    with pytest.raises(Invalid) as e:  # 422 by mip_server.ERRORS
        notices.check_payload(settings, {"notify_url": "http://rebind.example/"})
    assert e.value.code == "notify_url_refused"
    assert opened == []


def test_the_connection_goes_to_the_checked_address_with_the_names_host_header(monkeypatch,
                                                                              receiver):
    """No second lookup: the socket is opened to the address that was checked, while the
    request still names the URL's host."""
    asked = fake_dns(monkeypatch, {"hooks.example": ["127.0.0.1"]})
    allow = (ipaddress.ip_network("127.0.0.1/32"),)
    status = notices.post(f"http://hooks.example:{receiver.port}/in", b"{}",
                          {"Content-Type": "application/json"},
                          notices.NoticeSettings(allow=allow))
    assert status == 204
    path, headers, _ = receiver.hits[0]
    assert path == "/in" and headers["Host"] == f"hooks.example:{receiver.port}"
    assert asked == ["hooks.example"]


def test_a_resolver_that_never_answers_is_given_up_in_time(monkeypatch):
    """A name whose lookup hangs is refused after MIP_NOTIFY_TIMEOUT, not when the resolver
    gives up (minutes, over its servers and search domains): a request thread is not held."""
    release = threading.Event()

    def getaddrinfo(host, port, *args, **kwargs):
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        started = time.monotonic()
        with pytest.raises(Invalid) as e:  # 422 by mip_server.ERRORS
            notices.check_payload(notices.NoticeSettings(timeout=1),
                                  {"notify_url": "http://slow.example/"})
        assert time.monotonic() - started < 10
        assert "no answer in 1 s" in e.value.message
    finally:
        release.set()


def test_a_name_that_does_not_resolve_at_delivery_is_tried_again(monkeypatch, tmp_path):
    """A resolver down when a run ends is a failed try, retried with backoff like a
    receiver that is down, never a refusal for good."""
    def getaddrinfo(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    db = journal.Journal(str(tmp_path / "journal.db"))
    db.migrate()
    now = journal.utcnow()
    with db.transaction() as tx:
        tx.execute("INSERT INTO deliveries (id, run_id, url, source, state, attempts, next_try,"
                   " created, updated) VALUES ('d1', 'r1', 'https://hooks.example/in',"
                   " 'payload', 'pending', 0, ?, ?, ?)", (now, now, now))
    notifier = notices.Notifier(notices.NoticeSettings(), db, lambda run_id: {"run_id": run_id},
                                {})
    notifier.attempt(notifier.due()[0])
    row = notices.deliveries(db, "r1")[0]
    assert row["state"] == "pending" and row["attempts"] == 1, row
    assert "cannot resolve" in row["last_error"] and row["next_try"] > now
