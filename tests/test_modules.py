"""Tests for the stand-in TA1 modules in modules/, run as real subprocesses.

Run: python -m pytest tests/test_modules.py -q   (needs pytest and pyyaml)

A module-scoped fixture writes the sample map, then runs the nine stand-ins in catalogue
order with the switches config.yml gives, substituting the $TOKENS itself. The tests then
check each module's outputs against the sample map's known content, the three test
switches, usage errors, missing inputs, and that the OpenAI key never leaks.
"""

import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "modules"
sys.path.insert(0, str(MODULES))

import common  # noqa: E402
import sample_map  # noqa: E402

MAP_NAME = "WY_CO_Peach"
SECRET = "sk-test-NEVER-LOG-THIS-4f9c2b"
TIMEOUT = 60


# ---------------------------------------------------------------- helpers


def catalogue() -> list:
    with open(ROOT / "config.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)["modules"]


def substitute(text: str, tokens: dict) -> str:
    for token, value in tokens.items():
        text = text.replace(token, value)
    return text


def command(module: dict, tokens: dict, extra=()) -> list:
    """The argv for one catalogue entry, as the inline runner builds it."""
    program = [sys.executable if part == "python" else str(ROOT / part)
               for part in module["command"]]
    argv = []
    for name, value in module["options"].items():
        argv.append(f"--{name}")
        if isinstance(value, list):
            argv += [substitute(str(v), tokens) for v in value]
        elif value != "":
            argv.append(substitute(str(value), tokens))
    return program + argv + list(extra)


def run(argv: list, env: dict) -> tuple:
    """(CompletedProcess, seconds) for one module run."""
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return done, time.monotonic() - started


def png_size(path: Path) -> tuple:
    data = path.read_bytes()[:33]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the chain


class Chain:
    """One sample map run through every module; results keyed by module name."""

    def __init__(self, base: Path):
        self.inputs = base / "inputs"
        self.tif = self.inputs / "maps" / MAP_NAME / f"{MAP_NAME}.tif"
        sample_map.write_sample_map(str(self.tif))
        self.out = base / "outputs" / "job1"
        self.tokens = {
            "$MAP_NAME": MAP_NAME,
            "$INPUT_DIR": str(self.inputs),
            "$OUTPUT_DIR": str(self.out),
            "$TEMP_DIR": str(base / "temps" / "job1"),
            "$REPO_DIR": str(base / "repos"),
        }
        self.env = {**os.environ, "OPENAI_API_KEY": SECRET}
        self.modules = {m["name"]: m for m in catalogue()}
        self.results = {}
        for name, module in self.modules.items():
            (self.out / name).mkdir(parents=True, exist_ok=True)
            self.results[name] = run(command(module, self.tokens), self.env)

    def path(self, text: str) -> Path:
        return Path(substitute(text, self.tokens))

    def output(self, module: str, index: int = 0) -> Path:
        return self.path(self.modules[module]["outputs"][index])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("chain"))


MODULE_NAMES = [m["name"] for m in catalogue()]


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_module_succeeds_and_writes_its_outputs(chain, name):
    done, _ = chain.results[name]
    assert done.returncode == 0, done.stdout + done.stderr
    for output in chain.modules[name]["outputs"]:
        assert chain.path(output).exists(), output
    assert "wrote" in done.stdout


def test_every_module_has_a_stand_in():
    for name in MODULE_NAMES:
        assert (MODULES / f"{name}.py").exists()


def test_legend_segment_finds_map_and_legend(chain):
    shapes = {s["label"]: s["points"] for s in read_json(chain.output("legend_segment"))["shapes"]}
    assert shapes["map"] == [[20, 20], [740, 780]]
    (x0, y0), (x1, y1) = shapes["legend_polygons"]
    assert x0 >= 760 and y1 < 400
    (x0, y0), _ = shapes["legend_points_lines"]
    assert x0 >= 760 and y0 > 400


def test_georeference_gcps_match_the_geotiff_tags(chain):
    image = common.read_tiff(str(chain.tif), pixels=False)
    dx, dy, _ = image.tags[33550]
    i, j, _, lon0, lat0, _ = image.tags[33922]
    gcps = read_json(chain.output("georeference"))["gcps"]
    assert len(gcps) >= 3
    for gcp in gcps:
        assert set(gcp) == {"gcp_id", "rows_from_top", "columns_from_left", "latitude",
                            "longitude", "crs"}
        assert gcp["crs"] == "EPSG:4267"
        assert gcp["longitude"] == pytest.approx(lon0 + (gcp["columns_from_left"] - i) * dx)
        assert gcp["latitude"] == pytest.approx(lat0 - (gcp["rows_from_top"] - j) * dy)
        # Wyoming/Colorado border country
        assert -111 < gcp["longitude"] < -102 and 37 < gcp["latitude"] < 45


def test_legend_item_segment_finds_every_swatch(chain):
    polygons = read_json(chain.output("legend_item_segment", 1))["features"]
    colours = [common.hex_to_rgb(f["properties"]["color"]) for f in polygons]
    assert colours == sample_map.UNIT_COLOURS
    kinds = sorted(f["properties"]["type"]
                   for f in read_json(chain.output("legend_item_segment", 0))["features"])
    assert kinds == ["line", "point"]
    internal = read_json(chain.output("legend_item_segment", 2))
    assert internal["map_area"] == [20, 20, 740, 780]
    assert len(internal["shapes"]) == len(sample_map.UNIT_COLOURS)


def test_map_crop_writes_png_patches_of_the_right_size(chain):
    image = common.read_tiff(str(chain.tif))
    for n, size in enumerate([1000, 256, 640]):
        folder = chain.output("map_crop", n)
        patches = sorted(folder.glob(f"{MAP_NAME}_*_*.png"))
        assert patches, folder
        for patch in patches:
            assert png_size(patch) == (size, size)
    # patch (1, 1) of the 256/200 grid starts at pixel (200, 200), inside the map area
    patch = common.read_png(str(chain.output("map_crop", 1) / f"{MAP_NAME}_1_1.png"))
    assert patch.pixel(0, 0) == image.pixel(200, 200)
    assert patch.pixel(100, 37) == image.pixel(300, 237)
    # the legend is cropped away and the edge padded with white
    big = common.read_png(str(chain.output("map_crop", 0) / f"{MAP_NAME}_0_0.png"))
    assert big.pixel(820, 75) == (255, 255, 255)
    assert big.pixel(500, 900) == (255, 255, 255)
    assert not (chain.output("map_crop", 1) / f"{MAP_NAME}_0_4.png").exists()


def test_legend_item_description_describes_each_item(chain):
    counts = {}
    for n, kind in enumerate(["point", "line", "polygon"]):
        records = read_json(chain.output("legend_item_description", n))
        counts[kind] = len(records)
        for record in records.values():
            assert record["description"] and record["color"].startswith("#")
            assert record["label_bbox"] is not None
    assert counts == {"point": 1, "line": 1, "polygon": len(sample_map.UNIT_COLOURS)}


def test_polygon_extract_maps_every_unit(chain):
    features = read_json(chain.output("polygon_extract"))["features"]
    assert len(features) == len(sample_map.UNIT_COLOURS)
    for feature in features:
        assert feature["geometry"]["type"] == "MultiPolygon"
        for polygon in feature["geometry"]["coordinates"]:
            for x, y in polygon[0]:
                assert 20 <= x <= 740 and 20 <= y <= 780
    # unit 1 is the background, so it covers most of the map
    area = {f["properties"]["legend_id"]: f["properties"]["area_px"] for f in features}
    assert max(area, key=area.get) == "U1_poly"


def test_line_extract_traces_the_faults(chain):
    features = read_json(chain.output("line_extract"))["features"]
    assert len(features) == len(sample_map.FAULTS)
    for feature in features:
        start, end = feature["geometry"]["coordinates"][0], feature["geometry"]["coordinates"][-1]
        assert any(
            min(abs(start[0] - a[0]) + abs(start[1] - a[1]), abs(start[0] - b[0])
                + abs(start[1] - b[1])) < 20
            and min(abs(end[0] - a[0]) + abs(end[1] - a[1]), abs(end[0] - b[0])
                    + abs(end[1] - b[1])) < 20
            for a, b in sample_map.FAULTS), feature


def test_point_extract_finds_the_symbols(chain):
    features = read_json(chain.output("point_extract"))["features"]
    found = sorted(tuple(f["geometry"]["coordinates"]) for f in features)
    assert len(found) == len(sample_map.POINT_SYMBOLS)
    for (x, y), (ex, ey) in zip(found, sorted(sample_map.POINT_SYMBOLS), strict=True):
        assert abs(x - ex) < 5 and abs(y - ey) < 5


def test_geopackage_is_a_real_geopackage(chain):
    path = chain.output("geopackage")
    assert path.read_bytes()[68:72] == b"GPKG"  # application_id in the SQLite header
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 10200
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        srs = {row[0] for row in db.execute("SELECT srs_id FROM gpkg_spatial_ref_sys")}
        assert {-1, 0, 4326, 4267} <= srs
        contents = dict(db.execute("SELECT table_name, data_type FROM gpkg_contents"))
        assert contents == {"points": "features", "lines": "features", "polygons": "features"}
        columns = dict(db.execute(
            "SELECT table_name, geometry_type_name FROM gpkg_geometry_columns"))
        assert columns == {"points": "POINT", "lines": "LINESTRING",
                           "polygons": "MULTIPOLYGON"}
        assert db.execute("SELECT count(*) FROM points").fetchone()[0] == 6
        assert db.execute("SELECT count(*) FROM lines").fetchone()[0] == 3
        assert db.execute("SELECT count(*) FROM polygons").fetchone()[0] == 6
        blob = db.execute("SELECT geom FROM points LIMIT 1").fetchone()[0]
        assert blob[:2] == b"GP" and blob[3] == 0x03
        assert struct.unpack("<i", blob[4:8])[0] == 4267
        x, y = struct.unpack("<dd", blob[8 + 32 + 5:8 + 32 + 21])  # after envelope, WKB head
        assert -106.5 <= x <= -106.0 and 40.85 <= y <= 41.25
    finally:
        db.close()


def test_logs_are_written_and_the_key_never_leaks(chain):
    done, _ = chain.results["legend_item_description"]
    assert "OPENAI_API_KEY is set" in done.stdout
    for name, (done, _) in chain.results.items():
        assert SECRET not in done.stdout + done.stderr, name
    logs = list(chain.out.rglob("*.log"))
    assert len(logs) == len(MODULE_NAMES)
    for path in chain.out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_each_module_is_fast(chain):
    for name, (_, seconds) in chain.results.items():
        assert seconds < 5, (name, seconds)


# ---------------------------------------------------------------- switches


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_fail_switch_exits_1(chain, name):
    done, _ = run(command(chain.modules[name], chain.tokens, ["--fail"]), chain.env)
    assert done.returncode == 1
    assert "--fail" in done.stdout


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_fail_unless_exists(chain, name, tmp_path):
    missing = tmp_path / "missing"
    done, _ = run(command(chain.modules[name], chain.tokens,
                          ["--fail-unless-exists", str(missing)]), chain.env)
    assert done.returncode == 1
    assert str(missing) in done.stdout
    done, _ = run(command(chain.modules[name], chain.tokens,
                          ["--fail-unless-exists", str(tmp_path)]), chain.env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_sleep_switch_takes_that_long(chain, name):
    done, seconds = run(command(chain.modules[name], chain.tokens, ["--sleep", "0.3"]),
                        chain.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert seconds >= 0.3


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_unknown_switch_is_a_usage_error(chain, name):
    done, _ = run(command(chain.modules[name], chain.tokens, ["--no_such_switch", "1"]),
                  chain.env)
    assert done.returncode == 2
    assert "unrecognized arguments" in done.stderr


@pytest.mark.parametrize("name", [n for n in MODULE_NAMES if catalogue()[
    MODULE_NAMES.index(n)]["requires"]])
def test_missing_predecessor_output_fails_clearly(chain, name, tmp_path):
    empty_job = tmp_path / "job_without_predecessors"
    (empty_job / name).mkdir(parents=True)
    tokens = {**chain.tokens, "$OUTPUT_DIR": str(empty_job)}
    done, _ = run(command(chain.modules[name], tokens), chain.env)
    assert done.returncode == 1
    assert "missing input" in done.stdout
    assert str(empty_job) in done.stdout


def test_missing_map_fails_clearly(chain, tmp_path):
    tokens = {**chain.tokens, "$INPUT_DIR": str(tmp_path)}
    done, _ = run(command(chain.modules["georeference"], tokens), chain.env)
    assert done.returncode == 1
    assert "missing input (map GeoTIFF)" in done.stdout


# ---------------------------------------------------------------- sample map


def test_sample_map_is_deterministic(tmp_path):
    paths = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for path in paths:
        done = subprocess.run([sys.executable, str(MODULES / "sample_map.py"), str(path),
                               "--width", "400", "--height", "320"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    sample_map.write_sample_map(str(tmp_path / "c.tif"), 400, 320)
    assert (tmp_path / "c.tif").read_bytes() == paths[0].read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_map_reads_back_as_a_geotiff(tmp_path):
    path = sample_map.write_sample_map(str(tmp_path / "m.tif"), 500, 400)
    image = common.read_tiff(path)
    assert (image.width, image.height) == (500, 400)
    assert len(image.rgb) == 500 * 400 * 3
    assert common.geotiff_epsg(image) == 4267
    assert image.pixel(5, 5) == (255, 255, 255)
    assert image.pixel(30, 385) == sample_map.UNIT_COLOURS[0]
