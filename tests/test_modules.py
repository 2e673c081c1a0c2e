"""Tests for the stand-in TA1 modules in modules/, run as real subprocesses.

Run: python -m pytest tests/test_modules.py -q   (needs pytest and pyyaml)

A module-scoped fixture writes the sample map, then runs the nine stand-ins in catalogue
order with the switches config.yml gives, substituting the $TOKENS itself. The tests then
check each module's outputs against the sample map's known content, the three test
switches, usage errors, missing inputs, and that the OpenAI key never leaks.
"""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.control
import rasterio.crs
import shapely
import yaml
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from shapely.geometry import shape

ROOT = Path(__file__).resolve().parents[1]
MODULES = ROOT / "modules"
sys.path.insert(0, str(MODULES))

import common  # noqa: E402
import patches  # noqa: E402
import raster  # noqa: E402
import sample_map  # noqa: E402

MAP_NAME = "WY_CO_Peach"
SECRET = "sk-test-NEVER-LOG-THIS-4f9c2b"
# generous: the modules start in about a second, but CI machines are shared
TIMEOUT = 120
# where the sample map's test copy sits: NAD27, 0.5 x 0.4 degrees
WEST, NORTH, SPAN_X, SPAN_Y = -106.5, 41.25, 0.5, 0.4


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


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def open_map(path):
    """rasterio.open, quiet about maps without georeferencing (expected here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        return rasterio.open(path)


def sample_pixels(width: int = 1000, height: int = 800, folder=None) -> np.ndarray:
    """The sample map's pixels as a (3, height, width) uint8 array."""
    path = Path(folder) / "drawn.tif"
    sample_map.write_sample_map(str(path), width, height)
    with open_map(path) as ds:
        rgb = ds.read()
    path.unlink()
    return rgb


def write_map(path: Path, bands: np.ndarray, georeferenced=True, crs="EPSG:4267",
              **profile) -> Path:
    """Write bands (count, h, w) as a TIFF with rasterio; georeferenced over the sample
    map's box (in crs, projected from NAD27 degrees when crs is not geographic)."""
    count, height, width = bands.shape
    options = {"driver": "GTiff", "width": width, "height": height, "count": count,
               "dtype": bands.dtype.name, **profile}
    if georeferenced:
        west, south, east, north = WEST, NORTH - SPAN_Y, WEST + SPAN_X, NORTH
        if crs != "EPSG:4267":
            west, south, east, north = transform_bounds("EPSG:4267", crs, west, south, east,
                                                        north)
        options.update(crs=crs, transform=Affine((east - west) / width, 0, west,
                                                 0, -(north - south) / height, north))
    elif "gcps" in profile:
        options["crs"] = crs  # the CRS of the GCPs
    path.parent.mkdir(parents=True, exist_ok=True)
    colormap = options.pop("colormap", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        with rasterio.open(path, "w", **options) as ds:
            ds.write(bands)
            if colormap:
                ds.write_colormap(1, colormap)
    return path


# ---------------------------------------------------------------- the chain


class Chain:
    """One map run through every module in catalogue order; results keyed by module."""

    def __init__(self, base: Path, write):
        self.inputs = base / "inputs"
        self.tif = self.inputs / "maps" / MAP_NAME / f"{MAP_NAME}.tif"
        write(self.tif)
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

    def failures(self) -> dict:
        return {name: done.stdout[-2000:] + done.stderr[-2000:]
                for name, (done, _) in self.results.items() if done.returncode != 0}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The sample map as an uncompressed, striped RGB GeoTIFF in NAD27 (EPSG:4267)."""
    base = tmp_path_factory.mktemp("chain")
    pixels = sample_pixels(folder=base)
    return Chain(base, lambda path: write_map(path, pixels))


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


def test_no_hand_written_codec_remains():
    for path in MODULES.glob("*.py"):
        if path.name == "sample_map.py":
            continue
        text = path.read_text(encoding="utf-8")
        for codec_mark in ("import struct", "import zlib", "import sqlite3", "b\"II*"):
            assert codec_mark not in text, (path.name, codec_mark)


def test_legend_segment_finds_map_and_legend(chain):
    segmentation = read_json(chain.output("legend_segment"))
    shapes = {s["label"]: s["points"] for s in segmentation["shapes"]}
    assert shapes["map"] == [[20, 20], [740, 780]]
    (x0, y0), (x1, y1) = shapes["legend_polygons"]
    assert x0 >= 760 and y1 < 400
    (x0, y0), _ = shapes["legend_points_lines"]
    assert x0 >= 760 and y0 > 400
    assert segmentation["paper"] == [255, 255, 255]


def test_georeference_gcps_are_wgs84_degrees_from_the_geotiff(chain):
    data = read_json(chain.output("georeference"))
    assert data["crs"] == "EPSG:4267" and data["estimated"] is False
    gcps = data["gcps"]
    assert len(gcps) >= 3
    with open_map(chain.tif) as ds:
        transform = ds.transform
    for gcp in gcps:
        assert set(gcp) == {"gcp_id", "rows_from_top", "columns_from_left", "latitude",
                            "longitude", "crs"}
        assert gcp["crs"] == "EPSG:4326"
        x, y = transform @ (gcp["columns_from_left"], gcp["rows_from_top"])
        (lon,), (lat,) = warp_transform("EPSG:4267", "EPSG:4326", [x], [y])
        assert gcp["longitude"] == pytest.approx(lon, abs=1e-9)
        assert gcp["latitude"] == pytest.approx(lat, abs=1e-9)
        # NAD27 to WGS84 moves this corner of Wyoming by well under a thousandth of a degree
        assert abs(gcp["longitude"] - x) < 1e-3 and abs(gcp["latitude"] - y) < 1e-3


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
    with open_map(chain.tif) as ds:
        image = np.moveaxis(ds.read(), 0, -1)
    for n, size in enumerate([1000, 256, 640]):
        folder = chain.output("map_crop", n)
        found = sorted(folder.glob(f"{MAP_NAME}_*_*.png"))
        assert found, folder
        for patch in found:
            assert patches.read_png(str(patch)).shape == (size, size, 3)
    # patch (1, 1) of the 256/200 grid starts at pixel (200, 200), inside the map area
    patch = patches.read_png(str(chain.output("map_crop", 1) / f"{MAP_NAME}_1_1.png"))
    assert (patch == image[200:456, 200:456]).all()
    # the legend is cropped away and the edge padded with white
    big = patches.read_png(str(chain.output("map_crop", 0) / f"{MAP_NAME}_0_0.png"))
    assert (big[75, 820] == 255).all() and (big[900, 500] == 255).all()
    assert (big[20:780, 20:740] == image[20:780, 20:740]).all()
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


def test_polygon_extract_one_valid_multipolygon_per_unit(chain):
    features = read_json(chain.output("polygon_extract"))["features"]
    ids = [f["properties"]["legend_id"] for f in features]
    assert len(features) == len(sample_map.UNIT_COLOURS) == len(set(ids))
    for feature in features:
        assert feature["geometry"]["type"] == "MultiPolygon"
        geometry = shape(feature["geometry"])
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        x0, y0, x1, y1 = geometry.bounds
        assert 20 <= x0 and 20 <= y0 and x1 <= 740 and y1 <= 780
    # touching cells merge: each unit of the sample map is one connected part
    assert all(len(f["geometry"]["coordinates"]) == 1 for f in features)
    # unit 1 is the background, so it covers most of the map
    area = {f["properties"]["legend_id"]: f["properties"]["area_px"] for f in features}
    assert max(area, key=area.get) == "U1_poly"
    # the units tile the map area without overlapping
    union = shapely.union_all([shape(f["geometry"]) for f in features])
    total = sum(shape(f["geometry"]).area for f in features)
    assert union.area == pytest.approx(total)
    assert union.area > 0.95 * 720 * 760


def test_line_extract_traces_the_faults(chain):
    features = read_json(chain.output("line_extract"))["features"]
    assert len(features) == len(sample_map.FAULTS)
    for feature in features:
        start, end = feature["geometry"]["coordinates"][0], feature["geometry"]["coordinates"][-1]
        assert shape(feature["geometry"]).is_valid
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
    for feature in features:
        x0, y0, x1, y1 = feature["properties"]["bbox"]
        x, y = feature["geometry"]["coordinates"]
        assert x0 <= x <= x1 and y0 <= y <= y1


def gpkg_layers(path: Path) -> dict:
    """{layer: (info, [shapely geometries], {field: values})} read through GDAL."""
    layers = {}
    for name, _ in pyogrio.list_layers(path):
        info = pyogrio.read_info(path, layer=name)
        meta, _, geometry, fields = pyogrio.raw.read(path, layer=name)
        layers[name] = (info, list(shapely.from_wkb(geometry)),
                        dict(zip(meta["fields"], fields, strict=True)))
    return layers


def test_geopackage_opens_through_gdal_with_valid_layers(chain):
    layers = gpkg_layers(chain.output("geopackage"))
    assert set(layers) == {"points", "lines", "polygons"}
    kinds = {name: info["geometry_type"] for name, (info, _, _) in layers.items()}
    assert kinds == {"points": "Point", "lines": "LineString", "polygons": "MultiPolygon"}
    counts = {name: len(geometries) for name, (_, geometries, _) in layers.items()}
    assert counts == {"points": 6, "lines": 3, "polygons": 6}
    for name, (info, geometries, fields) in layers.items():
        assert info["crs"] == "EPSG:4326"
        assert all(g.is_valid for g in geometries), name
        assert all(fields["description"]), name
        for geometry in geometries:
            x0, y0, x1, y1 = geometry.bounds
            assert -106.51 <= x0 and x1 <= -105.99 and 40.84 <= y0 and y1 <= 41.26, name
    ids = list(layers["polygons"][2]["legend_id"])
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6


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


def test_each_module_finishes_in_bounded_time(chain):
    # a bound against hangs, not a speed goal (those live in bench/): shared CI machines
    for name, (_, seconds) in chain.results.items():
        assert seconds < 60, (name, seconds)
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


def test_unreadable_map_fails_clearly(chain, tmp_path):
    inputs = tmp_path / "inputs"
    bad = inputs / "maps" / MAP_NAME / f"{MAP_NAME}.tif"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"II*\x00 this is not a TIFF at all")
    tokens = {**chain.tokens, "$INPUT_DIR": str(inputs)}
    done, _ = run(command(chain.modules["legend_segment"], tokens), chain.env)
    assert done.returncode == 1
    assert "GDAL cannot read the map" in done.stdout and str(bad) in done.stdout


# ---------------------------------------------------------------- paper and ink


def test_paper_is_estimated_from_the_map():
    rng = np.random.default_rng(7)
    image = np.empty((200, 300, 3), dtype=np.uint8)
    image[:] = (236, 226, 198)  # tinted paper
    image[40:160, 30:200] = (245, 225, 140)  # a large pale yellow unit
    image[60:80, 220:280] = (250, 250, 160)  # a small bright yellow swatch
    noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    paper, threshold = raster.estimate_paper(noisy)
    assert max(abs(a - b) for a, b in zip(paper, (236, 226, 198), strict=True)) <= 3
    ink = raster.ink_mask(noisy, paper, threshold)
    assert ink[40:160, 30:200].mean() > 0.99  # the unit is ink
    assert ink[170:, :].mean() < 0.01  # the noisy paper is not
    white = np.full((50, 50, 3), 255, dtype=np.uint8)
    white[10:20, 10:20] = 128
    assert raster.estimate_paper(white)[0] == (255, 255, 255)


# ---------------------------------------------------------------- real-world files


def palette_map(rgb: np.ndarray) -> tuple:
    """(indexes (1, h, w) uint8, colormap) of an RGB map with few colours."""
    flat = rgb.reshape(3, -1).T
    colours, indexes = np.unique(flat, axis=0, return_inverse=True)
    assert len(colours) <= 256
    colormap = {n: (*(int(v) for v in c), 255) for n, c in enumerate(colours)}
    return indexes.reshape(1, *rgb.shape[1:]).astype(np.uint8), colormap


def cmyk_map(rgb: np.ndarray) -> np.ndarray:
    """(4, h, w) uint8 CMYK inks of an RGB map (black in K, colour in C, M, Y)."""
    ink = 255 - rgb.astype(np.int32)
    k = ink.min(axis=0)
    room = np.maximum(255 - k, 1)
    cmy = (ink - k) * 255 // room
    return np.concatenate([cmy, k[None]]).astype(np.uint8)


def tinted_map(rgb: np.ndarray) -> np.ndarray:
    """The map on tinted paper with scanner noise."""
    tinted = rgb.astype(np.float32)
    white = (rgb == 255).all(axis=0)
    tinted[:, white] = np.array([238, 228, 200], dtype=np.float32)[:, None]
    noise = np.random.default_rng(11).normal(0, 5, rgb.shape)
    return np.clip(tinted + noise, 0, 255).astype(np.uint8)


VARIANTS = {
    # name: (how to write it from the sample map's RGB bands, georeferenced)
    "lzw_tiled": (lambda rgb, path: write_map(path, rgb, compress="lzw", tiled=True,
                                               blockxsize=256, blockysize=256), True),
    "palette_utm": (lambda rgb, path: write_map(
        path, palette_map(rgb)[0], crs="EPSG:32613", compress="packbits", photometric="palette",
        colormap=palette_map(rgb)[1]), True),
    "cmyk": (lambda rgb, path: write_map(path, cmyk_map(rgb), photometric="cmyk",
                                          compress="deflate"), True),
    "uint16_band_interleaved": (lambda rgb, path: write_map(
        path, (rgb.astype(np.uint16) * 100 + 1000), interleave="band", compress="lzw"), True),
    "rgba_bigtiff": (lambda rgb, path: write_map(
        path, np.concatenate([rgb, np.full((1, *rgb.shape[1:]), 255, np.uint8)]),
        photometric="rgb", alpha="yes", BIGTIFF="YES"), True),
    "not_georeferenced": (lambda rgb, path: write_map(path, rgb, georeferenced=False,
                                                      compress="lzw"), False),
    "tinted_noisy": (lambda rgb, path: write_map(path, tinted_map(rgb), compress="lzw"), True),
}


@pytest.fixture(scope="module")
def variant_pixels(tmp_path_factory):
    return sample_pixels(800, 640, tmp_path_factory.mktemp("pixels"))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory, variant_pixels):
    write, georeferenced = VARIANTS[request.param]
    base = tmp_path_factory.mktemp(request.param)
    return Chain(base, lambda path: write(variant_pixels, path)), georeferenced


def test_variant_completes_with_valid_nonempty_results(variant):
    chain, _ = variant
    assert chain.failures() == {}
    polygons = read_json(chain.output("polygon_extract"))["features"]
    assert len(polygons) == len(sample_map.UNIT_COLOURS)
    for feature in polygons:
        geometry = shape(feature["geometry"])
        assert geometry.geom_type == "MultiPolygon" and geometry.is_valid
        assert not geometry.is_empty
    assert len(read_json(chain.output("line_extract"))["features"]) >= 1
    assert len(read_json(chain.output("point_extract"))["features"]) >= 1
    layers = gpkg_layers(chain.output("geopackage"))
    assert set(layers) == {"points", "lines", "polygons"}
    for name, (_, geometries, _) in layers.items():
        assert geometries and all(g.is_valid for g in geometries), name


def test_variant_gcps_are_wgs84_inside_the_map(variant):
    chain, georeferenced = variant
    data = read_json(chain.output("georeference"))
    assert all(g["crs"] == "EPSG:4326" for g in data["gcps"])
    with open_map(chain.tif) as ds:
        crs, bounds, width, height = ds.crs, ds.bounds, ds.width, ds.height
    for gcp in data["gcps"]:
        assert 0 <= gcp["columns_from_left"] <= width and 0 <= gcp["rows_from_top"] <= height
    if georeferenced:
        assert data["estimated"] is False and data["crs"] == crs.to_string()
        west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds)
        for gcp in data["gcps"]:
            assert west <= gcp["longitude"] <= east and south <= gcp["latitude"] <= north
    else:
        assert data["estimated"] is True and data["crs"] is None
        done, _ = chain.results["georeference"]
        assert "WARNING" in done.stdout and "placeholder GCPs" in done.stdout
        corners = {(g["longitude"], g["latitude"]) for g in data["gcps"]}
        assert corners == {(0.0, 1.0), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0)}


def run_georeference(tif: Path, tmp_path: Path) -> tuple:
    """(output JSON, stdout) of georeference alone on one map."""
    out = tmp_path / "georeference" / "map.json"
    done, _ = run([sys.executable, str(MODULES / "georeference.py"), "--input_path", str(tif),
                   "--support_data_dir", str(tmp_path), "--output_path", str(out),
                   "--temp_dir", str(tmp_path), "--gpu_id", "0"], dict(os.environ))
    assert done.returncode == 0, done.stdout + done.stderr
    return read_json(out), done.stdout


def test_georeference_passes_on_gcps_stored_in_the_file(tmp_path, variant_pixels):
    _, height, width = variant_pixels.shape
    corners = [(0, 0), (0, width), (height, 0), (height, width)]
    # the sample map's box in UTM zone 13N, corner by corner
    west, south, east, north = transform_bounds("EPSG:4267", "EPSG:32613", WEST,
                                                NORTH - SPAN_Y, WEST + SPAN_X, NORTH)
    gcps = [rasterio.control.GroundControlPoint(row, col, west + (east - west) * col / width,
                                                north - (north - south) * row / height)
            for row, col in corners]
    tif = write_map(tmp_path / "gcps.tif", variant_pixels, georeferenced=False,
                    gcps=gcps, crs="EPSG:32613")
    data, _ = run_georeference(tif, tmp_path)
    assert data["crs"] == "EPSG:32613" and data["estimated"] is False
    assert [(g["rows_from_top"], g["columns_from_left"]) for g in data["gcps"]] == corners
    lons, lats = warp_transform("EPSG:32613", "EPSG:4326", [g.x for g in gcps],
                                [g.y for g in gcps])
    for gcp, lon, lat in zip(data["gcps"], lons, lats, strict=True):
        assert gcp["crs"] == "EPSG:4326"
        assert gcp["longitude"] == pytest.approx(lon) and gcp["latitude"] == pytest.approx(lat)
        assert -106.6 < lon < -105.9 and 40.8 < lat < 41.3


def test_georeference_reads_an_aux_xml_sidecar(tmp_path, variant_pixels):
    _, height, width = variant_pixels.shape
    tif = write_map(tmp_path / "sidecar.tif", variant_pixels, georeferenced=False)
    wkt = rasterio.crs.CRS.from_epsg(4267).to_wkt()
    geotransform = f"{WEST}, {SPAN_X / width}, 0, {NORTH}, 0, {-SPAN_Y / height}"
    Path(str(tif) + ".aux.xml").write_text(
        f"<PAMDataset><SRS>{wkt}</SRS><GeoTransform>{geotransform}</GeoTransform>"
        "</PAMDataset>", encoding="utf-8")
    data, _ = run_georeference(tif, tmp_path)
    assert data["crs"] == "EPSG:4267" and data["estimated"] is False
    for gcp in data["gcps"]:
        assert WEST - 0.01 < gcp["longitude"] < WEST + SPAN_X + 0.01
        assert NORTH - SPAN_Y - 0.01 < gcp["latitude"] < NORTH + 0.01


# ---------------------------------------------------------------- sample map


def test_sample_map_is_deterministic(tmp_path):
    paths = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for path in paths:
        done = subprocess.run([sys.executable, str(MODULES / "sample_map.py"), str(path),
                               "--width", "400", "--height", "320"],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_sample_map_reads_back_through_gdal(tmp_path):
    path = sample_map.write_sample_map(str(tmp_path / "m.tif"), 500, 400)
    with raster.open_map(path) as reader:
        assert (reader.width, reader.height) == (500, 400)
        image = reader.rgb()
    assert tuple(image[5, 5]) == (255, 255, 255)
    assert tuple(image[385, 30]) == sample_map.UNIT_COLOURS[0]
