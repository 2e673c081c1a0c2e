"""bench: the figures of issues 8, 11-13, on loopback, each against a baseline of the same run.

    make bench                                  # = source env.sh && .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --only 1,4    # some figures only
    .venv/bin/python bench/run.py --python-load # the Python load generator even if wrk is here

It starts its own servers on free loopback ports (mip_server.py with a scratch journal and
folders, bench/bare.py as the baseline), and stops them, and every run they started, before
it exits. The modules are zero-time shell stand-ins on the real graph of config.yml, except
in figure 7, where the real stand-ins of modules/ run on a 12,000 x 9,000 px map.
Prints the machine, then one line per figure: value, baseline, ratio, goal, met.
A benchmark, not a test: it exits 0 whether or not the goals are met.

Sections: tools (processes, HTTP, load), fixtures, figures 1-6, figure 7 (a big map),
figures 8-9 (attacks), figure 10 (the console), figure 11 (issue 22: a burst of CDR
events against the stand-in CDR; BENCH_CDR_EVENTS=N sends N instead of 1,000), figure 12
(a long history: 100,000 CDR maps), figure 13 (a cheaper run: runs a minute,
CPU and memory per run in flight, inline and on moto for ECS), figure 14 (a 20,000 x 15,000
scan through the whole graph), figure 15 (the server's start-up, empty and at 100,000
jobs), main.
"""

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from datetime import datetime

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mip import journal  # noqa: E402
from mip import s3  # noqa: E402
from mip.queue import process_alive  # noqa: E402
from mip.settings import Settings  # noqa: E402

PY = sys.executable
MAP = "bench_map"
SECONDS = 3  # each load measurement; one more second of warm-up before it
CONNECTIONS = 16
# A module that takes no time: ignores its switches, sleeps when given `--sleep N`.
STANDIN = 'while [ $# -gt 0 ]; do if [ "$1" = --sleep ]; then sleep "$2"; fi; shift; done'
FINISHED = ("passed", "failed", "cancelled")


class BenchError(Exception):
    """A server did not start or answered wrongly: the figure cannot be measured."""


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- tools

class Server:
    """A server subprocess whose first output line is `...serving on http://HOST:PORT`."""

    def __init__(self, argv: list, env: dict, log_path: str):
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc = None
        self.url = None

    def start(self, timeout: float = 20) -> "Server":
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.url is None:
            with open(self.log_path) as f:
                match = re.search(r"serving on (http://[\d.]+:\d+)", f.readline())
            if match:
                self.url = match.group(1)
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.05)
        if self.url is None:
            self.stop()
            with open(self.log_path) as f:
                raise BenchError(f"{self.argv[1]} did not start: {f.read()[-500:]}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Client:
    """One keep-alive HTTP connection with optional basic auth."""

    def __init__(self, url: str, auth: str | None = None, timeout: float = 60,
                 source: str | None = None):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(
            host, int(port), timeout=timeout, source_address=(source, 0) if source else None)
        self.headers = {"Authorization": auth} if auth else {}

    def send(self, method: str, path: str, body=None):
        """(status, body bytes, seconds)."""
        data = None if body is None else json.dumps(body).encode()
        started = time.perf_counter()
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, raw, time.perf_counter() - started

    def json(self, method: str, path: str, body=None):
        status, raw, _ = self.send(method, path, body)
        if status != 200:
            raise BenchError(f"{method} {path}: {status} {raw[:300]!r}")
        return json.loads(raw)

    def timings(self, method: str, path: str, count: int, body=None) -> list:
        """Seconds of `count` requests one after another; raises BenchError on a non-200."""
        out = []
        for _ in range(count):
            status, raw, took = self.send(method, path, body)
            if status != 200:
                raise BenchError(f"{method} {path}: {status} {raw[:300]!r}")
            out.append(took)
        return out

    def close(self) -> None:
        self.conn.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def median_ms(times: list) -> float:
    return statistics.median(times) * 1000


def pct_ms(times: list, q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000


def load_rate(url: str, path: str, auth: str, use_wrk: bool, seconds: int = SECONDS) -> float:
    """Requests per second of GET `path` over CONNECTIONS keep-alive connections, after one
    second of warm-up; raises BenchError on any non-200 answer."""
    if use_wrk:
        wrk(url, path, auth, 1)
        return wrk(url, path, auth, seconds)
    python_load(url, path, auth, 1)
    return python_load(url, path, auth, seconds)


def wrk(url: str, path: str, auth: str, seconds: int) -> float:
    argv = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s",
            "-H", f"Authorization: {auth}", url + path]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or (errors and re.search(r"[1-9]", errors.group(1))):
        raise BenchError(f"wrk {path}: {(bad or errors).group(0)}")
    return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))


def python_load(url: str, path: str, auth: str, seconds: int) -> float:
    """wrk's stand-in: CONNECTIONS threads, each one keep-alive http.client connection."""
    counts = [0] * CONNECTIONS
    failures = []
    deadline = time.monotonic() + seconds

    def hammer(i):
        client = Client(url, auth, timeout=10)
        try:
            while time.monotonic() < deadline:
                status, _, _ = client.send("GET", path)
                if status != 200:
                    failures.append(status)
                    return
                counts[i] += 1
        except OSError as e:
            failures.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True)
               for i in range(CONNECTIONS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    if failures:
        raise BenchError(f"GET {path}: {failures[0]}")
    return sum(counts) / (time.monotonic() - started)


def find_wrk(force_python: bool) -> bool:
    if force_python:
        note("load generator: Python threads (--python-load); ratios hold, absolute rates "
             "are the client's ceiling")
        return False
    if shutil.which("wrk"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        note("wrk not found; trying `apt-get install -y wrk` (running as root)")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True,
                       timeout=120)
        if shutil.which("wrk"):
            return True
    note("wrk not found (apt-get install wrk); load generator: Python threads, "
         f"{CONNECTIONS} keep-alive http.client connections; ratios hold, absolute rates are "
         "the client's ceiling")
    return False


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def temp_bytes(pid: int, tmpdir: str) -> int:
    """Bytes in files under tmpdir, counting files the server holds open but unlinked."""
    total = 0
    for folder, _, files in os.walk(tmpdir):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return total
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(tmpdir) and "(deleted)" in \
                    os.readlink(f"/proc/{pid}/fd/{fd}"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            pass
    return total


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def machine(use_wrk: bool) -> str:
    with open("/proc/cpuinfo") as f:
        cpu = re.search(r"model name\s*:\s*(.*)", f.read())
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20
    load = "wrk" if use_wrk else "Python threads (no wrk)"
    return (f"{os.cpu_count()} x {cpu.group(1) if cpu else platform.processor()}, "
            f"{mem:.0f} GB RAM, Linux {platform.release()}, Python {platform.python_version()},"
            f" load: {load} {CONNECTIONS} connections, {SECONDS} s each")


# ---------------------------------------------------------------------------- fixtures

class Bench:
    """The scratch folders, the two servers and what the figures share."""

    def __init__(self, scratch: str, use_wrk: bool):
        self.scratch = scratch
        self.use_wrk = use_wrk
        self.rows = []  # (figure, value, baseline, ratio, goal, met)
        self.details = []
        self.dirs = {name: os.path.join(scratch, name)
                     for name in ("inputs", "outputs", "temps", "runs", "repos", "tmp")}
        for path in self.dirs.values():
            os.makedirs(path)
        map_dir = os.path.join(self.dirs["inputs"], "maps", MAP)
        os.makedirs(map_dir)
        # the stand-ins never read it, but POST /runs checks that GDAL can
        sys.path.insert(0, os.path.join(ROOT, "modules"))
        import sample_map
        sample_map.write_sample_map(os.path.join(map_dir, f"{MAP}.tif"), 200, 160)
        self.catalogue = self.write_catalogue(os.path.join(scratch, "config.yml"))
        password = secrets.token_urlsafe(12)
        self.auth = basic("bench", password)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MIP_", "TA1_")) and "proxy" not in k.lower()}
        env.update({
            "TA1_INPUTS_DIR": self.dirs["inputs"], "TA1_OUTPUTS_DIR": self.dirs["outputs"],
            "TA1_TEMPS_DIR": self.dirs["temps"], "TA1_RUNS_DIR": self.dirs["runs"],
            "TA1_REPOS_DIR": self.dirs["repos"], "TMPDIR": self.dirs["tmp"],
            "MIP_CONFIG": os.path.join(scratch, "config.yml"), "MIP_USER": "bench",
            "MIP_PASSWORD": password, "MIP_MAX_RUNS": "2", "MIP_WORKERS": "4",
            "MIP_THREADS": "8", "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        self.journal_path = os.path.join(self.dirs["runs"], "journal.db")
        self.mip = Server([PY, "mip_server.py", "--port", "0"], env,
                          os.path.join(scratch, "mip_server.log"))
        self.bare = Server([PY, "bench/bare.py", "--port", "0", "--threads", "8"], env,
                           os.path.join(scratch, "bare.log"))
        self.client = None
        self.finished = None  # (run_id, job, module) of a finished zero-time run
        self.status_rate = None

    def write_catalogue(self, path: str) -> dict:
        """config.yml with every module's command replaced by the zero-time stand-in."""
        with open(os.path.join(ROOT, "config.yml"), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for module in data["modules"]:
            module["command"] = ["sh", "-c", STANDIN, "standin"]
            module["outputs"] = []
            module.pop("checks", None)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        return {m["name"]: m["requires"] for m in data["modules"]}

    def critical_path(self) -> int:
        """Modules on the longest chain of `requires`."""
        depth = {}

        def chain(name):
            if name not in depth:
                depth[name] = 1 + max((chain(r) for r in self.catalogue[name]), default=0)
            return depth[name]

        return max(chain(n) for n in self.catalogue)

    def start(self) -> None:
        self.bare.start()
        self.mip.start()
        self.client = Client(self.mip.url, self.auth)
        deadline = time.monotonic() + 20
        while self.client.send("GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise BenchError("mip_server never answered /health")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.client:
            self.client.close()
        self.mip.stop()
        self.bare.stop()
        killed = kill_leftover_runs(self.journal_path)
        if killed:
            self.details.append(f"killed {killed} leftover mipper process group(s)")

    def row(self, figure, value, baseline="-", ratio=None, goal="-", met=None) -> None:
        self.rows.append((figure, value, baseline, ratio, goal, met))
        note(f"{figure}: {value} (baseline {baseline}"
             f"{f', ratio {ratio:.2f}' if ratio is not None else ''})")

    def run_graph(self, job: str, sleep: float | None = None, timeout: float = 60) -> dict:
        """Submit ALL for `job` and wait for it to pass; its RunStatus."""
        payload = {"job": job, "modules": ["ALL"], "map": MAP}
        if sleep:
            payload["extra_switches"] = {m: ["--sleep", str(sleep)] for m in self.catalogue}
        run = self.client.json("POST", "/runs", payload)
        deadline = time.monotonic() + timeout
        while run["status"] not in FINISHED:
            if time.monotonic() > deadline:
                raise BenchError(f"run {run['run_id']} still {run['status']} after {timeout} s")
            time.sleep(0.05)
            run = self.client.json("GET", f"/runs/{run['run_id']}")
        if run["status"] != "passed":
            raise BenchError(f"run {run['run_id']} {run['status']}: {run['log']}")
        return run

    def finished_run(self) -> tuple:
        if self.finished is None:
            run = self.run_graph("status-job")
            self.finished = (run["run_id"], "status-job", "geopackage")
        return self.finished

    def get_status_rate(self) -> float:
        if self.status_rate is None:
            self.status_rate = load_rate(self.mip.url, f"/runs/{self.finished_run()[0]}",
                                         self.auth, self.use_wrk)
        return self.status_rate


def kill_leftover_runs(journal_path: str) -> int:
    """SIGKILL the process group of every run whose mipper is still alive; how many."""
    if not os.path.exists(journal_path):
        return 0
    db = journal.Journal(journal_path)
    rows = db.connect().execute("SELECT run_id, pid FROM runs WHERE pid IS NOT NULL").fetchall()
    db.close()
    killed = 0
    for run_id, pid in rows:
        if process_alive(pid, run_id):
            try:
                os.killpg(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


# ---------------------------------------------------------------------------- figures

def figure_1(b: Bench) -> None:
    """Status reads against the bare endpoint, measured before and after each of them, since
    the machine is noisy; each ratio is against the mean of the two bare rates around it."""
    run_id, job, module = b.finished_run()
    bare = [load_rate(b.bare.url, "/bare", b.auth, b.use_wrk)]
    for label, path in (("GET /runs/{id}", f"/runs/{run_id}"),
                        ("GET /jobs/{job}", f"/jobs/{job}"),
                        ("GET /modules/{job}/{module}", f"/modules/{job}/{module}")):
        rate = load_rate(b.mip.url, path, b.auth, b.use_wrk)
        bare.append(load_rate(b.bare.url, "/bare", b.auth, b.use_wrk))
        base = (bare[-2] + bare[-1]) / 2
        if b.status_rate is None:
            b.status_rate = rate
        b.row(f"1 {label} req/s", f"{rate:.0f}", f"{base:.0f} bare", rate / base,
              ">= 0.90 x bare", rate / base >= 0.9)
    b.details.append(f"1: bare endpoint {', '.join(f'{r:.0f}' for r in bare)} req/s")


def fill_runs(journal_path: str, total: int) -> float:
    """Add passed runs of one job until the journal holds `total`; seconds it took."""
    started = time.monotonic()
    db = journal.Journal(journal_path)
    now = journal.utcnow()
    with db.transaction() as conn:
        have = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        conn.execute("INSERT OR IGNORE INTO jobs (job, map, created) VALUES (?, ?, ?)",
                     ("list-job", MAP, now))
        payload = json.dumps({"job": "list-job", "modules": ["ALL"], "map": MAP,
                              "force_rerun": False})
        log_path = os.path.join(os.path.dirname(journal_path), "logs", "list-job.log")
        conn.executemany(
            "INSERT INTO runs (run_id, job, map, modules, force_rerun, payload, status,"
            " submit_time, start_time, stop_time, log_path)"
            " VALUES (?, 'list-job', ?, '[\"ALL\"]', 0, ?, 'passed', ?, ?, ?, ?)",
            ((journal.new_run_id(), MAP, payload, now, now, now, log_path)
             for _ in range(max(0, total - have))))
    db.close()
    return time.monotonic() - started


def figure_2(b: Bench) -> None:
    """Run listing with 1,000 and 100,000 runs in the journal."""
    status_rate = b.get_status_rate()
    took = fill_runs(b.journal_path, 1000)
    full_rate = load_rate(b.mip.url, "/runs", b.auth, b.use_wrk)
    full_1k = b.client.timings("GET", "/runs", 50)
    page_1k = b.client.timings("GET", "/runs?limit=100", 100)
    took += fill_runs(b.journal_path, 100_000)
    page_100k = b.client.timings("GET", "/runs?limit=100", 100)
    full_100k = b.client.timings("GET", "/runs", 10)
    if len(b.client.json("GET", "/runs")) != 100_000:
        raise BenchError("GET /runs does not list 100,000 runs")
    b.details.append(f"2: journal filled to 100,000 runs in {took:.1f} s; "
                     f"?limit=100 p99 {pct_ms(page_100k, 0.99):.1f} ms at 100,000")
    b.row("2 GET /runs, 1k runs req/s", f"{full_rate:.0f}", f"{status_rate:.0f} status",
          full_rate / status_rate, ">= 0.50 x status", full_rate / status_rate >= 0.5)
    b.row("2 GET /runs?limit=100, 1k runs ms", f"{median_ms(page_1k):.1f}")
    b.row("2 GET /runs?limit=100, 100k runs ms", f"{median_ms(page_100k):.1f}",
          f"{median_ms(page_1k):.1f} at 1k", median_ms(page_100k) / median_ms(page_1k),
          "< 20 ms", median_ms(page_100k) < 20)
    b.row("2 GET /runs, 100k runs ms", f"{median_ms(full_100k):.0f}",
          f"{median_ms(full_1k):.1f} at 1k", median_ms(full_100k) / median_ms(full_1k))


def figure_3(b: Bench, count: int = 200) -> None:
    """POST /runs latency of long runs on distinct jobs, then every run cancelled."""
    bare = Client(b.bare.url)
    payloads = [{"job": f"post-{i:03d}", "modules": ["ALL"], "map": MAP,
                 "extra_switches": {"legend_segment": ["--sleep", "600"]}} for i in range(count)]
    base = median_ms(bare.timings("POST", "/bare", count, payloads[0]))
    bare.close()
    times, run_ids = [], []
    for body in payloads:
        status, raw, took = b.client.send("POST", "/runs", body)
        if status != 200:
            raise BenchError(f"POST /runs: {status} {raw[:300]!r}")
        times.append(took)
        run_ids.append(json.loads(raw)["run_id"])
    # newest first, so that no cancellation lets a queued run start
    started = time.monotonic()
    for run_id in reversed(run_ids):
        b.client.json("POST", f"/runs/{run_id}/cancel")
    cancelled = time.monotonic() - started
    statuses = {b.client.json("GET", f"/runs/{r}")["status"] for r in run_ids}
    left = kill_leftover_runs(b.journal_path)
    b.details.append(f"3: {count} runs cancelled in {cancelled:.1f} s; statuses after: "
                     f"{', '.join(sorted(statuses))}; mipper processes left: {left}"
                     f"{' (killed)' if left else ''}")
    b.row("3 POST /runs median ms", f"{median_ms(times):.1f}", f"{base:.1f} bare POST",
          median_ms(times) / base, "< 20 ms", median_ms(times) < 20)
    b.row("3 POST /runs p99 ms", f"{pct_ms(times, 0.99):.1f}")


def make_folder(root: str, files: int, size: int, compressible: bool) -> int:
    """`files` files of `size` bytes under root (100 per subfolder); total bytes."""
    os.makedirs(root)
    text = (b'{"type": "Feature", "properties": {"name": "unit %d", "confidence": 0.%d}, '
            b'"geometry": {"type": "Polygon", "coordinates": [[[%d, %d], [%d, %d]]]}}\n')
    for i in range(files):
        folder = os.path.join(root, f"part{i // 100:03d}")
        if i % 100 == 0:
            os.makedirs(folder)
        if compressible:
            data = b"".join(text % (i, j, i, j, j, i) for j in range(size // 100 + 1))[:size]
            name = f"item_{i:05d}.geojson"
        else:
            data = os.urandom(size)
            name = f"blob_{i:05d}.bin"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return files * size


def zipfile_baseline(root: str) -> float:
    """Seconds for Python's zipfile to write root, stored, to /dev/null."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink, zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                zf.write(path, os.path.relpath(path, root))
    return time.perf_counter() - started


def zip_baseline(root: str) -> float:
    """Seconds for `zip -0 -r` of root to /dev/null."""
    started = time.perf_counter()
    subprocess.run(["zip", "-q", "-0", "-r", "-", "."], cwd=root, stdout=subprocess.DEVNULL,
                   check=True, timeout=300)
    return time.perf_counter() - started


def download(b: Bench, path: str, status_path: str) -> dict:
    """Fetch a zip while sampling the server's RSS and temp bytes and timing status reads
    on a second connection."""
    pid, tmpdir = b.mip.pid, b.dirs["tmp"]
    idle = b.client.timings("GET", status_path, 50)
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    except OSError:
        pass
    before = rss_kb(pid)
    done = threading.Event()
    peak = {"rss": before, "tmp": 0}
    reads = []

    def sample():
        while not done.wait(0.02):
            peak["rss"] = max(peak["rss"], rss_kb(pid))
            peak["tmp"] = max(peak["tmp"], temp_bytes(pid, tmpdir))

    def status_reads():
        client = Client(b.mip.url, b.auth)
        while not done.is_set():
            reads.extend(client.timings("GET", status_path, 1))
            time.sleep(0.01)
        client.close()

    threads = [threading.Thread(target=sample, daemon=True),
               threading.Thread(target=status_reads, daemon=True)]
    for t in threads:
        t.start()
    conn = Client(b.mip.url, b.auth, timeout=120)
    buf = bytearray(1 << 20)
    tail = b""
    received = 0
    try:
        started = time.perf_counter()
        conn.conn.request("GET", path, headers=conn.headers)
        resp = conn.conn.getresponse()
        if resp.status != 200:
            raise BenchError(f"GET {path}: {resp.status} {resp.read()[:300]!r}")
        first = resp.read1(65536)
        ttfb = time.perf_counter() - started
        received, tail = len(first), first[-22:]
        while n := resp.readinto(buf):
            received += n
            tail = (tail + bytes(buf[max(0, n - 22):n]))[-22:]
        total = time.perf_counter() - started
    finally:
        done.set()
        for t in threads:
            t.join(30)
        conn.close()
    if not tail.startswith(b"PK\x05\x06"):
        raise BenchError(f"GET {path}: the answer does not end like a zip")
    try:
        peak["rss"] = max(peak["rss"], rss_kb(pid, "VmHWM"))
    except (OSError, AttributeError):
        pass
    return {"ttfb": ttfb, "seconds": total, "bytes": received, "tmp": peak["tmp"],
            "growth_mb": (peak["rss"] - before) / 1024, "reads": reads or [float("nan")],
            "idle": idle}


def figure_4(b: Bench) -> None:
    """Zip downloads of 500 MB of incompressible files and of 20,000 small files."""
    run_id = b.finished_run()[0]
    folders = {"map_crop": ("500 MB", 50, 10 * 2**20, False),
               "polygon_extract": ("20k files", 20_000, 2048, True)}
    b.run_graph("zip-job")  # the modules pass with empty folders, filled below
    job_out = os.path.join(b.dirs["outputs"], "zip-job")
    for module, (label, files, size, compressible) in folders.items():
        root = os.path.join(job_out, module)
        os.rmdir(root)
        made = time.monotonic()
        total = make_folder(root, files, size, compressible)
        made = time.monotonic() - made
        zf = zipfile_baseline(root)
        zp = zip_baseline(root)
        got = download(b, f"/modules/zip-job/{module}/outputs", f"/runs/{run_id}")
        mbps = total / got["seconds"] / 1e6
        zip_mbps, zf_mbps = total / zp / 1e6, total / zf / 1e6
        b.details.append(
            f"4 {label}: folder made in {made:.1f} s; zip {got['bytes'] / 1e6:.0f} MB in "
            f"{got['seconds']:.2f} s; zipfile stored {zf_mbps:.0f} MB/s, zip -0 {zip_mbps:.0f} "
            f"MB/s; concurrent status reads: {len(got['reads'])}, median "
            f"{median_ms(got['reads']):.1f} ms, max {max(got['reads']) * 1000:.1f} ms")
        idle_ms = median_ms(got["idle"])
        b.row(f"4 {label}: first byte ms", f"{got['ttfb'] * 1000:.1f}",
              f"{idle_ms:.1f} status", got["ttfb"] * 1000 / idle_ms, "< 50 ms",
              got["ttfb"] < 0.05)
        b.row(f"4 {label}: throughput MB/s", f"{mbps:.0f}", f"{zip_mbps:.0f} zip -0",
              mbps / zip_mbps, ">= 1.00 x zip -0", mbps >= zip_mbps)
        b.row(f"4 {label}: temp bytes", f"{got['tmp']}", goal="0", met=got["tmp"] == 0)
        b.row(f"4 {label}: memory growth MB", f"{got['growth_mb']:.1f}", goal="< 50 MB",
              met=got["growth_mb"] < 50)
        p99 = pct_ms(got["reads"], 0.99)
        b.row(f"4 {label}: concurrent status p99 ms", f"{p99:.1f}", f"{idle_ms:.1f} idle",
              p99 / idle_ms, "< 20 ms", p99 < 20)
        shutil.rmtree(root)


def figure_5(b: Bench, repeats: int = 3) -> None:
    """The whole graph with zero-time stand-ins, and with every module sleeping 1 s."""
    modules = len(b.catalogue)
    spans = []
    for i in range(repeats):
        run = b.run_graph(f"zero-{i}")
        spans.append(parse_time(run["stop_time"]) - parse_time(run["submit_time"]))
        startup = parse_time(run["start_time"]) - parse_time(run["submit_time"])
    started = time.perf_counter()
    for _ in range(modules):
        subprocess.run(["sh", "-c", STANDIN, "standin", "--input", "x"], check=True)
    direct = (time.perf_counter() - started) / modules
    per_module = statistics.median(spans) / modules
    b.details.append(f"5: zero-time graph makespans {', '.join(f'{s:.2f}' for s in spans)} s "
                     f"for {modules} modules (submit to mipper running: {startup:.2f} s)")
    b.row("5 zero-time graph: ms per module", f"{per_module * 1000:.0f}",
          f"{direct * 1000:.1f} spawn", per_module / direct, "< 150 ms", per_module < 0.15)
    chain = b.critical_path()
    run = b.run_graph("sleep-1", sleep=1)
    span = parse_time(run["stop_time"]) - parse_time(run["submit_time"])
    b.row("5 1 s modules: makespan s", f"{span:.2f}", f"{chain:.2f} crit. path", span / chain,
          "<= 1.10 x path", span / chain <= 1.10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def figure_6(b: Bench, files: int = 16, size: int = 16 * 2**20) -> None:
    """A module's upload (s3.upload_module: boto3 managed transfers) to moto's
    S3-compatible server on loopback, against a plain local copy of the same files."""
    import boto3


    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto_log = open(os.path.join(b.scratch, "moto.log"), "wb")
    moto = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=moto_log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                             "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        deadline = time.monotonic() + 30
        client = boto3.client("s3")
        while True:
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise BenchError("moto server did not start") from None
                time.sleep(0.1)
        root = os.path.join(b.dirs["outputs"], "s3-job", "map_crop")
        total = make_folder(root, files, size, compressible=False)
        started = time.perf_counter()
        shutil.copytree(root, os.path.join(b.scratch, "copy"))
        copy = time.perf_counter() - started
        settings = Settings(
            inputs_dir=b.dirs["inputs"], outputs_dir=b.dirs["outputs"],
            temps_dir=b.dirs["temps"], runs_dir=b.dirs["runs"], repos_dir=b.dirs["repos"],
            config_path=os.path.join(b.scratch, "config.yml"), s3_bucket="bench")
        started = time.perf_counter()
        s3.upload_module(settings, "s3-job", "map_crop", client)
        upload = time.perf_counter() - started
        started = time.perf_counter()
        s3.upload_module(settings, "s3-job", "map_crop", client)
        again = time.perf_counter() - started
        up_mbps, copy_mbps = total / upload / 1e6, total / copy / 1e6
        b.details.append(f"6: {files} files of {size // 2**20} MB: upload {upload:.2f} s, "
                         f"local copy {copy:.2f} s, upload again (nothing to send) {again:.2f} s")
        b.row("6 S3 upload MB/s", f"{up_mbps:.0f}", f"{copy_mbps:.0f} local copy",
              up_mbps / copy_mbps, "(reported)")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait(10)
        moto_log.close()


# ---------------------------------------------------------------------------- figure 7

BIG_MAP = "bench_big"
BIG_SIZE = (12_000, 9_000)
SAMPLE_SECONDS = 0.2
PAGE = os.sysconf("SC_PAGE_SIZE")
PATCH_NAME = re.compile(r"_(\d+)_(\d+)\.png$")


def tree_rss(root: int) -> tuple:
    """(bytes, processes): the summed resident memory of root and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
            count += 1
        except (OSError, ValueError, IndexError):
            continue
        todo.extend(children.get(pid, []))
    return total, count


def run_sampled(argv: list, env: dict, log_path: str, timeout: float) -> dict:
    """Run argv to its end, sampling the memory of its process tree every 0.2 s."""
    peak = {"bytes": 0, "processes": 0, "at": 0.0}
    done = threading.Event()
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def sample():
            while not done.is_set():
                rss, count = tree_rss(proc.pid)
                if rss > peak["bytes"]:
                    peak.update(bytes=rss, processes=count, at=time.perf_counter() - started)
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise BenchError(f"{argv[1]} still running after {timeout:.0f} s") from None
        finally:
            seconds = time.perf_counter() - started
            done.set()
            sampler.join(10)
    return {"code": code, "seconds": seconds, **peak}


def decode_seconds(path: str, repeats: int = 2) -> float:
    """The best time of one full decode of the map by rasterio (every band, every pixel)."""
    import rasterio

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with rasterio.open(path) as src:
            pixels = src.read()
        best = min(best, time.perf_counter() - started)
        del pixels
    return best


def map_box(segmentation_path: str) -> tuple:
    """legend_segment's map area (x0, y0, x1, y1)."""
    with open(segmentation_path, encoding="utf-8") as f:
        shapes = json.load(f)["shapes"]
    (x0, y0), (x1, y1) = next(s["points"] for s in shapes if s["label"] == "map")
    return int(x0), int(y0), int(x1), int(y1)


def encode_patches(path: str, crop_dir: str, area: tuple, dest: str) -> tuple:
    """(seconds, patches, bytes): map_crop's required output made alone: the very patches it
    wrote (white outside the map area and past the edges), encoded as PNG with Pillow at
    map_crop's compression level and on as many threads as map_crop uses, from the decoded
    map."""
    import numpy
    import rasterio
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "modules"))
    import patches as map_crop_patches

    with rasterio.open(path) as src:
        rgb = src.read().transpose(1, 2, 0)
    ax0, ay0, ax1, ay1 = area
    jobs = []
    for folder in sorted(os.listdir(crop_dir)):
        grid = re.search(r"_g(\d+)_s(\d+)_wo_legend$", folder)
        if not grid:
            continue
        size, stride = int(grid.group(1)), int(grid.group(2))
        os.makedirs(os.path.join(dest, folder))
        for name in sorted(os.listdir(os.path.join(crop_dir, folder))):
            place = PATCH_NAME.search(name)
            if place:
                jobs.append((os.path.join(dest, folder, name), size,
                             int(place.group(2)) * stride, int(place.group(1)) * stride))

    def encode(job) -> int:
        out, size, x0, y0 = job
        patch = numpy.full((size, size, 3), 255, dtype=numpy.uint8)
        left, top = max(x0, ax0), max(y0, ay0)
        right, bottom = min(x0 + size, ax1), min(y0 + size, ay1)
        if left < right and top < bottom:
            patch[top - y0:bottom - y0, left - x0:right - x0] = rgb[top:bottom, left:right]
        Image.fromarray(patch).save(out, "PNG", compress_level=map_crop_patches.PNG_LEVEL)
        return os.path.getsize(out)

    started = time.perf_counter()
    with map_crop_patches.pool() as threads:
        written = sum(threads.map(encode, jobs))
    return time.perf_counter() - started, len(jobs), written, map_crop_patches.THREADS


def figure_7(b: Bench) -> None:
    """The whole graph of the real stand-ins (config.yml), 4 workers, on the sample map drawn
    at 12,000 x 9,000 and written as LZW: wall time against one full decode of the file by
    rasterio, peak memory of mipper and all its children, and map_crop's patches encoded
    alone (the bound its required output puts on the graph)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import map_variants
    import sample_map

    base = os.path.join(b.scratch, "big")
    dirs = {name: os.path.join(base, name)
            for name in ("inputs", "outputs", "temps", "runs", "repos", "bound")}
    for path in dirs.values():
        os.makedirs(path)
    tif = os.path.join(dirs["inputs"], "maps", BIG_MAP, f"{BIG_MAP}.tif")
    started = time.perf_counter()
    map_variants.write_variant(map_variants.VARIANTS["lzw"], sample_map.draw_sample_map(*BIG_SIZE),
                               tif)
    made = time.perf_counter() - started
    decode = decode_seconds(tif)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIP_", "TA1_")) and "proxy" not in k.lower()}
    env.update({f"TA1_{name.upper()}_DIR": dirs[name]
                for name in ("inputs", "outputs", "temps", "runs", "repos")})
    env.update(MIP_CONFIG=os.path.join(ROOT, "config.yml"), MIP_WORKERS="4",
               PYTHONUNBUFFERED="1")
    job = "big-job"
    run = run_sampled([PY, "mipper.py", "--job", job, "--map", BIG_MAP, "--module", "ALL"], env,
                      os.path.join(base, "mipper.log"), timeout=900)
    if run["code"] != 0:
        with open(os.path.join(base, "mipper.log")) as f:
            raise BenchError(f"the graph failed on the 12k map: {f.read()[-400:]}")
    db = journal.Journal(os.path.join(dirs["runs"], "journal.db"))
    spans = {}
    for module in db.job_modules(job):
        row = db.latest_execution(job, module)
        spans[module] = parse_time(row["stop_time"]) - parse_time(row["start_time"])
    db.close()

    out = os.path.join(dirs["outputs"], job)
    area = map_box(os.path.join(out, "legend_segment", f"{BIG_MAP}_map_segmentation.json"))
    bound, patches, patch_bytes, threads = encode_patches(
        tif, os.path.join(out, "map_crop"), area, dirs["bound"])
    graph, peak_gb = run["seconds"], run["bytes"] / 1e9
    slowest = sorted(spans.items(), key=lambda kv: -kv[1])[:4]
    b.details.append(
        f"7: map {BIG_SIZE[0]} x {BIG_SIZE[1]} LZW, {os.path.getsize(tif) / 1e6:.0f} MB, made "
        f"in {made:.1f} s; decode {decode:.2f} s (best of 2); graph {graph:.1f} s, longest "
        f"modules {', '.join(f'{m} {s:.1f} s' for m, s in slowest)}; peak {peak_gb:.2f} GB in "
        f"{run['processes']} processes at {run['at']:.1f} s; map_crop's {patches} patches "
        f"({patch_bytes / 1e6:.0f} MB of PNG) encoded alone on {threads} threads in "
        f"{bound:.1f} s")
    b.row("7 12k map: graph s", f"{graph:.1f}", f"{decode:.2f} decode", graph / decode,
          "<= 20 x decode", graph / decode <= 20)
    b.row("7 12k map: graph vs patches s", f"{graph:.1f}", f"{bound:.1f} patches",
          graph / bound, "<= 1.5 x patches", graph / bound <= 1.5)
    b.row("7 12k map: peak memory GB", f"{peak_gb:.2f}", goal="<= 1.2 GB", met=peak_gb <= 1.2)


def sample_reads(b: Bench, paths: list, seconds: float) -> dict:
    """{path: seconds of each GET} for `seconds`, one connection per path, each sending a
    request 10 ms after the last answer; raises BenchError on a non-200 answer."""
    times = {path: [] for path in paths}
    failures = []
    deadline = time.monotonic() + seconds

    def read(path):
        client = Client(b.mip.url, b.auth, timeout=30)
        try:
            while time.monotonic() < deadline:
                status, raw, took = client.send("GET", path)
                if status != 200:
                    failures.append(f"GET {path}: {status} {raw[:200]!r}")
                    return
                times[path].append(took)
                time.sleep(0.01)
        except OSError as e:
            failures.append(f"GET {path}: {e}")
        finally:
            client.close()

    threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    if failures:
        raise BenchError(failures[0])
    return times


def latency_rows(b: Bench, figure: str, idle: dict, loaded: dict) -> None:
    """One row per path: p95 under load against p95 idle, goal < 50 ms."""
    for path, label in zip(idle, ("status read", "/health"), strict=True):
        p95, base = pct_ms(loaded[path], 0.95), pct_ms(idle[path], 0.95)
        b.row(f"{figure} {label} p95 ms", f"{p95:.1f}", f"{base:.1f} idle", p95 / base,
              "< 50 ms", p95 < 50)


ATTACKERS = 32
ATTACK_INTERVAL = 0.5  # seconds between two wrong passwords of one attacker: 64/s in all


def figure_8(b: Bench, seconds: float = 6) -> None:
    """Status reads and /health while 32 clients, each from its own loopback address
    (127.0.0.2 and up), send wrong passwords, each one every ATTACK_INTERVAL seconds."""
    paths = [f"/runs/{b.finished_run()[0]}", "/health"]
    idle = sample_reads(b, paths, 3)
    counts = {}
    done = threading.Event()
    wrong = basic("bench", "wrong password")

    def attack(i):
        client = Client(b.mip.url, wrong, timeout=30, source=f"127.0.0.{2 + i}")
        try:
            while not done.is_set():
                status = client.send("GET", "/jobs")[0]
                counts[status] = counts.get(status, 0) + 1
                done.wait(ATTACK_INTERVAL)
        except OSError as e:
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
        finally:
            client.close()

    logins = []  # (status, seconds) of new clients logging in during the attack
    user, password = "bench", b.env["MIP_PASSWORD"]

    def log_in():
        # each from an address of its own, with a header the server has not seen (the
        # scheme spelt in another case), so that each costs a real password check
        schemes = ["".join(c.upper() if i >> k & 1 else c for k, c in enumerate("basic"))
                   for i in range(32)]
        for i, scheme in enumerate(s for s in schemes if s != "Basic"):
            header = scheme + basic(user, password).removeprefix("Basic")
            client = Client(b.mip.url, header, timeout=30, source=f"127.0.1.{1 + i}")
            try:
                status, _, took = client.send("GET", "/jobs")
                logins.append((status, took))
            finally:
                client.close()
            if done.wait(ATTACK_INTERVAL):
                return

    threads = [threading.Thread(target=attack, args=(i,), daemon=True)
               for i in range(ATTACKERS)]
    threads.append(threading.Thread(target=log_in, daemon=True))
    for t in threads:
        t.start()
    try:
        loaded = sample_reads(b, paths, seconds)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    b.details.append(f"8: {ATTACKERS} addresses, {ATTACKERS / ATTACK_INTERVAL:.0f} wrong "
                     f"passwords/s asked, {sum(counts.values())} sent in {seconds:.0f} s, "
                     "answers " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(),
                                                                           key=str))
                     + f"; reads under attack: {', '.join(str(len(t)) for t in loaded.values())}")
    latency_rows(b, "8 wrong passwords:", idle, loaded)
    passed = [took for status, took in logins if status == 200]
    b.row("8 new clients' logins", f"{len(passed)}/{len(logins)} ok",
          goal="(reported)")
    b.details.append("8: new clients' logins: " + ", ".join(
        f"{status} in {took * 1000:.0f} ms" for status, took in logins))
    if passed:
        b.row("8 new client login max ms", f"{max(passed) * 1000:.0f}", goal="(reported)")


READERS = 20
READ_RATE = 600 * 1024  # bytes a second each slow reader takes


def figure_9(b: Bench, seconds: float = 8) -> None:
    """Status reads and /health while 20 clients download a 64 MB zip at 600 KB/s each;
    a reader refused with 503 waits its Retry-After and asks again, as a client would."""
    paths = [f"/runs/{b.finished_run()[0]}", "/health"]
    b.run_graph("slow-zip-job")
    root = os.path.join(b.dirs["outputs"], "slow-zip-job", "map_crop")
    shutil.rmtree(root)
    make_folder(root, 4, 16 * 2**20, compressible=False)
    idle = sample_reads(b, paths, 3)
    counts = {"served": 0, "refused": 0, "bytes": 0, "errors": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds + 1

    def read_slowly():
        while time.monotonic() < deadline:
            client = Client(b.mip.url, b.auth, timeout=30)
            try:
                client.conn.request("GET", "/modules/slow-zip-job/map_crop/outputs",
                                    headers=client.headers)
                resp = client.conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    with lock:
                        counts["refused"] += 1
                    time.sleep(min(float(resp.getheader("Retry-After") or 1),
                                   max(0, deadline - time.monotonic())))
                    continue
                with lock:
                    counts["served"] += 1
                while time.monotonic() < deadline:
                    data = resp.read(READ_RATE // 10)
                    if not data:
                        break
                    with lock:
                        counts["bytes"] += len(data)
                    time.sleep(0.1)
            except OSError:
                with lock:
                    counts["errors"] += 1
            finally:
                client.close()

    threads = [threading.Thread(target=read_slowly, daemon=True) for _ in range(READERS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)  # every reader has asked once
        loaded = sample_reads(b, paths, seconds)
    finally:
        for t in threads:
            t.join(60)
    b.details.append(f"9: {READERS} readers at {READ_RATE // 1024} KB/s: downloads served "
                     f"{counts['served']}, refused (503) {counts['refused']}, "
                     f"{counts['bytes'] / 1e6:.0f} MB read, connection errors "
                     f"{counts['errors']}; reads under load: "
                     f"{', '.join(str(len(t)) for t in loaded.values())}")
    latency_rows(b, "9 slow downloads:", idle, loaded)
    shutil.rmtree(root)


# ---------------------------------------------------------------------------- figure 10

def figure_10(b: Bench, total: int = 10_000) -> None:
    """The console's runs page, rendered by the server, with 10,000 runs in the journal (or
    the more figure 2 left): its first page, its last, and a filtered one."""
    fill_runs(b.journal_path, total)
    count = len(b.client.json("GET", "/runs"))
    last = -(-count // 50)
    for label, path in (("first page", "/ui/runs"),
                        ("last page", f"/ui/runs?page={last}"),
                        ("filtered", "/ui/runs?status=passed&job=list-job&page=2")):
        status, raw, _ = b.client.send("GET", path)
        if status != 200 or b"<tr data-run=" not in raw:
            raise BenchError(f"GET {path}: {status} {raw[:300]!r}")
        times = b.client.timings("GET", path, 50)
        b.row(f"10 GET /ui/runs {label}, {count // 1000}k runs ms", f"{median_ms(times):.1f}",
              goal="< 200 ms", met=median_ms(times) < 200)
        b.details.append(f"10: {path} p95 {pct_ms(times, 0.95):.1f} ms, {len(raw)} bytes")


# ---------------------------------------------------------------------------- figure 11

# writes its 4th argument (the --content option) to its 2nd (the --output option): the one
# output of each module that publishing reads, so that every run has something to publish
WRITE = 'mkdir -p "$(dirname "$2")" && printf "%s" "$4" > "$2"'
TRIVIAL = {"runner": "inline", "modules": [
    {"name": "legend_segment", "version": "0.1.0", "requires": [],
     "command": ["sh", "-c", WRITE, "write"],
     "options": {"output": "$OUTPUT_DIR/legend_segment/$MAP_NAME_map_segmentation.json",
                 "content": '{"shapes": []}'},
     "outputs": ["$OUTPUT_DIR/legend_segment/$MAP_NAME_map_segmentation.json"]},
    {"name": "georeference", "version": "0.1.0", "requires": ["legend_segment"],
     "command": ["sh", "-c", WRITE, "write"],
     "options": {"output": "$OUTPUT_DIR/georeference/$MAP_NAME.json",
                 "content": '{"gcps": [], "estimated": false, "crs": "EPSG:4267"}'},
     "outputs": ["$OUTPUT_DIR/georeference/$MAP_NAME.json"]},
]}
CDR_EVENTS = int(os.environ.get("BENCH_CDR_EVENTS", "1000"))


def figure_11(b: Bench, total: int = CDR_EVENTS, senders: int = 8,
              timeout: float = 3600) -> None:
    """The CDR burst: `total` signed map.process events, each for its own cog, from the
    stand-in CDR as fast as `senders` threads send them, against a server of its own with
    the default MIP_MAX_QUEUED (200) and a catalogue of two modules that each write one
    small output (not the zero-time graph: a run must leave something to publish)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cdr_standin import StandInCdr

    root = os.path.join(b.scratch, "cdr")
    dirs = {name: os.path.join(root, name) for name in ("inputs", "outputs", "temps", "runs",
                                                         "repos")}
    for path in dirs.values():
        os.makedirs(path)
    with open(os.path.join(root, "config.yml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(TRIVIAL, f, sort_keys=False)
    with open(os.path.join(b.dirs["inputs"], "maps", MAP, f"{MAP}.tif"), "rb") as f:
        image = f.read()
    cdr = StandInCdr("bench-token").start()
    cogs = [f"burst{i:05d}" for i in range(total)]
    for cog in cogs:
        cdr.add_cog(cog, image)
    port = free_port()
    env = dict(b.env, TA1_INPUTS_DIR=dirs["inputs"], TA1_OUTPUTS_DIR=dirs["outputs"],
               TA1_TEMPS_DIR=dirs["temps"], TA1_RUNS_DIR=dirs["runs"],
               TA1_REPOS_DIR=dirs["repos"], MIP_CONFIG=os.path.join(root, "config.yml"),
               MIP_WORKERS="1", MIP_MAX_RUNS="4", MIP_CDR_URL=cdr.url,
               MIP_CDR_TOKEN="bench-token", MIP_CDR_SECRET=secrets.token_hex(16),
               MIP_CDR_CALLBACK_URL=f"http://127.0.0.1:{port}/cdr")
    env.pop("MIP_MAX_QUEUED", None)
    srv = Server([PY, "mip_server.py", "--port", str(port)], env,
                 os.path.join(root, "mip_server.log"))
    try:
        srv.start()
        client = Client(srv.url, b.auth)
        deadline = time.monotonic() + 30
        while not client.json("GET", "/")["cdr"]["registered"]:
            if time.monotonic() > deadline:
                raise BenchError("the server never registered with the stand-in CDR")
            time.sleep(0.1)
        acks, times = [], []
        lock = threading.Lock()

        def send(part):
            for cog in part:
                started = time.perf_counter()
                try:
                    status = cdr.deliver("map.process", {
                        "cog_id": cog, "cog_url": f"{cdr.url}/cogs/{cog}.cog.tif"},
                        event_id=f"ev-{cog}").status_code
                except OSError:
                    status = None
                with lock:
                    times.append(time.perf_counter() - started)
                    acks.append(status)

        started = time.monotonic()
        threads = [threading.Thread(target=send, args=(cogs[i::senders],))
                   for i in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = time.monotonic() - started
        acknowledged = acks.count(200)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = client.json("GET", f"/cdr/events?limit={total + 10}")
            ended = len(client.json("GET", "/runs?status=passed")) + len(
                client.json("GET", "/runs?status=failed"))
            waiting = [e for e in events if e["status"] in ("received", "downloading")]
            submitted = sum(e["status"] == "submitted" for e in events)
            if not waiting and ended >= submitted:
                break
            time.sleep(1)
        ran = time.monotonic() - started
        time.sleep(2)  # the last publications
        passed = client.json("GET", "/runs?status=passed")
        failed = client.json("GET", "/runs?status=failed")
        with cdr.lock:
            published = len({p["cog_id"] for k, p, _ in cdr.published if k == "features"})
        statuses = [e["status"] for e in client.json("GET", f"/cdr/events?limit={total + 10}")]
        client.close()
    finally:
        srv.stop()
        kill_leftover_runs(os.path.join(dirs["runs"], "journal.db"))
        cdr.stop()
    lost = acknowledged - len(passed) - len(failed)
    b.row(f"11 CDR burst: {total} events acknowledged", str(acknowledged),
          goal=f"{total}", met=acknowledged == total)
    b.row("11 CDR burst: ack p95 ms", f"{pct_ms(times, 0.95):.1f}")
    b.row("11 CDR burst: run", str(len(passed) + len(failed)))
    b.row("11 CDR burst: published", str(published))
    b.row("11 CDR burst: lost", str(lost), goal="0", met=lost == 0)
    b.details.append(
        f"11: sent in {sent:.1f} s ({total / sent:.0f}/s), all ended after {ran:.0f} s "
        f"({len(passed)} passed, {len(failed)} failed runs); events "
        f"{', '.join(f'{s} {statuses.count(s)}' for s in sorted(set(statuses)))}; "
        f"ack median {median_ms(times):.1f} ms; MIP_MAX_QUEUED 200, MIP_MAX_RUNS 4, a "
        "catalogue of two modules that each write one small file")



def fill_history(journal_path: str, inputs_dir: str | None, total: int) -> float:
    """A journal holding `total` CDR maps' history, as the CDR makes it (one job per map,
    named after its cog): jobs, a passed run each with one execution, a submitted event
    and published results; with `inputs_dir`, a map folder each (an empty .tif: listing
    maps only asks whether it is a file). Filled by SQL; seconds it took."""
    started = time.monotonic()
    db = journal.Journal(journal_path)
    db.migrate()
    logs = os.path.join(os.path.dirname(journal_path), "logs")
    numbers = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)"
               " SELECT i, printf('cog%06d', i) AS name,"
               " strftime('%Y-%m-%dT%H:%M:%S.000Z', '2026-01-01', '+' || i || ' seconds')"
               " AS t FROM n")
    with db.transaction() as conn:
        conn.execute("INSERT INTO jobs (job, map, created)"
                     f" SELECT name, name, t FROM ({numbers})", (total,))
        conn.execute(
            "INSERT INTO runs (run_id, job, map, modules, force_rerun, payload, status,"
            " submit_time, start_time, stop_time, pid, log_path)"
            " SELECT printf('20260101-000000-%06d-0000', i), name, name, '[\"ALL\"]', 0,"
            " json_object('job', name, 'map', name, 'modules', json_array('ALL'),"
            " 'force_rerun', json('false')), 'passed', t, t, t, NULL,"
            f" ? || '/' || printf('20260101-000000-%06d-0000', i) || '.log' FROM ({numbers})",
            (logs, total))
        conn.execute(
            "INSERT INTO executions (run_id, job, module, status, start_time, stop_time,"
            " exit_code, log_path) SELECT printf('20260101-000000-%06d-0000', i), name,"
            f" 'map_crop', 'passed', t, t, 0, '/dev/null' FROM ({numbers})", (total,))
        conn.execute(
            "INSERT INTO cdr_events (event_id, event, cog_id, cog_url, status, received,"
            " updated, run_id) SELECT printf('event%06d', i), 'map.process', name,"
            " 'http://127.0.0.1:9/' || name || '.cog.tif', 'submitted', t, t,"
            f" printf('20260101-000000-%06d-0000', i) FROM ({numbers})", (total,))
        conn.execute(
            "INSERT INTO cdr_publications (job, kind, status, result_id, time)"
            " SELECT name, kind, 'published', name || kind, t"
            f" FROM ({numbers}), (SELECT 'features' AS kind UNION ALL SELECT 'georef')",
            (total,))
    db.close()
    if inputs_dir:
        maps_dir = os.path.join(inputs_dir, "maps")
        for i in range(1, total + 1):
            name = f"cog{i:06d}"
            os.makedirs(os.path.join(maps_dir, name), exist_ok=True)
            open(os.path.join(maps_dir, name, f"{name}.tif"), "wb").close()
    return time.monotonic() - started



def started_in(argv: list, env: dict, log_path: str, auth: str) -> tuple:
    """(a started Server, seconds from its launch to its first 200 on /health): the port
    line comes before the start-up work, and the server answers only once that is done."""
    began = time.monotonic()
    server = Server(argv, env, log_path).start(timeout=120)
    client = Client(server.url, auth)
    deadline = time.monotonic() + 120
    try:
        while client.send("GET", "/health")[0] != 200:
            if time.monotonic() > deadline:
                raise BenchError("mip_server never answered /health")
            time.sleep(0.01)
    except BaseException:
        server.stop()
        raise
    finally:
        client.close()
    return server, time.monotonic() - began



def cdr_linked(b: Bench, name: str) -> tuple:
    """Folders of their own under the scratch folder `name`, a started stand-in CDR of the
    tests, and the environment of a server linked to it: (root, dirs, cdr, env)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cdr_standin import StandInCdr

    root = os.path.join(b.scratch, name)
    dirs = {part: os.path.join(root, part)
            for part in ("inputs", "outputs", "temps", "runs", "repos")}
    for path in dirs.values():
        os.makedirs(path)
    cdr = StandInCdr("bench-token").start()
    env = dict(b.env, TA1_INPUTS_DIR=dirs["inputs"], TA1_OUTPUTS_DIR=dirs["outputs"],
               TA1_TEMPS_DIR=dirs["temps"], TA1_RUNS_DIR=dirs["runs"],
               TA1_REPOS_DIR=dirs["repos"], MIP_CDR_URL=cdr.url + "/",
               MIP_CDR_TOKEN="bench-token", MIP_CDR_SECRET=secrets.token_hex(16),
               MIP_CDR_CALLBACK_URL="http://127.0.0.1:9/cdr")
    return root, dirs, cdr, env


def figure_12(b: Bench, total: int = 100_000) -> None:
    """Lists that grow with every CDR map, at `total` maps (one job, run, execution, event
    and publication each, and a map folder each, as fill_history makes them): GET /jobs and
    /cdr/events?limit=100, the console's jobs and maps pages (first and last), and the
    server's start-up (launch to first /health) against the same on an empty journal. A
    server of its own, linked to the stand-in CDR of the tests (events need the link)."""
    root, dirs, cdr, env = cdr_linked(b, "pages")
    argv = [PY, "mip_server.py", "--port", "0"]
    log_path = os.path.join(root, "mip_server.log")
    server = None
    try:
        server, empty = started_in(argv, env, log_path, b.auth)
        server.stop()
        took = fill_history(os.path.join(dirs["runs"], "journal.db"), dirs["inputs"], total)
        server, start = started_in(argv, env, log_path, b.auth)
        b.row(f"12 start-up, {total // 1000}k jobs s", f"{start:.2f}", f"{empty:.2f} empty",
              start / empty, "< 1 s", start < 1)
        b.details.append(f"12: journal and {total} map folders filled in {took:.0f} s")
        client = Client(server.url, b.auth, timeout=120)
        last = -(-total // 50)
        for label, path in (("GET /jobs?limit=100", "/jobs?limit=100"),
                            ("GET /cdr/events?limit=100", "/cdr/events?limit=100"),
                            ("GET /jobs?offset=N (console's poll)", f"/jobs?offset={total}"),
                            ("GET /ui/jobs first page", "/ui/jobs"),
                            ("GET /ui/jobs last page", f"/ui/jobs?page={last}"),
                            ("GET /ui/maps first page", "/ui/maps"),
                            ("GET /ui/maps last page", f"/ui/maps?page={last}")):
            # the first answer after start may fill a cache (the maps listing)
            answers = [client.send("GET", path) for _ in range(2)]
            for status, raw, _ in answers:
                if status != 200:
                    raise BenchError(f"GET {path}: {status} {raw[:300]!r}")
            first, took = answers[0][2], answers[1][2]
            # a page that takes seconds is measured once: 30 would take minutes
            times = [took] if took > 1 else client.timings("GET", path, 30)
            b.row(f"12 {label}, {total // 1000}k jobs ms", f"{median_ms(times):.1f}",
                  goal="< 20 ms", met=median_ms(times) < 20)
            b.details.append(f"12: {path} p95 {pct_ms(times, 0.95):.1f} ms, {len(raw)} bytes,"
                             f" the first after start {first * 1000:.0f} ms")
        # a map arriving changes the maps folder, which the next page lists again
        name = f"cog{total + 1:06d}"
        os.makedirs(os.path.join(dirs["inputs"], "maps", name))
        open(os.path.join(dirs["inputs"], "maps", name, f"{name}.tif"), "wb").close()
        status, raw, took = client.send("GET", f"/ui/maps?page={last + 1}")
        if status != 200 or f'data-map="{name}"'.encode() not in raw:
            raise BenchError(f"/ui/maps?page={last + 1} does not show the new map {name}")
        b.row(f"12 GET /ui/maps after a new map, {total // 1000}k maps ms", f"{took * 1000:.0f}")
        client.close()
    finally:
        if server:
            server.stop()
        cdr.stop()
        shutil.rmtree(root, ignore_errors=True)



# ------------------------------------------------------------ figure 13 (a cheaper run)

ECS_CLUSTER = "mip-bench"
ECS_LOG_GROUP = "/ecs/ta1-bench"


def tree_pss(root: int, python_only: bool = True) -> tuple:
    """(bytes, processes): summed PSS (smaps_rollup) of root's descendants that run Python
    (mipper and its luigi workers, not the modules' shells), root itself excluded."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, count, todo = 0, 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/comm") as f:
                if python_only and not f.read().startswith("python"):
                    continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("Pss:"))
            count += 1
        except (OSError, ValueError, IndexError):
            continue
    return total, count


def moto_ecs(scratch: str) -> tuple:
    """A moto server on loopback with an ECS cluster, the nine task definitions and the log
    group; (its process, the AWS part of the environment). moto keeps tasks RUNNING until
    stopped, as real ones do until their container exits."""
    import boto3
    import requests

    port = free_port()
    log = open(os.path.join(scratch, "moto.log"), "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "MIP_RUNNER": "ecs", "MIP_ECS_CLUSTER": ECS_CLUSTER,
           "MIP_ECS_LOG_GROUP": ECS_LOG_GROUP, "MIP_ECS_POLL_SECONDS": "0.5"}
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.post(f"{url}/moto-api/state-manager/set-transition", timeout=5, json={
                "model_name": "ecs::task",
                "transition": {"progression": "manual", "times": 10**9}})
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise BenchError("moto server did not start") from None
            time.sleep(0.1)
    ecs = boto3.client("ecs", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="bench", aws_secret_access_key="bench")
    ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1",
                       aws_access_key_id="bench", aws_secret_access_key="bench")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    # moto names a task's network interface only in a VPC with DNS host names
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    env["MIP_ECS_SUBNETS"] = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")[
        "Subnet"]["SubnetId"]
    env["MIP_ECS_SECURITY_GROUPS"] = ec2.create_security_group(
        GroupName="mip-bench", Description="mip", VpcId=vpc)["GroupId"]
    ecs.create_cluster(clusterName=ECS_CLUSTER)
    for module in MODULE_NAMES:
        ecs.register_task_definition(
            family=f"ta1_{module}", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
            cpu="1024", memory="2048",
            containerDefinitions=[{"name": module, "image": f"inferlink/ta1_{module}",
                                   "cpu": 256, "memory": 512, "essential": True}])
    return proc, env


MODULE_NAMES = ("legend_segment", "georeference", "legend_item_segment", "map_crop",
                "legend_item_description", "polygon_extract", "line_extract", "point_extract",
                "geopackage")


class EcsPlayer:
    """Plays the ECS tasks the runs start: stops each (exit code 0) at once, or, while
    `hold` exists, leaves it running."""

    def __init__(self, aws_env: dict, hold: str | None = None):
        import boto3

        self.ecs = boto3.client("ecs", endpoint_url=aws_env["AWS_ENDPOINT_URL"],
                                region_name="us-east-1", aws_access_key_id="bench",
                                aws_secret_access_key="bench")
        self.hold = hold
        self.running = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name="ecs-player")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)

    def loop(self) -> None:
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError

        while not self.stopping.wait(0.1):
            try:
                self.play()
            except (BotoCoreError, ClientError):
                continue  # moto busy, or stopped under a figure that failed

    def play(self) -> None:
        arns = []
        for page in self.ecs.get_paginator("list_tasks").paginate(
                cluster=ECS_CLUSTER, desiredStatus="RUNNING"):
            arns += page["taskArns"]
        self.running = len(arns)
        if self.hold and os.path.exists(self.hold):
            return
        for arn in arns:
            self.ecs.stop_task(cluster=ECS_CLUSTER, task=arn, reason="exited")


def hold_catalogue(b: Bench, hold: str) -> str:
    """The zero-work catalogue whose modules wait while `hold` exists (zero work once it
    is gone); its path."""
    path = os.path.join(b.scratch, "config-hold.yml")
    with open(os.path.join(b.scratch, "config.yml"), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    for module in data["modules"]:
        module["command"] = ["sh", "-c", f"while [ -e {hold} ]; do sleep 0.1; done"]
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def submit_runs(b: Bench, url: str, prefix: str, count: int) -> list:
    client = Client(url, b.auth)
    ids = []
    try:
        for i in range(count):
            payload = {"job": f"{prefix}-{i}", "modules": ["ALL"], "map": MAP}
            ids.append(client.json("POST", "/runs", payload)["run_id"])
    finally:
        client.close()
    return ids


def wait_runs(b: Bench, url: str, ids: list, timeout: float) -> list:
    """Wait for the runs to end; the last lines of the log of each that did not pass (at
    many runs at once, journal writes may fail: issue 22 point 3)."""
    client = Client(url, b.auth)
    deadline = time.monotonic() + timeout
    failed = []
    try:
        for run_id in ids:
            while (run := client.json("GET", f"/runs/{run_id}"))["status"] not in FINISHED:
                if time.monotonic() > deadline:
                    raise BenchError(f"run {run_id} still {run['status']} after {timeout} s")
                time.sleep(0.2)
            if run["status"] != "passed":
                failed.append(run["log"].strip().splitlines()[-3:])
    finally:
        client.close()
    return failed


def mippers(parent: int) -> int:
    """How many mipper processes `parent` has (the server's runs, not yet reaped)."""
    found = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found += b"mipper.py" in f.read()
        except (OSError, ValueError, IndexError):
            continue
    return found


def children_cpu(pid: int, timeout: float = 30) -> float:
    """CPU seconds of the process's reaped children (cutime + cstime): the server's
    mippers, with their luigi workers and modules. Waits (bounded) until it has no child
    left, since a run reads as ended a moment before its mipper exits and is reaped."""
    deadline = time.monotonic() + timeout
    while mippers(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def in_flight_pss(b: Bench, server: Server, ids: list, held: callable,
                  timeout: float) -> tuple:
    """(PSS bytes per run, python processes per run) once every run holds its first
    modules (`held()` counts the modules holding)."""
    client = Client(server.url, b.auth)
    deadline = time.monotonic() + timeout
    try:
        while not (all(client.json("GET", f"/runs/{i}")["status"] == "running" for i in ids)
                   and held() >= 2 * len(ids)):  # the graph's two roots, in every run
            if time.monotonic() > deadline:
                raise BenchError(f"the runs did not all hold within {timeout} s "
                                 f"({held()} modules held)")
            time.sleep(0.5)
    finally:
        client.close()
    time.sleep(1)
    samples = [tree_pss(server.pid) for _ in range(3) if not time.sleep(0.3)]
    pss, count = max(samples)
    return pss / len(ids), count / len(ids)


def held_inline(hold: str) -> callable:
    def count():
        found = 0
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            found += argv.startswith(b"sh\0-c\0while") and hold.encode() in argv
        return found
    return count


def run_rate_case(b: Bench, runner: str, max_runs: int, aws_env: dict) -> None:
    """One server at MIP_MAX_RUNS=max_runs: PSS per run in flight with max_runs runs
    holding their first modules, then runs a minute for max_runs zero-work runs."""
    hold = os.path.join(b.scratch, "hold")
    runs_dir = os.path.join(b.scratch, f"runs-{runner}-{max_runs}")
    env = dict(b.env, MIP_MAX_RUNS=str(max_runs), MIP_MAX_QUEUED=str(4 * max_runs),
               MIP_MIN_FREE_MB="1", MIP_CONFIG=hold_catalogue(b, hold), TA1_RUNS_DIR=runs_dir)
    if runner == "ecs":
        env.update(aws_env)
    log_path = os.path.join(b.scratch, f"mip-{runner}-{max_runs}.log")
    server = Server([PY, "mip_server.py", "--port", "0"], env, log_path).start()
    open(hold, "w").close()
    try:
        player = EcsPlayer(aws_env, hold) if runner == "ecs" else contextlib.nullcontext()
        with player:
            held = (lambda: player.running) if runner == "ecs" else held_inline(hold)
            ids = submit_runs(b, server.url, f"held-{runner}-{max_runs}", max_runs)
            pss, procs = in_flight_pss(b, server, ids, held, 30 + 3 * max_runs)
            os.remove(hold)
            failed = wait_runs(b, server.url, ids, 60 + 6 * max_runs)
            started, cpu = time.monotonic(), children_cpu(server.pid)
            ids = submit_runs(b, server.url, f"rate-{runner}-{max_runs}", max_runs)
            failed += wait_runs(b, server.url, ids, 60 + 6 * max_runs)
            rate = len(ids) / (time.monotonic() - started) * 60
            cpu = (children_cpu(server.pid) - cpu) / len(ids)
    finally:
        if os.path.exists(hold):
            os.remove(hold)
        server.stop()
        kill_leftover_runs(os.path.join(runs_dir, "journal.db"))
    b.row(f"13 {runner}, MIP_MAX_RUNS {max_runs}: runs/min", f"{rate:.0f}")
    b.row(f"13 {runner}, MIP_MAX_RUNS {max_runs}: CPU s/run", f"{cpu:.2f}")
    if failed:
        b.details.append(f"13: {runner} at {max_runs}: {len(failed)} of {2 * max_runs} runs "
                         f"failed, e.g. {' / '.join(failed[0])}")
    goal = "<= 60 MB" if runner == "ecs" else "-"
    b.row(f"13 {runner}, MIP_MAX_RUNS {max_runs}: PSS MB/run in flight",
          f"{pss / 2**20:.0f}", goal=goal, met=pss <= 60 * 2**20 if runner == "ecs" else None)
    b.details.append(f"13: {runner} at {max_runs}: {procs:.1f} Python processes per run "
                     "in flight")


def mipper_costs(b: Bench, aws_env: dict, repeats: int = 3) -> None:
    """CPU seconds (mipper and its children, from RUSAGE_CHILDREN) and wall time of one
    zero-work run of the whole graph by mipper itself, inline and on ECS, of the same run
    inline as the server starts it (--run-id, with the catalogue's digest), and of
    mipper's start-up (`--list-modules`); medians. A run by hand also checks its map with
    GDAL in a child process (maps.check_readable), which the server does at its door."""
    import resource

    from mip import catalogue

    def cost(argv: list, env: dict) -> tuple:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([PY, "mipper.py", *argv], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise BenchError(f"mipper {' '.join(argv)}: {done.stderr[-300:]}")
        return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime), wall

    # the server's way: the run recorded first, in a journal of its own (the bench
    # server's queue must not see it), and the digest of the catalogue it checked
    runs_dir = os.path.join(b.scratch, "costs-runs")
    db = journal.Journal(os.path.join(runs_dir, "journal.db"))
    db.migrate()
    catalogue.load_catalogue(b.env["MIP_CONFIG"])
    served = dict(b.env, TA1_RUNS_DIR=runs_dir,
                  **{catalogue.CHECKED_ENV: " ".join(sorted(catalogue.CHECKED))})

    def server_run(i: int) -> list:
        job = f"cost-run-id-{i}"
        payload = {"job": job, "map": MAP, "modules": ["ALL"], "force_rerun": False}
        run_id = db.create_run(job, MAP, ["ALL"], False, payload,
                               os.path.join(runs_dir, "logs"))
        return ["--run-id", run_id, "--job", job, "--map", MAP, "--module", "ALL"]

    cases = [("start-up (--list-modules)", lambda i: ["--list-modules"], b.env, None),
             ("zero-work run inline", None, b.env, None),
             ("zero-work run inline, --run-id", server_run, served, None),
             ("zero-work run ecs", None, {**b.env, **aws_env}, aws_env)]
    for label, argv, env, player_env in cases:
        with EcsPlayer(player_env) if player_env else contextlib.nullcontext():
            figures = [cost(argv(i) if argv else ["--job", f"cost-{label[-3:]}-{i}", "--map",
                                                  MAP, "--module", "ALL"], env)
                       for i in range(repeats)]
        cpu = statistics.median(f[0] for f in figures)
        wall = statistics.median(f[1] for f in figures)
        goal, met = ("<= 0.40 s", cpu <= 0.4) if "inline" in label else ("-", None)
        b.row(f"13 mipper {label}: CPU s", f"{cpu:.2f}", goal=goal, met=met)
        b.details.append(f"13: mipper {label}: wall {wall:.2f} s (median of {repeats})")
    db.close()


def figure_13(b: Bench, sizes: tuple = (8, 32, 64)) -> None:
    """Runs a minute and PSS per run in flight on the zero-work catalogue, inline and on
    ECS (moto), at MIP_MAX_RUNS 8, 32 and 64; each with a server of its own."""
    proc, aws_env = moto_ecs(b.scratch)
    try:
        mipper_costs(b, aws_env)
        for runner in ("inline", "ecs"):
            for size in sizes:
                run_rate_case(b, runner, size, aws_env)
    finally:
        proc.kill()  # moto's server may take its time over SIGTERM, and keeps nothing
        proc.wait(10)



SCAN_MAP = "bench_scan"
SCAN_SIZE = (20_000, 15_000)
SCAN_ROWS = 1024  # rows of the scan noised and written at a time


def write_scan(path: str, size: tuple) -> None:
    """The sample map drawn at size on tinted paper with scanner noise, written as a tiled
    LZW TIFF (256 px tiles) a band of rows at a time, so that no float copy of the whole
    scan is ever held."""
    import numpy
    import rasterio
    from rasterio.windows import Window

    sys.path.insert(0, os.path.join(ROOT, "modules"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import map_variants
    import sample_map

    rgb = sample_map.draw_sample_map(*size)
    width, height = size
    rng = numpy.random.default_rng(map_variants.NOISE_SEED)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3,
               "dtype": "uint8", "compress": "lzw", "tiled": True, "blockxsize": 256,
               "blockysize": 256}
    tint = numpy.array(map_variants.TINT, dtype=numpy.int16)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, height, SCAN_ROWS):
            band = rgb[top:top + SCAN_ROWS].astype(numpy.int16)
            paper = (band == 255).all(axis=2)
            band[paper] = tint
            noise = rng.normal(0, map_variants.NOISE_SIGMA, band.shape).astype(numpy.float32)
            noisy = numpy.clip(band + numpy.rint(noise), 0, 255).astype(numpy.uint8)
            dst.write(noisy.transpose(2, 0, 1),
                      window=Window(0, top, width, noisy.shape[0]))


def figure_14(b: Bench) -> None:
    """The whole graph (config.yml, 4 workers) on a 20,000 x 15,000 scan, tiled LZW with
    tinted paper and scanner noise: wall time against one full decode in the same run, and
    peak memory of mipper and all its children."""
    base = os.path.join(b.scratch, "scan")
    dirs = {name: os.path.join(base, name)
            for name in ("inputs", "outputs", "temps", "runs", "repos")}
    for path in dirs.values():
        os.makedirs(path)
    tif = os.path.join(dirs["inputs"], "maps", SCAN_MAP, f"{SCAN_MAP}.tif")
    os.makedirs(os.path.dirname(tif))
    started = time.perf_counter()
    write_scan(tif, SCAN_SIZE)
    made = time.perf_counter() - started
    decode = decode_seconds(tif, repeats=1)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIP_", "TA1_")) and "proxy" not in k.lower()}
    env.update({f"TA1_{name.upper()}_DIR": path for name, path in dirs.items()})
    env.update(MIP_CONFIG=os.path.join(ROOT, "config.yml"), MIP_WORKERS="4",
               PYTHONUNBUFFERED="1")
    job = "scan-job"
    run = run_sampled([PY, "mipper.py", "--job", job, "--map", SCAN_MAP, "--module", "ALL"],
                      env, os.path.join(base, "mipper.log"), timeout=1800)
    if run["code"] != 0:
        with open(os.path.join(base, "mipper.log")) as f:
            raise BenchError(f"the graph failed on the 20k scan: {f.read()[-400:]}")
    db = journal.Journal(os.path.join(dirs["runs"], "journal.db"))
    spans = {}
    for module in db.job_modules(job):
        row = db.latest_execution(job, module)
        spans[module] = parse_time(row["stop_time"]) - parse_time(row["start_time"])
    db.close()
    graph, peak_gb = run["seconds"], run["bytes"] / 1e9
    slowest = sorted(spans.items(), key=lambda kv: -kv[1])[:4]
    b.details.append(
        f"14: scan {SCAN_SIZE[0]} x {SCAN_SIZE[1]} tiled LZW, noisy, "
        f"{os.path.getsize(tif) / 1e6:.0f} MB, made in {made:.1f} s; decode {decode:.2f} s; "
        f"graph {graph:.1f} s, longest modules "
        f"{', '.join(f'{m} {s:.1f} s' for m, s in slowest)}; peak {peak_gb:.2f} GB in "
        f"{run['processes']} processes at {run['at']:.1f} s")
    b.row("14 20k scan: graph s", f"{graph:.1f}", f"{decode:.2f} decode", graph / decode,
          "<= 20 x decode", graph / decode <= 20)
    b.row("14 20k scan: peak memory GB", f"{peak_gb:.2f}", goal="<= 1.2 GB", met=peak_gb <= 1.2)


# ------------------------------------------------------------- figure 15 (start-up)

def cpu_seconds(pid: int) -> float:
    """CPU seconds (utime + stime) the process has used itself, its threads included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def startups(argv: list, env: dict, log_path: str, auth: str, repeats: int) -> tuple:
    """Medians of (seconds from launch to the first 200 on /health, the server's CPU
    seconds by then) over `repeats` starts, each server stopped after; one start before
    them is not counted (the first on a new data folder makes the journal and the key)."""
    started_in(argv, env, log_path, auth)[0].stop()
    walls, cpus = [], []
    for _ in range(repeats):
        server, took = started_in(argv, env, log_path, auth)
        try:
            cpus.append(cpu_seconds(server.pid))
        finally:
            server.stop()
        walls.append(took)
    return statistics.median(walls), statistics.median(cpus)


def figure_15(b: Bench, total: int = 100_000, repeats: int = 3) -> None:
    """The server's start-up, from its launch to its first 200 on /health, and the CPU
    seconds it used by then: on an empty journal, then on one of `total` CDR maps' history
    with as many map folders (fill_history). A server of its own, linked to the tests'
    stand-in CDR, so that the link's start is counted too. Start-up must do no work that
    grows with history (issue 22 point 4): the goal is under 1 s at both."""
    root, dirs, cdr, env = cdr_linked(b, "startup")
    argv = [PY, "mip_server.py", "--port", "0"]
    log_path = os.path.join(root, "mip_server.log")
    try:
        empty, empty_cpu = startups(argv, env, log_path, b.auth, repeats)
        took = fill_history(os.path.join(dirs["runs"], "journal.db"), dirs["inputs"], total)
        full, full_cpu = startups(argv, env, log_path, b.auth, repeats)
    finally:
        cdr.stop()
        shutil.rmtree(root, ignore_errors=True)
    k = f"{total // 1000}k"
    b.row("15 start-up, empty journal s", f"{empty:.2f}", goal="< 1 s", met=empty < 1)
    b.row(f"15 start-up, {k} jobs s", f"{full:.2f}", f"{empty:.2f} empty", full / empty,
          "< 1 s", full < 1)
    b.row("15 start-up CPU, empty journal s", f"{empty_cpu:.2f}")
    b.row(f"15 start-up CPU, {k} jobs s", f"{full_cpu:.2f}", f"{empty_cpu:.2f} empty",
          full_cpu / empty_cpu if empty_cpu else None)
    b.details.append(f"15: medians of {repeats} starts each; journal and {total} map "
                     f"folders filled in {took:.0f} s; the host's load average "
                     f"{os.getloadavg()[0]:.1f} (wall times grow with it, CPU times less)")


FIGURES = {1: figure_1, 2: figure_2, 3: figure_3, 4: figure_4, 5: figure_5, 6: figure_6,
           7: figure_7, 8: figure_8, 9: figure_9, 10: figure_10, 11: figure_11, 12: figure_12,
           13: figure_13, 14: figure_14, 15: figure_15}


# ---------------------------------------------------------------------------- main

def table(rows: list) -> str:
    head = ("figure", "value", "baseline", "ratio", "goal", "met")
    lines = [head]
    for figure, value, baseline, ratio, goal, met in rows:
        lines.append((figure, value, baseline, "-" if ratio is None else f"{ratio:.2f}", goal,
                      "-" if met is None else ("yes" if met else "NO")))
    if any(len(r[1]) > 12 for r in lines[1:]):
        wide = [r for r in lines if len(r[1]) > 12]
        lines = [r for r in lines if len(r[1]) <= 12]
    else:
        wide = []
    widths = [max(len(r[i]) for r in lines) for i in range(6)]
    out = ["  ".join(c.ljust(w) if i in (0, 2, 4) else c.rjust(w) if i in (1, 3) else c
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
           for r in lines]
    out += [f"{r[0].ljust(widths[0])}  {r[1]}" for r in wide]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated figure numbers (1-15)")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python load generator even when wrk is installed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--write", metavar="PAGE",
                        help="also put the whole run's report into PAGE, between its "
                             "<!-- bench:begin --> and <!-- bench:end --> lines "
                             "(make bench: docs/benchmarks.md); a partial run (--only) never "
                             "writes")
    args = parser.parse_args(argv)
    chosen = [int(n) for n in args.only.split(",") if n.strip()] or list(FIGURES)
    use_wrk = find_wrk(args.python_load)
    scratch = tempfile.mkdtemp(prefix="mip-bench-")
    started = time.monotonic()
    bench = Bench(scratch, use_wrk)
    try:
        try:
            bench.start()
        except (BenchError, OSError) as e:
            chosen = []
            bench.row("(all)", f"not measured: {str(e).splitlines()[0]}")
            print(e, file=sys.stderr)
        for number in chosen:
            note(f"figure {number}")
            try:
                FIGURES[number](bench)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                bench.row(f"{number} (failed)", f"not measured: {e}")
    finally:
        bench.stop()
        if args.keep:
            note(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report = "\n".join([f"machine: {machine(use_wrk)}",
                         f"date: {datetime.now().strftime('%Y-%m-%d %H:%M')}, "
                         f"took {time.monotonic() - started:.0f} s",
                         table(bench.rows), *(f"  {line}" for line in bench.details)])
    print(report)
    if args.write and not args.only:
        write_report(args.write, report)
    return 0


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_report(page: str, report: str) -> None:
    """Replace what stands between the page's bench markers with this run's report, so the
    page holds one whole run and no figure copied by hand."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"bench/run.py: {page} has no {BEGIN} ... {END} lines")
    block = "\n".join(f"    {line}" if line else "" for line in report.splitlines())
    with open(page, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    note(f"report written into {page}")


if __name__ == "__main__":
    sys.exit(main())
