"""mipper: runs TA1 modules for one job and map as a luigi graph, recording each in the journal.

    source env.sh
    python mipper.py --job alpha --map WY_CO_Peach --module map_crop
    python mipper.py --job alpha --map WY_CO_Peach --module ALL --force-rerun
    python mipper.py --list-modules
    python mipper.py --list-deps geopackage

The server starts each run as `python mipper.py --run-id ID ...` in a process group of its
own. This file is the command line and the luigi graph only: the catalogue, maps, settings,
S3 and the journal live in the mip package, which never imports luigi.
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from dataclasses import field

from mip import VERSION
from mip import checks
from mip import gpus
from mip import journal
from mip import maps
from mip import runners
from mip import sanitize
from mip import switches
from mip.catalogue import CHECKED_ENV
from mip.catalogue import Module
from mip.catalogue import ancestors
from mip.catalogue import check_extra
from mip.catalogue import check_name
from mip.catalogue import expand_modules
from mip.catalogue import gpu_refusal
from mip.catalogue import launch
from mip.catalogue import load_catalogue
from mip.catalogue import local_gpu_modules
from mip.catalogue import module_checks
from mip.catalogue import module_env
from mip.catalogue import module_outputs
from mip.catalogue import module_runner
from mip.errors import EXIT_FAILED
from mip.errors import EXIT_OK
from mip.errors import EXIT_USAGE
from mip.errors import CatalogueError
from mip.errors import Invalid
from mip.errors import MipError
from mip.errors import ModuleFailed
from mip.errors import UsageError
from mip.journal import Status
from mip.maps import check_map
from mip.s3 import record_upload
from mip.s3 import upload_missing
from mip.settings import Settings
from mip.status import run_warnings

# luigi imports requests (its central scheduler's client), tornado (through tenacity) and
# jsonschema (for DictParameter's schemas) whenever they are installed: about a tenth of
# a CPU-second at every run, for nothing a run asks of luigi. Each is optional to luigi,
# which does without it (a central scheduler is then reached through urllib), so luigi's
# import does not see them; whatever imports them later finds them as usual.
_UNSEEN = [n for n in ("requests", "tornado", "jsonschema") if n not in sys.modules]
sys.modules.update(dict.fromkeys(_UNSEEN))
try:
    import luigi  # noqa: E402
    import luigi.interface  # noqa: E402
    import luigi.worker  # noqa: E402
finally:
    for _name in _UNSEEN:
        if sys.modules.get(_name, False) is None:
            del sys.modules[_name]

log = logging.getLogger("mip.mipper")


# ---------------------------------------------------------------------------- a run

@dataclass
class Run:
    """Everything one mipper run needs; shared with luigi tasks (forked, so read-only)."""

    settings: Settings
    catalogue: dict
    db: journal.Journal
    run_id: str
    job: str
    map_name: str
    graph: list
    to_run: set
    extra: dict
    env: dict
    passed_before: dict = field(default_factory=dict)  # module -> last pass when planned

    def done(self, name: str) -> bool:
        """True when the module need not run: it passed before and nothing forces it, or it
        passed since this run was planned (here, or in another mipper sharing a central
        luigi scheduler)."""
        if name not in self.to_run:
            return True
        last = self.db.latest_execution(self.job, name)
        return (last is not None and last["status"] == "passed"
                and last["id"] > self.passed_before.get(name, 0))

    def run_module(self, module: Module, how: runners.Launch, log_path: str,
                   used: dict) -> tuple:
        """Run the module with its log open; (exit code, message when it failed, the
        WARNING lines it logged). `used` gets what it used of the host (gpus.RESOURCE_KEYS)."""
        name = module.name
        job_out = os.path.join(self.settings.outputs_dir, self.job)
        with open(log_path, "wb") as out:
            out.write(f"# {name} {module.version}: {journal.utcnow()}\n"
                      f"# switches: {shlex.join(how.switches)}\n".encode())
            if how.gpu_device is not None:
                out.write(f"# GPU: device {how.gpu_device}, after "
                          f"{used['waited_for_gpu_seconds']} s waiting for it\n".encode())
            out.flush()
            since = out.tell()  # the module's own output starts here
            try:
                # again at the last moment: a module run since the run was checked may have
                # made a symlink that now leads a path out of the job
                check_extra(self.settings, self.catalogue, self.job,
                            {name: self.extra.get(name, ())})
                with gpus.GpuSampler(how.gpu_device) as sampler:
                    code, message = runners.run(module_runner(self.settings, module), how,
                                                out, self.settings.runner_settings, used)
                used.update(sampler.figures())
            except runners.RunnerError as e:
                code, message = None, str(e)
            except switches.Refused as e:
                code, message = None, f"extra switches refused: {e}"
            if message is not None and code is not None:
                out.flush()
                reason = runners.failure_reason(log_path, since)
                if reason:
                    message = f"{message}: {reason}"
            if message is None:
                missing = [os.path.relpath(p, job_out)
                           for p in module_outputs(self.settings, module, self.job, self.map_name)
                           if not os.path.exists(p)]
                if missing:
                    message = f"exited 0 but did not write {', '.join(missing)}"
            if message is None:
                message = next(filter(None, map(checks.failure, module_checks(
                    self.settings, module, self.job, self.map_name))), None)
            out.flush()
            warned = runners.logged_warnings(log_path, since)
            status = Status.FAILED if message else Status.PASSED
            out.write(f"# {name} {status.value}"
                      f"{': ' + message if message else ''}: {journal.utcnow()}\n".encode())
        return code, message, warned

    def execute(self, name: str) -> None:
        """Run one module to its end and record it; raises ModuleFailed."""
        module = self.catalogue[name]
        job_out = os.path.join(self.settings.outputs_dir, self.job)
        for folder in (os.path.join(job_out, name),
                       os.path.join(self.settings.temps_dir, self.job, name)):
            # a rerun starts clean, so that stale outputs cannot pass for new ones
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        log_path = os.path.join(job_out, f"{name}.log")
        how = launch(self.settings, module, self.job, self.map_name, self.run_id,
                     self.extra.get(name, ()), self.env)
        exec_id = self.db.start_execution(self.run_id, self.job, name, log_path)
        log.info("module %s started", name)
        started = time.monotonic()
        used = gpus.resources()
        slot = None
        warned = []
        try:
            slot = self.take_gpu(module, exec_id)
            if slot is not None:
                how = dataclasses.replace(how, gpu_device=slot.device, gpu_fd=slot.fd)
                used.update(gpu_device=slot.device, waited_for_gpu_seconds=slot.waited)
                self.db.set_execution_progress(exec_id, None, used, started=True)
            code, message, warned = self.run_module(module, how, log_path, used)
        except gpus.NoGpu as e:
            code, message = None, str(e)
        except Exception as e:  # noqa: BLE001 - the execution must not stay `running`
            # a full outputs disk: the module's log cannot be written, or it fails oddly
            code, message = None, f"mipper could not run the module or keep its log: {e}"
        finally:
            gpus.release(slot)
        self.db.finish_execution(exec_id, Status.FAILED if message else Status.PASSED, code,
                                 message, used, warned)
        took = time.monotonic() - started
        if message:
            log.error("module %s failed after %.1f s: %s", name, took, message)
            raise ModuleFailed(f"{name}: {message}")
        log.info("module %s passed in %.1f s%s", name, took, counted(warned))
        if self.settings.s3_bucket:
            record_upload(self.settings, self.db, self.db.latest_execution(self.job, name))

    def take_gpu(self, module: Module, exec_id: int) -> gpus.Slot | None:
        """A GPU slot for a GPU module run on this host, waiting (as `running`, with the
        message gpus.WAITING) while every device is held; None when the module needs
        none, runs on ECS, or the host has no GPU. Raises gpus.NoGpu."""
        devices = self.settings.gpu_settings.devices
        if not devices or not local_gpu_modules(self.settings, self.catalogue, [module.name]):
            return None

        def waiting():
            self.db.set_execution_progress(exec_id, gpus.WAITING)
            log.info("module %s is waiting for a GPU", module.name)

        return gpus.take(self.settings.runs_dir, devices,
                         f"run {self.run_id} job {self.job} module {module.name}", waiting)


# The run of this process. luigi tasks reach it here, since luigi tasks carry only
# string parameters and are forked (workers > 1) rather than pickled.
RUN: Run | None = None


class ModuleTask(luigi.Task):
    """One module of the current run; complete when the run need not execute it."""

    job = luigi.Parameter()
    module = luigi.Parameter()

    @classmethod
    def get_params(cls) -> list:
        # luigi finds them through dir() of the class, hundreds of times a run (a fifth of
        # luigi.build's CPU in the main process); a class's parameters never change
        return list(cls._params())

    @classmethod
    @functools.cache
    def _params(cls) -> tuple:
        return tuple(super().get_params())

    def requires(self):
        return [ModuleTask(job=self.job, module=r) for r in RUN.catalogue[self.module].requires]

    def complete(self):
        return RUN.done(self.module)

    def run(self):
        RUN.execute(self.module)


# luigi keeps a task's exception to itself (its own loggers are silenced, see setup_logging):
# anything but a module's own failure, which execute() has logged, is mipper's fault and must
# reach the run log with its cause, or the run would end failed with no reason given
@ModuleTask.event_handler(luigi.Event.FAILURE)
def task_failed(task, exception) -> None:
    if not isinstance(exception, ModuleFailed):
        log.error("module %s: mipper failed while running it: %s: %s", task.module,
                  type(exception).__name__, exception)


@ModuleTask.event_handler(luigi.Event.BROKEN_TASK)
def task_broken(task, exception) -> None:
    log.error("module %s: mipper could not tell whether it must run: %s: %s", task.module,
              type(exception).__name__, exception)


class ModuleThread:
    """A luigi task process run as a thread of this process instead of a forked child.

    For runs whose modules all run on ECS: each module then only starts a task and polls
    it, and a process per module in flight (each loading boto3) costs the host tens of MB
    while doing nothing. luigi still keeps the graph, its order and `workers` modules at
    once; only where each task's run() executes changes. Cancelling stops the thread's
    module through the runner's cleanups (a thread cannot be killed)."""

    use_multiprocessing = True  # so that luigi calls start(), not run(), and goes on

    def __init__(self, process):
        self.process = process
        self.thread = threading.Thread(target=process.run, daemon=True,
                                       name=f"module-{process.task.module}")

    def __getattr__(self, name):
        return getattr(self.process, name)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def exitcode(self) -> int | None:
        # the task's run() reports its own end, failed or not, on luigi's result queue
        return None if self.thread.is_alive() else 0

    def terminate(self) -> None:
        if self.thread.ident is not None:
            runners.terminate(self.thread.ident)


class ThreadWorker(luigi.worker.Worker):
    def _create_task_process(self, task):
        return ModuleThread(super()._create_task_process(task))


class ThreadWorkers(luigi.interface._WorkerSchedulerFactory):
    """luigi.build's factory (its documented `worker_scheduler_factory` hook; the class is
    luigi's own default, pinned with luigi 3.8) with workers that run tasks in threads."""

    def create_worker(self, scheduler, worker_processes, assistant=False):
        return ThreadWorker(scheduler=scheduler, worker_processes=worker_processes,
                            assistant=assistant)


def worker_options(settings: Settings, catalogue: dict, graph: list, to_run: set) -> dict:
    """Threads for a run whose modules to execute all run on ECS; otherwise luigi's own
    process per module, which keeps a local module's failures (and GPU slot) its own."""
    names = [n for n in graph if n in to_run]
    if names and all(module_runner(settings, catalogue[n]) == "ecs" for n in names):
        return {"worker_scheduler_factory": ThreadWorkers()}
    return {}


def scheduler_options(settings: Settings) -> dict:
    """luigi's local scheduler, or the central one (luigid) that mippers on several hosts
    share, so that a job's module never runs twice at once. With the central one, a worker
    waits for the tasks another mipper is running instead of giving up on them."""
    if not settings.luigi_scheduler_url:
        return {"local_scheduler": True}
    config = luigi.configuration.get_config()
    if not config.has_section("worker"):
        config.add_section("worker")
    config.set("worker", "keep_alive", "true")
    config.set("worker", "wait_interval", "0.5")
    return {"local_scheduler": False, "scheduler_url": settings.luigi_scheduler_url}


def wait_for_other_runs(db: journal.Journal, job: str, graph: list,
                        hours: float = 24) -> None:
    """With a central scheduler, luigi's worker ends once the tasks left are running in
    another mipper; wait (a day at most) for those modules to end, so that this run's
    outcome is theirs."""
    deadline = time.monotonic() + hours * 3600
    while time.monotonic() < deadline:
        busy = [n for n in graph
                if (db.latest_execution(job, n) or {}).get("status") == "running"]
        if not busy:
            return
        log.info("waiting for %s, run by another mipper", " ".join(busy))
        time.sleep(1)


def plan(catalogue: dict, db: journal.Journal, job: str, targets: list,
         force_rerun: bool) -> tuple:
    """(graph, to_run): the targets with their predecessors, and those that must execute:
    not passed yet, forced, or downstream of one that executes."""
    graph = ancestors(catalogue, targets)
    to_run = set()
    # repeat until nothing changes: the catalogue need not list predecessors first
    changed = True
    while changed:
        changed = False
        for name in graph:
            if name in to_run:
                continue
            last = db.latest_execution(job, name)
            if (last is None or last["status"] != "passed" or (force_rerun and name in targets)
                    or any(r in to_run for r in catalogue[name].requires)):
                to_run.add(name)
                changed = True
    return graph, to_run


def run(settings: Settings, job: str, map_name: str, modules, force_rerun: bool = False,
        extra: dict | None = None, run_id: str | None = None, env=None) -> int:
    """Run the modules (and what they need) for a job on a map; returns an exit code.

    With `run_id`, the run was recorded by the server; otherwise it is recorded here.
    Raises UsageError or CatalogueError for bad input.
    """
    global RUN
    env = os.environ if env is None else env
    catalogue = load_catalogue(settings.config_path, env.get(CHECKED_ENV, "").split())
    check_name("job", job)
    targets = expand_modules(catalogue, modules)
    extra = extra or {}
    check_extra(settings, catalogue, job, extra)
    check_map(settings, map_name)
    if run_id is None:
        # a run the server started was checked at its door; one started by hand is checked
        # here, before any module meets it
        maps.check_readable(settings, map_name, in_child=True)
    refusal = gpu_refusal(settings, catalogue, targets)
    if refusal:
        raise UsageError(refusal)
    settings.make_dirs()
    db = mipper_journal(settings)
    log_path = None
    if run_id is None:
        db.migrate()  # run by hand: this may be the first use of a new data folder
        payload = {"job": job, "modules": list(modules), "map": map_name,
                   "force_rerun": force_rerun, "extra_switches": extra}
        try:
            run_id = db.create_run(job, map_name, list(modules), force_rerun, payload,
                                   os.path.join(settings.runs_dir, "logs"))
        except journal.JournalError as e:
            raise UsageError(str(e)) from None
        log_path = db.run(run_id)["log_path"]
    else:
        # the server migrated at its start: 64 mippers starting at once must not all take
        # the write lock for that, and one of other code must not change the file
        db.check_version()
    if run_id is not None and db.run(run_id) is None:
        raise UsageError(f"no run {run_id!r} in the journal")
    with run_logs(settings, job, log_path):
        if not db.set_run_status(run_id, Status.RUNNING, pid=os.getpid()):
            log.info("run %s was cancelled before it started", run_id)
            return EXIT_FAILED
        graph, to_run = plan(catalogue, db, job, targets, force_rerun)
        log.info("run %s: job %s, map %s, modules %s; to execute: %s", run_id, job, map_name,
                 " ".join(targets), " ".join(n for n in graph if n in to_run) or "nothing")
        without = local_gpu_modules(settings, catalogue, [n for n in graph if n in to_run])
        if without and not settings.gpu_settings.devices:
            # once per run, not a list of every module: the catalogue marks all of them
            log.warning("%s run on the CPU", NO_GPU)
            db.add_run_warning(run_id, f"{NO_GPU} ran on the CPU")
        RUN = Run(settings, catalogue, db, run_id, job, map_name, graph, to_run, extra,
                  module_env(settings, env, settings.openai_key),
                  {n: db.last_pass(job, n) for n in to_run})
        # luigi forks a worker per module: with what is loaded by now kept out of the
        # collector's reach, a worker's collections do not write to (and so copy) every
        # page it shares with this process
        gc.freeze()
        try:
            result = luigi.build([ModuleTask(job=job, module=t) for t in targets],
                                 workers=settings.workers, detailed_summary=True,
                                 log_level="CRITICAL", **scheduler_options(settings),
                                 **worker_options(settings, catalogue, graph, to_run))
            status = Status.PASSED if judge(RUN) else Status.FAILED
        except KeyboardInterrupt:
            db.end_running_executions(run_id, Status.CANCELLED, "interrupted")
            db.set_run_status(run_id, Status.CANCELLED)
            log.info("run %s interrupted", run_id)
            return EXIT_FAILED
        finally:
            RUN = None
        # a module whose end could not be recorded (its worker died) must not stay running
        if db.end_running_executions(run_id, Status.FAILED, journal.LOST_EXECUTION):
            status = Status.FAILED
            stop_lost(settings, catalogue, run_id, graph)
        if status == Status.PASSED:
            warn_if_empty(settings, catalogue, db, run_id, job, map_name, graph)
        if not db.set_run_status(run_id, status):
            status = Status(db.run(run_id)["status"])
        warned = run_warnings(db.run(run_id), db.executions(run_id))
        log.info("run %s %s%s (luigi: %s)", run_id, status.value, counted(warned),
                 result.status.name)
        return EXIT_OK if status == Status.PASSED else EXIT_FAILED


def mipper_journal(settings: Settings) -> journal.Journal:
    """The journal with mipper's patience: a write waits minutes for a lock or a read-only
    file rather than seconds, since giving up loses the run's work."""
    return journal.Journal(settings.journal_path, journal.MIPPER_BUSY_TIMEOUT,
                           journal.MIPPER_WRITE_FOR)


def stop_lost(settings: Settings, catalogue: dict, run_id: str, graph: list) -> None:
    """Stop what the modules of a luigi worker that died left running: their processes
    (found by the run id the server puts in their environment), containers and tasks.
    Left alone, such a module would hold its GPU slot, unseen, for a run that has ended;
    the server stops leftovers only when mipper itself dies."""
    used = {module_runner(settings, catalogue[n]) for n in graph}
    try:
        stopped = runners.stop_run(run_id, None, used, settings.runner_settings)
    except runners.RunnerError as e:
        log.warning("what the run's lost modules started may still run: %s", e)
        return
    if stopped:
        # which containers and tasks stays in runners.log, on the host
        log.info("stopped %d processes, containers or tasks left by lost modules", len(stopped))
        runners.log.info("run %s: stopped %s", run_id, ", ".join(stopped))


NO_GPU = "this host has no GPU (MIP_GPUS=none, or none found): its GPU modules"


def counted(warned: list) -> str:
    """` with 2 warnings` for a module's log line; "" without any."""
    return f" with {len(warned)} warning{'s' if len(warned) > 1 else ''}" if warned else ""


def final_products(settings: Settings, catalogue: dict, job: str, map_name: str,
                   graph: list) -> list:
    """The feature files (GeoPackage, GeoJSON) among the outputs of the graph's last
    modules, those no other module of it requires: what the run was for."""
    needed = {r for n in graph for r in catalogue[n].requires}
    return [p for n in graph if n not in needed
            for p in module_outputs(settings, catalogue[n], job, map_name)
            if p.lower().endswith((".gpkg", ".geojson"))]


def warn_if_empty(settings: Settings, catalogue: dict, db: journal.Journal, run_id: str,
                  job: str, map_name: str, graph: list) -> None:
    """A run warning when its final products hold no feature while its map is not blank:
    every module passed, and yet nothing was found. The map is read (in a child) only then."""
    empty = checks.featureless(final_products(settings, catalogue, job, map_name, graph))
    if not empty or maps.has_content_in_child(maps.map_file(settings, map_name)) is False:
        return
    names = ", ".join(os.path.basename(p) for p in empty)
    what = (f"the GeoPackage {names}" if all(p.lower().endswith(".gpkg") for p in empty)
            else names)
    warning = (f"{what} holds no features, though the map is not blank: the modules found "
               "nothing on it (their warnings and logs may say why)")
    log.warning("%s", warning)
    db.add_run_warning(run_id, warning)


def judge(run: Run) -> bool:
    """True when every module of the run's graph is done (and in S3, when asked for); the
    log says what is not. luigi's own verdict is not enough: see plan() and done()."""
    settings, db, job, graph = run.settings, run.db, run.job, run.graph
    if settings.luigi_scheduler_url:
        wait_for_other_runs(db, job, graph)
    passed = all(run.done(n) for n in graph)
    ran = {e["module"] for e in db.executions(run.run_id)}
    skipped = [n for n in graph if not run.done(n) and n not in ran]
    if skipped:
        log.info("not run, since a module they need failed: %s", " ".join(skipped))
    if settings.s3_bucket:
        # modules that passed in earlier runs but whose upload failed or never happened
        upload_missing(settings, db, job, [n for n in graph if n not in ran])
        missing = [n for n in graph if (db.latest_execution(job, n) or {}).get(
            "upload_status") not in ("uploaded", None)]
        if missing:
            log.info("not in S3 (upload failed): %s", " ".join(missing))
            passed = False
    return passed


@contextlib.contextmanager
def run_logs(settings: Settings, job: str, log_path: str | None):
    """Where a run logs besides stderr: its own log file when mipper recorded the run (the
    server sends stderr there itself), and runners.log, where how each module was run
    (containers, tasks) stays on the host, never in the logs the API serves."""
    handlers = {"mip.runner": logging.FileHandler(os.path.join(settings.runs_dir,
                                                               "runners.log"))}
    handlers["mip.runner"].setFormatter(
        sanitize.OneLineFormatter(f"%(asctime)s {job} %(message)s"))
    logging.getLogger("mip.runner").propagate = False
    if log_path:
        handlers["mip"] = logging.FileHandler(log_path)
        handlers["mip"].setFormatter(sanitize.OneLineFormatter(LOG_FORMAT))
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
            handler.close()


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


MAIN_PID = os.getpid()


def stop_on_sigterm(signum, frame) -> None:
    """Cancelling a run sends SIGTERM to its process group: stop what the runners started
    (a container or an ECS task outlives the processes that started it), then exit. The
    main process waits for luigi's worker processes to do the same, so that the run's
    end means its modules have stopped."""
    runners.terminate()
    if os.getpid() == MAIN_PID:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.05)
            except ChildProcessError:
                break
    os._exit(128 + signum)


def setup_logging() -> None:
    """Our lines to stderr; luigi's own chatter (and its tracebacks of our
    ModuleFailed) kept out, since each failure is already logged in one line."""
    handler = logging.StreamHandler()
    handler.setFormatter(sanitize.OneLineFormatter(LOG_FORMAT))
    logger = logging.getLogger("mip")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for name in ("luigi", "luigi-interface", "luigi.scheduler"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# ---------------------------------------------------------------------------- main

def upload_job(settings: Settings, job: str | None) -> int:
    """`--upload`: copy every passed module of a job to S3 again; raises UsageError."""
    if not settings.s3_bucket:
        raise UsageError("--upload needs MIP_S3_BUCKET")
    check_name("job", job or "")
    db = mipper_journal(settings)
    db.migrate()
    if db.job_map(job) is None:
        raise UsageError(f"no job {job!r} in the journal")
    ok = upload_missing(settings, db, job, db.job_modules(job), again=True)
    return EXIT_OK if ok else EXIT_FAILED


def parse_extra(items) -> dict:
    """`MODULE=ARG` items into {module: [arg, ...]}, in order; raises UsageError."""
    extra = {}
    for item in items or ():
        name, sep, arg = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--extra-switch {item!r}: expected MODULE=ARG")
        extra.setdefault(name, []).append(arg)
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mipper.py", description="Run TA1 modules for a job and map (luigi graph).")
    parser.add_argument("--job", help="job name (a workspace bound to one map)")
    parser.add_argument("--map", help="map name, under $TA1_INPUTS_DIR/maps/<map>/<map>.tif")
    parser.add_argument("--module", action="append", default=[],
                        help="module to run (repeatable); ALL for every module")
    parser.add_argument("--force-rerun", action="store_true",
                        help="rerun the named modules (and what depends on them) even if passed")
    parser.add_argument("--extra-switch", action="append", metavar="MODULE=ARG",
                        help="one argument appended to MODULE's command line (repeatable)")
    parser.add_argument("--upload", action="store_true",
                        help="copy every passed module of --job to S3 again, then exit")
    parser.add_argument("--run-id", help="run id recorded by the server (internal)")
    parser.add_argument("--list-modules", action="store_true", help="print the catalogue")
    parser.add_argument("--list-deps", metavar="MODULE",
                        help="print what MODULE needs, predecessors first")
    parser.add_argument("--version", action="version", version=f"mipper {VERSION}")
    args = parser.parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        settings = Settings.from_env(os.environ)
        if args.list_modules or args.list_deps:
            catalogue = load_catalogue(settings.config_path)
            if args.list_modules:
                for m in catalogue.values():
                    print(f"{m.name} {m.version} requires: {' '.join(m.requires) or '-'}")
            else:
                target = expand_modules(catalogue, [args.list_deps])
                print("\n".join(n for n in ancestors(catalogue, target) if n not in target))
            return EXIT_OK
        if args.upload:
            return upload_job(settings, args.job)
        if not args.job or not args.map or not args.module:
            parser.error("--job, --map and --module are required to run modules")
        return run(settings, args.job, args.map, args.module, args.force_rerun,
                   parse_extra(args.extra_switch), args.run_id)
    except (UsageError, CatalogueError, Invalid) as e:  # Invalid: a refused switch, a bad map
        print(f"mipper: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MipError as e:
        print(f"mipper: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
