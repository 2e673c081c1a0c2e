"""idempotency: the `Idempotency-Key` header of POST /runs and POST /runs/{run_id}/rerun.

Not run directly: make_app makes one `Keys(db, secret)` and hands every submission to
`Keys.submit`. A client that sends a key with a submission and sends it again (its answer
was lost, the server was busy) gets the run the first one made, never a second run: the
same key and the same submission within KEEP_HOURS answer 200 with that run's RunStatus;
the same key with another submission is 409 `idempotency_key_reused`.

Submissions are compared by an HMAC, under a key derived from MIP_KEY_FILE, of their
canonical JSON (sorted keys, the OpenAI key and the route included), so neither the
payload's OpenAI key nor a digest anyone could recompute is stored. Keys live in the
journal (table idempotency_keys), so they survive a restart; each user has their own.
Its SQL is in journal.py; this file never starts a run itself, nor logs a key or a payload.
"""

import contextlib
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
from datetime import UTC
from datetime import datetime
from datetime import timedelta

import bottle

from mip import journal
from mip.errors import JournalUnavailable
from mip.web.apierror import ApiError

HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"[!-~]{1,255}")  # printable ASCII, no spaces, as Stripe's keys
KEEP_HOURS = 24
WAIT = 30  # seconds a repeat waits for the first request with its key to make its run
POLL = 0.05
# the header as /openapi.json declares it (openapi.Route.headers)
HEADERS = {HEADER: {
    "description": "a key of the caller's own (1 to 255 printable ASCII characters, no "
                   "spaces; a UUID will do): sent again with the same submission within "
                   f"{KEEP_HOURS} hours, it answers the run the first one made",
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}}}

log = logging.getLogger("mip.idempotency")


class Keys:
    """The Idempotency-Keys of submissions, in the journal `db`, compared under `secret`."""

    def __init__(self, db: journal.Journal, secret: bytes):
        self.db = db
        self.secret = secret
        # a key without a run was being answered when the server stopped: its request is
        # gone, so a retry must be free to make the run
        db.forget_unbound_idempotency_keys()

    def submit(self, payload: dict, openai_key: str | None, make_run) -> str:
        """The run id of this request's submission: `make_run()`'s when the request has no
        Idempotency-Key or a new one, else the run its key made (and the answer says
        `Idempotent-Replayed: true`). Raises ApiError 400 for a malformed key, 409 for a key
        used with another submission or still being answered, and what make_run raises."""
        key = header_key()
        if key is None:
            return make_run()
        request = bottle.request
        user = (request.auth or ("",))[0]  # the auth plugin has checked it
        digest = self.digest(f"{request.method} {request.path}", payload, openai_key)
        with full_is_507():
            run_id = self.claim(user, key, digest)
        if run_id is not None:
            log.info("run %s: the same submission again, with its Idempotency-Key", run_id)
            bottle.response.set_header("Idempotent-Replayed", "true")
            return run_id
        try:
            run_id = make_run()
        except BaseException:
            self.forget(user, key)  # nothing was made: a retry may try again
            raise
        try:
            self.db.bind_idempotency_key(user, key, run_id)
        except (sqlite3.Error, JournalUnavailable) as e:
            # the run is made and is the answer; a repeat will find the key still claimed
            log.warning("run %s: its Idempotency-Key could not be recorded: %s", run_id, e)
        return run_id

    def digest(self, route: str, payload: dict, openai_key: str | None) -> str:
        """The HMAC of a submission's canonical form. ASCII JSON: a lone surrogate in a
        string cannot break the encoding."""
        text = json.dumps({"route": route, "payload": payload, "openai_key": openai_key},
                          sort_keys=True, separators=(",", ":"))
        return hmac.new(self.secret, text.encode("ascii"), hashlib.sha256).hexdigest()

    def claim(self, user: str, key: str, digest: str) -> str | None:
        """Take `key` for a new submission (None), or the run id of the same submission
        already made with it. A repeat that arrives while the first is still being answered
        waits for its run. Raises ApiError 409."""
        deadline = time.monotonic() + WAIT
        while True:
            row = self.db.claim_idempotency_key(user, key, digest, expiry())
            if row is None:
                return None
            if not hmac.compare_digest(row["hmac"], digest):
                raise ApiError(409, "idempotency_key_reused",
                               f"this {HEADER} was sent with another submission in the last "
                               f"{KEEP_HOURS} hours; use a new key for a new submission")
            if row["run_id"]:
                return row["run_id"]
            if time.monotonic() > deadline:
                raise ApiError(409, "idempotency_key_in_use",
                               f"a request with this {HEADER} is still being answered; try "
                               "again later with the same key")
            time.sleep(POLL)

    def forget(self, user: str, key: str) -> None:
        try:
            self.db.free_idempotency_key(user, key)
        except (sqlite3.Error, JournalUnavailable) as e:
            # the refusal being answered says more; the claim goes at the next start
            log.warning("could not free an Idempotency-Key: %s", e)


@contextlib.contextmanager
def full_is_507():
    """A journal on a full disk answers 507, as a submission does, not 500."""
    try:
        yield
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
            raise
        raise ApiError(507, "insufficient_storage", "the journal's disk is full") from None


def header_key() -> str | None:
    """The request's Idempotency-Key, or None without one. Raises ApiError 400 when it is
    not 1 to 255 printable ASCII characters (the message does not repeat it)."""
    key = bottle.request.environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is None:
        return None
    if not KEY_RE.fullmatch(key):
        raise ApiError(400, "bad_idempotency_key",
                       f"{HEADER} must be 1 to 255 printable ASCII characters without spaces "
                       "(a UUID will do)")
    return key


def expiry() -> str:
    """The `created` time before which a key is forgotten, in journal.utcnow()'s form."""
    then = datetime.now(UTC) - timedelta(hours=KEEP_HOURS)
    return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"
