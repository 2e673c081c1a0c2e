"""Reading maps for the stand-in modules: any TIFF GDAL reads, as 8-bit RGB numpy arrays.

Not run on its own: the modules import it (after common). `open_map(path)` opens a map
with rasterio; `MapReader.rgb(window, out_shape)` reads a window, or a decimated view,
as an (height, width, 3) uint8 array whatever the file holds: palette (through its colour
map; a 1-bit file comes as a black and white one), grey (replicated; MINISWHITE
inverted), RGB, RGBA (alpha composited on white paper), CMYK (converted), 8-, 16-bit or
float (scaled by the file's real range), pixel- or band-interleaved, compressed, tiled,
COG or BigTIFF. Pixels GDAL's mask leaves out (nodata, a mask band, alpha) read as white
paper. Decimated reads take the nearest full-resolution pixels, never the file's
overviews. Reads of a part of the map touch only that part. A file GDAL cannot read fails
in one line with GDAL's reason; one that is not what its name says is logged as a WARNING.

Sections: opening, reading, paper and ink, layout.
"""

import contextlib
import math
import warnings

import common
import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.errors import RasterioError
from rasterio.windows import Window
from scipy import ndimage

# GDAL's block cache defaults to 5% of the machine's memory per process: with several
# modules running at once that alone would pass the graph's memory budget. A band of
# patches (640 rows of a 12,000 px map) fits in this, so overlapping bands decode once.
# In BYTES: rasterio hands an integer straight to GDALSetCacheMax64, so 96 would be a
# 96-byte cache (every decimated read of a tiled map then decodes each tile again per
# output row); only the GDAL_CACHEMAX environment variable reads a small number as MB.
GDAL_CACHE_BYTES = 96 * 1024 * 1024
# rows a decimated read decodes at a time (a tile row of the usual 256 px tiles)
DECIMATE_ROWS = 256
# decimated reads for the layout keep the longer side at most this long
LAYOUT_SIDE = 2000
# the longer side of the decimated read that fixes a non-8-bit file's range
RANGE_SIDE = 512
# pixels the paper estimate looks at (evenly spread): plenty for a histogram
SAMPLE_PIXELS = 250_000

CMYK = (ColorInterp.cyan, ColorInterp.magenta, ColorInterp.yellow, ColorInterp.black)
RGB = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)


# ---------------------------------------------------------------- opening


@contextlib.contextmanager
def open_map(path: str, log=None):
    """Yield a MapReader for the map at path, logging to log (when given) a WARNING for a
    file that is not what its name says; raises ModuleFailed, in one line carrying GDAL's
    reason, if GDAL cannot open it or, later, read it (a truncated file opens)."""
    common.require(path, "map GeoTIFF")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), warnings.catch_warnings():
        # most scanned maps carry no georeferencing; georeference handles that case itself
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        with gdal_errors(path):
            # A file does not record how its overviews were resampled (GDAL's COG driver
            # uses CUBIC, whose halos blur gaps and invent colours): decimated reads come
            # from the full-resolution pixels, nearest, whatever overviews the file has.
            dataset = rasterio.open(path, OVERVIEW_LEVEL="NONE")
        with dataset:
            reader = MapReader(dataset)
            for note in surprises(dataset, path):
                if log is not None:
                    log.warning("%s", note)
            yield reader


@contextlib.contextmanager
def gdal_errors(path: str):
    """Turn GDAL's errors into ModuleFailed, one line with GDAL's own reason."""
    try:
        yield
    except RasterioError as exc:
        raise common.ModuleFailed(f"GDAL cannot read the map {path}: {gdal_reason(exc)}") \
            from None


def gdal_reason(exc: BaseException) -> str:
    """GDAL's messages along an exception's chain, the first cause first, on one line:
    rasterio's own ("Read failed. See previous exception") says nothing by itself."""
    messages = []
    while exc is not None:
        text = " ".join(str(exc).split())
        if text and text not in messages:
            messages.append(text)
        exc = exc.__cause__ or exc.__context__
    return "; ".join(reversed(messages)) or "no reason given"


def surprises(dataset, path: str) -> list:
    """Why the file is not quite what its name says: another format under a .tif name,
    or a TIFF of several pages (only the first is read)."""
    notes = []
    if dataset.driver != "GTiff":
        notes.append(f"{path} is not a TIFF but a {dataset.driver} file under a .tif name; "
                     f"GDAL reads it as {dataset.driver}")
    pages = [name for name in dataset.subdatasets if name.startswith("GTIFF_DIR:")]
    if pages:
        notes.append(f"{path} is a multi-page TIFF of {len(pages)} pages: page 1 is used, "
                     f"the other {len(pages) - 1} are ignored")
    return notes


class MapReader:
    """An open map: its size, how its bands make RGB, and windowed RGB reads."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.width = dataset.width
        self.height = dataset.height
        self.kind, self.bands, self.alpha = band_layout(dataset)
        self.lut = palette_lut(dataset) if self.kind == "palette" else None
        # GDAL hands MINISWHITE grey over raw (0 is white); a 1-bit MINISWHITE file comes
        # as a palette that already says so
        self.inverted = self.kind == "grey" and \
            dataset.tags(ns="IMAGE_STRUCTURE").get("MINISWHITE") == "YES"
        # nodata, an internal mask band or alpha: GDAL's mask covers all three
        self.masked = any(flag.name in ("nodata", "per_dataset", "alpha")
                          for flag in dataset.mask_flag_enums[0])
        self.range = None if dataset.dtypes[0] == "uint8" or self.lut is not None \
            else self.value_range()

    def describe(self) -> str:
        ds = self.dataset
        structure = ds.tags(ns="IMAGE_STRUCTURE")
        return (f"{self.width} x {self.height}, {ds.count} band(s) of {ds.dtypes[0]}, "
                f"{self.kind}{' with alpha' if self.alpha else ''}"
                f"{', MINISWHITE' if self.inverted else ''}"
                f"{', masked' if self.masked else ''}, "
                f"{structure.get('COMPRESSION', 'uncompressed')}, "
                f"{structure.get('INTERLEAVE', '?').lower()}-interleaved"
                + (f", range {self.range[0]:g}..{self.range[1]:g} scaled to 0..255"
                   if self.range else ""))

    def rgb(self, window=None, out_shape=None) -> np.ndarray:
        """(h, w, 3) uint8 of a window (x0, y0, x1, y1) or the whole map, optionally
        decimated (nearest pixel) to out_shape (h, w). Masked pixels are white paper."""
        rgb = self.colour(window, out_shape)
        if self.masked:
            rgb[~self.valid(window, out_shape)] = 255
        return rgb

    def valid(self, window=None, out_shape=None) -> np.ndarray:
        """(h, w) bool: True where GDAL's mask (nodata, mask band, alpha) keeps the pixel."""
        x0, y0, x1, y1 = window or (0, 0, self.width, self.height)
        shape = out_shape or (y1 - y0, x1 - x0)
        if not self.masked:
            return np.ones(shape, dtype=bool)
        # the dataset's mask, not band 1's: with nodata, a pixel is out only when every
        # band says so (black ink on one band is not a collar)
        with gdal_errors(self.dataset.name):
            mask = self.dataset.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0),
                                             out_shape=shape, resampling=Resampling.nearest)
        return mask > 0

    def colour(self, window=None, out_shape=None) -> np.ndarray:
        x0, y0, x1, y1 = window or (0, 0, self.width, self.height)
        shape = tuple(out_shape or (y1 - y0, x1 - x0))
        with gdal_errors(self.dataset.name):
            if shape == (y1 - y0, x1 - x0):
                return self.read_colour((x0, y0, x1, y1))
            return self.decimate((x0, y0, x1, y1), shape)

    def decimate(self, window: tuple, shape: tuple) -> np.ndarray:
        """The pixel at each cell's centre, from full-resolution reads of a few rows at a
        time. GDAL's own decimated read of a pixel-interleaved file decodes every tile
        again for each band (a 20,000 x 15,000 scan: 59 s, against 16 s this way)."""
        x0, y0, x1, y1 = window
        rows = y0 + centres(y1 - y0, shape[0])
        cols = centres(x1 - x0, shape[1])
        out = np.empty((*shape, 3), dtype=np.uint8)
        # tiles and tall strips hold several wanted rows: read runs of rows; thin strips
        # between two wanted rows are not decoded at all
        tall = self.dataset.block_shapes[0][0] * shape[0] >= y1 - y0
        i = 0
        while i < len(rows):
            top = int(rows[i])
            j = int(np.searchsorted(rows, top + DECIMATE_ROWS)) if tall else i + 1
            band = self.read_colour((x0, top, x1, int(rows[j - 1]) + 1))
            out[i:j] = band[rows[i:j] - top][:, cols]
            i = j
        return out

    def read_colour(self, window: tuple) -> np.ndarray:
        x0, y0, x1, y1 = window
        win = Window(x0, y0, x1 - x0, y1 - y0)
        shape = (y1 - y0, x1 - x0)
        if self.kind == "rgb" and self.range is None and not self.alpha:
            # GDAL writes straight into a pixel-interleaved array: no band-first copy
            out = np.empty((*shape, 3), dtype=np.uint8)
            self.dataset.read(list(self.bands), window=win, out=np.moveaxis(out, -1, 0),
                              resampling=Resampling.nearest)
            return out
        indexes = list(self.bands) + ([self.alpha] if self.alpha else [])
        return self.to_rgb(self.dataset.read(indexes, window=win))

    def value_range(self) -> tuple:
        """(low, high) of the colour bands on a small decimated read: every module reading
        this file scales it the same way."""
        scale = max(1, math.ceil(max(self.width, self.height) / RANGE_SIDE))
        shape = (len(self.bands), math.ceil(self.height / scale), math.ceil(self.width / scale))
        # masked: a nodata collar (often 0 or -9999) must not stretch the range
        with gdal_errors(self.dataset.name):
            sample = self.dataset.read(list(self.bands), out_shape=shape, masked=True,
                                       resampling=Resampling.nearest).compressed()
        sample = sample[np.isfinite(sample)]
        if not sample.size:
            raise common.ModuleFailed("the map holds no valid pixels (all masked)")
        low, high = float(sample.min()), float(sample.max())
        return low, max(high, low + 1)

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        colour = raw[:len(self.bands)]
        if self.lut is not None:
            rgb = self.lut[colour[0]]
        else:
            channels = [self.to_byte(band) for band in colour]
            if self.kind == "cmyk":
                channels = cmyk_to_rgb(channels)
            elif self.kind == "grey":
                if self.inverted:
                    channels = [255 - channels[0]]
                channels = channels * 3
            rgb = np.stack(channels, axis=-1)
        if self.alpha:
            rgb = over_white(rgb, raw[-1], np.iinfo(raw.dtype).max
                             if raw.dtype.kind in "ui" else 1.0)
        return rgb

    def to_byte(self, band: np.ndarray) -> np.ndarray:
        if self.range is None:
            return band
        low, high = self.range
        scaled = (band.astype(np.float32) - low) * (255.0 / (high - low))
        return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def centres(length: int, cells: int) -> np.ndarray:
    """The index of each of `cells` equal cells' centre pixel along `length` pixels."""
    return np.minimum(((np.arange(cells) + 0.5) * (length / cells)).astype(np.int64),
                      length - 1)


def band_layout(dataset) -> tuple:
    """(kind, colour band indexes, alpha band index or None) from the colour interpretation."""
    interp = list(dataset.colorinterp)

    def band(ci):
        return interp.index(ci) + 1 if ci in interp else None

    alpha = band(ColorInterp.alpha)
    if ColorInterp.palette in interp:
        return "palette", (band(ColorInterp.palette),), alpha
    if all(ci in interp for ci in CMYK):
        return "cmyk", tuple(band(ci) for ci in CMYK), alpha
    if all(ci in interp for ci in RGB):
        return "rgb", tuple(band(ci) for ci in RGB), alpha
    colour = [n for n in range(1, dataset.count + 1) if n != alpha]
    if len(colour) >= 3:
        return "rgb", tuple(colour[:3]), alpha
    return "grey", (colour[0],), alpha


def palette_lut(dataset) -> np.ndarray:
    """(entries, 3) uint8: the colour map, entries with alpha composited on white."""
    colormap = dataset.colormap(1)
    size = max(256, max(colormap) + 1)
    lut = np.full((size, 4), 255, dtype=np.uint8)
    for index, entry in colormap.items():
        lut[index] = entry
    return over_white(lut[:, :3], lut[:, 3], 255)


def cmyk_to_rgb(channels: list) -> list:
    """Subtractive ink to additive light: R = (255 - C) * (255 - K) / 255, and so on."""
    *cmy, k = (channel.astype(np.uint16) for channel in channels)
    return [((255 - ink) * (255 - k) // 255).astype(np.uint8) for ink in cmy]


def over_white(rgb: np.ndarray, alpha: np.ndarray, full) -> np.ndarray:
    """Composite rgb over white paper with alpha in 0..full."""
    weight = (alpha.astype(np.float32) / float(full))[..., None]
    return (rgb * weight + 255.0 * (1 - weight) + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- paper and ink


def estimate_paper(rgb: np.ndarray, border=None) -> tuple:
    """((r, g, b) of the paper, ink threshold) estimated from the map's own pixels.

    The paper is the whitest colour that covers a real share of the map: colours are
    binned 32 levels per channel, bins holding at least 2% of the pixels compete, and the
    one whose darkest channel is lightest wins (so a bright yellow unit loses to tinted
    paper). The same contest, on bins of 8 levels inside that bin, then parts white paper
    from a pale unit that shares its coarse bin (a grey scan's lightest unit); scanner noise
    spreads paper over many fine bins, and then the coarse bin stands. The paper colour is
    the median of the pixels near the winner; the threshold grows with the paper's own
    noise, so noisy scans do not turn into ink. Where two bins tie (a pale unit and
    yellowed paper), the one holding more of `border`, pixels from the sheet's edge
    (n, 3), wins: the margin is paper.
    """
    pixels = rgb.reshape(-1, 3)
    if len(pixels) > SAMPLE_PIXELS:
        pixels = pixels[::len(pixels) // SAMPLE_PIXELS]
    share = max(1, 0.02 * len(pixels))
    centre, radius = whitest_bin(pixels, 5, share, border), 32
    if centre is None:
        centre = whitest_bin(pixels, 5, 1, border)
    signed = pixels.astype(np.int16)
    near = pixels[np.abs(signed - centre).max(axis=1) <= radius]
    fine = whitest_bin(near, 3, share, border)
    if fine is not None:
        centre, radius = fine, 12
        near = pixels[np.abs(signed - centre).max(axis=1) <= radius]
    paper = np.median(near, axis=0).round().astype(np.int16)
    distance = np.abs(signed - paper).max(axis=1)
    # the median distance of near-paper pixels measures the paper's own noise; a window
    # tighter than the pale units keeps them out of it
    close = distance[distance <= 24]
    noise = float(np.median(close)) if close.size else 0.0
    threshold = int(np.clip(3 * noise + 12, 24, 64))
    return tuple(int(v) for v in paper), threshold


def bin_keys(pixels: np.ndarray, shift: int) -> np.ndarray:
    per = 256 >> shift
    levels = (pixels >> shift).astype(np.int32)
    return (levels[:, 0] * per + levels[:, 1]) * per + levels[:, 2]


def whitest_bin(pixels: np.ndarray, shift: int, share: float, border=None):
    """The centre of the bin (2**shift levels a channel) holding at least `share` pixels
    whose darkest channel is lightest (ties: lightest in all, then most of `border`, then
    fullest); None if no bin holds that many."""
    per = 256 >> shift
    counts = np.bincount(bin_keys(pixels, shift), minlength=per ** 3)
    edge = np.zeros_like(counts) if border is None or not len(border) else \
        np.bincount(bin_keys(border, shift), minlength=per ** 3)
    candidates = np.flatnonzero(counts >= share)
    if not candidates.size:
        return None
    bins = np.stack([candidates // (per * per), candidates // per % per, candidates % per],
                    axis=1)
    order = np.lexsort((counts[candidates], edge[candidates], bins.sum(axis=1),
                        bins.min(axis=1)))
    return (bins[order[-1]] << shift) + (1 << shift) // 2


def ink_mask(rgb: np.ndarray, paper, threshold: int) -> np.ndarray:
    """True where a pixel is further than threshold from the paper in some channel."""
    paper = np.asarray(paper, dtype=np.int16)
    return (np.abs(rgb.astype(np.int16) - paper).max(axis=-1) > threshold)


def colour_distance(rgb: np.ndarray, colour) -> np.ndarray:
    """Sum of absolute channel differences to one colour, as int16 per pixel."""
    return np.abs(rgb.astype(np.int16) - np.asarray(colour, dtype=np.int16)).sum(axis=-1)


# ---------------------------------------------------------------- layout


def runs(flags: np.ndarray, min_gap: int) -> list:
    """[start, end) runs of true flags, bridging gaps of at most min_gap false flags."""
    where = np.flatnonzero(flags)
    if not where.size:
        return []
    breaks = np.flatnonzero(np.diff(where) > min_gap)
    starts = np.concatenate([where[:1], where[breaks + 1]])
    ends = np.concatenate([where[breaks] + 1, where[-1:] + 1])
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def widest(blocks: list) -> tuple:
    """The widest (start, end) block; raises ModuleFailed if there is none."""
    if not blocks:
        raise common.ModuleFailed("the map image is blank: no ink found on the paper")
    return max(blocks, key=lambda block: block[1] - block[0])


def edge_pixels(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(n, 3) of the valid pixels within 2% of the image's edge."""
    height, width = valid.shape
    ring = np.zeros_like(valid)
    dy, dx = max(1, height // 50), max(1, width // 50)
    ring[:dy], ring[-dy:], ring[:, :dx], ring[:, -dx:] = True, True, True, True
    return rgb[ring & valid]


def dense(share: np.ndarray) -> np.ndarray:
    """True where a line's share of ink is at least half the fullest line's."""
    return share >= 0.5 * share.max() if share.size and share.max() > 0 else share > 0


def sheet_mask(ink: np.ndarray, rgb: np.ndarray, paper, threshold: int) -> np.ndarray:
    """(h, w) bool: the paper sheet and all it encloses, apart from a scanner bed or
    collar around it, which is left out when it is one flat colour touching the border.
    A map printed to the image's edge has no such surround and keeps the whole image."""
    labels, count = ndimage.label(~ink)
    if not count:
        return np.ones(ink.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    sheet = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    outside = ~sheet
    if not outside.any() or not (outside[0].any() or outside[-1].any()
                                 or outside[:, 0].any() or outside[:, -1].any()):
        return np.ones(ink.shape, dtype=bool)
    surround = rgb[outside]
    median = np.median(surround, axis=0)
    flat = (np.abs(surround.astype(np.int16) - median).max(axis=1) <= threshold).mean()
    # a bed or collar is one colour, and not the paper's (then the biggest stretch of
    # paper was inside a frame); a map area reaching the edge is many colours
    unlike_paper = np.abs(median - np.asarray(paper)).max() > threshold
    return sheet if flat >= 0.9 and unlike_paper else np.ones(ink.shape, dtype=bool)


class Layout:
    """The map on a decimated read: paper, ink, the sheet, the map area and the legend.

    Positions found here are in overview pixels; `box` turns them into map pixels,
    widened by one overview pixel where the read was decimated.
    """

    def __init__(self, reader: MapReader):
        self.width, self.height = reader.width, reader.height
        scale = max(1, math.ceil(max(self.width, self.height) / LAYOUT_SIDE))
        shape = (math.ceil(self.height / scale), math.ceil(self.width / scale))
        self.rgb = reader.rgb(out_shape=shape) if scale > 1 else reader.rgb()
        valid = reader.valid(out_shape=self.rgb.shape[:2])
        self.sx = self.width / self.rgb.shape[1]
        self.sy = self.height / self.rgb.shape[0]
        self.paper, self.threshold = estimate_paper(
            self.rgb[valid] if valid.any() else self.rgb, edge_pixels(self.rgb, valid))
        ink = ink_mask(self.rgb, self.paper, self.threshold) & valid
        self.sheet = sheet_mask(ink, self.rgb, self.paper, self.threshold) & valid
        self.ink = ink & self.sheet
        # gaps narrower than this are bridged: a map's frame and the legend beside it
        # stand further apart (the fixture: 26 columns on 1,000), with a margin of more
        # than two so that a blurred or decimated read does not bring the gap down to it
        self.min_gap = max(2, round(max(3, self.width // 100) / self.sx))

    def row_blocks(self, x0: int, x1: int, min_gap: int) -> list:
        """[y0, y1) blocks (overview pixels) of rows holding ink between columns x0, x1."""
        return runs(self.ink[:, x0:x1].any(axis=1), min_gap)

    def map_area(self) -> tuple:
        """(x0, y0, x1, y1) of the map area in overview pixels, the legend on any side.

        The ink with its holes filled (a neatline makes even a line drawing solid) is cut
        into blocks of dense columns, then of dense rows, keeping the biggest, until the
        box stands still. Dense: at least half as much ink as the fullest line, so that a
        legend beside the map, its swatches apart, stays out, and a sheet skewed by a few
        degrees loses only slivers at the map's corners.
        """
        solid = ndimage.binary_fill_holes(self.ink)
        box = (0, 0, self.ink.shape[1], self.ink.shape[0])
        for _ in range(6):
            x0, y0, x1, y1 = box
            a, b = widest(runs(dense(solid[y0:y1, x0:x1].mean(axis=0)), self.min_gap))
            cx0, cx1 = x0 + a, x0 + b
            a, b = widest(runs(dense(solid[y0:y1, cx0:cx1].mean(axis=1)), self.min_gap))
            if (cx0, y0 + a, cx1, y0 + b) == box:
                break
            box = (cx0, y0 + a, cx1, y0 + b)
        return box

    def legend_side(self, map_box: tuple):
        """(side, (x0, y0, x1, y1)) of the legend: of the ink not joined to the map area
        (a skewed map's corners stick out of its box), the side of the map holding the
        most; None when there is none."""
        x0, y0, x1, y1 = map_box
        labels, _ = ndimage.label(self.ink, structure=np.ones((3, 3), dtype=bool))
        joined = np.unique(labels[y0:y1, x0:x1])
        apart = self.ink & ~np.isin(labels, joined[joined > 0])
        height, width = apart.shape
        strips = {"right": (x1, 0, width, height), "left": (0, 0, x0, height),
                  "below": (0, y1, width, height), "above": (0, 0, width, y0)}
        counts = {side: int(apart[b:d, a:c].sum()) for side, (a, b, c, d) in strips.items()}
        side = max(counts, key=counts.get)
        if not counts[side]:
            return None
        a, b, c, d = strips[side]
        ys, xs = np.nonzero(apart[b:d, a:c])
        return side, (a + int(xs.min()), b + int(ys.min()), a + int(xs.max()) + 1,
                      b + int(ys.max()) + 1)

    def box(self, x0, y0, x1, y1) -> tuple:
        """An overview-pixel box in map pixels (exact when the read was not decimated)."""
        pad_x = math.ceil(self.sx) if self.sx > 1 else 0
        pad_y = math.ceil(self.sy) if self.sy > 1 else 0
        return (max(0, math.floor(x0 * self.sx) - pad_x),
                max(0, math.floor(y0 * self.sy) - pad_y),
                min(self.width, math.ceil(x1 * self.sx) + pad_x),
                min(self.height, math.ceil(y1 * self.sy) + pad_y))
