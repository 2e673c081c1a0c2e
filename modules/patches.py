"""map_crop's PNG patches: their grid, writing them, and reading them back on a sample grid.

Not run on its own: map_crop, line_extract and point_extract import it (after common).
A patch folder is <map>_g<size>_s<stride>_wo_legend holding <map>_<row>_<col>.png, patch
(row, col) starting at map pixel (col*stride, row*stride).
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import common
import numpy as np
from PIL import Image

# Patches are intermediate files read once by the extractors: the fastest zlib level
# writes them several times faster than the default for a few percent more bytes.
PNG_LEVEL = 1
# Pillow encodes and decodes PNGs without holding the GIL, so a few threads use the
# machine's cores; more would only add memory.
THREADS = min(4, os.cpu_count() or 1)


def pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=THREADS)


def patch_grid(folder: str):
    """(patch size, stride) from a map_crop folder name like <map>_g256_s200_wo_legend."""
    match = re.search(r"_g(\d+)_s(\d+)_wo_legend$", os.path.basename(os.path.normpath(folder)))
    if not match:
        raise common.ModuleFailed(f"not a map_crop patch folder name: {folder}")
    return int(match.group(1)), int(match.group(2))


def list_patches(folder: str):
    """[(row, col, path)] of the <map>_<row>_<col>.png patches in a map_crop folder."""
    common.require(folder, "map_crop patch folder")
    found = []
    for entry in sorted(os.listdir(folder)):
        match = re.search(r"_(\d+)_(\d+)\.png$", entry)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), os.path.join(folder, entry)))
    if not found:
        raise common.ModuleFailed(
            f"missing input (map patches): no <map>_<row>_<col>.png in {folder}")
    return found


def write_png(path: str, rgb: np.ndarray) -> None:
    """Write an (h, w, 3) or (h, w) uint8 array as a PNG, atomically."""
    tmp = path + ".tmp"
    Image.fromarray(rgb).save(tmp, format="PNG", compress_level=PNG_LEVEL)
    os.replace(tmp, path)


def read_png(path: str) -> np.ndarray:
    """An (h, w, 3) uint8 array of any PNG Pillow reads."""
    try:
        with Image.open(path) as image:
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except OSError as exc:
        raise common.ModuleFailed(f"unreadable PNG patch {path}: {exc}") from exc


def sample_patches(folder: str, step: int, limit=None):
    """Yield (gx0, gy0, samples) for each patch: samples is the patch read every step
    pixels on a grid aligned to the whole map, so overlapping patches agree, starting at
    grid cell (gx0, gy0). limit (width, height) drops padding past the map's edge.
    Patches are decoded on a few threads; only their samples are kept."""
    _, stride = patch_grid(folder)

    def load(entry):
        row, col, path = entry
        patch = read_png(path)
        ox, oy = col * stride, row * stride
        height, width = patch.shape[:2]
        if limit is not None:
            width, height = min(width, limit[0] - ox), min(height, limit[1] - oy)
        start_x, start_y = (-ox) % step, (-oy) % step
        samples = np.ascontiguousarray(patch[start_y:height:step, start_x:width:step])
        return (ox + start_x) // step, (oy + start_y) // step, samples

    with pool() as threads:
        yield from threads.map(load, list_patches(folder))
