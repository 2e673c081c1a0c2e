"""idempotency: the `Idempotency-Key` header of POST /runs and POST /runs/{run_id}/rerun.

Not run directly: the server makes one `Keys(db, secret)` and hands every submission to
`Keys.submit`, with the user, the key (its header checked by the web layer) and the route.
A client that sends a key with a submission and sends it again (its answer
was lost, the server was busy) gets the run the first one made, never a second run: the
same key and the same submission within KEEP_HOURS answer 200 with that run's RunStatus;
the same key with another submission is 409 `idempotency_key_reused`.

Submissions are compared by an HMAC, under a key derived from MIP_KEY_FILE, of their
canonical JSON (sorted keys, the OpenAI key and the route included), so neither the
payload's OpenAI key nor a digest anyone could recompute is stored. Keys live in the
journal (table idempotency_keys), so they survive a restart; each user has their own.
Its SQL is in journal.py; this file never starts a run itself, nor logs a key or a payload,
and knows nothing of HTTP: it raises mip/errors.py's Conflict and DiskFull.
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

from mip import journal
from mip.errors import Conflict
from mip.errors import DiskFull
from mip.errors import JournalUnavailable

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

    def submit(self, user: str, key: str | None, route: str, payload: dict,
               openai_key: str | None, make_run) -> tuple:
        """(run id, replayed) of this submission: `make_run()`'s run when there is no key
        or a new one, else the run its key made (replayed True). `route` is the method and
        path the submission came by. Raises Conflict (idempotency_key_reused,
        idempotency_key_in_use), DiskFull, and what make_run raises."""
        if key is None:
            return make_run(), False
        digest = self.digest(route, payload, openai_key)
        with full_is_disk_full():
            run_id = self.claim(user, key, digest)
        if run_id is not None:
            log.info("run %s: the same submission again, with its Idempotency-Key", run_id)
            return run_id, True
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
        return run_id, False

    def digest(self, route: str, payload: dict, openai_key: str | None) -> str:
        """The HMAC of a submission's canonical form. ASCII JSON: a lone surrogate in a
        string cannot break the encoding."""
        text = json.dumps({"route": route, "payload": payload, "openai_key": openai_key},
                          sort_keys=True, separators=(",", ":"))
        return hmac.new(self.secret, text.encode("ascii"), hashlib.sha256).hexdigest()

    def claim(self, user: str, key: str, digest: str) -> str | None:
        """Take `key` for a new submission (None), or the run id of the same submission
        already made with it. A repeat that arrives while the first is still being answered
        waits for its run. Raises Conflict."""
        deadline = time.monotonic() + WAIT
        while True:
            row = self.db.claim_idempotency_key(user, key, digest, expiry())
            if row is None:
                return None
            if not hmac.compare_digest(row["hmac"], digest):
                raise Conflict(f"this {HEADER} was sent with another submission in the last "
                               f"{KEEP_HOURS} hours; use a new key for a new submission",
                               "idempotency_key_reused")
            if row["run_id"]:
                return row["run_id"]
            if time.monotonic() > deadline:
                raise Conflict(f"a request with this {HEADER} is still being answered; try "
                               "again later with the same key", "idempotency_key_in_use")
            time.sleep(POLL)

    def forget(self, user: str, key: str) -> None:
        try:
            self.db.free_idempotency_key(user, key)
        except (sqlite3.Error, JournalUnavailable) as e:
            # the refusal being answered says more; the claim goes at the next start
            log.warning("could not free an Idempotency-Key: %s", e)


@contextlib.contextmanager
def full_is_disk_full():
    """A journal on a full disk is DiskFull (507), as a submission's is, not a 500."""
    try:
        yield
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
            raise
        raise DiskFull("the journal's disk is full") from None


def expiry() -> str:
    """The `created` time before which a key is forgotten, in journal.utcnow()'s form."""
    then = datetime.now(UTC) - timedelta(hours=KEEP_HOURS)
    return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"
