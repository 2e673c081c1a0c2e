"""Completion notices: when a run ends, its RunStatus is POSTed to the run's `notify_url`
and to `MIP_NOTIFY_URL`, signed, retried with backoff, and kept in the journal.

Not run directly: the server hooks check_payload() and record() into the run queue, runs
one Notifier thread, and answers GET /runs/{run_id}/notices from deliveries(). Receivers verify
`X-Mip-Signature-256: sha256=<hex HMAC-SHA256 of the body under MIP_NOTIFY_SECRET>`.

An API user names the URL, so the server must never be made to call its own network:
every address a host name resolves to is checked, at submit and again at each delivery
(DNS can change in between), the connection goes to the address that was checked, and
redirects are not followed. The receiver's answer body is never read into the journal
or the log; only its status code is kept.
"""

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from mip import journal
from mip.errors import Invalid
from mip.errors import MipError
from mip.settings import NoticeSettings
from mip.settings import origin

MAX_URL = 2048
POLL = 2.0  # seconds between looks for runs that ended without telling us (a queued cancel)
BATCH = 20  # deliveries tried per pass, so that a stop is never far off
USER_AGENT = "mip-notices"
# lookups in flight at once; one stuck in a resolver that never answers keeps its place
# until the resolver gives up, so those can never take every request thread
LOOKUPS = threading.BoundedSemaphore(4)

log = logging.getLogger("mip.notices")

# Never called unless MIP_NOTIFY_ALLOW lists them: the host itself, its networks, the cloud
# metadata service (169.254.169.254 is link-local) and whatever is not a unicast address.
# ipaddress's is_global covers most; these are checked by name so that the rule is visible.
REFUSED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
    # IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d) and local-use NAT64:
    # forms that may reach an IPv4 address ipaddress does not unwrap, none of them public
    "::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class Refused(Exception):
    """A notify URL or one of its addresses that the server will not call."""


class Unresolved(Refused):
    """A host name that did not resolve, or not in time: refused at submit, but at delivery
    a failed try like any other (a resolver down for a while must not lose notices)."""


# ---------------------------------------------------------------------------- settings

def check_settings(settings: NoticeSettings) -> None:
    """Hold MIP_NOTIFY_URL to the address rule at start (mip/settings.py reads it); raises
    MipError naming it. A literal address is checked now; a name at each delivery."""
    if not settings.url:
        return
    try:
        host, _ = split_url(settings.url)
        if is_literal(host):
            check_address(host, settings.allow)
    except Refused as e:
        raise MipError(f"MIP_NOTIFY_URL: {e}") from None


def split_url(url: str) -> tuple:
    """(host, port) of an http or https URL without credentials; raises Refused."""
    if len(url) > MAX_URL:
        raise Refused(f"longer than {MAX_URL} characters")
    # before parsing: urlsplit silently drops tabs and newlines
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise Refused("the URL has spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise Refused(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("expected an http:// or https:// URL")
    if not parts.hostname:
        raise Refused("the URL names no host")
    if parts.username is not None or parts.password is not None:
        # it would be stored, shown in the RunStatus and sent in clear: sign, do not embed
        raise Refused("the URL must not carry a user or password (the notice is signed)")
    if not parts.hostname.isascii():
        raise Refused("write the host name in ASCII (its xn-- form)")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_address(address: str, allow: tuple) -> None:
    """Raises Refused for an address on the host's own networks, unless allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if any(ip in net for net in allow if net.version == ip.version):
        return
    inner = ip
    if ip.version == 6:
        # an IPv4 address inside an IPv6 one reaches that IPv4 address
        if ip.ipv4_mapped:
            inner = ip.ipv4_mapped
        elif ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour:
            inner = ip.sixtofour
        if inner is not ip and any(inner in net for net in allow if net.version == 4):
            return
    for candidate in {ip, inner}:
        if (any(candidate in net for net in REFUSED_NETWORKS if net.version == candidate.version)
                or not candidate.is_global or candidate.is_multicast):
            raise Refused(f"{address} is a private, loopback, link-local or otherwise "
                          "non-public address (MIP_NOTIFY_ALLOW lets an operator allow it)")


def lookup(host: str, port: int, timeout: float) -> list:
    """socket.getaddrinfo, given up after `timeout` seconds: the resolver's own timeouts,
    tried for each name server and search domain, can add up to minutes, which would hold a
    request thread (at submit) or the one delivery thread. Raises Unresolved."""
    if not LOOKUPS.acquire(timeout=timeout):
        raise Unresolved(f"cannot resolve {host!r}: the resolver is not answering")
    answer = {}

    def work():
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            answer["error"] = e
        finally:
            LOOKUPS.release()

    thread = threading.Thread(target=work, daemon=True, name="notices-lookup")
    thread.start()
    thread.join(timeout)
    if "infos" in answer:
        return answer["infos"]
    if "error" in answer:
        raise Unresolved(f"cannot resolve {host!r}: {answer['error']}")
    raise Unresolved(f"cannot resolve {host!r}: no answer in {timeout:g} s")


def resolve(host: str, port: int, timeout: float = 10) -> list:
    """Every address `host` resolves to (a literal address is itself); raises Refused."""
    if is_literal(host):
        return [host]
    infos = lookup(host, port, timeout)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise Refused(f"{host!r} resolves to no address")
    return addresses


def checked_addresses(url: str, allow: tuple, timeout: float = 10) -> tuple:
    """(host, port, addresses): the URL's host resolved, EVERY address checked, since a
    connection could go to any of them. Raises Refused."""
    host, port = split_url(url)
    addresses = resolve(host, port, timeout)
    for address in addresses:
        check_address(address, allow)
    return host, port, addresses


def check_payload(settings: NoticeSettings, payload: dict) -> None:
    """Refuse a payload's notify_url that the server would not call. Raises Invalid
    notify_url_refused."""
    url = payload.get("notify_url")
    if url is None:
        return
    try:
        checked_addresses(url, settings.allow, settings.timeout)
    except Refused as e:
        raise Invalid(f"notify_url: {e}", "notify_url_refused") from None


# ---------------------------------------------------------------------------- journal

def targets(settings: NoticeSettings, payload: dict) -> list:
    """(url, source) of everyone to be told of a run's end. MIP_NOTIFY_URL is kept by its
    origin only (its path may hold a token) and read from the settings when sent."""
    out = []
    if payload.get("notify_url"):
        out.append((payload["notify_url"], "payload"))
    if settings.url:
        out.append((origin(settings.url), "server"))
    return out


def record(db: journal.Journal, settings: NoticeSettings, run_id: str, payload: dict) -> None:
    """Record, as `waiting`, the notices a new run will send when it ends: kept in the
    journal, a notice is sent even when the run ends while the server is down."""
    rows = targets(settings, payload)
    if not rows:
        return
    db.add_deliveries(run_id, rows)


def deliveries(db: journal.Journal, run_id: str) -> list:
    """A run's notices as answered by the API (MIP_NOTIFY_URL by its origin only)."""
    rows = db.deliveries(run_id)
    return [{"delivery_id": r["id"], "url": r["url"], "source": r["source"],
             "state": r["state"], "attempts": r["attempts"], "next_try": r["next_try"],
             "last_error": r["last_error"], "updated": r["updated"]} for r in rows]


def later(seconds: float) -> str:
    """utcnow() `seconds` from now, in the journal's text form (which sorts as time)."""
    when = datetime.now(UTC) + timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------- delivery

class PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand, while the Host header, TLS
    SNI and the certificate check use the URL's host name: nothing is resolved again."""

    def __init__(self, host: str, port: int, address: str, timeout: float,
                 context: ssl.SSLContext | None = None):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.context = context
        if context is not None:
            self.default_port = 443  # so that Host omits :443, as for any https client

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.context is not None:
            try:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock


def cut(conn: http.client.HTTPConnection) -> None:
    """Shut a connection down from another thread: unlike close(), this wakes a read that
    is blocked on it (the raw socket's shutdown, also under TLS)."""
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def sign(secret: str, body: bytes) -> str:
    """The X-Mip-Signature-256 value of a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, headers: dict, settings: NoticeSettings) -> int:
    """POST the body to the URL at an address checked now; the answer's status. The answer
    body is never read. Raises Refused (an address the server will not call) or OSError /
    http.client.HTTPException."""
    host, port, addresses = checked_addresses(url, settings.allow, settings.timeout)
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context = ssl.create_default_context() if parts.scheme == "https" else None
    error = None
    for address in addresses:
        conn = PinnedConnection(host, port, address, settings.timeout, context)
        # a receiver that answers a byte at a time must not hold the one delivery thread
        guard = threading.Timer(3 * settings.timeout, cut, args=(conn,))
        guard.daemon = True
        guard.start()
        try:
            conn.request("POST", target, body=body, headers=headers)
            return conn.getresponse().status
        except ConnectionRefusedError as e:
            error = e  # the next address may answer
        finally:
            guard.cancel()
            conn.close()
    raise error


class Notifier:
    """The one thread that sends due notices: each is tried up to `attempts` times, with a
    wait that doubles from `backoff`, and its state is kept in the journal, so that a
    restarted server carries on where it stopped."""

    def __init__(self, settings: NoticeSettings, db: journal.Journal, status_of, running):
        """`status_of(run_id)`: the run's RunStatus, or None once the run is deleted;
        `running`: the run ids whose end is not fully recorded yet."""
        self.settings = settings
        self.db = db
        self.status_of = status_of
        self.running = running
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, daemon=True, name="notices")

    def start(self) -> None:
        if not self.settings.secret:
            log.warning("MIP_NOTIFY_SECRET is not set: completion notices go out UNSIGNED, and "
                        "receivers cannot tell them from forgeries")
        self.thread.start()

    def stop(self, timeout: float = 5) -> None:
        """End the thread after the delivery in hand; pending ones resume at the next start."""
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def run_ended(self, run: dict) -> None:
        """A run-end callback of the RunQueue: look for due notices now."""
        self.wake.set()

    def loop(self) -> None:
        while not self.stopping:
            try:
                self.promote()
                due = self.due()
                for row in due:
                    if self.stopping:
                        return
                    self.attempt(row)
            except Exception:  # noqa: BLE001 - a journal hiccup must not end the notices
                log.exception("notices: a pass failed; trying again")
                due = []
            if len(due) < BATCH:
                self.wake.wait(self.wait_time())
                self.wake.clear()

    def promote(self) -> None:
        """Make the notices of runs that have ended due; those of deleted runs fail."""
        ended, orphans = self.db.deliveries_to_promote()
        ended = [run_id for run_id in ended if run_id not in self.running]
        if not ended and not orphans:
            return  # no write lock taken for nothing, every POLL seconds
        self.db.promote_deliveries(ended, orphans)

    def due(self) -> list:
        return self.db.due_deliveries(BATCH)

    def wait_time(self) -> float:
        """Seconds until the next pending notice is due, at most POLL."""
        due = self.db.next_delivery_time()
        if not due:
            return POLL
        due = datetime.strptime(due, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return max(0.05, min(POLL, (due - datetime.now(UTC)).total_seconds()))

    def attempt(self, row: dict) -> None:
        """Try one notice once and record how it went."""
        status = self.status_of(row["run_id"])
        if status is None:
            self.finish(row, "failed", "the run was deleted")
            return
        body = json.dumps(status).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "X-Mip-Delivery": row["id"], "X-Mip-Event": "run.ended"}
        if self.settings.secret:
            headers["X-Mip-Signature-256"] = sign(self.settings.secret, body)
        shown = origin(row["url"])
        url = row["url"] if row["source"] == "payload" else self.settings.url
        if not url:
            self.finish(row, "failed", "MIP_NOTIFY_URL is no longer set")
            return
        try:
            code = post(url, body, headers, self.settings)
            error = None if 200 <= code < 300 else (
                f"answered {code} (a redirect is not followed)" if 300 <= code < 400
                else f"answered {code}")
        except Unresolved as e:
            error = str(e)  # a resolver down or slow for a while: tried again later
        except Refused as e:
            # an address refused now, though not at submit: DNS changed; never retried
            log.warning("notice %s for run %s to %s refused: %s", row["id"], row["run_id"],
                        shown, e)
            self.finish(row, "failed", f"refused at delivery: {e}")
            return
        except http.client.HTTPException as e:
            # its text may quote the receiver's answer, which is never kept
            error = f"{type(e).__name__}: not a valid HTTP answer"
        except OSError as e:  # ssl.SSLError and timeouts too
            error = f"{type(e).__name__}: {e}"[:300]
        if error is None:
            log.info("notice %s for run %s delivered to %s", row["id"], row["run_id"], shown)
            self.finish(row, "delivered", None)
            return
        attempts = row["attempts"] + 1
        if attempts >= self.settings.attempts:
            log.warning("notice %s for run %s to %s failed for good after %d tries: %s",
                        row["id"], row["run_id"], shown, attempts, error)
            self.finish(row, "failed", error)
            return
        delay = self.settings.backoff * 2 ** (attempts - 1)
        log.info("notice %s for run %s to %s failed (%s); try %d in %d s", row["id"],
                 row["run_id"], shown, error, attempts + 1, delay)
        self.db.delivery_failed_attempt(row["id"], attempts, later(delay), error)

    def finish(self, row: dict, state: str, error: str | None) -> None:
        self.db.end_delivery(row["id"], state, error)


# ---------------------------------------------------------------------------- answers

# the answer of GET /runs/{run_id}/notices, items of deliveries()
NOTICE = {"type": "object", "properties": {
    "delivery_id": {"type": "string"}, "url": {"type": "string"},
    "source": {"enum": ["payload", "server"]},
    "state": {"enum": ["waiting", "pending", "delivered", "failed"]},
    "attempts": {"type": "integer"}, "next_try": {"type": ["string", "null"]},
    "last_error": {"type": ["string", "null"]}, "updated": {"type": "string"}},
    "required": ["delivery_id", "url", "source", "state", "attempts"]}
