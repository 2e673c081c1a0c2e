"""End to end on the kinds of map file users have: each variant of tests/map_variants.py
(compressed, tiled, COG, BigTIFF, palette, grey, RGBA, CMYK, 16-bit, band-interleaved,
tinted and noisy, projected, not georeferenced) through the whole graph (mipper, ALL
modules, the catalogue's stand-ins), then its results read as a GIS user and the CDR would:

- the GeoPackage opens through GDAL (pyogrio) with points, lines and polygons layers, each
  with features, every geometry valid (shapely);
- georeference's GCPs are in EPSG:4326 degrees, on the map's pixels, inside the map's
  extent and where the file's own georeferencing puts their pixels; a map without any
  gets placeholder GCPs marked estimated;
- the CDR payloads of the job validate against the CDR's schemas; estimated GCPs are
  not published.

`make test` runs REPRESENTATIVE; `pytest -m slow tests/test_real_maps.py` runs every variant.
"""

import json
import os
import subprocess
import sys
import time
import warnings

import numpy
import pyogrio
import pytest
import rasterio
import sample_map
import shapely
from conftest import Server
from conftest import add_map
from conftest import kill_leftover_runs
from conftest import mipper
from map_variants import VARIANTS
from map_variants import describe
from map_variants import write_variant
from rasterio import warp
from rasterio.errors import NotGeoreferencedWarning

from mip import maps
from mip.links import cdr
from mip.settings import Settings

# the CDR's case (a COG, projected), the common case (no georeferencing), a colour map,
# CMYK and a tinted noisy scan: each exercises a different reading path of the modules
REPRESENTATIVE = ["cog", "plain", "palette", "cmyk", "tinted"]
LAYERS = {"points": ("Point", "MultiPoint"), "lines": ("LineString", "MultiLineString"),
          "polygons": ("Polygon", "MultiPolygon")}
GRAPH_TIMEOUT = 300
WGS84 = "EPSG:4326"


@pytest.fixture(scope="session")
def drawn():
    """The sample map's pixels, drawn once."""
    return sample_map.draw_sample_map()


@pytest.fixture(scope="session")
def variant_files(tmp_path_factory, drawn):
    """name -> the variant's file, written on first use."""
    folder = tmp_path_factory.mktemp("variants")
    files = {}

    def get(name: str) -> str:
        if name not in files:
            files[name] = write_variant(VARIANTS[name], drawn, str(folder / f"{name}.tif"))
        return files[name]

    return get


# ---------------------------------------------------------------- checks


def run_graph(env: dict, job: str, map_name: str) -> float:
    """Run ALL for job on map_name with mipper; seconds. Fails with the logs of the modules
    that failed."""
    started = time.monotonic()
    done = mipper(env, "--job", job, "--map", map_name, "--module", "ALL",
                  timeout=GRAPH_TIMEOUT)
    took = time.monotonic() - started
    if done.returncode != 0:
        logs = []
        folder = os.path.join(env["TA1_OUTPUTS_DIR"], job)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".log"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if "Traceback" in text or "ERROR" in text or "failed" in text:
                    logs.append(f"--- {name}\n{text[-3000:]}")
        pytest.fail(f"the graph failed on {map_name} (exit {done.returncode}):\n"
                    f"{done.stderr[-3000:]}\n" + "\n".join(logs), pytrace=False)
    return took


def read_layer(gpkg: str, layer: str) -> list:
    """The shapely geometries of one GeoPackage layer, read through GDAL."""
    _, _, wkb, _ = pyogrio.raw.read(gpkg, layer=layer, read_geometry=True)
    return list(shapely.from_wkb(wkb))


def check_geopackage(env: dict, job: str, map_name: str) -> dict:
    """Each layer opens, has features, all valid and non-empty; {layer: count}."""
    gpkg = os.path.join(env["TA1_OUTPUTS_DIR"], job, "geopackage", "gpkg_outputs",
                        f"{map_name}.gpkg")
    assert os.path.exists(gpkg), f"no GeoPackage at {gpkg}"
    layers = {name: kind for name, kind in pyogrio.list_layers(gpkg)}
    counts = {}
    for layer, kinds in LAYERS.items():
        assert layer in layers, f"{map_name}: no {layer} layer in {sorted(layers)}"
        geometries = read_layer(gpkg, layer)
        assert geometries, f"{map_name}: the {layer} layer is empty"
        assert {g.geom_type for g in geometries} <= set(kinds), layer
        invalid = [shapely.is_valid_reason(g) for g in geometries if not g.is_valid]
        assert not invalid, f"{map_name}: {len(invalid)} invalid {layer}: {invalid[:3]}"
        assert not any(g.is_empty for g in geometries), f"{map_name}: empty {layer}"
        counts[layer] = len(geometries)
    # every unit, fault and symbol the map has, whatever form the file takes
    assert counts["points"] == len(sample_map.POINT_SYMBOLS), counts
    assert counts["lines"] == len(sample_map.FAULTS), counts
    assert counts["polygons"] == len(sample_map.UNIT_COLOURS), counts
    return counts


def extent_wgs84(path: str) -> tuple:
    """(west, south, east, north) of the whole file in EPSG:4326."""
    with rasterio.open(path) as src:
        return warp.transform_bounds(src.crs, WGS84, *src.bounds, densify_pts=21)


def expected_lonlat(path: str, columns: list, rows: list) -> tuple:
    """(longitudes, latitudes) in EPSG:4326 of pixel positions, by the file's own
    georeferencing."""
    with rasterio.open(path) as src:
        xs, ys = rasterio.transform.xy(src.transform, rows, columns, offset="ul")
        return warp.transform(src.crs, WGS84, xs, ys)


def check_gcps(env: dict, job: str, map_name: str, path: str, crs: str | None) -> dict:
    """georeference's output keeps the contract and its GCPs sit where they should."""
    out = os.path.join(env["TA1_OUTPUTS_DIR"], job, "georeference", f"{map_name}.json")
    with open(out, encoding="utf-8") as f:
        data = json.load(f)
    gcps = data["gcps"]
    assert data["map_name"] == map_name
    assert data["crs"] == crs
    assert data["estimated"] is (crs is None)
    assert len(gcps) >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            width, height = src.width, src.height
    for gcp in gcps:
        assert gcp["crs"] == WGS84, gcp
        assert 0 <= gcp["columns_from_left"] <= width and 0 <= gcp["rows_from_top"] <= height
    if crs is None:
        return data
    west, south, east, north = extent_wgs84(path)
    for gcp in gcps:
        assert west <= gcp["longitude"] <= east and south <= gcp["latitude"] <= north, \
            f"GCP {gcp} outside the map's extent {(west, south, east, north)}"
    lons, lats = expected_lonlat(path, [g["columns_from_left"] for g in gcps],
                                 [g["rows_from_top"] for g in gcps])
    # within two pixels: a module may take a pixel's corner or its centre
    tolerance = 2 * max((east - west) / width, (north - south) / height)
    got = numpy.array([[g["longitude"], g["latitude"]] for g in gcps])
    assert numpy.abs(got - numpy.column_stack([lons, lats])).max() <= tolerance, \
        f"GCPs {got.tolist()} are not where the map's georeferencing puts their pixels"
    return data


def check_cdr_payloads(env: dict, job: str, map_name: str, estimated: bool) -> None:
    """The job's FeatureResults (and, with real GCPs, GeoreferenceResults) pass the CDR's
    schemas, with every kind of feature present."""
    settings = Settings.from_env(env)
    features = cdr.feature_results(settings, job, map_name, map_name, "mip", "0.0.0")
    cdr.validate("FeatureResults", features)
    for kind in ("polygon", "line", "point"):
        assert features[f"{kind}_feature_results"], f"{map_name}: no {kind} results"
    if estimated:
        with pytest.raises(cdr.Skipped):
            cdr.georef_results(settings, job, map_name, map_name, "mip", "0.0.0")
        return
    georef, _ = cdr.georef_results(settings, job, map_name, map_name, "mip", "0.0.0")
    cdr.validate("GeoreferenceResults", georef)
    assert georef["gcps"]


def check_variant(name: str, env: dict, variant_files) -> None:
    v = VARIANTS[name]
    path = variant_files(name)
    facts = describe(path)
    assert {k: facts[k] for k in v.expect} == v.expect, f"{name} is not what it claims"
    map_name, job = f"real_{name}", f"job_{name}"
    placed = add_map(env, map_name, path)
    took = run_graph(env, job, map_name)
    counts = check_geopackage(env, job, map_name)
    check_gcps(env, job, map_name, placed, v.crs)
    check_cdr_payloads(env, job, map_name, estimated=not v.georeferenced)
    print(f"{name}: graph {took:.1f} s, {counts}")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_graph_on_real_map_files(name, mip_env, variant_files):
    check_variant(name, mip_env, variant_files)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_graph_on_every_map_variant(name, mip_env, variant_files):
    check_variant(name, mip_env, variant_files)


def test_a_map_without_a_legend_passes_with_a_warning_said_everywhere(mip_env, drawn, tmp_path):
    """The whole graph on a map whose legend is gone: every module passes and the
    GeoPackage is empty. The run ends passed with a warning saying so, which its RunStatus,
    the client's last line and the console's run page all show."""
    from test_client import client
    from test_client import client_env

    pixels = sample_map.draw_sample_map(500, 400).copy()
    pixels[:, 380:] = 255  # the legend, right of the map area (design x 760 of 1000)
    add_map(mip_env, "no_legend", write_variant(VARIANTS["plain"], pixels,
                                                str(tmp_path / "no_legend.tif")))
    env = dict(mip_env, MIP_USER="tester", MIP_PASSWORD="a test password")
    srv = Server(env).start()
    try:
        data = json.dumps({"job": "no_legend", "map": "no_legend", "modules": ["ALL"]})
        proc = client("--post", "--url", f"{srv.url}/runs", "--data", data, "--wait",
                      env=client_env(srv), cwd=tmp_path, timeout=GRAPH_TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        final = json.loads(proc.stdout)
        assert final["status"] == "passed"
        run = srv.get(f"/runs/{final['run_id']}").json()
        empty = [w for w in run["warnings"] if "holds no features" in w]
        assert len(empty) == 1 and empty[0].startswith("the GeoPackage no_legend.gpkg"), run
        assert "legend_segment: no legend found beside the map area" in run["warnings"]
        assert f"run {final['run_id']} passed with {len(run['warnings'])} warnings:" \
            in proc.stderr and f"  - {empty[0]}" in proc.stderr
        text = srv.get(f"/ui/runs/{final['run_id']}", headers={"Accept": "text/html"}).text
        box = text[text.index('<div class="warnings"'):]
        assert empty[0] in box[:box.index("</div>")]
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_a_blank_map_has_no_content_and_a_drawn_one_has(tmp_path, drawn):
    """What keeps an empty GeoPackage from a warning: the map itself is blank (masked or
    paper, noise aside)."""
    noisy = numpy.random.default_rng(5).normal(230, 6, drawn.shape).clip(0, 255)
    for name, pixels, content in (("drawn", drawn, True),
                                  ("blank", numpy.full_like(drawn, 255), False),
                                  ("noisy", noisy.astype(numpy.uint8), False)):
        for kind in ("plain", "grey"):
            path = write_variant(VARIANTS[kind], pixels, str(tmp_path / f"{name}_{kind}.tif"))
            assert maps.has_content(path) is content, (name, kind)
    assert maps.has_content_in_child(str(tmp_path / "blank_grey.tif")) is False


def test_variants_are_what_they_claim(variant_files):
    """The fixture itself: every file reads back, through GDAL, as its variant says."""
    for name, v in VARIANTS.items():
        facts = describe(variant_files(name))
        assert {k: facts[k] for k in v.expect} == v.expect, name
        assert facts["size"] == (1000, 800)
        assert facts["crs"] == v.crs
        assert facts["transform"] is v.georeferenced


def test_demo_maps_are_written_as_real_maps_come(tmp_path):
    """`make setup`'s two demo maps: a compressed, tiled TIFF with no georeferencing, and
    the same pixels as a GeoTIFF in EPSG:4267; the same command gives the same bytes."""
    plain, geo, again = (str(tmp_path / name) for name in ("plain.tif", "geo.tif", "again.tif"))
    script = os.path.join(os.path.dirname(sample_map.__file__), "sample_map.py")
    for args in ([plain, "--no-georef"], [geo], [again, "--no-georef"]):
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    facts = describe(plain)
    assert (facts["crs"], facts["transform"]) == (None, False)
    assert facts["compress"] == "lzw" and facts["tiled"] and facts["size"] == (1000, 800)
    facts = describe(geo)
    assert facts["crs"] == sample_map.CRS and facts["transform"]
    assert file_bounds(geo) == pytest.approx(sample_map.BOUNDS)
    with open(plain, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(plain) as p, rasterio.open(geo) as g:
            assert (p.read() == g.read()).all()
    assert not list(tmp_path.glob("*.tmp*"))


def file_bounds(path: str) -> tuple:
    with rasterio.open(path) as src:
        return tuple(src.bounds)


def test_sample_map_draws_every_feature_in_its_colour(drawn):
    """The pixels hold what the checks above expect the modules to find: each unit colour,
    the faults' black, the symbols' red, the label and frame grey, and paper."""
    colours = {tuple(c) for c in numpy.unique(drawn.reshape(-1, 3), axis=0)}
    expected = {*sample_map.UNIT_COLOURS, sample_map.BLACK, sample_map.RED,
                sample_map.LABEL_GREY, sample_map.WHITE}
    assert colours == expected
    lumas = sorted(round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in
                   sample_map.UNIT_COLOURS)
    assert min(b - a for a, b in zip(lumas, lumas[1:], strict=False)) >= 15
    with pytest.raises(ValueError):
        sample_map.draw_sample_map(100, 100)
