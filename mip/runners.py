"""runners: how one module executes: `inline` (a local process), `docker` (a local
container) or `ecs` (an AWS ECS task). mipper chooses the runner of each module from the
catalogue and MIP_RUNNER; nothing outside mipper knows which one ran a module.

Not run directly. A runner gets a Launch and the module's open log file, returns the
module's exit code, and raises RunnerError when the module could not be run at all.
Cancelling (SIGTERM to mipper's process group) calls `terminate()`, which stops what the
runner started: the local process, the container (`docker kill`), the task (`StopTask`).
When mipper itself dies (SIGKILL, the OOM killer), nothing of that runs: the server then
calls `stop_run()`, which finds what the run started by its run id (the processes'
MIP_RUN_ID, the containers' label, the tasks' startedBy) and stops it.
"""

import contextlib
import json
import logging
import math
import os
import re

# os.wait4 imports it to build its rusage at its first call: imported here, it is loaded
# once in mipper rather than again in every luigi worker forked for a module
import resource  # noqa: F401
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from dataclasses import field

from mip import sanitize
from mip.settings import RunnerSettings

log = logging.getLogger("mip.runner")

RUN_LABEL = "mip.run_id"  # the docker label naming the run that started a container
RUN_ENV = "MIP_RUN_ID"  # set by the server for mipper; every process of the run inherits it
# docker run's own failures (the image, the engine, the command) rather than the module's
DOCKER_EXIT = {125: "docker could not run the container (the log has docker's reason: a "
                    "missing image, an engine that is not running, ...)",
               126: "the container's command could not be invoked",
               127: "the container's command was not found"}


class RunnerError(Exception):
    """The module could not be run (not a module failure): the message says why."""


@dataclass(frozen=True)
class Launch:
    """One module execution, in the terms every runner understands."""

    module: str
    name: str  # unique: container name
    command: tuple  # inline: the program and its first arguments
    switches: tuple  # the module's switches, with the paths where the module runs
    env: dict = field(repr=False)  # inline: the whole environment
    secrets: dict = field(repr=False, default_factory=dict)  # passed on as environment only
    cwd: str | None = None
    gpu: bool = False
    image: str | None = None
    user: str | None = None
    mounts: tuple = ()  # (host path, container path, read-only)
    task_definition: str | None = None
    container_name: str | None = None
    run_id: str = ""  # the container's label, the ECS task's startedBy
    gpu_device: str | None = None  # the host device of the module's GPU slot (gpus.py)
    gpu_fd: int | None = None  # the slot's lock, handed on to what runs the module


# ---------------------------------------------------------------------------- cancelling

# thread id -> its cleanups: mipper may run several modules in threads of one process (ECS
# runs), each forgetting only its own when its module ends. Plain dict operations, which
# are atomic, rather than a lock, since terminate() runs in a signal handler.
_cleanups = {}


def on_terminate(cleanup) -> None:
    """Call `cleanup` if this process (or this thread's module) is told to stop while the
    module runs."""
    _cleanups.setdefault(threading.get_ident(), []).append(cleanup)


def terminate(thread: int | None = None) -> None:
    """Stop whatever this process's runners started (SIGTERM handler), or only what the
    runner in thread `thread` started."""
    for ident in [thread] if thread is not None else list(_cleanups):
        for cleanup in reversed(_cleanups.pop(ident, [])):
            try:
                cleanup()
            except Exception as e:  # noqa: BLE001 - the other cleanups must still run
                log.warning("stopping a module failed: %s", e)


def run(runner: str, launch: Launch, out, settings: RunnerSettings,
        usage: dict | None = None) -> tuple:
    """Run the module to its end: (exit code, message when it failed). Raises RunnerError.
    `usage` gets `cpu_seconds` and `peak_rss_bytes` when the runner can tell them."""
    usage = {} if usage is None else usage
    try:
        if runner == "docker":
            code = run_docker(launch, out, settings, usage)
            return code, DOCKER_EXIT.get(code) or exit_message(code)
        if runner == "ecs":
            code = run_ecs(launch, out, settings)
        else:
            code = run_inline(launch, out, usage)
        return code, exit_message(code)
    finally:
        _cleanups.pop(threading.get_ident(), None)


def exit_message(code: int) -> str | None:
    if code == 0:
        return None
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


REASON_BYTES = 64 * 1024  # how much of a failed module's log is searched for its reason
REASON_CHARS = 400
LEVEL = re.compile(r"\b(?:ERROR|CRITICAL)\b:?\s*(.*)")


def failure_reason(log_path: str, since: int = 0) -> str | None:
    """Why a module failed, in its own words: the last ERROR or CRITICAL line it wrote to its
    log (from byte `since`, where its own output starts), with the last line after it when
    that line only announces a traceback; failing that, its last lines. One line, escaped
    and bounded; None when it wrote nothing."""
    try:
        with open(os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            end = f.seek(0, os.SEEK_END)
            f.seek(max(since, end - REASON_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith("# ")]
    if not lines:
        return None
    reason = None
    for i in range(len(lines) - 1, -1, -1):
        found = LEVEL.search(lines[i])
        if found:
            reason = found.group(1)
            if reason.endswith(":") and i + 1 < len(lines):
                reason = f"{reason} {lines[-1]}"  # the exception that ends the traceback
            break
    if reason is None:
        reason = " / ".join(lines[-3:])
    return one_line(reason, REASON_CHARS)


def one_line(text: str, chars: int) -> str:
    """`text` escaped to one line (sanitize.escape) and cut to `chars` characters."""
    text = sanitize.escape(text)
    return text if len(text) <= chars else text[:chars - 1] + "…"


WARNINGS_MAX = 5  # a module's warnings kept in its ModuleStatus; a count says how many more
WARNING_CHARS = 300
WARNINGS_BYTES = 64 * 2**20  # how much of a module's log is searched for WARNING lines
WARNING = re.compile(rb"\bWARNING\b:?\s*(.*)")


def logged_warnings(log_path: str, since: int = 0) -> list:
    """The WARNING lines a module wrote to its log from byte `since` (where its own output
    starts): the first WARNINGS_MAX distinct ones, each one escaped and bounded line without
    what precedes the level (a time, a logger's name), and then how many more there were."""
    found, more = [], 0
    try:
        with open(os.open(log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return []
            f.seek(since)
            # readline's bound: a module's megabyte line without a newline is read in pieces
            for line in iter(lambda: f.readline(WARNING_CHARS * 16), b""):
                if f.tell() > since + WARNINGS_BYTES:
                    break
                match = WARNING.search(line) if not line.startswith(b"# ") else None
                if not match:
                    continue
                text = one_line(match.group(1).decode("utf-8", "replace").strip(),
                                WARNING_CHARS)
                if text in found:
                    continue
                if len(found) < WARNINGS_MAX:
                    found.append(text)
                else:
                    more += 1
    except OSError:
        return []
    if more:
        found.append(f"and {more} more WARNING line{'s' if more > 1 else ''} in its log")
    return found


# ---------------------------------------------------------------------------- inline

def run_inline(launch: Launch, out, usage: dict | None = None) -> int:
    """A local process; its output goes to the module's log. With a GPU slot, it sees only
    that device (as index 0) and inherits the slot's lock, which it then holds as long as
    it lives."""
    argv = [*launch.command, *launch.switches]
    env = {**launch.env, **launch.secrets}
    if launch.gpu_device is not None:
        # PCI order: CUDA's own default order may number the devices unlike NVML
        env.update(CUDA_VISIBLE_DEVICES=launch.gpu_device, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    try:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=launch.cwd,
                                pass_fds=slot_fds(launch))
    except OSError as e:
        raise RunnerError(f"could not start {argv[0]}: {e.strerror}") from None
    on_terminate(proc.kill)
    return wait_accounted(proc, {} if usage is None else usage)


def slot_fds(launch: Launch) -> tuple:
    return () if launch.gpu_fd is None else (launch.gpu_fd,)


def wait_accounted(proc: subprocess.Popen, usage: dict) -> int:
    """Reap the process with wait4, whose resource usage is the process's own accounting
    (with its reaped children), exact even for a process of a few milliseconds; Popen.wait
    would reap it and lose that. ru_maxrss is in KiB on Linux."""
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    usage["cpu_seconds"] = round(rusage.ru_utime + rusage.ru_stime, 3)
    usage["peak_rss_bytes"] = rusage.ru_maxrss * 1024
    return proc.returncode


# ---------------------------------------------------------------------------- docker

def docker_argv(launch: Launch, settings: RunnerSettings) -> list:
    """`docker run` for the module: its image, the data folders mounted (inputs and repos
    read-only), the GPU when it wants one, the user, the secrets by name only (their
    values travel in the environment, never on a command line), a unique name, the
    switches as the command."""
    argv = [settings.docker, "run", "--rm", "--name", launch.name]
    if launch.run_id:
        argv += ["--label", f"{RUN_LABEL}={launch.run_id}"]
    for host, container, read_only in launch.mounts:
        argv += ["-v", f"{host}:{container}{':ro' if read_only else ''}"]
    if launch.gpu_device is not None:
        # the container sees this one device, as index 0
        argv += ["--gpus", f"device={launch.gpu_device}"]
    if launch.user:
        argv += ["--user", launch.user]
    for name in sorted(launch.secrets):
        argv += ["-e", name]
    return [*argv, launch.image, *launch.switches]


def run_docker(launch: Launch, out, settings: RunnerSettings, usage: dict | None = None) -> int:
    """A local container, its output captured into the module's log as it runs. The docker
    client inherits the GPU slot's lock: it lives as long as the container (until `docker
    kill`, which stop_run does before killing the client)."""
    argv = docker_argv(launch, settings)
    log.info("module %s: %s", launch.module, " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**launch.env, **launch.secrets},
                                pass_fds=slot_fds(launch))
    except OSError as e:
        raise RunnerError(f"the docker runner needs the {settings.docker!r} program: "
                          f"{e.strerror}") from None

    def stop():
        # killing the docker client would leave the container running
        subprocess.run([settings.docker, "kill", launch.name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
        proc.kill()

    on_terminate(stop)
    with ContainerStats(settings.docker, launch.name) as stats:
        code = proc.wait()
    if usage is not None:
        usage.update(stats.figures())
    return code


class ContainerStats:
    """Samples `docker stats --no-stream` about once a second while a container runs: the
    peak of its memory use, and its CPU seconds as the sum of each sample's CPU share times
    the time since the one before (an estimate; a container that ends before the first
    answer leaves both unknown)."""

    def __init__(self, docker: str, name: str, every: float = 1.0):
        self.argv = [docker, "stats", "--no-stream", "--format", "{{json .}}", name]
        self.every = every
        self.peak = None
        self.cpu = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name=f"stats-{name}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(15)

    def loop(self) -> None:
        last = time.monotonic()
        while not self.stopping.wait(self.every):
            try:
                answer = subprocess.run(self.argv, capture_output=True, text=True, timeout=10,
                                        check=False)
                sample = json.loads(answer.stdout.splitlines()[0]) if answer.returncode == 0 \
                    else None
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
                sample = None
            now = time.monotonic()
            if isinstance(sample, dict):
                memory = docker_bytes(str(sample.get("MemUsage", "")).split("/")[0])
                share = docker_percent(sample.get("CPUPerc"))
                if memory is not None:
                    self.peak = max(self.peak or 0, memory)
                if share is not None:
                    self.cpu = (self.cpu or 0.0) + share / 100 * (now - last)
            last = now

    def figures(self) -> dict:
        return {"cpu_seconds": None if self.cpu is None else round(self.cpu, 3),
                "peak_rss_bytes": self.peak}


UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
         "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def docker_bytes(text: str) -> int | None:
    """`12.5MiB` (docker stats' MemUsage, before the slash) as bytes; None if unreadable."""
    found = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", text or "")
    if not found or found.group(2).lower() not in UNITS:
        return None
    try:
        return int(float(found.group(1)) * UNITS[found.group(2).lower()])
    except (ValueError, OverflowError):  # 400 digits are an infinite float
        return None


def docker_percent(text) -> float | None:
    """`12.5%` as 12.5; None if unreadable, negative or not finite (json.dumps writes a
    NaN as `NaN`, which is not JSON, and the journal would serve it so)."""
    try:
        share = float(str(text).strip().rstrip("%"))
    except ValueError:
        return None
    return share if math.isfinite(share) and share >= 0 else None


# ---------------------------------------------------------------------------- ecs

def run_ecs(launch: Launch, out, settings: RunnerSettings) -> int:
    """An ECS task from the module's task definition, the switches and secrets as container
    overrides; waits for it to stop, copies its CloudWatch log stream into the module's log
    and returns the container's exit code. The data folders reach the task through a
    shared file system (EFS) mounted at the same paths as here."""
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    ecs = aws_client("ecs")
    request = {
        "cluster": settings.ecs_cluster,
        "taskDefinition": launch.task_definition,
        "count": 1,
        "startedBy": launch.run_id,  # a run id (34 characters) fits ECS's 128
        "overrides": {"containerOverrides": [{
            "name": launch.container_name,
            "command": list(launch.switches),
            "environment": [{"name": k, "value": v} for k, v in sorted(launch.secrets.items())],
        }]},
    }
    if launch.gpu:
        # ECS places GPUs itself: the task asks for one, and no local slot is held
        request["overrides"]["containerOverrides"][0]["resourceRequirements"] = [
            {"type": "GPU", "value": "1"}]
    if settings.ecs_capacity_provider:
        request["capacityProviderStrategy"] = [{"capacityProvider":
                                                settings.ecs_capacity_provider}]
    else:
        request["launchType"] = settings.ecs_launch_type
    if settings.ecs_subnets:
        request["networkConfiguration"] = {"awsvpcConfiguration": {
            "subnets": list(settings.ecs_subnets),
            "securityGroups": list(settings.ecs_security_groups),
            "assignPublicIp": "DISABLED"}}
    try:
        answer = ecs.run_task(**request)
    except (BotoCoreError, ClientError) as e:
        raise RunnerError(f"ECS did not start the task: {e}") from None
    if answer.get("failures") or not answer.get("tasks"):
        reasons = "; ".join(f"{f.get('reason')} {f.get('detail') or ''}".strip()
                            for f in answer.get("failures", ())) or "no task and no reason"
        raise RunnerError(f"ECS could not place the task: {reasons}")
    arn = answer["tasks"][0]["taskArn"]
    log.info("module %s: ECS task %s", launch.module, arn)
    on_terminate(lambda: ecs.stop_task(cluster=settings.ecs_cluster, task=arn,
                                       reason="cancelled through mip"))
    task = wait_stopped(ecs, settings, arn)
    copy_task_log(launch, arn, out, settings)
    containers = task.get("containers") or [{}]
    container = next((c for c in containers if c.get("name") == launch.container_name),
                     containers[0])
    code = container.get("exitCode")
    if code is None:
        raise RunnerError("the ECS task stopped without an exit code: "
                          f"{task.get('stoppedReason') or container.get('reason') or 'no reason'}")
    return code


_clients = {}
_clients_lock = threading.Lock()


def aws_client(service: str):
    """A boto3 client, made once per process and environment: a client costs tens of
    milliseconds and megabytes to make, and the ECS modules of a run share one process
    (clients are thread-safe; the default session that makes them is not, hence the lock).
    boto3 is imported here, never at mipper's start: most runs never need it."""
    key = (service, *sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _clients_lock:
        if key not in _clients:
            import boto3

            _clients[key] = boto3.client(service)
        return _clients[key]


def wait_stopped(ecs, settings: RunnerSettings, arn: str) -> dict:
    """Poll the task until it has stopped, waiting longer each time (up to the setting)."""
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    delay = min(1.0, settings.ecs_poll_seconds)
    while True:
        try:
            tasks = ecs.describe_tasks(cluster=settings.ecs_cluster, tasks=[arn])["tasks"]
        except (BotoCoreError, ClientError) as e:
            # throttling and passing faults: botocore has retried already; keep watching
            log.warning("ECS task %s: describe_tasks failed: %s", arn, e)
            tasks = []
        if tasks and tasks[0].get("lastStatus") == "STOPPED":
            return tasks[0]
        time.sleep(delay)
        delay = min(delay * 1.5, settings.ecs_poll_seconds)


def copy_task_log(launch: Launch, arn: str, out, settings: RunnerSettings) -> None:
    """Append the task's CloudWatch log stream (awslogs: prefix/container/task id)."""
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    logs = aws_client("logs")
    stream = f"{settings.ecs_log_prefix}/{launch.container_name}/{arn.rsplit('/', 1)[1]}"
    token = None
    try:
        while True:
            kwargs = {"logGroupName": settings.ecs_log_group, "logStreamName": stream,
                      "startFromHead": True}
            if token:
                kwargs["nextToken"] = token
            page = logs.get_log_events(**kwargs)
            for event in page.get("events", ()):
                out.write(event["message"].rstrip("\n").encode() + b"\n")
            if not page.get("events") or page.get("nextForwardToken") in (None, token):
                break
            token = page["nextForwardToken"]
    except (BotoCoreError, ClientError) as e:
        out.write(f"# the task's log {settings.ecs_log_group}/{stream} could not be read: "
                  f"{e}\n".encode())
    out.flush()


# ---------------------------------------------------------------------------- a dead run

def stop_run(run_id: str, pgid: int | None, used: set, settings: RunnerSettings) -> list:
    """Stop everything a run whose mipper died had started: its processes (the process
    group `pgid` and any process carrying its MIP_RUN_ID), the containers labelled with
    its id when `used` has docker, the ECS tasks it started when `used` has ecs. Returns
    what was stopped, as text; raises RunnerError when docker or ECS could not be asked
    (the processes are stopped whatever happens). Containers go before the processes,
    since a docker client holds its container's GPU slot (gpus.py)."""
    stopped, errors = [], []
    if "docker" in used:
        # containers first: their docker clients hold their GPU slots, which must not be
        # freed while a container still uses the device
        stopped += _stopping(stop_containers, run_id, settings, errors)
    stopped += [f"process {pid}" for pid in stop_processes(run_id, pgid)]
    for runner, stop in (("docker", stop_containers), ("ecs", stop_tasks)):
        if runner in used:
            # again for docker: a container a worker started while the first pass ran
            stopped += _stopping(stop, run_id, settings, errors)
    if errors:
        raise RunnerError("; ".join(dict.fromkeys(errors)))
    return stopped


def _stopping(stop, run_id: str, settings: RunnerSettings, errors: list) -> list:
    try:
        return stop(run_id, settings)
    except RunnerError as e:
        errors.append(str(e))
        return []


def run_processes(run_id: str) -> list:
    """(pid, process group) of the live processes whose environment holds this run's id."""
    marker = f"{RUN_ENV}={run_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            # a zombie's environ reads empty: it is gone already
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                pgrp = int(f.read().rsplit(b")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(name), pgrp))
    return found


def stop_processes(run_id: str, pgid: int | None, timeout: float = 10) -> list:
    """SIGKILL the run's process group (mipper's luigi workers and inline modules) and any
    straggler that left it; returns the pids seen. The group is killed only while a
    member carries the run's id, so a pid reused since cannot be hit."""
    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = run_processes(run_id)
        if not found:
            break
        seen.update(pid for pid, _ in found)
        if pgid and any(group == pgid for _, group in found):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for pid, _ in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return sorted(seen)


def stop_containers(run_id: str, settings: RunnerSettings) -> list:
    """`docker kill` the running containers labelled with the run's id."""
    argv = [settings.docker, "ps", "--quiet", "--filter", f"label={RUN_LABEL}={run_id}"]
    try:
        found = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunnerError(f"could not list the run's containers: {e}") from None
    if found.returncode != 0:
        raise RunnerError(f"could not list the run's containers: {found.stderr.strip()}")
    ids = found.stdout.split()
    if ids:
        subprocess.run([settings.docker, "kill", *ids], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
    return [f"container {i}" for i in ids]


def stop_tasks(run_id: str, settings: RunnerSettings) -> list:
    """StopTask on the cluster's tasks started by the run (startedBy = its id)."""
    import boto3
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError

    try:
        ecs = boto3.client("ecs")
        arns = []
        for page in ecs.get_paginator("list_tasks").paginate(
                cluster=settings.ecs_cluster, startedBy=run_id, desiredStatus="RUNNING"):
            arns += page.get("taskArns", [])
        for arn in arns:
            ecs.stop_task(cluster=settings.ecs_cluster, task=arn,
                          reason="its mip run's mipper process died")
    except (BotoCoreError, ClientError) as e:
        raise RunnerError(f"could not stop the run's ECS tasks: {e}") from None
    return [f"task {arn}" for arn in arns]
