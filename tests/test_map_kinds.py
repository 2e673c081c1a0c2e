"""The stand-in modules on maps as the world sends them (issue 23): how raster.py reads
GDAL's files (block cache, overviews, masks, MINISWHITE, 1-bit), and the chain of all the
catalogue's modules, called in process (a subprocess adds nothing here), on small maps of
several drawings written as real files by tests/map_variants.py.

For each map the checks are what a GIS user would see: every unit the drawing has, in its
colour, and no unit of the paper's colour; line and point counts within a factor of the
drawn ones; the GeoPackage opens through GDAL with valid geometries.

Run: .venv/bin/python -m pytest tests/test_map_kinds.py   (every kind: -m slow)
"""

import importlib
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pyogrio
import pytest
import raster
import rasterio
import rasterio.env
import sample_map
import shapely
import yaml
from map_variants import ALL
from map_variants import BILEVEL_CUT
from map_variants import KINDS
from map_variants import describe
from map_variants import write_variant
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP = "kind_map"
SIZE = (600, 450)
# a found count may differ from the drawn one by this factor either way: crossing faults
# make one stroke, a symbol on a fault may merge with it
FACTOR = 2
# the largest channel difference between a drawn unit colour and the one found
COLOUR_TOLERANCE = 40


# ---------------------------------------------------------------- the chain, in process


def catalogue() -> list:
    with open(os.path.join(ROOT, "config.yml"), encoding="utf-8") as f:
        return yaml.safe_load(f)["modules"]


def module_argv(module: dict, tokens: dict) -> list:
    """The switches of one catalogue entry, as the runner builds them (no program)."""
    def fill(value) -> str:
        text = str(value)
        for token, replacement in tokens.items():
            text = text.replace(token, replacement)
        return text

    argv = []
    for name, value in module["options"].items():
        argv.append(f"--{name}")
        if isinstance(value, list):
            argv += [fill(v) for v in value]
        elif value != "":
            argv.append(fill(value))
    return argv


def load(name: str):
    """A stand-in module imported in this process, leaving boto3 importable: the modules
    block it for their own start-up (common.lighter_rasterio)."""
    blocked = "boto3" in sys.modules
    module = importlib.import_module(name)
    if not blocked and sys.modules.get("boto3", False) is None:
        del sys.modules["boto3"]
    return module


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


class Chain:
    """Every catalogue module, in order, on one map file: outputs under base."""

    def __init__(self, tif: str, base, kind: str, grey: bool = False):
        self.kind, self.grey = kind, grey
        folder = base / "inputs" / "maps" / MAP
        folder.mkdir(parents=True)
        os.link(tif, folder / f"{MAP}.tif")
        self.out = base / "outputs"
        tokens = {"$MAP_NAME": MAP, "$INPUT_DIR": str(base / "inputs"),
                  "$OUTPUT_DIR": str(self.out), "$TEMP_DIR": str(base / "temps"),
                  "$REPO_DIR": str(base / "repos"), "$GPU_ID": "0"}
        self.log = {}
        for entry in catalogue():
            self.run(entry, module_argv(entry, tokens))

    def run(self, entry: dict, argv: list) -> None:
        name = entry["name"]
        module = load(os.path.splitext(os.path.basename(entry["command"][-1]))[0])
        records = Records()
        log = logging.getLogger(f"mip.test.{name}")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(records)
        self.log[name] = records.lines
        (self.out / name).mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                module.work(module.parse_args(argv), log)
        except module.common.ModuleFailed as exc:
            pytest.fail(f"{name} failed: {exc}\n" + "\n".join(records.lines[-20:]),
                        pytrace=False)
        finally:
            log.removeHandler(records)

    def json(self, *parts):
        return sample_map_json(self.out.joinpath(*parts))


def sample_map_json(path):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- checks


def within(found: int, drawn: int) -> bool:
    return drawn / FACTOR <= found <= drawn * FACTOR


def luma(colour) -> int:
    r, g, b = colour
    return round(0.299 * r + 0.587 * g + 0.114 * b)


def drawn_colours(chain: Chain, drawing) -> list:
    """The drawing's unit colours as the file holds them: grey levels in a grey file;
    in a 1-bit file only the units dark enough to turn black (the rest are paper)."""
    if chain.kind == "g4":
        return [(0, 0, 0)] * any(luma(c) < BILEVEL_CUT for c in drawing.colours)
    if chain.grey:
        return [(luma(c),) * 3 for c in drawing.colours]
    return list(drawing.colours)


def check_units(chain: Chain, drawing) -> list:
    """Every drawn unit colour found as a unit, and no unit of the paper's colour;
    the found units' colours."""
    descriptions = chain.json("legend_item_description", f"{MAP}_polygon.json")
    segmentation = chain.json("legend_segment", f"{MAP}_map_segmentation.json")
    paper = np.array(segmentation["paper"])
    found = [np.array(sample_map_hex(d["color"])) for d in descriptions.values()]
    for colour in found:
        assert np.abs(colour - paper).max() > segmentation["ink_threshold"], \
            f"a unit of the paper's colour {colour.tolist()} (paper {paper.tolist()})"
    for drawn in drawn_colours(chain, drawing):
        assert any(np.abs(colour - drawn).max() <= COLOUR_TOLERANCE for colour in found), \
            f"no unit of the drawn colour {drawn}: found {[c.tolist() for c in found]}"
    assert len(found) <= len(drawing.colours) + 1, [c.tolist() for c in found]
    return found


def sample_map_hex(text: str) -> tuple:
    return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))


def counts(chain: Chain) -> dict:
    lines = chain.json("line_extract", f"{MAP}_lines.geojson")["features"]
    points = chain.json("point_extract", "output-per-symbol", f"{MAP}_points.geojson")
    return {"lines": len(lines), "points": len(points["features"])}


def check_geopackage(chain: Chain, layers=("points", "lines", "polygons")) -> None:
    gpkg = str(chain.out / "geopackage" / "gpkg_outputs" / f"{MAP}.gpkg")
    for layer in layers:
        _, _, wkb, _ = pyogrio.raw.read(gpkg, layer=layer, read_geometry=True)
        geometries = list(shapely.from_wkb(wkb))
        assert geometries, f"the {layer} layer is empty"
        assert all(g.is_valid and not g.is_empty for g in geometries), layer


def check_map(chain: Chain, drawing) -> dict:
    units = check_units(chain, drawing)
    found = counts(chain)
    assert within(found["lines"], len(drawing.faults)), (found, len(drawing.faults))
    assert within(found["points"], len(drawing.points)), (found, len(drawing.points))
    check_geopackage(chain, ("points", "lines", "polygons") if units else ("points", "lines"))
    return found


def kind_chain(tmp_path, kind: str, drawing, size=SIZE) -> Chain:
    v = ALL[kind]
    path = write_variant(v, sample_map.draw_sample_map(*size, drawing), str(tmp_path / "k.tif"))
    facts = describe(path)
    assert {k: facts[k] for k in v.expect} == v.expect, f"{kind} is not what it claims"
    grey = facts["count"] <= 2 and facts["colorinterp"][0] in ("gray", "undefined")
    return Chain(path, tmp_path / "run", kind, grey)


# ---------------------------------------------------------------- reading


def write_rgb(path, rgb: np.ndarray, **profile) -> str:
    """rgb (h, w, 3) as a TIFF with rasterio's defaults plus profile; path."""
    height, width = rgb.shape[:2]
    options = {"driver": "GTiff", "width": width, "height": height, "count": 3,
               "dtype": "uint8", **profile}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **options) as dst:
            dst.write(rgb.transpose(2, 0, 1))
    return str(path)


def test_the_block_cache_is_given_in_bytes(tmp_path):
    """GDAL's own figure, read back inside the modules' Env, is megabytes, not bytes."""
    path = write_rgb(tmp_path / "map.tif", sample_map.draw_sample_map(300, 240))
    with raster.open_map(path):
        cache = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
    assert cache == raster.GDAL_CACHE_BYTES
    assert 32 * 2**20 <= cache <= 256 * 2**20


def test_kinds_are_what_they_claim(tmp_path):
    """Each kind's file reads back, through GDAL, as its variant says."""
    drawn = sample_map.draw_sample_map(300, 225, sample_map.BELOW)
    for name, v in KINDS.items():
        facts = describe(write_variant(v, drawn, str(tmp_path / f"{name}.tif")))
        assert {k: facts[k] for k in v.expect} == v.expect, name


def test_decimated_reads_ignore_the_files_overviews(tmp_path):
    """A COG's CUBIC overview blurs and invents colours; a half-size read of it is the
    nearest full-resolution pixels, exactly as from the same pixels without overviews."""
    drawn = sample_map.draw_sample_map(*SIZE, sample_map.LEFT)
    cog = write_variant(ALL["cog_cubic"], drawn, str(tmp_path / "cog.tif"))
    plain = write_rgb(tmp_path / "plain.tif", drawn)
    assert describe(cog)["overviews"]
    half = (SIZE[1] // 2, SIZE[0] // 2)
    with raster.open_map(cog) as reader:
        from_cog = reader.rgb(out_shape=half)
    with raster.open_map(plain) as reader:
        from_plain = reader.rgb(out_shape=half)
    assert (from_cog == from_plain).all()
    assert colours_of(from_cog) <= colours_of(drawn)


@pytest.mark.parametrize("kind", ["lzw", "strips", "cmyk", "uint16", "g4"])
def test_a_decimated_read_is_the_cells_centre_pixels(tmp_path, kind):
    """Tiles, thin strips (only the wanted rows decoded), and the converting paths: a
    decimated read, whole or of a window, holds each cell's centre pixel of a full read."""
    path = write_variant(ALL[kind], sample_map.draw_sample_map(*SIZE, sample_map.ABOVE),
                         str(tmp_path / "d.tif"))
    with raster.open_map(path) as reader:
        full = reader.rgb()
        small = reader.rgb(out_shape=(45, 70))
        part = reader.rgb((100, 50, 433, 301), out_shape=(21, 37))
    assert (small == full[raster.centres(SIZE[1], 45)][:, raster.centres(SIZE[0], 70)]).all()
    window = full[50:301, 100:433]
    assert (part == window[raster.centres(251, 21)][:, raster.centres(333, 37)]).all()


@pytest.mark.parametrize("kind", ["collar", "mask_band", "grey_alpha"])
def test_masked_pixels_read_as_paper(tmp_path, kind):
    """Nodata, a mask band and alpha: whatever the surround holds, it reads white."""
    path = write_variant(ALL[kind], sample_map.draw_sample_map(*SIZE), str(tmp_path / "m.tif"))
    with raster.open_map(path) as reader:
        rgb, valid = reader.rgb(), reader.valid()
    assert reader.masked and 0.05 < (~valid).mean() < 0.5
    assert (rgb[~valid] == 255).all()


def test_miniswhite_grey_is_inverted(tmp_path):
    drawn = sample_map.draw_sample_map(*SIZE, sample_map.LEFT)
    path = write_variant(ALL["miniswhite"], drawn, str(tmp_path / "w.tif"))
    with raster.open_map(path) as reader:
        assert reader.inverted
        grey = reader.rgb()[..., 0].astype(int)
    expected = ALL["grey"].bands(drawn)[0][0].astype(int)
    assert np.abs(grey - expected).max() == 0


def test_one_bit_reads_as_black_ink_on_white(tmp_path):
    drawn = sample_map.draw_sample_map(*SIZE, sample_map.BELOW)
    path = write_variant(ALL["g4"], drawn, str(tmp_path / "g4.tif"))
    with raster.open_map(path) as reader:
        rgb = reader.rgb()
    assert colours_of(rgb) == {(0, 0, 0), (255, 255, 255)}
    assert (rgb == 0).all(axis=-1).mean() < 0.3  # ink is the minority: not a negative


def test_paper_is_the_margin_when_a_pale_unit_ties_with_it():
    """A pale blue unit covering most of the sheet and yellowed paper both have a
    darkest channel of about 200: the colour of the sheet's edge is the paper."""
    rng = np.random.default_rng(3)
    image = np.empty((200, 300, 3), dtype=np.uint8)
    image[:] = (236, 226, 198)
    image[20:180, 20:280] = (200, 230, 240)
    noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    valid = np.ones(image.shape[:2], dtype=bool)
    paper, _ = raster.estimate_paper(noisy, raster.edge_pixels(noisy, valid))
    assert np.abs(np.array(paper) - (236, 226, 198)).max() <= 4, paper


# ---------------------------------------------------------------- the chain on kinds


DEFAULT_KINDS = [
    # (kind, drawing): each a different reading path, none on the fixture's drawing
    ("cog_cubic", sample_map.LEFT),
    ("cog_jpeg75", sample_map.COLUMNS),
    ("collar", sample_map.COLUMNS),
    ("scanner_bed", sample_map.BELOW),
    ("miniswhite", sample_map.LEFT),
    ("g4", sample_map.BELOW),
    ("lzw", sample_map.BELOW),
    ("lzw", sample_map.ABOVE),
]
def test_a_one_bit_map_gives_lines_and_points_not_a_paper_unit(tmp_path):
    """Black on white: the faults are lines, the symbols points, and no black mark that is
    not symbol-sized (a fault, a dark unit) counts as a point."""
    drawing = sample_map.LEFT
    chain = kind_chain(tmp_path, "g4", drawing)
    check_units(chain, drawing)
    found = counts(chain)
    assert 1 <= found["lines"] <= 2 * len(drawing.faults), found
    assert len(drawing.points) / 2 <= found["points"] <= len(drawing.points), found


DRAWINGS = list(sample_map.DRAWINGS.values())
SLOW_KINDS = [(kind, drawing) for kind in [*KINDS, "lzw", "palette", "cmyk", "tinted"]
              for drawing in DRAWINGS if (kind, drawing) not in DEFAULT_KINDS]


@pytest.fixture
def decimated(monkeypatch):
    """The layout read at half size, as on a map of 1,200 px and more: on a COG, a read
    GDAL would serve from the first overview."""
    monkeypatch.setattr(raster, "LAYOUT_SIDE", max(SIZE) // 2)


@pytest.mark.parametrize("kind,drawing", DEFAULT_KINDS,
                         ids=[f"{k}-{d.name}" for k, d in DEFAULT_KINDS])
def test_chain_on_map_kinds(tmp_path, decimated, kind, drawing):
    found = check_map(kind_chain(tmp_path, kind, drawing), drawing)
    print(kind, drawing.name, found)


@pytest.mark.slow
@pytest.mark.parametrize("kind,drawing", SLOW_KINDS,
                         ids=[f"{k}-{d.name}" for k, d in SLOW_KINDS])
def test_chain_on_every_kind_and_drawing(tmp_path, decimated, kind, drawing):
    check_map(kind_chain(tmp_path, kind, drawing), drawing)


# COLUMNS is left out: at this size the text's 10 px floor runs its first column's labels
# into the second column's swatches (the drawing itself breaks down)
TINY = [sample_map.PEACH, sample_map.LEFT, sample_map.BELOW, sample_map.ABOVE]


@pytest.mark.parametrize("drawing", TINY, ids=[d.name for d in TINY])
def test_a_tiny_map(tmp_path, drawing):
    """300 x 225 px: lines and symbols at their size floor, text at its own."""
    check_map(kind_chain(tmp_path, "lzw", drawing, size=(300, 225)), drawing)


@pytest.mark.parametrize("drawing", DRAWINGS, ids=[d.name for d in DRAWINGS])
def test_drawings_tell_their_units_apart_in_grey(drawing):
    """Every unit, the symbols and the lines at least 15 grey levels apart, so the grey
    kinds can be held to the drawn colours."""
    levels = sorted(luma(c) for c in [*drawing.colours, drawing.point_colour,
                                      drawing.line_colour])
    assert min(b - a for a, b in zip(levels, levels[1:], strict=False)) >= 15, levels
    assert set(drawing.colours) | {drawing.point_colour, drawing.line_colour} <= \
        colours_of(sample_map.draw_sample_map(*SIZE, drawing))


def colours_of(rgb: np.ndarray) -> set:
    """The distinct (r, g, b) of an image (packed to one integer a pixel: quick)."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) \
        | rgb[..., 2]
    return {(int(v >> 16), int(v >> 8 & 255), int(v & 255)) for v in np.unique(packed)}


# ---------------------------------------------------------------- files not what they claim


def test_a_truncated_map_fails_at_once_in_one_line_with_gdals_reason(tmp_path):
    """The file opens (its header is whole) and fails on the first read: legend_segment,
    the graph's first module, exits 1 with one FAILED line naming GDAL's reason."""
    drawn = sample_map.draw_sample_map(*SIZE, sample_map.COLUMNS)
    whole = write_variant(ALL["lzw"], drawn, str(tmp_path / "whole.tif"))
    folder = tmp_path / "maps" / MAP
    folder.mkdir(parents=True)
    with open(whole, "rb") as f:
        data = f.read()
    (folder / f"{MAP}.tif").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "modules", "legend_segment.py"), "--input",
         str(folder), "--model", "m", "--output", str(out), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1, done.stdout
    assert "GDAL cannot read the map" in failed[0]
    # GDAL's own words (the codec's complaint), not only rasterio's "Read failed"
    reason = failed[0].split("GDAL cannot read the map", 1)[1]
    assert "LZW" in reason or "TIFF" in reason or "scanline" in reason, failed[0]


def warnings_of(chain: Chain) -> list:
    return [line for line in chain.log["legend_segment"] if line.startswith("WARNING")]


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_a_png_or_jpeg_named_tif_runs_with_a_warning(tmp_path, image_format):
    drawing = sample_map.LEFT
    drawn = sample_map.draw_sample_map(*SIZE, drawing)
    path = tmp_path / "scan.tif"
    Image.fromarray(drawn).save(path, format=image_format, quality=95)
    chain = Chain(str(path), tmp_path / "run", "lzw")
    assert any(f"not a TIFF but a {image_format} file" in line for line in warnings_of(chain))
    check_map(chain, drawing)


def test_a_multi_page_tiff_runs_page_one_with_a_warning(tmp_path):
    """Three pages written by GDAL (APPEND_SUBDATASET): the first is the map."""
    drawing = sample_map.BELOW
    path = str(tmp_path / "pages.tif")
    write_rgb(path, sample_map.draw_sample_map(*SIZE, drawing))
    for other in (sample_map.LEFT, sample_map.COLUMNS):
        write_rgb(path, sample_map.draw_sample_map(*SIZE, other), APPEND_SUBDATASET="YES")
    chain = Chain(path, tmp_path / "run", "lzw")
    assert any("multi-page TIFF of 3 pages: page 1 is used" in line
               for line in warnings_of(chain)), warnings_of(chain)
    check_map(chain, drawing)
