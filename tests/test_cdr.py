"""The server invoked by, and publishing to, a stand-in CDR that speaks the CDR's protocol."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jsonschema
import pytest
import rasterio
import requests
from cdr_standin import StandInCdr
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import free_port
from conftest import kill_leftover_runs
from conftest import payload
from conftest import wait_for
from rasterio.transform import Affine

TOKEN = "cdr-token-for-tests"
SECRET = "webhook-secret-for-tests"
COG = "5a06544690b6d3f04fe7f4c8a7e3a1c2"
# a whole graph, then publishing: generous, as tests share a loaded machine
GRAPH_WAIT = 240


@pytest.fixture
def cdr(sample_tif):
    with open(sample_tif, "rb") as f:
        image = f.read()
    standin = StandInCdr(TOKEN).start()
    standin.add_cog(COG, image)
    standin.image = image
    yield standin
    standin.stop()


@pytest.fixture
def cdr_env(server_env, cdr):
    port = free_port()
    return dict(server_env, MIP_CDR_URL=cdr.url + "/", MIP_CDR_TOKEN=TOKEN,
                MIP_CDR_SECRET=SECRET, MIP_CDR_CALLBACK_URL=f"http://127.0.0.1:{port}/cdr",
                MIP_CDR_SYSTEM="mip_test", MIP_CDR_VERSION="0.1.0",
                # a broken download is tried again at once: 0.35 s of pauses, not 7.5
                MIP_CDR_BACKOFF="0.05")


def start(env):
    """The server on the port its callback URL names."""
    port = env["MIP_CDR_CALLBACK_URL"].rsplit(":", 1)[1].split("/")[0]
    return Server(env, "--port", port).start()


@pytest.fixture
def linked(cdr_env, cdr):
    """The server, registered with the stand-in CDR."""
    srv = start(cdr_env)
    wait_for(lambda: srv.get("/").json()["cdr"]["registered"], timeout=20)
    yield srv
    srv.stop()
    kill_leftover_runs(cdr_env)


def registrations(cdr):
    return list(cdr.registrations.values())


def published(cdr, kind):
    return [p for k, p, _ in cdr.published if k == kind]


def job_done(srv, job):
    resp = srv.get(f"/jobs/{job}")
    return resp.status_code == 200 and resp.json()["status"] in ("passed", "failed")


def test_registers_at_start_and_unregisters_at_shutdown(cdr_env, cdr):
    stale = requests.post(cdr.url + "/user/me/register", timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"name": "mip_test", "version": "old", "callback_url": "x",
                                "webhook_secret": "y", "events": []}).json()["id"]
    srv = start(cdr_env)
    try:
        info = wait_for(lambda: srv.get("/").json()["cdr"]["registered"] and srv.get("/").json())
        regs = registrations(cdr)
        assert [r["id"] for r in regs] != [stale] and len(regs) == 1
        assert regs[0]["callback_url"] == cdr_env["MIP_CDR_CALLBACK_URL"]
        assert set(regs[0]["events"]) >= {"ping", "map.process"}
        assert regs[0]["webhook_secret"] == SECRET
        assert info["cdr"]["system"] == "mip_test"
        assert SECRET not in srv.output() and TOKEN not in srv.output()
        assert cdr.deliver("ping", None).status_code == 200
    finally:
        srv.stop()
    assert registrations(cdr) == []


def test_registration_failure_is_loud_and_retried(cdr_env, cdr):
    cdr.fail_next("/user/me/register", 2, 403)
    srv = start(cdr_env)
    try:
        assert srv.get("/health").status_code == 200  # serving meanwhile
        wait_for(lambda: srv.get("/").json()["cdr"]["registered"], timeout=30)
        assert "CDR REGISTRATION FAILED" in srv.output()
    finally:
        srv.stop()
        kill_leftover_runs(cdr_env)


def test_map_process_downloads_runs_and_publishes(linked, cdr, cdr_env):
    resp = cdr.deliver("map.process", {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"},
                       content_type="")
    assert resp.status_code == 200 and resp.json() == {"ok": "success"}
    wait_for(lambda: job_done(linked, COG), timeout=GRAPH_WAIT)
    job = linked.get(f"/jobs/{COG}").json()
    assert job["status"] == "passed" and job["modules"] == ["ALL"] and job["map"] == COG
    with open(f"{cdr_env['TA1_INPUTS_DIR']}/maps/{COG}/{COG}.tif", "rb") as f:
        assert f.read() == cdr.image
    status = wait_for(lambda: (linked.get(f"/jobs/{COG}").json()["cdr"] or {}).get("georef", {})
                      .get("status") in ("published", "failed") and linked.get(
                          f"/jobs/{COG}").json()["cdr"], timeout=GRAPH_WAIT)
    assert status["features"]["status"] == "published"
    assert status["features"]["result_id"] == f"mip_test_0.1.0_{COG}"
    assert status["georef"]["status"] == "published" and status["georef"]["cdr_job_id"]
    features = published(cdr, "features")[0]
    assert features["cog_id"] == COG and features["polygon_feature_results"]
    assert published(cdr, "georef")[0]["gcps"]
    events = linked.get("/cdr/events").json()
    assert events[0]["status"] == "submitted" and events[0]["cog_id"] == COG

    # publishing again on request is safe
    again = linked.post(f"/jobs/{COG}/publish")
    assert again.status_code == 200
    wait_for(lambda: len(published(cdr, "features")) == 2, timeout=GRAPH_WAIT)


def test_bad_or_missing_signature_is_refused_and_nothing_recorded(linked, cdr):
    body = {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"}
    for kwargs in ({"signature": ""}, {"signature": "0" * 64}, {"secret": "wrong"}):
        resp = cdr.deliver("map.process", body, **kwargs)
        assert resp.status_code == 403 and resp.json()["error"] == "bad_signature"
    assert linked.get("/cdr/events").json() == []
    assert linked.get("/jobs").json() == []
    # no basic auth is asked of the CDR, and basic auth alone is not enough
    resp = requests.post(linked.url + "/cdr", json={"id": "x", "event": "ping"},
                         auth=linked.auth, timeout=10)
    assert resp.status_code == 403


def test_duplicate_deliveries_start_nothing(linked, cdr):
    body = {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"}
    assert cdr.deliver("map.process", body, event_id="ev-1").status_code == 200
    assert cdr.deliver("map.process", body, event_id="ev-1").status_code == 200
    assert cdr.deliver("map.process", body, event_id="ev-2").status_code == 200
    wait_for(lambda: job_done(linked, COG), timeout=GRAPH_WAIT)
    assert cdr.deliver("map.process", body, event_id="ev-3").status_code == 200
    time.sleep(0.5)
    assert len(linked.get(f"/runs?job={COG}").json()) == 1
    statuses = {e["event_id"]: e["status"] for e in linked.get("/cdr/events").json()}
    assert statuses == {"ev-1": "submitted", "ev-2": "duplicate", "ev-3": "duplicate"}
    assert cdr.deliver("something.else", {"id": "x"}).status_code == 200
    assert cdr.deliver("map.process", {"cog_id": "../x", "cog_url": "http://h/x"}) \
        .status_code == 422
    # checked against the CDR's own MapEventPayload schema, naming the field
    resp = cdr.deliver("map.process", {"cog_id": COG})
    assert resp.status_code == 422 and "$.payload.cog_url" in resp.json()["message"]


class SlowOnce(http.server.BaseHTTPRequestHandler):
    """Serves one file; the first request hangs until the server is let go."""

    data = b""
    calls = 0
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).calls += 1
        if type(self).calls == 1:
            type(self).release.wait(30)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data)

    def log_message(self, *args):
        pass


def test_event_accepted_before_a_kill_is_processed_after_restart(cdr_env, cdr):
    SlowOnce.data = cdr.image
    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowOnce)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    srv = start(cdr_env)
    try:
        wait_for(lambda: srv.get("/").json()["cdr"]["registered"])
        url = f"http://127.0.0.1:{slow.server_address[1]}/{COG}.tif"
        assert cdr.deliver("map.process", {"cog_id": COG, "cog_url": url}).status_code == 200
        wait_for(lambda: SlowOnce.calls == 1)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()
        SlowOnce.release.set()
        srv.start()
        wait_for(lambda: job_done(srv, COG), timeout=GRAPH_WAIT)
        assert srv.get(f"/jobs/{COG}").json()["status"] == "passed"
        assert SlowOnce.calls == 2
    finally:
        srv.stop()
        slow.shutdown()
        slow.server_close()
        kill_leftover_runs(cdr_env)


def test_cdr_answering_500_twice_still_gets_the_results(linked, cdr):
    cdr.fail_next("/v1/maps/publish/features", 2, 500)
    cdr.fail_next("/v1/maps/publish/georef", 2, 502)
    cdr.deliver("map.process", {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"})
    status = wait_for(lambda: (linked.get(f"/jobs/{COG}").json() if job_done(linked, COG)
                               else {}).get("cdr") or None, timeout=GRAPH_WAIT)
    status = wait_for(lambda: all(v["status"] != "pending" for v in linked.get(
        f"/jobs/{COG}").json()["cdr"].values()) and linked.get(f"/jobs/{COG}").json()["cdr"],
        timeout=GRAPH_WAIT)
    assert status["features"]["status"] == "published"
    assert status["georef"]["status"] == "published"
    calls = [p for m, p in cdr.requests if p == "/v1/maps/publish/features"]
    assert len(calls) == 3


def test_broken_download_is_reported_and_a_manual_trigger_retries(linked, cdr, cdr_env):
    cdr.break_download(COG)
    cdr.deliver("map.process", {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"},
                event_id="ev-broken")
    event = wait_for(lambda: [e for e in linked.get("/cdr/events").json()
                              if e["status"] == "failed"])[0]
    assert "download" in event["message"] and COG in event["message"]
    assert linked.get("/jobs").json() == []
    assert not os.listdir(f"{cdr_env['TA1_INPUTS_DIR']}/maps/{COG}")

    cdr.broken.discard(COG)
    resp = linked.post(f"/cdr/cogs/{COG}")
    assert resp.status_code == 200 and resp.json()["status"] == "received"
    wait_for(lambda: job_done(linked, COG), timeout=GRAPH_WAIT)
    assert linked.get(f"/jobs/{COG}").json()["status"] == "passed"
    assert linked.post("/cdr/cogs/unknowncog").status_code == 404


def test_publish_on_request_for_any_passed_job(linked, cdr):
    run_id = linked.post("/runs", json=payload("handmade", "ALL")).json()["run_id"]
    assert linked.wait_run(run_id, timeout=GRAPH_WAIT)["status"] == "passed"
    assert linked.get("/jobs/handmade").json()["cdr"] is None  # not from the CDR
    resp = linked.post("/jobs/handmade/publish")
    assert resp.status_code == 200
    wait_for(lambda: published(cdr, "georef"), timeout=GRAPH_WAIT)
    assert published(cdr, "features")[0]["cog_id"] == "WY_CO_Peach"


def test_without_cdr_settings_the_webhook_is_404(server):
    resp = requests.post(server.url + "/cdr", data=b"{}", timeout=10)
    assert resp.status_code == 404
    assert server.get("/").json()["cdr"] is None
    assert server.post("/jobs/x/publish").status_code == 404


def test_half_configured_cdr_stops_start_up(server_env):
    env = dict(server_env, MIP_CDR_URL="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, f"{ROOT}/mip_server.py", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "MIP_CDR_TOKEN" in proc.stderr


def publication(srv, job):
    """The job's cdr state once no publication is pending."""
    def settled():
        state = srv.get(f"/jobs/{job}").json()["cdr"]
        return state if state and all(p["status"] != "pending" for p in state.values()) \
            else None
    return wait_for(settled, timeout=GRAPH_WAIT)


def passed_job(srv, job):
    run_id = srv.post("/runs", json=payload(job, "ALL")).json()["run_id"]
    assert srv.wait_run(run_id, timeout=GRAPH_WAIT)["status"] == "passed"


def write_output(env, job, name, data):
    with open(os.path.join(env["TA1_OUTPUTS_DIR"], job, name), "w", encoding="utf-8") as f:
        json.dump(data, f)


def read_output(env, job, name):
    with open(os.path.join(env["TA1_OUTPUTS_DIR"], job, name), encoding="utf-8") as f:
        return json.load(f)


def publish_calls(cdr):
    return [p for _, p in cdr.requests if p.startswith("/v1/maps/publish/")]


def test_a_payload_the_cdr_would_refuse_is_not_sent(linked, cdr, cdr_env):
    passed_job(linked, "handmade")
    # outputs breaking the contract: a GCP without its crs, a point without its bbox
    georef_name = f"georeference/{MAP}.json"
    georef = read_output(cdr_env, "handmade", georef_name)
    del georef["gcps"][1]["crs"]
    write_output(cdr_env, "handmade", georef_name, georef)
    points_name = f"point_extract/output-per-symbol/{MAP}_points.geojson"
    points = read_output(cdr_env, "handmade", points_name)
    del points["features"][2]["properties"]["bbox"]
    write_output(cdr_env, "handmade", points_name, points)

    assert linked.post("/jobs/handmade/publish").status_code == 200
    state = publication(linked, "handmade")
    assert state["georef"]["status"] == "failed" and state["features"]["status"] == "failed"
    assert state["georef"]["message"].startswith("not sent: ")
    assert "$.gcps[1].crs" in state["georef"]["message"]
    assert "point_features.features[2].properties.bbox" in state["features"]["message"]
    assert publish_calls(cdr) == [] and cdr.published == [] and cdr.refused == []
    output = wait_for(lambda: "$.gcps[1].crs" in linked.output() and linked.output())
    assert "properties.bbox" in output


def test_estimated_gcps_are_skipped_and_the_features_still_go(linked, cdr, cdr_env):
    passed_job(linked, "handmade")
    # what georeference writes for a map without georeferencing, by the contract
    georef_name = f"georeference/{MAP}.json"
    georef = read_output(cdr_env, "handmade", georef_name)
    georef.update(crs=None, estimated=True)
    for gcp in georef["gcps"]:
        gcp["crs"] = "EPSG:4326"
    write_output(cdr_env, "handmade", georef_name, georef)

    linked.post("/jobs/handmade/publish")
    state = publication(linked, "handmade")
    assert state["features"]["status"] == "published"
    assert state["georef"]["status"] == "skipped"
    assert "estimated" in state["georef"]["message"] and MAP in state["georef"]["message"]
    assert publish_calls(cdr) == ["/v1/maps/publish/features"]
    assert [kind for kind, _, _ in cdr.published] == ["features"]
    assert "georef not published to the CDR" in linked.output()
    with open(os.path.join(ROOT, "schema", "JobStatus.json"), encoding="utf-8") as f:
        jsonschema.Draft202012Validator(json.load(f)).validate(
            linked.get("/jobs/handmade").json())


def test_a_downloaded_map_gdal_cannot_read_is_refused_and_fetched_again(linked, cdr, cdr_env):
    good = cdr.image
    cdr.add_cog(COG, b"<html>an error page where the map should be</html>")
    cdr.deliver("map.process", {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"})
    event = wait_for(lambda: [e for e in linked.get("/cdr/events").json()
                              if e["status"] == "failed"])[0]
    assert "not an image GDAL reads" in event["message"]
    assert "not recognized as being in a supported file format" in event["message"]
    assert linked.get("/jobs").json() == []
    assert not os.path.exists(f"{cdr_env['TA1_INPUTS_DIR']}/maps/{COG}/{COG}.tif")

    cdr.add_cog(COG, good)
    assert linked.post(f"/cdr/cogs/{COG}").json()["status"] == "received"
    wait_for(lambda: job_done(linked, COG), timeout=GRAPH_WAIT)
    assert linked.get(f"/jobs/{COG}").json()["status"] == "passed"


def cog_bytes(sample_tif: str, folder, georeferenced: bool) -> bytes:
    """The sample map as the CDR serves maps: a Cloud-Optimized GeoTIFF written by GDAL,
    placed in EPSG:4267 or without any georeferencing (as most scans come)."""
    with rasterio.open(sample_tif) as src:
        data = src.read()
    height, width = data.shape[1:]
    # 0.5 x 0.4 degrees from 106.5 W, 41.25 N (Affine's own constructor: its `*` is
    # deprecated, and rasterio's from_bounds uses it)
    where = {"crs": "EPSG:4267",
             "transform": Affine(0.5 / width, 0, -106.5, 0, -0.4 / height, 41.25)} \
        if georeferenced else {}
    path = str(folder / "map.cog.tif")
    with rasterio.open(path, "w", driver="COG", compress="lzw", width=width, height=height,
                       count=data.shape[0], dtype=data.dtype, **where) as out:
        out.write(data)
    with rasterio.open(path) as written:
        assert written.driver == "GTiff" and written.block_shapes[0] == (512, 512)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("georeferenced", [True, False], ids=["with_crs", "without_crs"])
def test_a_cog_from_the_cdr_runs_and_publishes(linked, cdr, cdr_env, sample_tif, tmp_path,
                                               georeferenced):
    image = cog_bytes(sample_tif, tmp_path, georeferenced)
    cdr.add_cog(COG, image)
    cdr.deliver("map.process", {"cog_id": COG, "cog_url": f"{cdr.url}/cogs/{COG}.cog.tif"})
    wait_for(lambda: job_done(linked, COG), timeout=GRAPH_WAIT)
    job = linked.get(f"/jobs/{COG}").json()
    assert job["status"] == "passed", linked.get(f"/runs/{job['run_id']}/log").text[-3000:]
    # stored where mipper looks for a map, byte for byte, and listed as a map
    with open(f"{cdr_env['TA1_INPUTS_DIR']}/maps/{COG}/{COG}.tif", "rb") as f:
        assert f.read() == image
    assert COG in linked.get("/maps").json()

    state = publication(linked, COG)
    assert state["features"]["status"] == "published", state
    (features,) = published(cdr, "features")  # accepted by the CDR's schemas
    assert all(f["geometry"]["type"] == "Polygon" for r in features["polygon_feature_results"]
               for f in r["polygon_features"]["features"])
    units = [r["id"] for r in features["polygon_feature_results"]]
    assert len(units) == len(set(units)) and any(
        r["polygon_features"]["features"] for r in features["polygon_feature_results"])
    if georeferenced:
        assert state["georef"]["status"] == "published", state
        (georef,) = published(cdr, "georef")
        assert georef["georeference_results"][0]["likely_CRSs"] == ["EPSG:4267"]
        for gcp in georef["gcps"]:
            assert gcp["crs"] == "EPSG:4326"
            assert 40.85 <= gcp["map_geom"]["latitude"] <= 41.25
            assert -106.5 <= gcp["map_geom"]["longitude"] <= -106.0
    else:
        assert state["georef"]["status"] == "skipped" and "estimated" in state["georef"]["message"]
        assert published(cdr, "georef") == []
