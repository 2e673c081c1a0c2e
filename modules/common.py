"""Shared helpers for the stand-in TA1 modules in this folder.

Not run on its own: each `modules/<name>.py` imports it (after putting this folder on
sys.path) for argument parsing, the three test switches, logging, a pure-Python TIFF
reader, a PNG reader/writer, and a few pixel and JSON helpers. Standard library only.

Sections: errors, arguments, running, files, TIFF, PNG, pixels.
"""

import argparse
import json
import logging
import os
import re
import struct
import sys
import time
import traceback
import zlib

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

WHITE = (255, 255, 255)


# ---------------------------------------------------------------- errors


class ModuleFailed(Exception):
    """An expected failure: logged as one line, the module exits 1."""


# ---------------------------------------------------------------- arguments


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser that rejects abbreviations, with the test switches added."""
    # allow_abbrev=False: a misspelt catalogue switch must fail (exit 2), not match a prefix
    parser = argparse.ArgumentParser(prog=name, description=description, allow_abbrev=False)
    tests = parser.add_argument_group("test switches")
    tests.add_argument("--sleep", type=float, default=0.0, metavar="SECONDS",
                       help="take at least this long, sleeping")
    tests.add_argument("--fail", action="store_true", help="log why, then exit 1")
    tests.add_argument("--fail-unless-exists", metavar="PATH",
                       help="log and exit 1 unless PATH exists")
    return parser


def parse_bool(text: str) -> bool:
    """The catalogue's booleans arrive as the strings True/False."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ---------------------------------------------------------------- running


def run(name: str, args: argparse.Namespace, output_dir: str, log_path: str, work) -> int:
    """Create the output folder and log, honour the test switches, then call work(args, log).

    Returns the exit code: 0 on success, 1 when work raises (ModuleFailed is logged as one
    line, anything else with its traceback).
    """
    os.makedirs(output_dir, exist_ok=True)
    log = open_log(name, log_path)
    started = time.monotonic()
    log.info("%s stand-in started; output folder %s", name, output_dir)
    try:
        honour_test_switches(args, log)
        work(args, log)
    except ModuleFailed as exc:
        log.error("FAILED: %s", exc)
        return EXIT_FAILED
    except Exception:
        log.error("FAILED with an unexpected error:\n%s", traceback.format_exc())
        return EXIT_FAILED
    finally:
        # --sleep is a minimum duration, so a slow test module stays slow even if it fails
        remaining = args.sleep - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
    log.info("%s done in %.3f s", name, time.monotonic() - started)
    return EXIT_OK


def open_log(name: str, log_path: str) -> logging.Logger:
    """A logger writing the same lines to log_path and to stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = logging.getLogger(f"mip.module.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(log_path, encoding="utf-8"),
                    logging.StreamHandler(sys.stdout)):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def honour_test_switches(args: argparse.Namespace, log: logging.Logger) -> None:
    """Raises ModuleFailed for --fail, and for --fail-unless-exists with a missing path."""
    if args.sleep > 0:
        log.info("--sleep %.3f: this run takes at least that long", args.sleep)
    if args.fail:
        raise ModuleFailed("asked to fail by --fail")
    if args.fail_unless_exists is not None:
        if not os.path.exists(args.fail_unless_exists):
            raise ModuleFailed(f"--fail-unless-exists: {args.fail_unless_exists} does not exist")
        log.info("--fail-unless-exists: %s exists", args.fail_unless_exists)


# ---------------------------------------------------------------- files


def require(path: str, what: str) -> str:
    """Return path; raises ModuleFailed naming `what` if it does not exist."""
    if not os.path.exists(path):
        raise ModuleFailed(f"missing input ({what}): {path}")
    return path


def find_map_tif(map_dir: str) -> str:
    """The map GeoTIFF inside a map folder: <folder>/<folder name>.tif, else the only .tif.

    Raises ModuleFailed if there is none.
    """
    require(map_dir, "map folder")
    name = os.path.basename(os.path.normpath(map_dir))
    preferred = os.path.join(map_dir, name + ".tif")
    if os.path.exists(preferred):
        return preferred
    tifs = sorted(f for f in os.listdir(map_dir) if f.lower().endswith((".tif", ".tiff")))
    if not tifs:
        raise ModuleFailed(f"missing input (map GeoTIFF): no .tif in {map_dir}")
    return os.path.join(map_dir, tifs[0])


def read_json(path: str, what: str):
    """Parse a predecessor's JSON file; raises ModuleFailed if missing or malformed."""
    require(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise ModuleFailed(f"bad JSON in {what} {path}: {exc}") from exc


def write_json(path: str, data) -> None:
    """Write JSON atomically (temp file + os.replace) so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def feature_collection(features: list, **properties) -> dict:
    """A GeoJSON FeatureCollection; extra keyword arguments become top-level members."""
    return {"type": "FeatureCollection", **properties, "features": features}


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list:
    """A closed GeoJSON polygon ring (counter-clockwise in x-right, y-up terms)."""
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def segmentation_boxes(segmentation: dict) -> dict:
    """legend_segment's labelme-style shapes as {label: (x0, y0, x1, y1)}."""
    boxes = {}
    for shape in segmentation.get("shapes", []):
        (x0, y0), (x1, y1) = shape["points"]
        boxes[shape["label"]] = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    return boxes


def patch_grid(folder: str):
    """(patch size, stride) from a map_crop folder name like <map>_g256_s200_wo_legend."""
    match = re.search(r"_g(\d+)_s(\d+)_wo_legend$", os.path.basename(os.path.normpath(folder)))
    if not match:
        raise ModuleFailed(f"not a map_crop patch folder name: {folder}")
    return int(match.group(1)), int(match.group(2))


def list_patches(folder: str):
    """[(row, col, path)] of the <map>_<row>_<col>.png patches in a map_crop folder."""
    require(folder, "map_crop patch folder")
    patches = []
    for entry in sorted(os.listdir(folder)):
        match = re.search(r"_(\d+)_(\d+)\.png$", entry)
        if match:
            patches.append((int(match.group(1)), int(match.group(2)), os.path.join(folder, entry)))
    if not patches:
        raise ModuleFailed(f"missing input (map patches): no <map>_<row>_<col>.png in {folder}")
    return patches


# ---------------------------------------------------------------- TIFF

TAG_WIDTH = 256
TAG_HEIGHT = 257
TAG_BITS = 258
TAG_COMPRESSION = 259
TAG_PHOTOMETRIC = 262
TAG_STRIP_OFFSETS = 273
TAG_SAMPLES = 277
TAG_ROWS_PER_STRIP = 278
TAG_STRIP_COUNTS = 279
TAG_PLANAR = 284
TAG_PIXEL_SCALE = 33550
TAG_TIEPOINT = 33922
TAG_GEOKEYS = 34735

# TIFF field type -> (struct code, byte size)
TIFF_TYPES = {
    1: ("B", 1), 2: ("c", 1), 3: ("H", 2), 4: ("I", 4), 5: ("II", 8), 6: ("b", 1),
    7: ("B", 1), 8: ("h", 2), 9: ("i", 4), 10: ("ii", 8), 11: ("f", 4), 12: ("d", 8),
}


class Image:
    """An 8-bit RGB raster: `rgb` holds width*height*3 bytes, row after row."""

    def __init__(self, width: int, height: int, rgb, tags=None):
        self.width = width
        self.height = height
        self.rgb = rgb
        self.tags = tags or {}

    def pixel(self, x: int, y: int) -> tuple:
        i = (y * self.width + x) * 3
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]

    def row(self, y: int, x0: int = 0, x1=None) -> bytes:
        """Bytes of row y from column x0 up to (not including) x1."""
        x1 = self.width if x1 is None else x1
        start = (y * self.width + x0) * 3
        return self.rgb[start:start + (x1 - x0) * 3]


def read_tiff(path: str, pixels: bool = True) -> Image:
    """Read the first image of a baseline TIFF: uncompressed, 8-bit, strips, chunky.

    Grey, RGB and RGBA are accepted and returned as RGB. With pixels=False only the size
    and tags are decoded. Raises ModuleFailed for anything else.
    """
    require(path, "map GeoTIFF")
    # the tags may sit after the pixels, so read it all; a few MB takes milliseconds
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        raise ModuleFailed(f"not a classic TIFF (BigTIFF is not supported): {path}")
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    tags = read_ifd(path, data, order, ifd)
    width = tags[TAG_WIDTH][0]
    height = tags[TAG_HEIGHT][0]
    if not pixels:
        return Image(width, height, b"", tags)
    samples = tags.get(TAG_SAMPLES, (1,))[0]
    bits = tags.get(TAG_BITS, (8,))
    if tags.get(TAG_COMPRESSION, (1,))[0] != 1 or set(bits) != {8}:
        raise ModuleFailed(f"only uncompressed 8-bit TIFFs are supported: {path}")
    if tags.get(TAG_PLANAR, (1,))[0] != 1 or samples not in (1, 3, 4):
        raise ModuleFailed(f"only chunky grey/RGB/RGBA TIFFs are supported: {path}")
    raw = b"".join(data[offset:offset + count] for offset, count
                   in zip(tags[TAG_STRIP_OFFSETS], tags[TAG_STRIP_COUNTS], strict=True))
    need = width * height * samples
    if len(raw) < need:
        raise ModuleFailed(f"truncated TIFF pixel data in {path}")
    raw = raw[:need]
    if samples == 3:
        return Image(width, height, raw, tags)
    # extended-slice assignment converts grey/RGBA to RGB in C, not a Python loop
    rgb = bytearray(width * height * 3)
    for channel in range(3):
        rgb[channel::3] = raw[0::1] if samples == 1 else raw[channel::4]
    return Image(width, height, bytes(rgb), tags)


def read_ifd(path: str, data: bytes, order: str, offset: int) -> dict:
    """The tags of one IFD as {tag: tuple of values} (ASCII tags as one str)."""
    (count,) = struct.unpack_from(order + "H", data, offset)
    tags = {}
    for n in range(count):
        tag, kind, number, value = struct.unpack_from(order + "HHI4s", data, offset + 2 + n * 12)
        if kind not in TIFF_TYPES:
            continue
        code, size = TIFF_TYPES[kind]
        total = size * number
        if total <= 4:
            raw = value[:total]
        else:
            (where,) = struct.unpack(order + "I", value)
            raw = data[where:where + total]
            if len(raw) < total:
                raise ModuleFailed(f"TIFF tag {tag} points past the end of {path}")
        if kind == 2:
            tags[tag] = raw.rstrip(b"\x00").decode("latin-1")
        else:
            tags[tag] = struct.unpack(order + code * number, raw)
    return tags


def geotiff_transform(image: Image):
    """(lon0, lat0, dx, dy) so that lon = lon0 + col*dx, lat = lat0 - row*dy.

    Raises ModuleFailed if the ModelPixelScale or ModelTiepoint tag is missing.
    """
    if TAG_PIXEL_SCALE not in image.tags or TAG_TIEPOINT not in image.tags:
        raise ModuleFailed("the map has no GeoTIFF ModelPixelScale/ModelTiepoint tags")
    dx, dy = image.tags[TAG_PIXEL_SCALE][:2]
    i, j, _, x, y, _ = image.tags[TAG_TIEPOINT][:6]
    return x - i * dx, y + j * dy, dx, dy


def geotiff_epsg(image: Image):
    """The EPSG code of the GeoKeyDirectory (projected, else geographic), or None."""
    keys = image.tags.get(TAG_GEOKEYS)
    if not keys:
        return None
    found = {}
    for n in range(keys[3]):
        key, location, _, value = keys[4 + n * 4:8 + n * 4]
        if location == 0:
            found[key] = value
    # 3072 ProjectedCSTypeGeoKey, 2048 GeographicTypeGeoKey; 32767 means user-defined
    for key in (3072, 2048):
        if key in found and found[key] not in (0, 32767):
            return found[key]
    return None


# ---------------------------------------------------------------- PNG


def write_png(path: str, width: int, height: int, rows) -> None:
    """Write an 8-bit RGB PNG from `rows` (an iterable of width*3-byte rows), atomically."""
    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 on every row
    if len(raw) != height * (width * 3 + 1):
        raise ValueError("PNG rows do not match width and height")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def read_png(path: str) -> Image:
    """Read an 8-bit RGB PNG written by write_png (filter type 0 only).

    Raises ModuleFailed for any other kind of PNG: a general unfilter in pure Python
    would be too slow for the stand-ins' time budget.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ModuleFailed(f"not a PNG: {path}")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    if header is None or header[2:5] != (8, 2, 0) or header[6] != 0:
        raise ModuleFailed(f"only 8-bit RGB non-interlaced PNGs are supported: {path}")
    width, height = header[:2]
    raw = zlib.decompress(b"".join(idat))
    stride = width * 3 + 1
    if raw[0::stride].strip(b"\x00"):
        raise ModuleFailed(f"only PNG filter type 0 is supported: {path}")
    rgb = b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height))
    return Image(width, height, rgb)


# ---------------------------------------------------------------- pixels


def colour_close(a, b, tolerance: int = 40) -> bool:
    return abs(a[0] - b[0]) + abs(a[1] - b[1]) + abs(a[2] - b[2]) <= tolerance


def is_ink(rgb) -> bool:
    """Not paper: not near-white, and not the mid-grey used for legend label text."""
    r, g, b = rgb
    if r > 235 and g > 235 and b > 235:
        return False
    grey = max(r, g, b) - min(r, g, b) < 12
    return not (grey and 80 <= r <= 200)


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def hex_to_rgb(text: str) -> tuple:
    """'#rrggbb' -> (r, g, b)."""
    return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))


def components(cells: set) -> list:
    """8-connected components of a set of (col, row) grid cells, as sorted lists."""
    left = set(cells)
    found = []
    while left:
        seed = left.pop()
        stack, group = [seed], [seed]
        while stack:
            cx, cy = stack.pop()
            for nx in (cx - 1, cx, cx + 1):
                for ny in (cy - 1, cy, cy + 1):
                    if (nx, ny) in left:
                        left.remove((nx, ny))
                        stack.append((nx, ny))
                        group.append((nx, ny))
        found.append(sorted(group))
    found.sort()
    return found


# bytes.translate table: 0 for paper (near-white channel values), 1 for anything darker
PAPER_TABLE = bytes(0 if value > 235 else 1 for value in range(256))


def runs(flags, min_gap: int) -> list:
    """[start, end) runs of true flags, bridging gaps shorter than min_gap."""
    found = []
    for i, flag in enumerate(flags):
        if not flag:
            continue
        if found and i - found[-1][1] < min_gap:
            found[-1][1] = i + 1
        else:
            found.append([i, i + 1])
    return [tuple(run) for run in found]


def column_blocks(image: Image, y0: int, y1: int, min_gap: int, row_step: int = 4) -> list:
    """[x0, x1) blocks of columns holding any non-paper pixel in rows y0..y1 (sampled)."""
    # OR-ing the rows as big integers keeps the per-pixel work in C
    seen = 0
    for y in range(y0, y1, row_step):
        seen |= int.from_bytes(image.row(y).translate(PAPER_TABLE), "big")
    marks = seen.to_bytes(image.width * 3, "big")
    flags = [marks[3 * x] | marks[3 * x + 1] | marks[3 * x + 2] for x in range(image.width)]
    return runs(flags, min_gap)


def row_blocks(image: Image, x0: int, x1: int, y0: int, y1: int, min_gap: int) -> list:
    """[y0, y1) blocks of rows holding any non-paper pixel between columns x0 and x1."""
    flags = [bool(image.row(y, x0, x1).translate(PAPER_TABLE).strip(b"\x00"))
             for y in range(y0, y1)]
    return [(y0 + a, y0 + b) for a, b in runs(flags, min_gap)]


def widest(blocks: list) -> tuple:
    """The widest (start, end) block; raises ModuleFailed if there is none."""
    if not blocks:
        raise ModuleFailed("the map image is blank: no non-white pixels found")
    return max(blocks, key=lambda block: block[1] - block[0])


def samples(image: Image, x0: int, y0: int, x1: int, y1: int, step: int):
    """Yield (x, y, r, g, b) for every step-th pixel of the box, starting at (x0, y0)."""
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    stride = 3 * step
    for y in range(y0, y1, step):
        row = image.row(y, x0, x1)
        # slicing each channel out keeps the loop free of per-pixel indexing
        for n, (r, g, b) in enumerate(zip(row[0::stride], row[1::stride], row[2::stride],
                                          strict=False)):
            yield x0 + n * step, y, r, g, b


def runs_of(numbers: list) -> list:
    """[start, end) runs of consecutive integers in a sorted list."""
    found = []
    for n in numbers:
        if found and n == found[-1][1]:
            found[-1][1] = n + 1
        else:
            found.append([n, n + 1])
    return [tuple(run) for run in found]
