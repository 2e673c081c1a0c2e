"""access: who may use the API, and how much of the server one kind of request may take.

Imported by mip_server.py; nothing to run. It owns:

- password hashes (pbkdf2) and the check of a basic-auth header against them;
- the cache of headers already found valid, so that a client's every request does not
  cost a 200,000-round pbkdf2 check;
- the throttle of wrong credentials: a budget of failures per client address, checked
  before any hashing, and one pbkdf2 check at a time (requests with the same header share
  it), so that many addresses together cannot take the CPU or the threads from everyone
  else;
- slots: a bound on long answers (zip downloads) held at once, so that slow readers never
  hold every request thread.

It never renders an HTTP answer and never imports the server: a refusal is a `Refused`
exception carrying the code, the message and the seconds to wait, which mip_server turns
into its JSON error with a `Retry-After` header.
"""

import base64
import functools
import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import OrderedDict

PBKDF2_ITERATIONS = 200_000
# A header found valid is trusted this long without hashing again; users are read once at
# start-up, so the cache can never outlive a password change (a restart empties it).
CACHE_SECONDS = 300
CACHE_SIZE = 1024  # headers kept; past it the oldest goes
# pbkdf2 releases the GIL but takes a whole core: one check at a time leaves the other
# cores to requests. A correct header is hashed once per CACHE_SECONDS, so one is plenty.
# While it runs, a client address with no failure on record may wait for it (a new client
# logging in during an attack); others are refused at once, and so is anyone past the
# waiting places, since each waiter holds a request thread.
WAITING_PLACES = 2
CHECK_WAIT = 3.0  # seconds a waiter waits at most
CHECK_BUSY_RETRY = 1  # Retry-After when a check is already running
ADDRESSES = 10_000  # failure budgets kept; those grown back whole are dropped first
DOWNLOAD_RETRY = 5  # Retry-After when every download slot is taken


class Refused(Exception):
    """Not now: answer with `code`, `message` and `Retry-After: retry_after`."""

    def __init__(self, code: str, message: str, retry_after: int):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


# ---------------------------------------------------------------------------- hashes

def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """`pbkdf2_sha256$<iterations>$<salt hex>$<hash hex>` for a users file."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a hash_password() string."""
    try:
        scheme, iterations, salt, expected = stored.split("$")
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt),
                                     int(iterations))
    except ValueError:
        return False
    return scheme == "pbkdf2_sha256" and hmac.compare_digest(digest.hex(), expected)


@functools.cache
def dummy_hash() -> str:
    """What an unknown user's password is checked against; made at the first check, not
    at import: a pbkdf2 costs tens of ms of the server's start-up."""
    return hash_password("not a password", b"0" * 16)


class LaterHash:
    """hash_password(password), made when Credentials first checks a header rather than
    at start (where MIP_PASSWORD was hashed at a cost of tens of ms); the password is
    dropped once hashed, and never shown."""

    def __init__(self, password: str):
        self._password = password
        self._hash = None
        self._lock = threading.Lock()

    def value(self) -> str:
        with self._lock:
            if self._hash is None:
                self._hash, self._password = hash_password(self._password), None
            return self._hash

    def __repr__(self) -> str:
        return "LaterHash(...)"


def parse_basic(header: str) -> tuple | None:
    """(user, password) of a basic-auth header; None when it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# ---------------------------------------------------------------------------- credentials

class Credentials:
    """Checks basic-auth headers against {user: hash}, cheaply for the known good ones and
    at a bounded cost for wrong ones. Thread-safe."""

    def __init__(self, users: dict, failures_per_minute: int, clock=time.monotonic,
                 cache_size: int = CACHE_SIZE):
        self.users = users
        self.rate = failures_per_minute / 60.0  # budget regained per second
        self.burst = float(failures_per_minute)
        self.clock = clock
        self.cache_size = cache_size
        # keyed by a MAC of the header (keyed BLAKE2b), never the password or the header
        # itself, under a random key that dies with the process
        self.key = secrets.token_bytes(32)
        self.verified = OrderedDict()  # MAC of header -> when it was found valid
        self.budgets = {}  # client address -> (failures left, when counted)
        self.lock = threading.Lock()
        self.slot = CheckSlot()
        self.flights = {}  # MAC of header -> Flight, while that header is being checked

    def check(self, header: str, address: str) -> bool:
        """True for valid credentials, False for none or wrong ones.
        Raises Refused when the address has spent its failures or a check is running;
        a header in the cache is never refused."""
        # keyed BLAKE2b is a MAC in one C call: HMAC-SHA256 through OpenSSL cost 4 us of
        # the status read's CPU here, for every request of every client
        token = hashlib.blake2b(header.encode(), key=self.key, digest_size=32).digest()
        # the cache first: a header in it was parsed when it was found valid
        if self.cached(token):
            return True
        parsed = parse_basic(header)
        if parsed is None:
            return False  # nothing to hash: costs nothing, counts nothing
        with self.lock:
            self.refuse_spent(address)
            clean = self.left(address) >= self.burst
            flight = self.flights.get(token)
            leader = flight is None
            if leader:
                flight = self.flights[token] = Flight()
            elif clean:
                flight.waiting += 1
        if not leader:
            return self.follow(flight, address, clean)
        try:
            flight.outcome = self.verify(parsed, token, address, clean)
        except Refused as e:
            flight.outcome = e
            raise
        finally:
            with self.lock:
                del self.flights[token]
            flight.done.set()
        return flight.outcome

    def follow(self, flight: "Flight", address: str, clean: bool) -> bool:
        """The outcome of the check of the same header that another request is making: a
        new client's first requests, sent at once, cost one check. An address with
        failures on record is refused at once instead, so that it never holds threads."""
        if not clean:
            raise self.busy(address)
        if not flight.done.wait(2 * CHECK_WAIT):
            raise self.busy(address)
        if isinstance(flight.outcome, Refused):
            raise flight.outcome
        if not flight.outcome:
            self.fail(address)
        return bool(flight.outcome)

    def verify(self, parsed: tuple, token: bytes, address: str, clean: bool) -> bool:
        """The pbkdf2 check itself, once the check slot is ours; a wrong answer is a
        failure of the address. Raises Refused when the slot is not to be had."""
        if not self.slot.take(CHECK_WAIT if clean else 0):
            raise self.busy(address)
        try:
            self.settle()
            user, password = parsed
            stored = self.users.get(user)
            # a dummy hash for unknown users too, so that timing does not reveal names
            ok = check_password(password, stored or dummy_hash()) and stored is not None
        finally:
            self.slot.give()
        if ok:
            self.remember(token)
        else:
            self.fail(address)
        return ok

    def settle(self) -> None:
        """Make the dummy hash and every hash left for later (LaterHash) at once, under the
        check slot: the first check then costs the same whichever user it names."""
        dummy_hash()
        if any(isinstance(h, LaterHash) for h in self.users.values()):
            self.users = {u: h.value() if isinstance(h, LaterHash) else h
                          for u, h in self.users.items()}

    def busy(self, address: str) -> Refused:
        """The refusal while a check runs. It counts as a failure: an address refused this
        way has failures on record and never waits, so the waiting places stay for
        addresses that are new."""
        self.fail(address)
        return Refused("auth_busy", "another credential check is running; try again",
                       CHECK_BUSY_RETRY)

    def cached(self, token: bytes) -> bool:
        # a fresh entry is read without the lock (one dict read is atomic): every request
        # of every thread passed here, and a contended lock cost more than the read
        when = self.verified.get(token)
        if when is not None and self.clock() - when < CACHE_SECONDS:
            return True
        with self.lock:
            when = self.verified.get(token)
            if when is None:
                return False
            if self.clock() - when < CACHE_SECONDS:
                return True
            del self.verified[token]
            return False

    def remember(self, token: bytes) -> None:
        with self.lock:
            self.verified[token] = self.clock()
            self.verified.move_to_end(token)
            while len(self.verified) > self.cache_size:
                self.verified.popitem(last=False)

    def refuse_spent(self, address: str) -> None:
        """Raises Refused when the address has no failure left; call under self.lock."""
        left = self.left(address)
        if left < 1:
            wait = math.ceil((1 - left) / self.rate)
            raise Refused("too_many_failures", f"too many wrong credentials from {address}; "
                                               f"try again in {wait} s", max(1, wait))

    def fail(self, address: str) -> None:
        """Count a failure of the address."""
        with self.lock:
            self.budgets[address] = (max(0.0, self.left(address) - 1), self.clock())
            if len(self.budgets) > ADDRESSES:
                self.forget()

    def left(self, address: str) -> float:
        """Failures the address may still make (the budget grows back over a minute)."""
        left, when = self.budgets.get(address, (self.burst, 0.0))
        return min(self.burst, left + (self.clock() - when) * self.rate)

    def forget(self) -> None:
        """Keep the budget table bounded: drop the addresses whose budget has grown back
        whole (the same as unknown), then the oldest half if that is not enough."""
        self.budgets = {a: b for a, b in self.budgets.items() if self.left(a) < self.burst}
        if len(self.budgets) > ADDRESSES:
            self.budgets = dict(list(self.budgets.items())[-ADDRESSES // 2:])


class Flight:
    """One check of a header in progress; requests with the same header wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.outcome = None  # True, False or the Refused the check ended with
        self.waiting = 0  # requests waiting for it (read by tests)


class CheckSlot:
    """The one pbkdf2 check running at a time. take(wait) with wait > 0 queues for it in
    one of WAITING_PLACES; take(0) gets it only when it is free and nobody is waiting, so
    that clients with failures on record never pass the ones waiting."""

    def __init__(self):
        self.cond = threading.Condition()
        self.busy = False
        self.waiting = 0

    def take(self, wait: float) -> bool:
        with self.cond:
            if not self.busy and not self.waiting:
                self.busy = True
                return True
            if wait <= 0 or self.waiting >= WAITING_PLACES:
                return False
            self.waiting += 1
            try:
                if not self.cond.wait_for(lambda: not self.busy, wait):
                    return False
            finally:
                self.waiting -= 1
            self.busy = True
            return True

    def give(self) -> None:
        with self.cond:
            self.busy = False
            # all: a waiter that has just timed out must not swallow the only wake-up
            self.cond.notify_all()


# ---------------------------------------------------------------------------- slots

class Slots:
    """At most `size` of something at once; a request beyond it is refused at once rather
    than made to wait, since a waiting request would hold a request thread too."""

    def __init__(self, size: int, code: str, what: str, retry_after: int = DOWNLOAD_RETRY):
        self.size = size
        self.code = code
        self.what = what
        self.retry_after = retry_after
        self.free = threading.BoundedSemaphore(size)

    def hold(self, parts):
        """`parts` (an iterable of response bytes) holding a slot until it ends, fails or
        is closed. Raises Refused when every slot is taken."""
        if not self.free.acquire(blocking=False):
            raise Refused(self.code, f"{self.size} {self.what} already in progress, the most "
                                     f"at once; try again in {self.retry_after} s",
                          self.retry_after)
        return Held(parts, self.free.release)


class Held:
    """An iterable that calls `release` once when it is exhausted, raises or is closed.
    The WSGI server calls close() on every answer, finished or not (a client gone
    mid-stream included); the first two cases cover a body that fails before the server
    sees it, which bottle would not close."""

    def __init__(self, parts, release):
        self.parts = iter(parts)
        self.release = release
        self.open = True
        self.lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.parts)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self.lock:
            if not self.open:
                return
            self.open = False
        try:
            close = getattr(self.parts, "close", None)
            if close:
                close()
        finally:
            self.release()
