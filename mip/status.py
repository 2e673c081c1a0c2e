"""status: the RunStatus, JobStatus and ModuleStatus answers built from journal rows, the
tails of logs they carry, and the cache of answers that can no longer change.

Used by the server's handlers and the notices (a completion notice carries a RunStatus).
Reads logs without following links or waiting on FIFOs; never writes.
"""

import json
import os
import stat
import threading
import time

from mip import gpus
from mip import journal
from mip.journal import FINISHED

LOG_TAIL = 8192


def log_tail(path: str | None, size: int = LOG_TAIL) -> str | None:
    """The last `size` bytes of a log file, from a line start; None if there is none."""
    if not path:
        return None
    try:
        # not through a link, nor waiting on a FIFO: a module (a container) may have put
        # either in its log's place
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return None
    if end > size and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace")


ANSWER_ITEM_MAX = 256 * 1024  # an answer larger than this (a huge payload) is never kept


class AnswerCache:
    """JSON bodies of status answers that only a new run can change, kept `ttl` seconds
    (None: for good). Status polling under load then costs no journal or log reads, which
    under contention cost far more than their few microseconds: each one gives up the GIL
    and waits to get it back. Bounded by `max_bytes` of bodies (the oldest go first) and
    `size` answers; a body over ANSWER_ITEM_MAX (or a sixteenth of `max_bytes`) is not
    kept at all, so a few huge payloads cannot push out every other answer."""

    def __init__(self, ttl: float | None, max_bytes: int = 64 * 2**20, size: int = 4096):
        self.ttl = ttl
        self.size = size
        self.max_bytes = max_bytes
        self.item_max = min(ANSWER_ITEM_MAX, max_bytes // 16)
        self.items = {}  # key -> (time, body), oldest first
        self.bytes = 0  # of the bodies kept: json.dumps writes ASCII, a byte a character
        self.lock = threading.Lock()

    def get(self, key):
        item = self.items.get(key)
        if item and (self.ttl is None or time.monotonic() - item[0] < self.ttl):
            return item[1]
        return None

    def put(self, key, body: str | bytes) -> str | bytes:
        with self.lock:
            self._drop(key)
            if len(body) > self.item_max:
                return body
            while self.items and (len(self.items) >= self.size
                                  or self.bytes + len(body) > self.max_bytes):
                self._drop(next(iter(self.items)))
            self.items[key] = (time.monotonic(), body)
            self.bytes += len(body)
        return body

    def drop(self, key) -> None:
        """Forget one answer."""
        with self.lock:
            self._drop(key)

    def _drop(self, key) -> None:
        item = self.items.pop(key, None)
        if item is not None:
            self.bytes -= len(item[1])

    def drop_job(self, job: str) -> None:
        """Forget the job's answers (a run of it was just submitted or cancelled here)."""
        with self.lock:
            for key in [k for k in self.items if k[1] == job]:
                self._drop(key)


def listed(text: str | None) -> list:
    """A journal column holding a JSON list of strings (warnings) as a list; [] for NULL."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def run_warnings(run: dict, executions: list) -> list:
    """A run's warnings (RunStatus, and JobStatus of its latest run): its own, then each of
    its modules' as `module: warning`, in the order they ran."""
    return listed(run.get("warnings")) + [
        f"{e['module']}: {w}" for e in executions for w in listed(e.get("warnings"))]


def run_status(db: journal.Journal, run: dict) -> dict:
    """The RunStatus of a journal row."""
    finished = run["status"] in FINISHED
    executions = db.executions(run["run_id"])
    return {
        "status": run["status"],
        "run_id": run["run_id"],
        "payload": run["payload"],
        "submit_time": run["submit_time"],
        "start_time": run["start_time"],
        "stop_time": run["stop_time"],
        "log": log_tail(run["log_path"]) if finished else None,
        "module_status": {e["module"]: e["status"] for e in executions},
        "warnings": run_warnings(run, executions),
    }


def notice_status(db: journal.Journal, run_id: str) -> dict | None:
    """The RunStatus a completion notice carries; None once the run is deleted."""
    run = db.run(run_id)
    return run and run_status(db, run)


def module_status(execution: dict) -> dict:
    """The ModuleStatus of an execution row."""
    finished = execution["status"] in FINISHED
    return {
        "status": execution["status"],
        "job": execution["job"],
        "module": execution["module"],
        "start_time": execution["start_time"],
        "stop_time": execution["stop_time"],
        "log": log_tail(execution["log_path"]) if finished else None,
        "run_id": execution["run_id"],
        "exit_code": execution["exit_code"],
        "message": execution["message"],
        "s3_uri": execution["upload_uri"] if execution["upload_status"] == "uploaded" else None,
        "upload_status": execution["upload_status"],
        "upload_message": execution["upload_message"],
        "resources": gpus.resources(**json.loads(execution.get("resources") or "{}")),
        "warnings": listed(execution.get("warnings")),
    }
