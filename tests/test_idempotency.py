"""Idempotent submits: the Idempotency-Key header of POST /runs and rerun on the real server,
and mip_client.py's own key and retries, through a loopback proxy that loses answers.

Run: .venv/bin/python -m pytest -q tests/test_idempotency.py
"""

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading

import pytest
from conftest import ROOT
from conftest import Server
from conftest import kill_leftover_runs
from conftest import payload

import mip_server

CLIENT = os.path.join(ROOT, "mip_client.py")
SECRET = "sk-idempotency-test-NEVER-STORED-41c9"
KEY = "0b7c6a52-6f7e-4d0e-9a55-0d8c1f7f2f10"


def journal_rows(env: dict) -> list:
    with sqlite3.connect(os.path.join(env["TA1_RUNS_DIR"], "journal.db")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM idempotency_keys")]


def client(server, *args, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIP_")}
    env.update(MIP_CLIENT_USER=server.user, MIP_CLIENT_PASSWORD=server.password)
    return subprocess.run([sys.executable, CLIENT, *args], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the server

def test_same_key_same_submission_answers_the_same_run(server):
    body = payload("idem", "georeference", openai_key=SECRET)
    first = server.post("/runs", json=body, headers={"Idempotency-Key": KEY})
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    # the same submission, keys in another order and force_rerun spelled out
    again = server.post("/runs", json=dict(reversed(list(body.items())), force_rerun=False),
                        headers={"Idempotency-Key": KEY})
    assert again.status_code == 200, again.text
    assert again.json()["run_id"] == first.json()["run_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == f"/runs/{first.json()['run_id']}"
    assert server.get("/runs").json() == [first.json()["run_id"]]
    # neither the OpenAI key nor a plain hash of the submission is kept
    rows = journal_rows(server.env)
    assert len(rows) == 1 and rows[0]["run_id"] == first.json()["run_id"]
    with open(os.path.join(server.env["TA1_RUNS_DIR"], "journal.db"), "rb") as f:
        assert SECRET.encode() not in f.read()
    assert rows[0]["hmac"] != hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert SECRET not in server.output()
    server.wait_run(first.json()["run_id"])


def test_same_key_another_submission_is_409(server):
    body = payload("idem", "georeference", openai_key=SECRET)
    run = server.post("/runs", json=body, headers={"Idempotency-Key": KEY}).json()
    others = [payload("idem", "map_crop", openai_key=SECRET),
              payload("idem", "georeference", openai_key=SECRET + "x"),  # the key counts
              payload("idem", "georeference")]
    for other in others:
        resp = server.post("/runs", json=other, headers={"Idempotency-Key": KEY})
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"] == "idempotency_key_reused"
        assert SECRET not in resp.text
    # the same key on another route is another submission
    server.wait_run(run["run_id"])
    resp = server.post(f"/runs/{run['run_id']}/rerun", headers={"Idempotency-Key": KEY})
    assert resp.status_code == 409 and resp.json()["error"] == "idempotency_key_reused"
    assert server.get("/runs").json() == [run["run_id"]]


@pytest.mark.parametrize("key", ["", "a b", "k" * 256, "caf\u00e9", "tab\there"])
def test_malformed_key_is_400(server, key):
    resp = server.post("/runs", json=payload("idem", "georeference"),
                       headers={"Idempotency-Key": key.encode("latin-1")})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_idempotency_key"
    assert server.get("/runs").json() == []


def test_longest_key_is_taken(server):
    key = "!~" * 127 + "z"
    resp = server.post("/runs", json=payload("idem", "georeference"),
                       headers={"Idempotency-Key": key})
    assert resp.status_code == 200, resp.text
    server.wait_run(resp.json()["run_id"])


def test_rerun_with_a_key(server):
    run = server.post("/runs", json=payload("idem", "georeference")).json()
    server.wait_run(run["run_id"])
    url = f"/runs/{run['run_id']}/rerun"
    first = server.post(url, headers={"Idempotency-Key": "rerun-1"})
    again = server.post(url, headers={"Idempotency-Key": "rerun-1"})
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["run_id"] == again.json()["run_id"] != run["run_id"]
    with_key = server.post(url, json={"openai_key": SECRET}, headers={"Idempotency-Key": "rerun-1"})
    assert with_key.status_code == 409
    server.wait_run(first.json()["run_id"])
    other = server.post(url, headers={"Idempotency-Key": "rerun-2"})
    assert other.status_code == 200 and other.json()["run_id"] != first.json()["run_id"]
    server.wait_run(other.json()["run_id"])
    assert len(server.get("/runs").json()) == 3


def test_a_refused_submission_leaves_its_key_free(server):
    resp = server.post("/runs", json=payload("idem", "georeference", map="no_such_map"),
                       headers={"Idempotency-Key": KEY})
    assert resp.status_code == 404, resp.text
    assert journal_rows(server.env) == []
    resp = server.post("/runs", json=payload("idem", "georeference"),
                       headers={"Idempotency-Key": KEY})
    assert resp.status_code == 200, resp.text
    server.wait_run(resp.json()["run_id"])


def test_simultaneous_requests_with_one_key_make_one_run(server):
    """Six requests at once, one key: one run, and every answer names it."""
    body = payload("idem", "georeference")
    start = threading.Barrier(6)
    answers = []

    def post():
        start.wait(10)
        answers.append(server.post("/runs", json=body, headers={"Idempotency-Key": KEY},
                                   timeout=60))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(answers) == 6
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert len({a.json()["run_id"] for a in answers}) == 1
    assert server.get("/runs").json() == [answers[0].json()["run_id"]]
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 5
    server.wait_run(answers[0].json()["run_id"])


def test_keys_are_kept_per_user(mip_env, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"ann:{mip_server.hash_password('pw-ann')}\n"
                     f"bob:{mip_server.hash_password('pw-bob')}\n")
    srv = Server(dict(mip_env, MIP_USERS_FILE=str(users))).start()
    try:
        body = payload("idem", "georeference")
        ann = srv.post("/runs", json=body, auth=("ann", "pw-ann"),
                       headers={"Idempotency-Key": KEY})
        bob = srv.post("/runs", json=body, auth=("bob", "pw-bob"),
                       headers={"Idempotency-Key": KEY})
        assert ann.status_code == bob.status_code == 200, bob.text
        assert ann.json()["run_id"] != bob.json()["run_id"]
        srv.user, srv.password = "ann", "pw-ann"  # every user sees every run
        assert sorted(srv.get("/runs").json()) == sorted(r.json()["run_id"] for r in (ann, bob))
        for run in (ann, bob):
            srv.wait_run(run.json()["run_id"])
    finally:
        srv.stop()
        kill_leftover_runs(mip_env)


def test_keys_expire_after_24_hours(server):
    first = server.post("/runs", json=payload("idem", "georeference"),
                        headers={"Idempotency-Key": KEY}).json()
    server.wait_run(first["run_id"])
    with sqlite3.connect(os.path.join(server.env["TA1_RUNS_DIR"], "journal.db")) as db:
        db.execute("UPDATE idempotency_keys SET created = '2000-01-01T00:00:00.000Z'")
    resp = server.post("/runs", json=payload("idem", "map_crop"),
                       headers={"Idempotency-Key": KEY})
    assert resp.status_code == 200, resp.text
    assert resp.json()["run_id"] != first["run_id"]
    rows = journal_rows(server.env)
    assert [r["run_id"] for r in rows] == [resp.json()["run_id"]]  # the old one pruned
    server.wait_run(resp.json()["run_id"])


def test_openapi_declares_the_header_and_409(server):
    spec = server.get("/openapi.json").json()
    for path in ("/runs", "/runs/{run_id}/rerun"):
        op = spec["paths"][path]["post"]
        header = [p for p in op["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in header] == ["Idempotency-Key"]
        assert header[0]["required"] is False
        assert header[0]["schema"]["pattern"] == "^[!-~]{1,255}$"
        assert "idempotency_key_reused" in op["responses"]["409"]["description"]


# ---------------------------------------------------------------- the client

class LossyProxy:
    """A loopback TCP proxy to the server whose first connections go wrong as `plan` says:
    "503" (or "429") answers that status with Retry-After: 1 itself, "drop" passes the
    request on and closes the connection once the server answers (the answer is lost);
    later ones are relayed."""

    def __init__(self, target_url: str, plan: list):
        host, port = target_url.rsplit("/", 1)[-1].split(":")
        self.target = (host, int(port))
        self.plan = list(plan)
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(30)
            self.connections += 1
            mode = self.plan.pop(0) if self.plan else "relay"
            threading.Thread(target=self.handle, args=(conn, mode), daemon=True).start()

    def handle(self, conn, mode):
        with conn:
            request = read_request(conn)
            if mode in ("503", "429"):
                body = b'{"error": "queue_full", "message": "busy; try again in 1 s"}'
                conn.sendall(b"HTTP/1.1 %s Busy\r\nRetry-After: 1\r\n"
                             b"Content-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (mode.encode(), len(body), body))
                return
            with socket.create_connection(self.target, timeout=30) as up:
                up.sendall(request)
                if mode == "drop":
                    up.recv(1)  # the server has answered: the run exists; lose the answer
                    return
                pipe = threading.Thread(target=copy, args=(conn, up), daemon=True)
                pipe.start()
                copy(up, conn)
                pipe.join(30)

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def read_request(conn) -> bytes:
    """One HTTP request with a Content-Length body, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += conn.recv(65536)
    return head + b"\r\n\r\n" + rest


def copy(src, dst):
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.mark.parametrize("plan", [["503"], ["drop"], ["503", "drop"], ["429"]])
def test_client_retries_with_its_key_and_makes_one_run(server, plan):
    """The first tries fail (a 503, an answer lost after the run was made): the client tries
    again with the same key, and the server answers the run the first try made."""
    proxy = LossyProxy(server.url, plan)
    try:
        proc = client(server, "--post", "--url", f"{proxy.url}/runs",
                      "--data", json.dumps(payload("idem", "georeference")))
    finally:
        proxy.stop()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("; trying again in ") == len(plan), proc.stderr
    if plan[0] != "drop":
        assert f"(HTTP {plan[0]} queue_full); trying again in 1 s (try 2 of 5)" in proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    assert server.get("/runs").json() == [run_id]
    assert proxy.connections == len(plan) + 1
    server.wait_run(run_id)


def test_client_key_survives_a_server_restart(server):
    body = json.dumps(payload("idem", "georeference"))
    first = client(server, "--post", "--url", f"{server.url}/runs", "--data", body,
                   "--idempotency-key", KEY)
    assert first.returncode == 0, first.stderr
    run_id = json.loads(first.stdout)["run_id"]
    server.wait_run(run_id)
    server.stop()
    server.start()
    again = client(server, "--post", "--url", f"{server.url}/runs", "--data", body,
                   "--idempotency-key", KEY)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["run_id"] == run_id
    other = client(server, "--post", "--url", f"{server.url}/runs", "--idempotency-key", KEY,
                   "--data", json.dumps(payload("idem", "map_crop")))
    assert other.returncode == 1
    assert "idempotency_key_reused" in other.stderr and "HTTP 409" in other.stderr
    # without --idempotency-key each call is a new submission
    fresh = client(server, "--post", "--url", f"{server.url}/runs", "--data", body)
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads(fresh.stdout)["run_id"] != run_id
    server.wait_run(json.loads(fresh.stdout)["run_id"])
    assert len(server.get("/runs").json()) == 2


def test_retry_pause_honours_retry_after_within_a_cap():
    import mip_client

    assert mip_client.retry_pause("5", 1) == 5
    assert mip_client.retry_pause("3600", 1) == mip_client.RETRY_AFTER_MAX
    assert mip_client.retry_pause("Wed, 21 Oct 2015 07:28:00 GMT", 2) == 0
    assert [mip_client.retry_pause(None, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert mip_client.retry_pause("soon", 2) == 2


def test_the_hmac_key_is_derived_from_the_key_file(tmp_path):
    """Stable for one key file (keys survive a restart), another for another file, and
    neither the Fernet key itself nor the key of another purpose."""
    from mip import keystore

    one = keystore.KeyStore(str(tmp_path / "one.key"))
    again = keystore.KeyStore(str(tmp_path / "one.key"))
    other = keystore.KeyStore(str(tmp_path / "other.key"))
    derived = one.derived_key("idempotency")
    assert derived == again.derived_key("idempotency") and len(derived) == 32
    assert derived != other.derived_key("idempotency")
    assert derived != one.derived_key("notices")
    assert derived not in (tmp_path / "one.key").read_bytes()
