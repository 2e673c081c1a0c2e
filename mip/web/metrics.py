"""metrics: GET /metrics, the server's health in Prometheus's text format (prometheus_client).

    curl -u mip:$(cat .mip_password) http://127.0.0.1:8080/metrics

Runs by state, the queue, running modules and free disk space are read when scraped.
Module durations are observed from the journal: mipper, not the server, records a module's
end, so each scrape reads the executions that ended since the last one. Requests are
counted by mip_server's middleware around the app's WSGI callable (every_request, which
calls RequestMetrics.observe), labelled by route template (never the raw path). Each app
has a registry of its own (Metrics), so that several apps can live in one process.
This file only reads: it never changes runs, files or the journal.
"""

import os
import re
import threading
from collections import deque

import bottle
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram
from prometheus_client import disable_created_metrics
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily

from mip import journal
from mip.journal import FINISHED
from mip.journal import Status

# a request's method as a label; anything else a client sends counts as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
UNMATCHED = "unmatched"  # the route of a request no route matched (404, 405, bad path)
# a status read takes a millisecond or two; a zip download or a submission, seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# stand-in modules take a second; real ones minutes to hours
MODULE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
ENDED = tuple(s.value for s in FINISHED)


class Metrics:
    """One app's registry: the request counting, which mip_server installs around the app
    (`requests.observe`, through its every_request middleware), and what the journal and the
    disk say at scrape time. Each app has its own, so that several apps can live in one
    process."""

    def __init__(self, db, queue, settings, catalogue: dict):
        # a `_created` series per labelled histogram doubles the series and says little here
        # (process-wide in prometheus_client; this process serves one app)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.registry.register(JournalCollector(db, queue, settings, catalogue))


def get_metrics(ctx):
    """Runs by state, the queue, running modules, module durations, requests by route
    and status, and free disk space, in Prometheus's text format."""
    ctx.metrics.requests.fold()  # the requests' observations waiting to be counted
    body = generate_latest(ctx.metrics.registry)
    # the classic text format (0.0.4): every Prometheus version reads it
    bottle.response.content_type = CONTENT_TYPE_PLAIN_0_0_4
    return body


def route_template(route) -> str:
    """`/runs/{run_id}` for bottle's `/runs/<run_id>` (the paths /openapi.json names)."""
    if route is None:
        return UNMATCHED
    return re.sub(r"<(\w+)(?::[^>]*)?>", r"{\1}", route.rule)


class RequestMetrics:
    """A latency histogram per (method, route template, status); its _count is the number
    of requests. Labels come from the app's own route table and status codes, so a client
    cannot make new series by inventing paths or methods. A request only appends its
    observation to a deque (no lock); they are counted into the histograms at the next
    scrape (get_metrics), or by the request that finds BATCH of them waiting:
    prometheus_client takes a lock per observation, and that lock, contended by every
    request thread, cost a status read more than the rest of the metrics."""

    BATCH = 4096

    def __init__(self, registry: CollectorRegistry):
        self.latency = Histogram("mip_http_request_duration_seconds",
                                 "Time to the answer's status line, by method, route "
                                 "template and status",
                                 ("method", "route", "status"), buckets=LATENCY_BUCKETS,
                                 registry=registry)
        # the labelled children, found again without prometheus_client's lock and label
        # checks: a dict read is all an observation pays besides the observation itself
        self.children = {}
        self.waiting = deque()  # (method, route, status, seconds) not yet counted
        self.fold_lock = threading.Lock()

    def observe(self, method: str, route, status: str, seconds: float) -> None:
        """Note one request (bottle's route, None when none matched) for the next fold;
        mip_server's every_request middleware calls it for every request."""
        waiting = self.waiting
        waiting.append((method, route, status, seconds))
        if len(waiting) >= self.BATCH:
            self.fold()

    def fold(self) -> None:
        """Count the waiting observations into their histograms."""
        with self.fold_lock:
            waiting = self.waiting
            for _ in range(len(waiting)):
                method, route, status, seconds = waiting.popleft()
                if method not in METHODS:
                    method = "other"
                key = (method, route, status)
                child = self.children.get(key)
                if child is None:
                    child = self.children[key] = self.latency.labels(
                        method, route_template(route), status)
                child.observe(seconds)

class JournalCollector:
    """What the journal and the disk say at scrape time. Module durations are observed
    once each, incrementally: every execution below `low` has ended and been seen (or
    ended before this server started), so a scrape reads only the executions from the
    oldest still running on."""

    def __init__(self, db, queue, settings, catalogue: dict):
        self.db = db
        self.queue = queue
        self.settings = settings
        self.catalogue = catalogue
        self.durations = Histogram("mip_module_duration_seconds",
                                   "Module executions that ended since the server started, "
                                   "by module and final state", ("module", "status"),
                                   buckets=MODULE_BUCKETS, registry=None)
        # ends recorded before this server started belong to a previous server's histogram
        self.started = journal.utcnow()
        self.low = 0  # the oldest execution id that may still end
        self.seen = set()  # ids from `low` on whose end was observed
        # two scrapes at once must not observe one end twice
        self.lock = threading.Lock()

    def sync(self) -> dict:
        """Observe the executions that ended since the last sync; {module: running count}."""
        # read first: an execution recorded after it has a higher id, and stays above `low`
        top = self.db.last_execution_id()
        rows = self.db.executions_from(self.low, self.started)
        running, low = {}, top + 1
        for exec_id, module, status, seconds in rows:
            if status == Status.RUNNING:
                running[module] = running.get(module, 0) + 1
                low = min(low, exec_id)
            elif status in ENDED and exec_id not in self.seen:
                self.seen.add(exec_id)
                if seconds is not None:
                    self.durations.labels(module, status).observe(max(seconds, 0.0))
        self.low = low
        self.seen = {i for i in self.seen if i >= low}
        return running

    def collect(self):
        with self.lock:
            running = self.sync()
        counts = self.db.run_counts()
        runs = GaugeMetricFamily("mip_runs", "Runs in the journal, by state", labels=("state",))
        for status in Status:
            runs.add_metric((status.value,), counts.get(status.value, 0))
        yield runs
        yield GaugeMetricFamily("mip_queue_length", "Runs waiting to start",
                                value=self.queue.queued())
        modules = GaugeMetricFamily("mip_modules_running", "Module executions running now",
                                    labels=("module",))
        for module in {**dict.fromkeys(self.catalogue, 0), **running}:
            modules.add_metric((module,), running.get(module, 0))
        yield modules
        yield from self.durations.collect()
        disk = GaugeMetricFamily("mip_disk_free_bytes",
                                 "Free space for the server's user in each data folder",
                                 labels=("folder",))
        settings = self.settings
        for folder, path in (("inputs", settings.inputs_dir), ("outputs", settings.outputs_dir),
                             ("temps", settings.temps_dir), ("runs", settings.runs_dir)):
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            disk.add_metric((folder,), st.f_bavail * st.f_frsize)
        yield disk
