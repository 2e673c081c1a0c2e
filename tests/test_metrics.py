"""GET /metrics on the real server: Prometheus's text format, parsed with prometheus_client's
own parser, after real runs."""

import time

import pytest
import requests
from conftest import MAP
from conftest import Server
from conftest import kill_leftover_runs
from conftest import payload
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families

from mip import journal
from mip.web import metrics


def scrape(srv, **kw) -> dict:
    """{metric family name: [samples]} of one scrape."""
    resp = srv.get("/metrics", **kw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}


def value(samples, name, **labels):
    """The one sample called `name` whose labels include `labels`."""
    found = [s.value for s in samples if s.name == name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_after_real_runs(inproc):
    passed = inproc.post("/runs", json=payload("m1", "georeference")).json()
    failed = inproc.post("/runs", json=payload(
        "m2", "georeference", extra_switches={"georeference": ["--fail"]})).json()
    statuses = {r["run_id"]: inproc.wait_run(r["run_id"]) for r in (passed, failed)}
    assert statuses[passed["run_id"]]["status"] == "passed"
    assert statuses[failed["run_id"]]["status"] == "failed"
    for _ in range(3):
        assert inproc.get(f"/runs/{passed['run_id']}").status_code == 200
    assert inproc.get("/no/such/route/12345").status_code == 404

    families = scrape(inproc)
    runs = families["mip_runs"]
    assert value(runs, "mip_runs", state="passed") == 1
    assert value(runs, "mip_runs", state="failed") == 1
    assert value(runs, "mip_runs", state="running") == 0
    assert value(families["mip_queue_length"], "mip_queue_length") == 0
    assert all(s.value == 0 for s in families["mip_modules_running"])
    assert {s.labels["module"] for s in families["mip_modules_running"]} >= {"georeference"}

    durations = families["mip_module_duration_seconds"]
    ran = {}
    for status in statuses.values():
        for module, state in status["module_status"].items():
            ran[(module, state)] = ran.get((module, state), 0) + 1
    assert ("georeference", "passed") in ran and ("georeference", "failed") in ran
    for (module, state), count in ran.items():
        assert value(durations, "mip_module_duration_seconds_count",
                     module=module, status=state) == count
        assert value(durations, "mip_module_duration_seconds_sum",
                     module=module, status=state) > 0

    latency = families["mip_http_request_duration_seconds"]
    assert value(latency, "mip_http_request_duration_seconds_count",
                 method="GET", route="/runs/{run_id}", status="200") >= 3
    assert value(latency, "mip_http_request_duration_seconds_count",
                 method="POST", route="/runs", status="200") == 2
    assert value(latency, "mip_http_request_duration_seconds_count",
                 method="GET", route="unmatched", status="404") == 1
    routes = {s.labels["route"] for s in latency}
    assert not any(passed["run_id"] in r or "12345" in r for r in routes), routes

    disk = families["mip_disk_free_bytes"]
    assert {s.labels["folder"] for s in disk} == {"inputs", "outputs", "temps", "runs"}
    assert all(s.value > 0 for s in disk)

    # a second scrape observes no module end twice
    again = scrape(inproc)["mip_module_duration_seconds"]
    for (module, state), count in ran.items():
        assert value(again, "mip_module_duration_seconds_count",
                     module=module, status=state) == count


def test_running_module_and_queue_are_reported(server_env):
    env = dict(server_env, MIP_MAX_RUNS="1")
    srv = Server(env).start()
    try:
        slow = srv.post("/runs", json=payload(
            "s1", "georeference", extra_switches={"georeference": ["--sleep", "30"]})).json()
        queued = srv.post("/runs", json=payload("s2", "georeference")).json()
        srv.wait_run(slow["run_id"], until=("running",))

        def module_running():
            families = scrape(srv)
            if value(families["mip_modules_running"], "mip_modules_running",
                     module="georeference") == 1:
                return families
            return None

        families = wait_for(module_running, timeout=60, step=0.2)
        assert value(families["mip_runs"], "mip_runs", state="running") == 1
        assert value(families["mip_runs"], "mip_runs", state="not_started") == 1
        assert value(families["mip_queue_length"], "mip_queue_length") == 1
        srv.post(f"/runs/{slow['run_id']}/cancel")
        srv.post(f"/runs/{queued['run_id']}/cancel")
        srv.wait_run(slow["run_id"])
        families = scrape(srv)
        assert value(families["mip_runs"], "mip_runs", state="cancelled") == 2
        assert value(families["mip_module_duration_seconds"],
                     "mip_module_duration_seconds_count",
                     module="georeference", status="cancelled") == 1
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_labels_stay_bounded_against_invented_paths_and_methods(server):
    for i in range(20):
        assert server.get(f"/made/up/{i}").status_code == 404
        requests.request("BREW", f"{server.url}/runs/{i}", timeout=10)
    latency = scrape(server)["mip_http_request_duration_seconds"]
    counts = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
              for s in latency if s.name.endswith("_count")}
    assert counts[("GET", "unmatched", "404")] == 20
    assert sum(v for (m, _, _), v in counts.items() if m == "other") == 20
    assert not any("made" in route or "BREW" in method for method, route, _ in counts)


def test_metrics_need_credentials_unless_open(server_env):
    srv = Server(server_env).start()
    try:
        resp = srv.get("/metrics", auth=None)
        assert resp.status_code == 401
        assert resp.json()["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mip"'
        op = srv.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert "text/plain" in op["responses"]["200"]["content"]
        assert op["security"] == [{"basic": []}]
    finally:
        srv.stop()
    srv = Server(dict(server_env, MIP_METRICS_OPEN="1")).start()
    try:
        families = scrape(srv, auth=None)
        assert "mip_runs" in families
        # only /metrics is open
        assert srv.get("/runs", auth=None).status_code == 401
        op = srv.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert "security" not in op
    finally:
        srv.stop()
    srv = Server(dict(server_env, MIP_METRICS_OPEN="yes"))
    with pytest.raises(AssertionError):
        srv.start()
    assert srv.proc.wait(10) == 2
    assert srv.lines == ["mip_server: error: MIP_METRICS_OPEN must be 0 or 1, not 'yes'"]


def test_module_ends_are_observed_once_in_any_order(tmp_path):
    """The incremental read of the journal: ends recorded before the server started are not
    counted, an execution that ends after a later one is still counted, none twice."""
    db = journal.Journal(str(tmp_path / "journal.db"))
    db.migrate()
    try:
        run_id = db.create_run("j", MAP, ["georeference"], False, {}, str(tmp_path))

        def start(module):
            return db.start_execution(run_id, "j", module, str(tmp_path / f"{module}.log"))

        before = start("map_crop")
        db.finish_execution(before, journal.Status.PASSED, 0, None)
        time.sleep(0.01)  # the journal's clock counts milliseconds
        collector = metrics.JournalCollector(db, None, None, {})

        def counts():
            return {(s.labels["module"], s.labels["status"]): s.value
                    for m in collector.durations.collect() for s in m.samples
                    if s.name.endswith("_count")}

        slow, fast = start("georeference"), start("legend_segment")
        assert collector.sync() == {"georeference": 1, "legend_segment": 1}
        db.finish_execution(fast, journal.Status.FAILED, 1, "no")
        assert collector.sync() == {"georeference": 1}
        assert counts() == {("legend_segment", "failed"): 1}
        db.finish_execution(slow, journal.Status.PASSED, 0, None)
        later = start("point_extract")
        db.end_running_executions(run_id, journal.Status.CANCELLED, "run cancelled")
        for _ in range(3):
            assert collector.sync() == {}
        assert counts() == {("legend_segment", "failed"): 1, ("georeference", "passed"): 1,
                            ("point_extract", "cancelled"): 1}
        assert collector.low == later + 1 and not collector.seen - {later}
    finally:
        db.close()
