"""A connection flood from loopback does not shut others out (issue 21, point 2): with
waitress's own defaults (100 connections, select()) 100 idle sockets were enough.

The real server on a free port, since what is tested is its sockets, once straight and
once behind the real Caddy of deploy/Caddyfile (test_tls.py's loopback copy). One server
serves both tests; the flood lasts a few seconds, and every socket it opens is closed at
the end.
"""

import os
import secrets
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from conftest import Server
from conftest import data_env
from conftest import kill_leftover_runs
from conftest import payload
from conftest import wait_for
from test_tls import Caddy

IDLE = 500  # connections that send nothing
SLOW = 100  # connections that send one header line every DRIP seconds, never the end
DRIP = 2.0
READS = 16  # the authenticated client's GETs, one every PAUSE seconds, over two drips
PAUSE = 0.2


@pytest.fixture(scope="module")
def flood_server(tmp_path_factory, sample_tif):
    """The server on the real catalogue (a module runs while the flood goes on, as it
    would), shared by the straight and the Caddy test: each posts its own job."""
    env = dict(data_env(tmp_path_factory.mktemp("flood"), sample_tif),
               MIP_USER="tester", MIP_PASSWORD=secrets.token_urlsafe(12))
    srv = Server(env).start()
    yield srv
    srv.stop()
    kill_leftover_runs(env)


def open_sockets(address: tuple, count: int) -> list:
    return [socket.create_connection(address, timeout=5) for _ in range(count)]


def open_tls_sockets(address: tuple, count: int, root_ca: str) -> list:
    """Connections that finish the TLS handshake, so that what they then drip reaches
    Caddy's HTTP reader (plain text on its HTTPS port would be refused at once)."""
    context = ssl.create_default_context(cafile=root_ca)
    sockets = []
    for _ in range(count):
        raw = socket.create_connection(address, timeout=5)
        try:
            sockets.append(context.wrap_socket(raw, server_hostname=address[0]))
        except BaseException:
            raw.close()
            raise
    return sockets


def drip(sockets: list, stop: threading.Event) -> None:
    """A request that never ends its headers: one more line every DRIP seconds."""
    for s in sockets:
        s.sendall(b"GET /runs HTTP/1.1\r\nHost: flood\r\n")
    while not stop.wait(DRIP):
        for s in sockets:
            try:
                s.sendall(b"X-Drip: 1\r\n")
            except OSError:
                return  # closed by the server: the assertion below says so


def reads_under_flood(url: str, run_id: str, auth: tuple, slow: list, **kw) -> list:
    """Start the drip on `slow`, then READS new-connection GETs of the run: their times.
    The drip stops before this returns."""
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(slow, stop), daemon=True)
    dripper.start()
    took = []
    try:
        for _ in range(READS):
            started = time.monotonic()
            # a new connection each time: it must find a free slot, not reuse one
            answer = requests.get(f"{url}/runs/{run_id}", auth=auth, timeout=5,
                                  headers={"Connection": "close"}, **kw)
            took.append(time.monotonic() - started)
            assert answer.status_code == 200, answer.text
            time.sleep(PAUSE)
        # the slow ones were still held open, not refused or dropped
        for s in slow[:5]:
            s.sendall(b"X-Drip: 1\r\n")
    finally:
        stop.set()
        dripper.join(DRIP + 5)
    return took


def assert_p95_under_a_second(took: list) -> None:
    p95 = sorted(took)[int(0.95 * READS) - 1]
    assert p95 < 1.0, f"p95 {p95:.3f} s, all: {[round(t, 3) for t in took]}"


def open_sockets_of(pid: int) -> int:
    """How many sockets process `pid` holds (its /proc fd links)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def close_all(sockets: list) -> None:
    for s in sockets:
        s.close()


def test_idle_and_slow_connections_leave_room_for_a_client(flood_server):
    srv = flood_server
    sockets = []
    try:
        # read while it runs: the flood and a module share the host, as they would
        run_id = srv.post("/runs", json=payload("flood", "map_crop")).json()["run_id"]
        parts = urlsplit(srv.url)
        address = (parts.hostname, parts.port)
        sockets += open_sockets(address, IDLE)
        slow = open_sockets(address, SLOW)
        sockets += slow
        assert_p95_under_a_second(reads_under_flood(srv.url, run_id, srv.auth, slow))
    finally:
        close_all(sockets)


@pytest.mark.tls
def test_the_same_flood_through_caddy(flood_server, tmp_path):
    """The flood against Caddy's HTTPS port: 500 that never start TLS, 100 that finish it
    and then drip header lines. Caddy holds them (its read_header and idle bounds cut them
    off later, 10 s and 2 min: test_tls checks the shipped values) and passes on only whole
    requests, so the client's GETs through it stay quick."""
    srv = flood_server
    caddy = Caddy(tmp_path, srv.url)
    sockets = []
    try:
        caddy.start()
        run_id = srv.post("/runs", json=payload("flood-caddy", "map_crop")).json()["run_id"]
        address = ("127.0.0.1", caddy.port)
        sockets += open_sockets(address, IDLE)
        slow = open_tls_sockets(address, SLOW, caddy.root_ca)
        sockets += slow
        # Caddy really holds the flood, rather than refusing it
        wait_for(lambda: open_sockets_of(caddy.proc.pid) >= IDLE + SLOW, timeout=10)
        took = reads_under_flood(caddy.url, run_id, srv.auth, slow, verify=caddy.root_ca)
        assert_p95_under_a_second(took)
    finally:
        close_all(sockets)
        caddy.stop()
