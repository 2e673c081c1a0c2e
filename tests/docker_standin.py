"""A stand-in `docker` program for tests (no Docker engine runs here).

It accepts the `docker run`, `docker kill`, `docker ps --quiet --filter label=K=V` and
`docker stats --no-stream --format {{json .}} NAME` command lines mip gives, checks them as
a real docker would need them, records each call as a JSON line in $DOCKER_STANDIN_LOG
(`argv`: the whole command line), and runs the stand-in module of the image
(`inferlink/ta1_<module>` -> modules/<module>.py) with the container paths of its switches
mapped back to the mounted host folders. `--gpus device=N` shows in the module as
NVIDIA_VISIBLE_DEVICES=N, as the NVIDIA container toolkit sets it. `docker stats` answers
with the played module process's own figures (resident memory from /proc, CPU share as
its CPU time over its lifetime so far).

    $DOCKER_STANDIN_STATE        folder for the pids and labels of running "containers"
    $DOCKER_STANDIN_MISSING      space-separated images that do not exist
    $DOCKER_STANDIN_NO_ENGINE=1  behave as a client whose engine is not running
    $DOCKER_STANDIN_NO_STATS=1   answer `docker stats` as an engine that cannot tell
"""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(entry: dict) -> None:
    with open(os.environ["DOCKER_STANDIN_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def fail(message: str, code: int = 125) -> int:
    print(f"docker: {message}", file=sys.stderr)
    return code


def parse_run(args: list) -> dict:
    """The options of `docker run` up to the image; raises ValueError for unknown ones."""
    run = {"rm": False, "name": None, "mounts": [], "gpus": None, "user": None, "env": [],
           "labels": {}}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        flag = args[i]
        if flag == "--rm":
            run["rm"] = True
            i += 1
            continue
        if i + 1 >= len(args):
            raise ValueError(f"flag needs an argument: {flag}")
        value = args[i + 1]
        if flag == "--name":
            run["name"] = value
        elif flag == "-v":
            host, _, container = value.partition(":")
            container, _, mode = container.partition(":")
            run["mounts"].append([host, container, mode or "rw"])
        elif flag == "--gpus":
            run["gpus"] = value
        elif flag == "--user":
            run["user"] = value
        elif flag == "-e":
            run["env"].append(value)
        elif flag == "--label":
            key, sep, label = value.partition("=")
            if not sep or not key:
                raise ValueError(f"invalid label {value!r}: expected KEY=VALUE")
            run["labels"][key] = label
        else:
            raise ValueError(f"unknown flag: {flag}")
        i += 2
    if i >= len(args):
        raise ValueError("\"docker run\" requires at least 1 argument")
    run["image"], run["command"] = args[i], args[i + 1:]
    return run


def docker_run(args: list) -> int:
    try:
        run = parse_run(args)
    except ValueError as e:
        return fail(str(e))
    record({"cmd": "run", **run, "argv": ["docker", "run", *args]})
    if os.environ.get("DOCKER_STANDIN_NO_ENGINE") == "1":
        return fail("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                    "Is the docker daemon running?")
    if run["image"] in os.environ.get("DOCKER_STANDIN_MISSING", "").split():
        print(f"Unable to find image '{run['image']}:latest' locally", file=sys.stderr)
        return fail(f"Error response from daemon: pull access denied for {run['image']}, "
                    "repository does not exist")
    for host, container, _ in run["mounts"]:
        if not os.path.isabs(host) or not os.path.isdir(host) or not container.startswith("/"):
            return fail(f"invalid mount {host}:{container}")
    for name in run["env"]:
        if "=" in name or name not in os.environ:
            return fail(f"-e {name}: expected the name of a variable of the client's environment")
    module = run["image"].rsplit("/", 1)[-1].removeprefix("ta1_")
    program = os.path.join(ROOT, "modules", f"{module}.py")
    if not os.path.exists(program):
        return fail(f"Error response from daemon: no such image {run['image']}")
    # longest container path first, so /ta1/outputs is not taken for /ta1
    mounts = sorted(run["mounts"], key=lambda m: -len(m[1]))
    command = [next((host + arg[len(container):] for host, container, _ in mounts
                     if arg == container or arg.startswith(container + "/")), arg)
               for arg in run["command"]]
    # a container is not in the docker client's process group: signals to the client (or
    # its death) leave it running, as a real one would be without `docker kill`
    # nor does it inherit the client's environment: only the variables named with -e (and
    # what the interpreter needs here to start)
    env = {k: v for k, v in os.environ.items()
           if k in run["env"] or not k.startswith(("MIP_", "TA1_", "DOCKER_STANDIN", "CUDA_"))}
    if run["gpus"] and run["gpus"].startswith("device="):
        env["NVIDIA_VISIBLE_DEVICES"] = run["gpus"].removeprefix("device=")
    proc = subprocess.Popen([sys.executable, program, *command], start_new_session=True,
                            env=env)
    state = os.environ["DOCKER_STANDIN_STATE"]
    pid_file = os.path.join(state, f"{run['name']}.pid")
    labels_file = os.path.join(state, f"{run['name']}.labels")
    with open(labels_file, "w") as f:
        json.dump(run["labels"], f)
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    try:
        return proc.wait()
    finally:
        os.remove(pid_file)
        os.remove(labels_file)


def docker_ps(args: list) -> int:
    """`docker ps --quiet --filter label=KEY=VALUE`: the names (as ids) of the running
    containers with that label."""
    record({"cmd": "ps", "args": args})
    if args[:2] not in (["--quiet", "--filter"], ["-q", "--filter"]) or len(args) != 3 \
            or not args[2].startswith("label="):
        return fail(f"ps: this stand-in knows only --quiet --filter label=K=V, not {args}")
    key, _, value = args[2].removeprefix("label=").partition("=")
    state = os.environ["DOCKER_STANDIN_STATE"]
    for name in sorted(os.listdir(state)):
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(state, name.removesuffix(".pid") + ".labels")) as f:
                labels = json.load(f)
        except (OSError, ValueError):
            continue
        if labels.get(key) == value:
            print(name.removesuffix(".pid"))
    return 0


def docker_stats(args: list) -> int:
    """`docker stats --no-stream --format {{json .}} NAME`: one JSON line of the played
    module's memory and CPU share."""
    record({"cmd": "stats", "args": args})
    if args[:3] != ["--no-stream", "--format", "{{json .}}"] or len(args) != 4:
        return fail(f"stats: this stand-in knows only --no-stream --format {{{{json .}}}} "
                    f"NAME, not {args}")
    if os.environ.get("DOCKER_STANDIN_NO_STATS") == "1":
        return fail("Error response from daemon: stats are not available", 1)
    name = args[3]
    try:
        with open(os.path.join(os.environ["DOCKER_STANDIN_STATE"], f"{name}.pid")) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, StopIteration):
        return fail(f"Error response from daemon: No such container: {name}", 1)
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    age = max(uptime - int(fields[19]) / tick, 1e-3)  # since the process started
    print(json.dumps({"Name": name, "ID": name, "CPUPerc": f"{100 * cpu / age:.2f}%",
                      "MemUsage": f"{rss_kb / 1024:.2f}MiB / 7.6GiB", "MemPerc": "0.00%",
                      "NetIO": "0B / 0B", "BlockIO": "0B / 0B", "PIDs": "1",
                      "Read": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return 0


def docker_kill(args: list) -> int:
    record({"cmd": "kill", "names": args})
    for name in args:
        pid_file = os.path.join(os.environ["DOCKER_STANDIN_STATE"], f"{name}.pid")
        try:
            with open(pid_file) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            return fail(f"Error response from daemon: No such container: {name}", 1)
        print(name)
    return 0


def main(argv: list) -> int:
    if argv[:1] == ["run"]:
        return docker_run(argv[1:])
    if argv[:1] == ["kill"]:
        return docker_kill(argv[1:])
    if argv[:1] == ["ps"]:
        return docker_ps(argv[1:])
    if argv[:1] == ["stats"]:
        return docker_stats(argv[1:])
    return fail(f"'{' '.join(argv[:1])}' is not a docker command this stand-in knows")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
