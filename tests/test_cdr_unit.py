"""cdr.py against the stand-in CDR (real HTTP on loopback) and on real module outputs of a
whole-graph mipper run on the sample map."""

import copy
import dataclasses
import hashlib
import hmac
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import jsonschema
import pytest
from cdr_standin import StandInCdr

from mip.links import cdr
from mip.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token"
JOB = "J"
MAP = "M"


@pytest.fixture
def standin():
    with StandInCdr(TOKEN) as server:
        yield server


@pytest.fixture
def client(standin):
    with cdr.CdrClient(standin.url, TOKEN, timeout=5, retries=3, backoff=0.01) as c:
        yield c


# ---------------------------------------------------------------------------- calls

@pytest.mark.parametrize("suffix", ["", "/", "//"])
def test_base_url_joined_without_double_slash(standin, suffix):
    with cdr.CdrClient(standin.url + suffix, TOKEN, timeout=5) as c:
        assert c.health() is True
        assert c.registrations() == []
    assert standin.requests == [("GET", "/v1/health/check"), ("GET", "/user/me/registrations")]


def test_wrong_token_gets_401_without_retrying(standin):
    with cdr.CdrClient(standin.url, "wrong", timeout=5, backoff=0.01) as c:
        assert c.health() is False
        with pytest.raises(cdr.CdrError) as caught:
            c.registrations()
    assert caught.value.status == 401
    assert "Not authenticated" in caught.value.body
    assert standin.requests.count(("GET", "/user/me/registrations")) == 1


def test_register_list_unregister(standin, client):
    rid = client.register("mip", "0.1.0", "http://127.0.0.1:1/hook", "s3cret",
                          auth_header="Authorization", auth_token="Bearer xyz")
    listed = client.registrations()
    assert [(r["id"], r["name"], r["events"]) for r in listed] == [
        (rid, "mip", ["ping", "map.process"])]
    assert standin.registrations[rid]["webhook_secret"] == "s3cret"
    with pytest.raises(cdr.CdrError) as caught:
        client.register("mip", "0.1.0", "http://127.0.0.1:1/hook", "s3cret")
    assert caught.value.status == 409
    client.unregister(rid)
    assert client.registrations() == []
    with pytest.raises(cdr.CdrError) as caught:
        client.unregister(rid)
    assert caught.value.status == 404


def test_secret_check_refuses_registration():
    with StandInCdr(TOKEN, secret_check=lambda s: len(s) >= 16) as standin:
        with cdr.CdrClient(standin.url, TOKEN, timeout=5, backoff=0.01) as c:
            with pytest.raises(cdr.CdrError) as caught:
                c.register("mip", "1", "http://127.0.0.1:1/hook", "short")
    assert caught.value.status == 400


def test_5xx_retried_until_success(standin, client):
    standin.fail_next("/user/me/registrations", 2)
    assert client.registrations() == []
    assert standin.requests.count(("GET", "/user/me/registrations")) == 3


def test_5xx_gives_up_after_retries(standin, client):
    standin.fail_next("/user/me/registrations", 10, status=503)
    with pytest.raises(cdr.CdrError) as caught:
        client.registrations()
    assert caught.value.status == 503
    assert standin.requests.count(("GET", "/user/me/registrations")) == 4  # 1 + 3 retries


def test_4xx_not_retried(standin, client):
    standin.fail_next("/user/me/registrations", 3, status=400)
    with pytest.raises(cdr.CdrError) as caught:
        client.registrations()
    assert caught.value.status == 400
    assert "injected failure" in caught.value.body
    assert standin.requests.count(("GET", "/user/me/registrations")) == 1


def test_connection_refused_is_a_cdr_error_without_status(standin):
    url = standin.url
    standin.stop()
    with cdr.CdrClient(url, TOKEN, timeout=2, retries=1, backoff=0.01) as c:
        assert c.health() is False
        with pytest.raises(cdr.CdrError) as caught:
            c.registrations()
    assert caught.value.status is None


# ---------------------------------------------------------------------------- downloads

COG = bytes(range(256)) * 4099  # about 1 MB, so it spans several chunks


def test_cog_url_and_download(standin, client, tmp_path):
    standin.add_cog("abc", COG)
    url = client.cog_url("abc")
    assert url == f"{standin.url}/cogs/abc.cog.tif"
    dest = tmp_path / "maps" / "abc.tif"
    assert client.download(url, str(dest)) == len(COG)
    assert dest.read_bytes() == COG
    assert os.listdir(dest.parent) == ["abc.tif"]


def test_unknown_cog_is_404(client):
    with pytest.raises(cdr.CdrError) as caught:
        client.cog_url("nope")
    assert caught.value.status == 404


def test_broken_download_leaves_no_file(standin, client, tmp_path):
    standin.add_cog("abc", COG)
    standin.break_download("abc")
    dest = tmp_path / "abc.tif"
    with pytest.raises(cdr.CdrError) as caught:
        client.download(client.cog_url("abc"), str(dest))
    assert caught.value.status is None
    assert os.listdir(tmp_path) == []
    assert standin.requests.count(("GET", "/cogs/abc.cog.tif")) == 4  # retried


def test_download_missing_file_is_404_and_no_file(standin, client, tmp_path):
    with pytest.raises(cdr.CdrError) as caught:
        client.download(f"{standin.url}/cogs/nope.cog.tif", str(tmp_path / "x.tif"))
    assert caught.value.status == 404
    assert os.listdir(tmp_path) == []


def test_download_sends_no_token(standin, client, tmp_path):
    seen = []
    receiver = Receiver(seen).start()
    try:
        client.download(receiver.url + "/file", str(tmp_path / "f"))
    finally:
        receiver.stop()
    assert "Authorization" not in seen[0][1]
    assert (tmp_path / "f").read_bytes() == b"ok"


def test_download_over_the_limit_refused(standin, client, tmp_path, monkeypatch):
    monkeypatch.setattr(cdr, "MAX_MAP_BYTES", 1000)
    standin.add_cog("abc", COG)
    with pytest.raises(cdr.CdrError, match="limit"):
        client.download(client.cog_url("abc"), str(tmp_path / "abc.tif"))
    assert os.listdir(tmp_path) == []
    assert standin.requests.count(("GET", "/cogs/abc.cog.tif")) == 1  # not retried


# ---------------------------------------------------------------------------- signatures

def test_sign_known_vectors():
    # RFC 4231 test case 2
    assert cdr.sign("Jefe", b"what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    body = b'{"id": "1", "event": "ping", "payload": null}'
    assert cdr.sign("s3cret", body) == hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()


def test_verify():
    body = b'{"event": "ping"}'
    good = cdr.sign("s3cret", body)
    assert cdr.verify("s3cret", body, good)
    assert not cdr.verify("s3cret", body + b" ", good)
    assert not cdr.verify("other", body, good)
    assert not cdr.verify("s3cret", body, None)
    assert not cdr.verify("s3cret", body, "")
    assert not cdr.verify("s3cret", body, "sha256=" + good)
    assert not cdr.verify("s3cret", body, "\u00e9" * 64)
    assert cdr.verify("s3cret", body, good.upper())


def test_deliver_signs_so_that_verify_accepts(standin, client):
    seen = []
    receiver = Receiver(seen).start()
    try:
        client.register("mip", "1", receiver.url + "/hook", "s3cret",
                        auth_header="Authorization", auth_token="Bearer abc")
        standin.deliver("ping", None, event_id="e1")
        standin.deliver("map.process", {"cog_id": "c", "cog_url": "u"}, secret="wrong")
        standin.deliver("ping", None, signature="", content_type="")
    finally:
        receiver.stop()
    (_, h1, b1), (_, h2, b2), (_, h3, b3) = seen
    assert json.loads(b1) == {"id": "e1", "event": "ping", "payload": None}
    assert cdr.verify("s3cret", b1, h1["x-cdr-signature-256"])
    assert h1["Authorization"] == "Bearer abc"
    assert not cdr.verify("s3cret", b2, h2["x-cdr-signature-256"])
    assert "x-cdr-signature-256" not in h3 and "Content-Type" not in h3


class Receiver:
    """A callback endpoint recording (path, headers, body) and answering 200 "ok"."""

    def __init__(self, seen: list):
        seen_list = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                seen_list.append((self.path, dict(self.headers), self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "Receiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# ---------------------------------------------------------------------------- results

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Settings of a scratch data folder where mipper ran every module on the sample map."""
    data = tmp_path_factory.mktemp("cdr")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIP_", "TA1_"))}
    for name in ("INPUTS", "OUTPUTS", "TEMPS", "RUNS", "REPOS"):
        env[f"TA1_{name}_DIR"] = str(data / name.lower())
    env["MIP_CONFIG"] = os.path.join(ROOT, "config.yml")
    tif = data / "inputs" / "maps" / MAP / f"{MAP}.tif"
    subprocess.run([sys.executable, os.path.join(ROOT, "modules", "sample_map.py"), str(tif)],
                   env=env, check=True, capture_output=True, timeout=60)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "mipper.py"), "--job", JOB,
                           "--map", MAP, "--module", "ALL"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return Settings.from_env(env)


def read_output(settings, *parts):
    with open(os.path.join(settings.outputs_dir, JOB, *parts), encoding="utf-8") as f:
        return json.load(f)


def features_of(result: dict) -> list:
    field = next(k for k in result if k.endswith("_features"))
    return result[field]["features"]


def test_feature_results_from_real_outputs(outputs, standin, client):
    results = cdr.feature_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("FeatureResults", results)
    legend = read_output(outputs, "legend_item_description", f"{MAP}_polygon.json")
    polygons = read_output(outputs, "polygon_extract", f"{MAP}_polygons.geojson")
    polygon_results = results["polygon_feature_results"]
    assert [r["id"] for r in polygon_results] == list(legend)
    assert all(r["label"] and r["legend_bbox"] for r in polygon_results)
    # every polygon of every MultiPolygon becomes one PolygonFeature of its legend item
    for result in polygon_results:
        parts = [p for f in polygons["features"] if f["properties"]["legend_id"] == result["id"]
                 for p in f["geometry"]["coordinates"]]
        assert [f["geometry"]["coordinates"] for f in features_of(result)] == parts
        assert parts
    lines = read_output(outputs, "line_extract", f"{MAP}_lines.geojson")
    points = read_output(outputs, "point_extract", "output-per-symbol", f"{MAP}_points.geojson")
    assert [len(features_of(r)) for r in results["line_feature_results"]] == [
        len(lines["features"])]
    assert [len(features_of(r)) for r in results["point_feature_results"]] == [
        len(points["features"])]
    point = features_of(results["point_feature_results"][0])[0]
    assert point["properties"]["model"] == "point_extract"
    assert point["properties"]["bbox"] and point["properties"]["dip"] is None
    ids = [f["id"] for key in ("polygon", "line", "point")
           for r in results[f"{key}_feature_results"] for f in features_of(r)]
    assert len(ids) == len(set(ids))
    assert sorted(a["category"] for a in results["cog_area_extractions"]) == [
        "line_point_legend_area", "map_area", "polygon_legend_area"]
    answer = client.publish_features(results)
    assert answer["id"] == "mip_0.2.0_cog1" and answer["job_id"]
    assert standin.published == [("features", results, [])]


def test_georef_results_from_real_outputs(outputs, standin, client):
    results, files = cdr.georef_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("GeoreferenceResults", results)
    assert files == []
    gcps = read_output(outputs, "georeference", f"{MAP}.json")["gcps"]
    assert [(g["gcp_id"], g["map_geom"]["latitude"], g["map_geom"]["longitude"],
             g["px_geom"]["rows_from_top"], g["px_geom"]["columns_from_left"], g["crs"])
            for g in results["gcps"]] == [
        (g["gcp_id"], g["latitude"], g["longitude"], g["rows_from_top"],
         g["columns_from_left"], g["crs"]) for g in gcps]
    assert all(g["model"] == "georeference" for g in results["gcps"])
    (result,) = results["georeference_results"]
    assert result["likely_CRSs"] == ["EPSG:4267"] and result["projections"] == []
    assert result["map_area"]["category"] == "map_area"
    answer = client.publish_georef(results, files)
    assert answer["id"] == "mip_0.2.0_cog1"
    assert standin.published == [("georef", results, [])]


def test_publish_georef_with_files(outputs, standin, client, tmp_path):
    results, _ = cdr.georef_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    tif = tmp_path / "cog1_4267.tif"
    tif.write_bytes(COG)
    results["georeference_results"][0]["projections"] = [
        {"crs": "EPSG:4267", "gcp_ids": ["gcp_1"], "file_name": tif.name}]
    cdr.validate("GeoreferenceResults", results)
    standin.fail_next("/v1/maps/publish/georef", 1)
    client.publish_georef(results, [str(tif)])
    # the retry sent the file again from its start
    assert standin.published == [("georef", results, [tif.name])]


def test_publish_georef_unreadable_file_sends_nothing(standin, client, tmp_path):
    with pytest.raises(cdr.CdrError, match="cannot read"):
        client.publish_georef({"cog_id": "c", "system": "s", "system_version": "1"},
                              [str(tmp_path / "absent.tif")])
    assert standin.requests == []


def test_cdr_schemas_are_the_cdrs_own_and_valid():
    for name in cdr.SCHEMAS:
        with open(os.path.join(ROOT, "schema", "cdr", f"{name}.json"), encoding="utf-8") as f:
            schema = json.load(f)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"] == name
    with open(os.path.join(ROOT, "schema", "cdr", "README.md"), encoding="utf-8") as f:
        note = f.read()
    assert "cdr_schemas" in note and "0.4.18" in note and "model_json_schema()" in note


def test_standin_refuses_missing_fields(outputs, standin, client):
    results = cdr.feature_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    broken = copy.deepcopy(results)
    del features_of(broken["line_feature_results"][0])[0]["properties"]["model"]
    with pytest.raises(cdr.CdrError) as caught:
        client.publish_features(broken)
    assert caught.value.status == 422
    # the CDR's answer is kept truncated: its start names the field
    assert '"loc": ["body", "line_feature_results", 0, "line_features", "features", 0, ' \
        '"properties", "model"]' in caught.value.body
    georef, _ = cdr.georef_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    georef["georeference_results"][0]["projections"] = [
        {"crs": "EPSG:4267", "gcp_ids": [], "file_name": "absent.tif"}]
    with pytest.raises(cdr.CdrError) as caught:
        client.publish_georef(georef)
    assert caught.value.status == 422 and "file_name" in caught.value.body
    assert standin.published == []
    assert [kind for kind, _ in standin.refused] == ["features", "georef"]


def minimal_features(**point_properties) -> dict:
    point = {"id": "p1", "geometry": {"type": "Point", "coordinates": [5, 6]},
             "properties": {"model": "point_extract", "model_version": "1", **point_properties}}
    return {"system": "mip", "system_version": "1", "cog_id": "c",
            "point_feature_results": [{"id": "P", "name": "P", "point_features": {
                "type": "FeatureCollection", "features": [point]}}]}


def minimal_georef(**gcp_fields) -> dict:
    gcp = {"gcp_id": "1", "map_geom": {"latitude": 40.5, "longitude": -105.2},
           "px_geom": {"rows_from_top": 10, "columns_from_left": 20},
           "model": "georeference", "model_version": "1", **gcp_fields}
    return {"cog_id": "c", "system": "mip", "system_version": "1", "gcps": [gcp]}


@pytest.mark.parametrize("name, payload, field", [
    # what the CDR's models refuse and hand-written approximations used to let through
    ("GeoreferenceResults", minimal_georef(), "$.gcps[0].crs"),
    ("GeoreferenceResults", minimal_georef(crs=None), "$.gcps[0].crs"),
    ("FeatureResults", minimal_features(bbox=None), "bbox"),
    ("FeatureResults", minimal_features(bbox=[1, 2, 3, 4], dip=12.5), "dip"),
])
def test_what_the_cdr_refuses_fails_validation_and_the_standin(name, payload, field, standin,
                                                                 client):
    assert cdr.problem(name, payload) is not None
    with pytest.raises(cdr.CdrError, match=re.escape(field)):
        cdr.validate(name, payload)
    publish = client.publish_features if name == "FeatureResults" else client.publish_georef
    with pytest.raises(cdr.CdrError) as caught:
        publish(payload)
    assert caught.value.status == 422 and standin.published == []
    # and the same payloads, completed honestly, pass both
    if name == "GeoreferenceResults":
        fixed = minimal_georef(crs="EPSG:4326")
    else:
        fixed = minimal_features(bbox=[1, 2, 3, 4], dip=12)
    cdr.validate(name, fixed)
    publish(fixed)
    assert len(standin.published) == 1


def test_a_multipolygon_is_refused_by_the_cdrs_schema():
    results = {"system": "s", "system_version": "1", "cog_id": "c",
               "polygon_feature_results": [{"id": "A", "label": "A", "polygon_features": {
                   "features": [{"id": "A_1", "properties": {"model": "m", "model_version": "1"},
                                 "geometry": {"type": "MultiPolygon",
                                              "coordinates": [[[0, 0], [1, 0], [0, 0]]]}}]}}]}
    assert ".geometry.type: 'MultiPolygon' is not one of" in cdr.problem("FeatureResults",
                                                                          results)


def test_validate_names_the_failing_field(outputs):
    results = cdr.feature_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    del features_of(results["polygon_feature_results"][1])[0]["properties"]["model_version"]
    with pytest.raises(cdr.CdrError, match=r"polygon_feature_results\[1\]"):
        cdr.validate("FeatureResults", results)
    georef, _ = cdr.georef_results(outputs, JOB, MAP, "cog1", "mip", "0.2.0")
    georef["gcps"][2]["px_geom"]["rows_from_top"] = "96"
    with pytest.raises(cdr.CdrError, match=r"gcps\[2\]\.px_geom\.rows_from_top"):
        cdr.validate("GeoreferenceResults", georef)
    area = {"coordinates": [[[0, 0], [1, 0], [0, 0]]], "category": "legend",
            "model": "m", "model_version": "1"}
    with pytest.raises(cdr.CdrError, match="category"):
        cdr.validate("FeatureResults", {"system": "s", "system_version": "1", "cog_id": "c",
                                        "cog_area_extractions": [area]})
    with pytest.raises(cdr.CdrError):
        cdr.validate("Nope", {})


def test_missing_outputs_leave_parts_empty(outputs, tmp_path):
    settings = dataclasses.replace(outputs, outputs_dir=str(tmp_path))
    shutil.copytree(os.path.join(outputs.outputs_dir, JOB, "legend_segment"),
                    tmp_path / JOB / "legend_segment")
    results = cdr.feature_results(settings, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("FeatureResults", results)
    assert results["polygon_feature_results"] == results["line_feature_results"] == []
    assert results["point_feature_results"] == []
    assert len(results["cog_area_extractions"]) == 3
    with pytest.raises(cdr.CdrError, match="no georeference output"):
        cdr.georef_results(settings, JOB, MAP, "cog1", "mip", "0.2.0")


def test_extraction_without_its_legend_still_published(outputs, tmp_path):
    settings = dataclasses.replace(outputs, outputs_dir=str(tmp_path))
    shutil.copytree(os.path.join(outputs.outputs_dir, JOB, "point_extract"),
                    tmp_path / JOB / "point_extract")
    (tmp_path / JOB / "legend_segment").mkdir()
    (tmp_path / JOB / "legend_segment" / f"{MAP}_map_segmentation.json").write_text("{bad")
    results = cdr.feature_results(settings, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("FeatureResults", results)
    assert [(r["id"], r["name"], len(features_of(r)))
            for r in results["point_feature_results"]] == [("P1_pt", "P1_pt", 6)]
    assert results["cog_area_extractions"] == []


def test_nothing_to_publish_raises(outputs, tmp_path):
    settings = dataclasses.replace(outputs, outputs_dir=str(tmp_path))
    with pytest.raises(cdr.CdrError, match="no module output"):
        cdr.feature_results(settings, JOB, MAP, "cog1", "mip", "0.2.0")


# ---------------------------------------------------------------------------- the contract

# Module outputs as the contract between the modules and the CDR link describes them:
# polygon_extract gives ONE feature per map unit (a MultiPolygon, or a Polygon), and
# georeference gives EPSG:4326 GCPs, the map's own CRS and whether the GCPs are estimated.
SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
FRAME = [[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]]
HOLE = [[25, 25], [30, 25], [30, 30], [25, 30], [25, 25]]
TRIANGLE = [[50, 50], [60, 50], [55, 58], [50, 50]]
CONTRACT = {
    "polygon_extract/M_polygons.geojson": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"legend_id": "Qal"},
         "geometry": {"type": "MultiPolygon", "coordinates": [[SQUARE], [FRAME, HOLE]]}},
        {"type": "Feature", "properties": {"legend_id": "Tg"},
         "geometry": {"type": "Polygon", "coordinates": [TRIANGLE]}}]},
    "legend_item_description/M_polygon.json": {
        "Qal": {"symbol name": "Qal", "description": "alluvium", "color": "#e0d080",
                "bbox": [100, 10, 120, 20]},
        "Tg": {"symbol name": None, "description": None, "color": "#c04040",
               "bbox": [100, 30, 120, 40]},
        "Kx": {"symbol name": "Kx", "description": "", "color": "#40c040",
               "bbox": [100, 50, 120, 60]}},
    "line_extract/M_lines.geojson": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"legend_id": "fault", "dash_pattern": "dash"},
         "geometry": {"type": "MultiLineString",
                      "coordinates": [[[0, 0], [5, 5]], [[7, 7], [9, 9], [12, 9]]]}}]},
    "point_extract/output-per-symbol/M_points.geojson": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"legend_id": "mine", "bbox": [3, 3, 9, 9],
                                           "score": 0.8},
         "geometry": {"type": "Point", "coordinates": [6, 6]}}]},
    "georeference/M.json": {
        "map_name": "M", "crs": "EPSG:26913", "estimated": False,
        "gcps": [{"gcp_id": "1", "rows_from_top": 0, "columns_from_left": 0,
                  "latitude": 40.9, "longitude": -105.6, "crs": "EPSG:4326"},
                 {"gcp_id": "2", "rows_from_top": 900, "columns_from_left": 1200,
                  "latitude": 40.8, "longitude": -105.4, "crs": "EPSG:4326"}]},
}


def write_outputs(settings, files: dict) -> None:
    for name, data in files.items():
        path = os.path.join(settings.outputs_dir, JOB, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)


@pytest.fixture
def contract(outputs, tmp_path):
    settings = dataclasses.replace(outputs, outputs_dir=str(tmp_path))
    write_outputs(settings, copy.deepcopy(CONTRACT))
    return settings


def test_one_legend_result_per_unit_and_one_polygon_per_part(contract):
    results = cdr.feature_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("FeatureResults", results)
    units = results["polygon_feature_results"]
    assert [u["id"] for u in units] == ["Qal", "Tg", "Kx"]
    assert [u["label"] for u in units] == ["Qal", "Tg", "Kx"]
    qal, tg, kx = units
    assert [f["geometry"] for f in features_of(qal)] == [
        {"type": "Polygon", "coordinates": [SQUARE]},
        {"type": "Polygon", "coordinates": [FRAME, HOLE]}]  # the hole stays with its part
    assert [f["geometry"] for f in features_of(tg)] == [
        {"type": "Polygon", "coordinates": [TRIANGLE]}]
    assert features_of(kx) == []  # a legend unit found nowhere on the map is still reported
    assert qal["color"] == "#e0d080" and qal["description"] == "alluvium"
    assert qal["legend_bbox"] == [100, 10, 120, 20]
    # nulls written by a module become the model's own default, never a null
    assert tg["abbreviation"] == "" and tg["description"] == ""
    assert {f["properties"]["model"] for u in units for f in features_of(u)} == {
        "polygon_extract"}
    (fault,) = results["line_feature_results"]
    assert [f["geometry"]["type"] for f in features_of(fault)] == ["LineString"] * 2
    assert features_of(fault)[0]["properties"]["dash_pattern"] == "dash"
    assert "color" not in fault  # the line model has no colour
    (mine,) = results["point_feature_results"]
    assert features_of(mine)[0]["properties"]["bbox"] == [3, 3, 9, 9]
    assert features_of(mine)[0]["properties"]["confidence"] == 0.8


def test_gcps_in_degrees_with_the_maps_own_crs_as_likely(contract):
    results, files = cdr.georef_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")
    cdr.validate("GeoreferenceResults", results)
    assert files == []
    assert [(g["gcp_id"], g["map_geom"]["latitude"], g["map_geom"]["longitude"], g["crs"])
            for g in results["gcps"]] == [("1", 40.9, -105.6, "EPSG:4326"),
                                          ("2", 40.8, -105.4, "EPSG:4326")]
    assert results["gcps"][1]["px_geom"] == {"rows_from_top": 900, "columns_from_left": 1200,
                                             "type": "Point"}
    (result,) = results["georeference_results"]
    assert result["likely_CRSs"] == ["EPSG:26913"] and result["projections"] == []


def test_estimated_gcps_are_never_published(contract):
    georef = copy.deepcopy(CONTRACT["georeference/M.json"])
    georef.update(crs=None, estimated=True)
    write_outputs(contract, {"georeference/M.json": georef})
    with pytest.raises(cdr.Skipped, match="estimated"):
        cdr.georef_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")
    # the features of the same job are published all the same
    cdr.validate("FeatureResults", cdr.feature_results(contract, JOB, MAP, "cog1", "mip", "1"))
    georef["estimated"] = "no"
    write_outputs(contract, {"georeference/M.json": georef})
    with pytest.raises(cdr.CdrError, match="estimated"):
        cdr.georef_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")


def test_what_a_module_left_out_is_not_made_up(contract):
    georef = copy.deepcopy(CONTRACT["georeference/M.json"])
    del georef["gcps"][1]["crs"]
    del georef["gcps"][0]["latitude"]
    points = copy.deepcopy(CONTRACT["point_extract/output-per-symbol/M_points.geojson"])
    del points["features"][0]["properties"]["bbox"]
    write_outputs(contract, {"georeference/M.json": georef,
                             "point_extract/output-per-symbol/M_points.geojson": points})
    results, _ = cdr.georef_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")
    assert "crs" not in results["gcps"][1]  # never the map's CRS in its place
    with pytest.raises(cdr.CdrError, match=re.escape("$.gcps[1].crs")):
        cdr.validate("GeoreferenceResults", results)
    del results["gcps"][1]
    with pytest.raises(cdr.CdrError, match=re.escape("$.gcps[0].map_geom.latitude")):
        cdr.validate("GeoreferenceResults", results)
    features = cdr.feature_results(contract, JOB, MAP, "cog1", "mip", "0.2.0")
    with pytest.raises(cdr.CdrError, match=r"point_features\.features\[0\]\.properties\.bbox"):
        cdr.validate("FeatureResults", features)


# ---------------------------------------------------------------------------- the inbox

def held(status: str, retry: int = 0, attempts: int = 1) -> dict:
    return {"status": status, "retry": retry, "attempts": attempts}


def notification(nid: str, created: str, event: str = "map.process", **inner) -> dict:
    return {"id": nid, "event": {"event": event, "created_date": created, **inner}}


def test_missed_events_matched_by_event_id():
    items = [notification("ev-1", "2026-01-01T00:00:00"),  # held, ran
             notification("ev-2", "2026-01-01T00:00:01"),  # held, failed for a passing reason
             notification("ev-3", "2026-01-01T00:00:02"),  # held, failed for good
             notification("ev-4", "2026-01-01T00:00:03"),  # held, failed too often
             notification("ev-5", "2025-01-01T00:00:00"),  # not held, however old
             notification("ev-6", "2026-01-01T00:00:04", event="ping"),
             {"id": "odd"}, "not an object"]
    known = {"ev-1": held("submitted"), "ev-2": held("failed", 1), "ev-3": held("failed"),
             "ev-4": held("failed", 1, cdr.MAX_ATTEMPTS)}
    assert cdr.missed_events(items, known, "2026-01-01T00:00:03.000Z") == (
        ["ev-2", "ev-5"], "event id")
    # the event's own id inside `event`, when the CDR sends it, is matched too
    items = [notification("n1", "2026-01-01T00:00:00", id="ev-1"),
             notification("n2", "2026-01-01T00:00:00", id="ev-9")]
    assert cdr.missed_events(items, {"ev-1": held("submitted")}, "2026-01-01T00:00:00Z") \
        == (["n2"], "event id")


def test_missed_events_matched_by_created_date_when_no_id_agrees():
    items = [notification("n1", "2026-01-01T00:00:00"),
             notification("n2", "2026-01-01T12:00:00.5"),  # naive: UTC
             notification("n3", "2026-01-01T13:00:00+01:00"),  # = 12:00 UTC
             notification("n4", "not a time")]
    assert cdr.missed_events(items, {}, "2026-01-01T12:00:00.000Z") == (
        ["n2", "n4"], "created_date")
    # a journal without events: every map.process notification is missed
    assert cdr.missed_events(items, {}, None) == (["n1", "n2", "n3", "n4"], "event id")


class FakeQueue:
    """submit() with room for `room` runs; each run is a string."""

    def __init__(self, room: int):
        self.room = room
        self.runs = []

    def submit(self, payload: dict) -> str:
        if len(self.runs) >= self.room:
            raise cdr.Busy("full", "queue_full", retry_after=30)
        self.runs.append(payload["job"])
        return f"run-{payload['job']}"


@pytest.fixture
def link(tmp_path):
    from mip import journal

    settings = Settings.from_env({f"TA1_{name}_DIR": str(tmp_path / name.lower())
                                  for name in ("INPUTS", "OUTPUTS", "TEMPS", "RUNS", "REPOS")})
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    cs = cdr.CdrSettings(url="http://127.0.0.1:9", token="t", secret="s",
                         callback_url="http://127.0.0.1:9/cdr", system="mip", version="1",
                         inbox_max=5)
    queue = FakeQueue(2)
    made = cdr.CdrLink(cs, settings, db, queue.submit)
    made.fake_queue = queue
    yield made
    db.close()


def test_the_inbox_waits_while_the_queue_is_full_and_goes_on_when_a_run_ends(link):
    for n in range(4):
        path = cdr.map_file(link.settings, f"cog{n}")
        os.makedirs(os.path.dirname(path))
        open(path, "wb").close()  # here already: nothing to fetch
        assert link.take(f"ev{n}", f"cog{n}", "https://cdr.example/x") == "received"
    assert link.pump() == 30  # the queue refused the third: wait its retry time
    assert link.fake_queue.runs == ["cog0", "cog1"]
    assert [e["event_id"] for e in link.db.inbox(10)] == ["ev2", "ev3"]
    assert link.pump() > 0 and link.fake_queue.runs == ["cog0", "cog1"]  # not asked again
    link.fake_queue.room = 3
    link.run_finished({"run_id": "run-cog0", "status": "failed", "job": "cog0"})
    assert link.wake.is_set()
    assert link.pump() == 30 and link.fake_queue.runs == ["cog0", "cog1", "cog2"]
    assert link.db.event("ev2")["status"] == "submitted"
    assert link.db.event("ev2")["run_id"] == "run-cog2"


def test_the_inbox_refuses_past_its_bound(link):
    for n in range(5):
        link.take(f"ev{n}", f"cog{n}", "https://cdr.example/x")
    with pytest.raises(cdr.Busy) as refused:
        link.take("ev5", "cog5", "https://cdr.example/x")
    assert refused.value.code == "cdr_inbox_full" and refused.value.retry_after == 60
    assert link.db.event("ev5") is None
    # a duplicate is no new work: still answered
    assert link.take("ev0", "cog0", "https://cdr.example/x") == "duplicate"


def test_reconcile_asks_the_standin_for_what_the_journal_lacks(link, standin):
    link.client = cdr.CdrClient(standin.url, TOKEN)
    link.cs = dataclasses.replace(link.cs, system="mip_u", version="9")
    standin.register({"name": "mip_u", "version": "9", "callback_url": "http://127.0.0.1:9/",
                      "webhook_secret": "s"})
    for event_id in ("ev-held", "ev-missed"):
        standin.miss("map.process", {"cog_id": "c", "cog_url": "https://x/c"}, event_id)
    link.db.add_event("ev-held", "map.process", "c", "https://x/c", "submitted")
    assert link.reconcile() == 1
    wait_for_resend = [n for n in standin.resent if n == "ev-missed"]
    assert wait_for_resend == ["ev-missed"]
    assert ("PUT", "/user/me/resend/notification/ev-missed") in standin.requests
    link.client.close()
