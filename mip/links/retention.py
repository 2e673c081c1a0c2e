"""retention: deleting jobs, modules' files and runs, and the sweeper that keeps the disk.

Not run directly: the server's DELETE /jobs/{job}, DELETE /jobs/{job}/{module} and
DELETE /runs/{run_id} call Remover.delete_job, delete_module and delete_run, and
mip_server.main() starts the Sweeper. They raise mip/errors.py's exceptions (JobBusy,
Conflict, NotFound, Unavailable), never HTTP answers. The sweeper removes what
MIP_RETAIN_*_DAYS say is old (the maps the CDR link downloaded go with the temps), and
temps (then, with MIP_SWEEP_OUTPUTS=1, outputs already in S3) when free space falls below
MIP_SWEEP_FREE_MB.

It never touches a job with a run queued or running: every removal happens under the run
queue's lock, after that check, so a run submitted meanwhile waits and then finds the job
whole or gone, never half-deleted. Paths are made from checked names only, and a symlink
is removed, never followed.
"""

import logging
import os
import shutil
import stat
import threading
import time
from datetime import UTC
from datetime import datetime

from mip.errors import Conflict
from mip.errors import JobBusy
from mip.errors import NotAFolder
from mip.errors import NotFound
from mip.errors import Unavailable
from mip.files import free_mb
from mip.files import open_folder
from mip.journal import Status
from mip.s3 import list_objects
from mip.s3 import s3_client
from mip.s3 import s3_key_prefix
from mip.settings import RetentionSettings
from mip.settings import Settings

log = logging.getLogger("mip.retention")


class S3Refused(Exception):
    """The store refused to delete some of the keys it was sent."""


DAY = 86400
DONE_BY_MIPPER = (Status.PASSED, Status.FAILED)
SETTLE = 10  # seconds a delete waits for a run that just ended to be let go
S3_BATCH = 1000  # the most keys one DeleteObjects call takes

# the answer of the DELETE routes
REMOVED = {
    "type": "object",
    "required": ["deleted", "removed", "runs", "s3_objects"],
    "properties": {
        "deleted": {"enum": ["job", "module", "run"]},
        "removed": {"type": "array", "items": {"type": "string"},
                    "description": "files and folders removed, relative to the data folders"},
        "runs": {"type": "array", "items": {"type": "string"},
                 "description": "run records removed"},
        "s3_objects": {"type": "integer", "minimum": 0,
                       "description": "S3 objects removed (only with ?s3=1)"},
    },
}


def free_space(settings: Settings) -> dict:
    """{folder: free MB} of the runs, outputs and temps folders, for GET /."""
    return {name: free_mb(path) for name, path in (
        ("runs", settings.runs_dir), ("outputs", settings.outputs_dir),
        ("temps", settings.temps_dir))}


def iso_ago(now: float, days: int) -> str:
    """journal.utcnow()'s text of `days` before `now`, to compare with recorded times."""
    then = datetime.fromtimestamp(now - days * DAY, UTC)
    return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"


# ---------------------------------------------------------------------------- removing

def kept(settings: Settings) -> tuple:
    """The server's own files and folders, real paths: no removal may reach them. A job name
    may be any of their names (`logs`, `gpus`, `journal.db`), and an operator may set the
    outputs or temps folder to the runs folder, or put one inside another."""
    runs = settings.runs_dir
    paths = [runs, settings.outputs_dir, settings.temps_dir, settings.inputs_dir,
             settings.repos_dir, settings.config_path, settings.key_file,
             os.path.join(runs, "logs"), os.path.join(runs, "gpus"),
             os.path.join(runs, "runners.log")]
    paths += [settings.journal_path + tail for tail in ("", "-wal", "-shm")]
    return tuple(os.path.realpath(p) for p in paths if p)


def remove(root: str, *parts: str, keep: tuple = ()) -> str | None:
    """Remove `root/parts...` (a folder, a file, or a symlink itself, never what it points
    to); its name relative to root's parent when something was there, else None. Refused
    (None, with a warning) when a folder on the way is a symlink, which could lead out of
    the data folders, or when it is or holds one of the paths `keep` (kept()). Everything
    is reached from descriptors opened with O_NOFOLLOW, never by a path a module could
    have changed since it was checked."""
    path = os.path.join(root, *parts)
    # the folders on the way are opened below without following a link, so this is the
    # real path of what is removed
    real = os.path.join(os.path.realpath(root), *parts)
    held = [k for k in keep if k == real or k.startswith(real + os.sep)]
    if held:
        log.warning("not removing %s: it is or holds %s, which the server needs", path, held[0])
        return None
    try:
        parent = open_folder(root, *parts[:-1], label=os.path.basename(root))
    except NotAFolder:
        log.warning("not removing %s: a folder on its way is a symlink (or not a folder)",
                    path)
        return None
    if parent is None:
        return None
    try:
        if not remove_at(parent, parts[-1], path):
            return None
    finally:
        os.close(parent)
    return "/".join((os.path.basename(root), *parts))


def remove_at(parent: int, name: str, path: str) -> bool:
    """Remove `name` from the folder `parent`, a whole folder through its descriptors;
    False when nothing was there."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        # shutil's rmtree with dir_fd walks by descriptor and never follows a link
        # (shutil.rmtree.avoids_symlink_attacks), which is what a hand-written walk would do
        shutil.rmtree(name, dir_fd=parent, ignore_errors=True)
        if os.path.lexists(path):
            log.warning("cannot remove all of %s", path)
    else:
        try:
            os.unlink(name, dir_fd=parent)
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)
    return True


class Remover:
    """What the routes and the sweeper share: the busy check and each kind of removal,
    with the journal and the answer caches kept in step."""

    def __init__(self, cfg, db, queue, caches=()):
        self.settings = cfg.settings
        self.db = db
        self.queue = queue
        self.caches = caches  # mip_server.AnswerCache objects holding job and run answers
        self.keep = kept(cfg.settings)

    def busy(self, job: str) -> bool:
        """True while a run of the job is queued or running, or its end is not yet
        recorded by the server. Call it under self.queue.lock."""
        return (self.db.job_busy(job)
                or any(j == job for j, _ in self.queue.running.values()))

    def settle(self, job: str, timeout: float = SETTLE) -> None:
        """Wait a little for the job's runs whose mipper has recorded their end (and only
        exits now) to be let go by the run queue, so that a delete right after a run's end
        is not refused for it."""
        for run_id, (j, _) in list(self.queue.running.items()):
            if j == job and (self.db.run(run_id) or {}).get("status") in DONE_BY_MIPPER:
                self.queue.wait_gone(run_id, timeout)

    def forget(self, job: str, run_ids=()) -> None:
        """Drop the cached answers about the job and its runs."""
        for cache in self.caches:
            cache.drop_job(job)
            for run_id in run_ids:
                cache.drop(("run", run_id))

    def module(self, job: str, module: str, why: str, forget_upload: bool = False) -> list:
        """Remove a module's outputs, temps and log, and set it back to not_started."""
        s = self.settings
        self.db.reset_module(job, module, why, forget_upload)
        keep = self.keep
        removed = [remove(s.outputs_dir, job, module, keep=keep),
                   remove(s.outputs_dir, job, f"{module}.log", keep=keep),
                   remove(s.temps_dir, job, module, keep=keep)]
        self.forget(job, self.db.run_ids(job))
        return [r for r in removed if r]

    def outputs(self, job: str, module: str, why: str) -> list:
        """Remove a module's outputs and its log (its temps stay); back to not_started."""
        s = self.settings
        self.db.reset_module(job, module, why, False)
        removed = [remove(s.outputs_dir, job, module, keep=self.keep),
                   remove(s.outputs_dir, job, f"{module}.log", keep=self.keep)]
        self.forget(job, self.db.run_ids(job))
        return [r for r in removed if r]

    def temps(self, job: str) -> str | None:
        """Remove the job's temps folder; module states do not change."""
        return remove(self.settings.temps_dir, job, keep=self.keep)

    def job(self, job: str) -> tuple:
        """Remove the job's folders, records and run logs; (removed, run ids)."""
        run_ids = self.db.run_ids(job)
        logs = self.db.delete_job(job)
        removed = [remove(self.settings.outputs_dir, job, keep=self.keep),
                   remove(self.settings.temps_dir, job, keep=self.keep)]
        removed += [self.run_log(path) for path in logs]
        self.forget(job, run_ids)
        return [r for r in removed if r], run_ids

    def cdr_map(self, cog_id: str) -> str | None:
        """Remove a map the CDR link downloaded; the next event for it downloads it again."""
        removed = remove(self.settings.inputs_dir, "maps", cog_id, keep=self.keep)
        self.db.forget_fetched(cog_id)
        return removed

    def run(self, run: dict) -> list:
        """Remove a finished run's record and log."""
        self.db.delete_run(run["run_id"])
        removed = self.run_log(run["log_path"])
        self.forget(run["job"], [run["run_id"]])
        return [removed] if removed else []

    def run_log(self, path: str) -> str | None:
        """Remove a run's log, if it is in the runs' log folder (where the server puts it)."""
        folder = os.path.join(self.settings.runs_dir, "logs")
        if os.path.dirname(path) != folder:
            return None
        return remove(self.settings.runs_dir, "logs", os.path.basename(path), keep=self.keep)

    def s3(self, job: str, module: str | None = None) -> int:
        """Delete the S3 objects under the job's (or the module's) prefix; how many.
        Raises Unavailable when the store cannot be reached."""
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError

        s = self.settings
        if not s.s3_bucket:
            return 0
        prefix = (s3_key_prefix(s, job, module) if module
                  else "/".join(p for p in (s.s3_prefix, job) if p)) + "/"
        count = 0
        try:
            client = s3_client()
            keys = [{"Key": o["Key"]} for o in list_objects(client, s.s3_bucket, prefix)]
            for start in range(0, len(keys), S3_BATCH):
                batch = keys[start:start + S3_BATCH]
                done = client.delete_objects(Bucket=s.s3_bucket,
                                             Delete={"Objects": batch, "Quiet": True})
                # a refused key is reported in the answer, not raised
                failed = done.get("Errors") or []
                count += len(batch) - len(failed)
                if failed:
                    raise S3Refused(f"{failed[0].get('Key')}: {failed[0].get('Code')} "
                                    f"{failed[0].get('Message')}")
        except (BotoCoreError, ClientError, S3Refused) as e:
            log.warning("S3 deletion under %s failed after %d objects: %s", prefix, count, e)
            raise Unavailable(f"S3 objects under {prefix} could not be deleted ({count} were): "
                              f"{e}; nothing on the server was removed") from None
        return count

    # ------------------------------------------------------------------ on request

    def refuse_busy(self, job: str) -> None:
        """Raises JobBusy while a run of the job is queued or running."""
        if self.busy(job):
            raise JobBusy(f"job {job!r} has a run queued or running; cancel it or wait for "
                          "its end, then delete")

    def delete_module(self, job: str, module: str, s3: bool) -> dict:
        """Remove a module's files (and with `s3` its S3 copies) for DELETE
        /jobs/{job}/{module}; the answer. Raises JobBusy, Unavailable."""
        self.settle(job)
        with self.queue.lock:
            self.refuse_busy(job)
            count = self.s3(job, module) if s3 else 0
            removed = self.module(job, module, f"deleted on request at {now_text()}",
                                  forget_upload=s3)
        log.info("deleted module %s of job %s: %s; %d S3 objects", module, job,
                 " ".join(removed) or "no files", count)
        return answer("module", removed, s3_objects=count)

    def delete_job(self, job: str, s3: bool) -> dict:
        """Remove a whole job for DELETE /jobs/{job}; the answer. Raises NotFound (another
        delete took it meanwhile), JobBusy, Unavailable."""
        self.settle(job)
        with self.queue.lock:
            if self.db.job_map(job) is None:
                raise NotFound(f"no job {job!r}; GET /jobs lists them", "unknown_job")
            self.refuse_busy(job)
            count = self.s3(job) if s3 else 0
            removed, runs = self.job(job)
        log.info("deleted job %s: %s; %d run records; %d S3 objects", job,
                 " ".join(removed) or "no files", len(runs), count)
        return answer("job", removed, runs, count)

    def delete_run(self, run: dict) -> dict:
        """Remove a finished run's record and log for DELETE /runs/{run_id}; the answer.
        Raises NotFound (another delete took it meanwhile), JobBusy, or Conflict
        run_holds_job_state when it is its job's latest run or holds a module's latest
        state."""
        run_id = run["run_id"]
        self.settle(run["job"])
        with self.queue.lock:
            run = self.db.run(run_id)
            if run is None:
                raise NotFound(f"no run {run_id!r}; GET /runs lists them", "unknown_run")
            self.refuse_busy(run["job"])
            if self.db.holds_job_state(run_id):
                raise Conflict(f"run {run_id!r} is job {run['job']!r}'s latest run or holds "
                               "the latest state of one of its modules; DELETE "
                               f"/jobs/{run['job']} (or /jobs/{run['job']}/MODULE) instead",
                               "run_holds_job_state")
            removed = self.run(run)
        log.info("deleted run %s of job %s", run_id, run["job"])
        return answer("run", removed, [run_id])


def answer(kind: str, removed: list, runs=(), s3_objects: int = 0) -> dict:
    """What a delete removed (REMOVED)."""
    return {"deleted": kind, "removed": removed, "runs": list(runs), "s3_objects": s3_objects}


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------- sweeper

class Sweeper:
    """A thread that, every `interval` seconds, removes what the retention settings say
    is old and frees space below the floor; one log line per removal. Never raises."""

    def __init__(self, rs: RetentionSettings, remover: Remover):
        self.rs = rs
        self.remover = remover
        self.stopping = threading.Event()
        self.thread = None

    def start(self) -> None:
        """Start sweeping, if any retention setting or the floor is set."""
        if self.rs.active and self.thread is None:
            log.info("%s", describe(self.rs))
            self.thread = threading.Thread(target=self.loop, daemon=True, name="sweeper")
            self.thread.start()

    def stop(self, timeout: float = 10) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("the sweep failed; trying again in %d s", self.rs.interval)
            self.stopping.wait(self.rs.interval)

    def sweep(self, now: float | None = None) -> None:
        """One pass: old temps, outputs and runs, runners.log, then the floor."""
        now = time.time() if now is None else now
        rs, r = self.rs, self.remover
        if rs.temps_days is not None:
            cutoff = iso_ago(now, rs.temps_days)
            for job in self.ended_before(cutoff):
                self.locked(job, lambda j: self.log_temps(j, f"ended over {rs.temps_days} days "
                                                             "ago (MIP_RETAIN_TEMPS_DAYS)"),
                            cutoff)
            for cog_id, changed in r.db.fetched_maps():
                self.locked(cog_id, lambda j, c=changed: self.log_cdr_map(
                    j, c, cutoff, f"ended over {rs.temps_days} days ago (MIP_RETAIN_TEMPS_DAYS)"))
        if rs.outputs_days is not None:
            why = f"ended over {rs.outputs_days} days ago (MIP_RETAIN_OUTPUTS_DAYS)"
            cutoff = iso_ago(now, rs.outputs_days)
            for job in self.ended_before(cutoff):
                for module in r.db.job_modules(job):
                    self.locked(job, lambda j, m=module: self.log_outputs(j, m, why), cutoff)
        if rs.runs_days is not None:
            cutoff = iso_ago(now, rs.runs_days)
            for run in r.db.old_runs(cutoff):
                self.locked(run["job"], lambda j, run=run: self.log_run(run))
            self.trim_runners_log(now - rs.runs_days * DAY)
        if rs.sweep_free_mb:
            self.floor()

    def ended_before(self, cutoff: str) -> list:
        return [job for job, stop in self.remover.db.finished_jobs() if stop and stop < cutoff]

    def locked(self, job: str, action, ended_before: str | None = None) -> None:
        """Run action(job) under the queue's lock, unless the job is busy or, with
        `ended_before`, its latest run no longer ended before then: a long sweep works from
        a list read at its start, and a job run again since is not old any more."""
        if self.stopping.is_set():
            return
        with self.remover.queue.lock:
            if self.remover.busy(job):
                return
            if ended_before is not None:
                stop = self.remover.db.job_ended(job)
                if not (stop and stop < ended_before):
                    return
            action(job)

    def log_temps(self, job: str, why: str) -> None:
        removed = self.remover.temps(job)
        if removed:
            log.info("sweep: removed %s: job %s %s", removed, job, why)

    def log_cdr_map(self, cog_id: str, changed: str, cutoff: str, why: str) -> None:
        """Remove the map of a CDR cog whose events and runs all ended before `cutoff`:
        an input fetched for the run, kept as long as its temps."""
        db = self.remover.db
        if max(changed, db.job_ended(cog_id) or "") >= cutoff or db.cog_in_hand(cog_id):
            return
        removed = self.remover.cdr_map(cog_id)
        if removed:
            log.info("sweep: removed %s: the CDR map of job %s %s", removed, cog_id, why)

    def log_outputs(self, job: str, module: str, why: str) -> None:
        s = self.remover.settings
        if not (os.path.lexists(os.path.join(s.outputs_dir, job, module))
                or os.path.lexists(os.path.join(s.outputs_dir, job, f"{module}.log"))):
            return
        removed = self.remover.outputs(job, module, f"outputs removed by the sweeper at "
                                                    f"{now_text()}: job {why}")
        log.info("sweep: removed %s: job %s %s; module %s now not_started",
                 " ".join(removed), job, why, module)

    def log_run(self, run: dict) -> None:
        if self.remover.db.run(run["run_id"]) is None:
            return
        self.remover.run(run)
        log.info("sweep: removed run %s of job %s: ended %s (MIP_RETAIN_RUNS_DAYS)",
                 run["run_id"], run["job"], run["stop_time"])

    def trim_runners_log(self, cutoff: float) -> None:
        """Drop the lines of runners.log older than `cutoff`, while no run writes to it
        (a running mipper holds it open and would go on writing to the old file)."""
        path = os.path.join(self.remover.settings.runs_dir, "runners.log")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cutoff))
        with self.remover.queue.lock:
            if self.remover.queue.running or self.remover.db.runs_with_status(Status.RUNNING):
                return
            dropped = 0
            try:
                with open(path, "rb") as f:
                    # lines start with their ISO 8601 UTC time stamp, oldest first
                    for line in iter(f.readline, b""):
                        if line[:19].decode("ascii", "replace") >= stamp:
                            f.seek(-len(line), os.SEEK_CUR)
                            break
                        dropped += 1
                    if dropped == 0:
                        return
                    with open(path + ".new", "wb") as new:
                        shutil.copyfileobj(f, new)
                os.replace(path + ".new", path)
            except OSError as e:
                log.warning("sweep: cannot trim %s: %s", path, e)
                return
        log.info("sweep: removed %d lines of runners.log older than %s "
                 "(MIP_RETAIN_RUNS_DAYS)", dropped, stamp)

    def floor(self) -> None:
        """Below MIP_SWEEP_FREE_MB: the temps of the jobs that ended longest ago, then
        (with MIP_SWEEP_OUTPUTS=1) their modules' outputs already in S3, until above."""
        s, rs = self.remover.settings, self.rs

        def low(path):
            free = free_mb(path)
            return free is not None and free < rs.sweep_free_mb

        jobs = [job for job, _ in self.remover.db.finished_jobs()]
        why = f"free space below MIP_SWEEP_FREE_MB={rs.sweep_free_mb}"
        for job in jobs:
            if not low(s.temps_dir):
                break
            self.locked(job, lambda j: self.log_temps(j, f"ended; {why}"))
        if not (rs.sweep_outputs and s.s3_bucket):
            if low(s.outputs_dir) or low(s.temps_dir):
                log.warning("sweep: %s and no temps left to remove%s", why,
                            "" if rs.sweep_outputs else " (outputs stay: MIP_SWEEP_OUTPUTS=0)")
            return
        for job in jobs:
            for module in self.remover.db.job_modules(job):
                if not low(s.outputs_dir):
                    return
                self.locked(job, lambda j, m=module: self.in_s3(j, m) and self.log_outputs(
                    j, m, f"ended, outputs in S3; {why}"))

    def in_s3(self, job: str, module: str) -> bool:
        last = self.remover.db.latest_execution(job, module)
        return bool(last and last["status"] == Status.PASSED
                    and last["upload_status"] == "uploaded")


def describe(rs: RetentionSettings) -> str:
    """One line of what the sweeper keeps, for the start-up log."""
    def days(d):
        return "forever" if d is None else f"{d} days"
    return (f"retention: temps {days(rs.temps_days)}, outputs {days(rs.outputs_days)}, runs "
            f"{days(rs.runs_days)}; floor {rs.sweep_free_mb or 'off'} MB"
            f"{', outputs in S3 too' if rs.sweep_outputs else ''}; sweep every "
            f"{rs.interval} s")

