"""Wrong credentials and slow downloads cost nothing to other clients (issue 12, items 2
and 3): auth.py on its own, then the real server from several loopback addresses."""

import base64
import http.client
import io
import os
import re
import threading
import zipfile

import pytest
from conftest import AppClient
from conftest import kill_leftover_runs
from conftest import payload
from conftest import wait_for

from mip.web import auth

FAST = 1000  # pbkdf2 rounds for users made in these tests; the cost is not what is tested


def basic(user: str, password: str, scheme: str = "Basic") -> str:
    return f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def hashes(monkeypatch):
    """Counts pbkdf2 checks auth.py makes (the real check runs)."""
    calls = []
    real = auth.check_password

    def counted(password, stored):
        calls.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "check_password", counted)
    return calls


# ---------------------------------------------------------------------------- credentials

def test_a_password_from_the_environment_is_hashed_at_the_first_check_not_at_start(
        monkeypatch):
    """MIP_PASSWORD's hash (a LaterHash, as mip_server.read_config makes it) costs nothing
    until the first check, which makes it (and the dummy hash) whichever user it names;
    then the password itself is gone."""
    made = []
    real = auth.hash_password
    monkeypatch.setattr(auth, "hash_password",
                        lambda password, salt=None: made.append(1) or real(password, salt, FAST))
    auth.dummy_hash.cache_clear()
    later = auth.LaterHash("right")
    creds = auth.Credentials({"ann": later}, 5)
    assert made == [] and "right" not in repr(later)
    assert creds.check(basic("nobody", "right"), "10.0.0.1") is False
    assert len(made) == 2 and isinstance(creds.users["ann"], str)
    assert later._password is None
    assert creds.check(basic("ann", "right"), "10.0.0.2") is True
    assert creds.check(basic("ann", "wrong"), "10.0.0.2") is False
    assert len(made) == 2
    auth.dummy_hash.cache_clear()  # made with FAST rounds: not for the other tests


def test_failures_are_refused_before_any_hashing(hashes):
    clock = Clock()
    creds = auth.Credentials({"ann": auth.hash_password("right", iterations=FAST)}, 3,
                               clock=clock)
    for _ in range(3):
        assert creds.check(basic("ann", "wrong"), "10.0.0.1") is False
    assert len(hashes) == 3
    for header in (basic("ann", "wrong"), basic("ann", "right"), basic("nobody", "x")):
        with pytest.raises(auth.Refused) as refused:
            creds.check(header, "10.0.0.1")
        assert refused.value.code == "too_many_failures" and refused.value.retry_after == 20
    assert len(hashes) == 3  # not even the right password was hashed
    # another address has its own budget; no credentials at all are never hashed nor counted
    assert creds.check(basic("ann", "right"), "10.0.0.2") is True
    assert creds.check("", "10.0.0.1") is False and creds.check("Basic !!", "10.0.0.1") is False
    assert len(hashes) == 4
    # the budget grows back: 3 a minute is one every 20 s
    clock.now += 20
    assert creds.check(basic("ann", "right"), "10.0.0.1") is True
    assert creds.check(basic("ann", "wrong"), "10.0.0.1") is False
    with pytest.raises(auth.Refused):
        creds.check(basic("ann", "wrong"), "10.0.0.1")


def test_a_cached_success_is_never_throttled(hashes):
    clock = Clock()
    creds = auth.Credentials({"ann": auth.hash_password("right", iterations=FAST)}, 2,
                               clock=clock)
    good = basic("ann", "right")
    assert creds.check(good, "10.0.0.1") is True
    for _ in range(2):
        creds.check(basic("ann", "wrong"), "10.0.0.1")
    with pytest.raises(auth.Refused):
        creds.check(basic("ann", "wrong"), "10.0.0.1")
    assert [creds.check(good, "10.0.0.1") for _ in range(5)] == [True] * 5
    assert len(hashes) == 3  # the good header was hashed once
    # the same password in another header (scheme spelt otherwise) is not in the cache
    with pytest.raises(auth.Refused):
        creds.check(basic("ann", "right", "basic"), "10.0.0.1")
    # short-lived: after CACHE_SECONDS the header is hashed again
    clock.now += auth.CACHE_SECONDS - 1
    assert creds.check(good, "10.0.0.1") is True and len(hashes) == 3
    clock.now += 1
    assert creds.check(good, "10.0.0.1") is True and len(hashes) == 4


def test_the_cache_is_bounded_and_holds_no_password():
    users = {f"u{i}": auth.hash_password(f"secret-{i}", iterations=FAST) for i in range(5)}
    creds = auth.Credentials(users, 10, cache_size=3)
    for i in range(5):
        assert creds.check(basic(f"u{i}", f"secret-{i}"), "10.0.0.1") is True
    assert len(creds.verified) == 3
    for key in creds.verified:
        assert len(key) == 32  # an HMAC-SHA256 digest
        for i in range(5):
            assert f"secret-{i}".encode() not in key
            assert basic(f"u{i}", f"secret-{i}").encode() not in key


def test_one_pbkdf2_check_at_a_time_and_new_clients_first(monkeypatch):
    """32 addresses that sent wrong credentials get one core's worth of hashing between
    them and are refused at once while it runs, never holding a thread, and that refusal
    counts as a failure; an address with no failure on record waits for the check in one
    of WAITING_PLACES."""
    creds = auth.Credentials({"ann": auth.hash_password("right", iterations=FAST)}, 5)
    inside, go_on = threading.Event(), threading.Event()
    real = auth.check_password

    def slow(password, stored):
        inside.set()
        go_on.wait(30)
        return real(password, stored)

    monkeypatch.setattr(auth, "check_password", slow)
    results = {}

    def check(header, address):
        try:
            results[address] = creds.check(header, address)
        except auth.Refused as e:
            results[address] = e.code

    threads = [threading.Thread(target=check, args=(basic("ann", "wrong"), "10.0.0.1"))]
    threads[0].start()
    try:
        assert inside.wait(30)
        for i in range(2, 34):
            creds.fail(f"10.0.0.{i}")  # a failure on record
            with pytest.raises(auth.Refused) as refused:
                creds.check(basic("ann", f"wrong-{i}"), f"10.0.0.{i}")
            assert refused.value.code == "auth_busy" and refused.value.retry_after >= 1
            assert round(creds.left(f"10.0.0.{i}")) == 3  # counted as a failure
        with pytest.raises(auth.Refused):  # the header being checked, sent again
            creds.check(basic("ann", "wrong"), "10.0.0.2")
        # new clients (headers not seen, addresses with no failure) wait for the check
        for address, scheme in (("10.0.1.1", "basic"), ("10.0.1.2", "BASIC")):
            threads.append(threading.Thread(target=check,
                                            args=(basic("ann", "right", scheme), address)))
            threads[-1].start()
        wait_for(lambda: creds.slot.waiting == 2, timeout=10)
        with pytest.raises(auth.Refused):  # no waiting place left
            creds.check(basic("ann", "right", "bAsic"), "10.0.1.3")
        with pytest.raises(auth.Refused):  # nor a way past those waiting
            creds.check(basic("ann", "wrong-2"), "10.0.0.2")
    finally:
        go_on.set()
        for t in threads:
            t.join(30)
    assert results == {"10.0.0.1": False, "10.0.1.1": True, "10.0.1.2": True}


def test_a_new_clients_first_requests_at_once_cost_one_check(monkeypatch, hashes):
    creds = auth.Credentials({"ann": auth.hash_password("right", iterations=FAST)}, 5)
    go_on = threading.Event()
    counted = auth.check_password

    def slow(password, stored):
        go_on.wait(30)
        return counted(password, stored)

    monkeypatch.setattr(auth, "check_password", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        creds.check(basic("ann", "right"), "10.0.0.1"))) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(f.waiting for f in list(creds.flights.values())) == 19,
                 timeout=10)
    finally:
        go_on.set()
        for t in threads:
            t.join(30)
    assert results == [True] * 20 and len(hashes) == 1


def test_the_address_table_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "ADDRESSES", 100)
    clock = Clock()
    creds = auth.Credentials({"ann": auth.hash_password("right", iterations=FAST)}, 2,
                               clock=clock)
    monkeypatch.setattr(auth, "check_password", lambda password, stored: False)
    for i in range(250):
        creds.check(basic("ann", "wrong"), f"10.0.{i // 200}.{i % 200}")
    assert len(creds.budgets) <= 100


# ---------------------------------------------------------------------------- slots

def test_a_slot_is_released_however_the_answer_ends():
    slots = auth.Slots(1, "too_many_downloads", "zip downloads")

    def parts(fail_at=None):
        for i in range(3):
            if i == fail_at:
                raise OSError("disk gone")
            yield b"x"

    def free() -> bool:
        try:
            slots.hold([]).close()
            return True
        except auth.Refused:
            return False

    held = slots.hold(parts())
    with pytest.raises(auth.Refused) as refused:
        slots.hold(parts())
    assert refused.value.code == "too_many_downloads" and refused.value.retry_after > 0
    held.close()  # closed before a byte was read (a generator's own finally would not run)
    held.close()  # twice is harmless
    assert free()
    assert list(slots.hold(parts())) == [b"x"] * 3  # completed
    assert free()
    for fail_at in (0, 1):  # an error before the first byte (bottle closes nothing then)
        held = slots.hold(parts(fail_at))
        with pytest.raises(OSError):
            list(held)
        assert free()
    held = slots.hold(parts())
    next(held)
    held.close()  # the client went away mid-stream
    assert free()


# ---------------------------------------------------------------------------- the server

def raw_get(url: str, path: str, auth: str | None, source: str = "127.0.0.1"):
    """(status, headers, body) of a GET sent from the loopback address `source`."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": auth} if auth else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def assert_throttled(status, headers, body, code="too_many_failures"):
    assert status == 429, (status, body)
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[1-9]\d*", headers["Retry-After"])
    assert code in body.decode()


def app_get(app: AppClient, path: str, auth: str | None, source: str = "127.0.0.1"):
    """raw_get, answered by the app in process."""
    resp = app.get(path, auth=None, headers={"Authorization": auth} if auth else {},
                   remote_addr=source)
    return resp.status_code, resp.headers, resp.content


def test_wrong_passwords_get_429_before_hashing_on_every_route(server_env):
    """The reproduction: wrong passwords from one address; the 429 comes before any pbkdf2
    check (the right password is refused too, unless its header is cached), from that
    address only, on every authenticated route."""
    srv = AppClient(dict(server_env, MIP_AUTH_FAILURES="3"))
    try:
        good = basic(srv.user, srv.password)
        wrong = basic(srv.user, "wrong")
        assert app_get(srv, "/jobs", good)[0] == 200
        assert [app_get(srv, "/jobs", wrong)[0] for _ in range(3)] == [401] * 3
        assert_throttled(*app_get(srv, "/jobs", wrong))
        # the right password in a header not seen before: refused without being checked
        assert_throttled(*app_get(srv, "/jobs", basic(srv.user, srv.password, "basic")))
        # no credentials at all cost nothing: still 401
        assert app_get(srv, "/jobs", None)[0] == 401
        # the header already found valid is never throttled
        assert app_get(srv, "/jobs", good)[0] == 200
        assert app_get(srv, "/health", None)[0] == 200
        # another address is not affected
        assert app_get(srv, "/jobs", wrong, "127.0.0.2")[0] == 401
        assert app_get(srv, "/jobs", basic(srv.user, srv.password, "basic"),
                       "127.0.0.2")[0] == 200
        spec = srv.get("/openapi.json").json()
        guarded = [(method, path) for path, ops in spec["paths"].items()
                   for method, op in ops.items() if op.get("security")]
        assert len(guarded) > 20
        for method, path in guarded:
            resp = srv.request(method, re.sub(r"{\w+}", "x", path), auth=(srv.user, "wrong"))
            assert_throttled(resp.status_code, resp.headers, resp.content)
            assert resp.json()["error"] == "too_many_failures"
    finally:
        srv.close()


class Download:
    """A zip download read a little and then held (a slow reader), on its own connection."""

    def __init__(self, url: str, path: str, auth: str):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.conn.request("GET", path, headers={"Authorization": auth})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.first = self.resp.read(65536) if self.status == 200 else self.resp.read()

    def close(self) -> None:
        self.conn.close()
        self.resp.close()


def test_slow_downloads_never_take_the_last_threads(server):
    """The reproduction: downloads held by slow readers. Past MIP_MAX_DOWNLOADS (by default
    half of the 8 request threads) a download gets 503 with Retry-After, and /health and
    status reads still answer. Slots come back when a reader goes away mid-stream and when
    a download completes."""
    run_id = server.post("/runs", json=payload("big", "georeference")).json()["run_id"]
    server.wait_run(run_id)
    folder = os.path.join(server.env["TA1_OUTPUTS_DIR"], "big", "georeference")
    with open(os.path.join(folder, "blob.bin"), "wb") as f:
        for _ in range(48):  # more than waitress's buffer and the sockets' hold
            f.write(os.urandom(1024 * 1024))
    auth = basic(server.user, server.password)
    path = "/modules/big/georeference/outputs"
    held = []
    try:
        for _ in range(4):
            held.append(Download(server.url, path, auth))
            assert held[-1].status == 200 and held[-1].first.startswith(b"PK")
        for _ in range(5):  # the 5th to the 9th: on main, the 9th took the last thread
            status, headers, body = raw_get(server.url, path, auth)
            assert status == 503, status
            assert headers["Content-Type"] == "application/json"
            assert re.fullmatch(r"[1-9]\d*", headers["Retry-After"])
            assert b"too_many_downloads" in body
        assert server.get("/health", timeout=5).status_code == 200
        assert server.get(f"/runs/{run_id}", timeout=5).status_code == 200
        for download in held:  # every reader goes away mid-stream
            download.close()
        held = []
        # once the server has seen them go, a download completes...
        whole = wait_for(lambda: (r := server.get(path, timeout=60)).status_code == 200 and r,
                         timeout=60)
        archive = zipfile.ZipFile(io.BytesIO(whole.content))
        assert archive.getinfo("big_georeference_outputs/blob.bin").file_size == 48 * 2**20
        # ...and all four slots are free again: none leaked
        for _ in range(4):
            held.append(Download(server.url, path, auth))
            assert held[-1].status == 200
        assert raw_get(server.url, path, auth)[0] == 503
    finally:
        for download in held:
            download.close()
    kill_leftover_runs(server.env)
