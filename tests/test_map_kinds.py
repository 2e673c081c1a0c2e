"""The stand-in modules on maps as the world sends them (issue 23): how raster.py reads
GDAL's files (block cache, overviews, masks, MINISWHITE, 1-bit), and the whole chain of
modules, called in process, on small maps of several drawings written as real files.

Run: .venv/bin/python -m pytest tests/test_map_kinds.py   (the slow kinds: -m slow)
"""

import warnings

import numpy as np
import raster
import rasterio
import rasterio.env
import sample_map
from rasterio.errors import NotGeoreferencedWarning


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


# ---------------------------------------------------------------- reading


def test_the_block_cache_is_given_in_bytes(tmp_path):
    """GDAL's own figure, read back inside the modules' Env, is megabytes, not bytes."""
    path = write_rgb(tmp_path / "map.tif", sample_map.draw_sample_map(300, 240))
    with raster.open_map(path):
        cache = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
    assert cache == raster.GDAL_CACHE_BYTES
    assert 32 * 2**20 <= cache <= 256 * 2**20
