"""The sample map written the ways real maps come: each kind of TIFF GDAL reads, written
with rasterio from the pixels modules/sample_map.py draws.

    from map_variants import VARIANTS, KINDS, write_variant, describe
    write_variant(VARIANTS["cog"], sample_map.draw_sample_map(), "/tmp/cog.tif")
    write_variant(KINDS["collar"], sample_map.draw_sample_map(600, 450, sample_map.LEFT),
                  "/tmp/collar.tif")

VARIANTS are the formats (test_real_maps.py runs each through mipper); KINDS are the maps
of issue 23 (COGs with the COG driver's own overviews, JPEG q75, ZSTD, WEBP, LERC; a
nodata collar, a mask band, a scanner bed around a skewed sheet; MINISWHITE, grey+alpha,
float32 and 1-bit G4), which test_map_kinds.py runs on every drawing of sample_map.

Each Variant names what it is, how rasterio writes it (a creation profile, and how the RGB
pixels become its bands) and what reading it back must show (`expect`, compared with
describe()), so a test can tell that a file is what its name says before trusting what the
modules make of it. Georeferenced variants use the sample map's EPSG:4267 bounds, or, for
the projected ones, the same ground in a UTM zone (so that GCPs must be converted to
EPSG:4326 degrees). Run as a script to write every variant into a folder:

    python tests/map_variants.py DEST_DIR [--width 1000 --height 800] [--drawing left]
"""

import argparse
import os
import sys
import warnings
from dataclasses import dataclass

import numpy
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform_bounds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "modules"))

import sample_map  # noqa: E402

RGB = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
UTM_13N_NAD83 = "EPSG:26913"
UTM_13N_WGS84 = "EPSG:32613"
TINT = (236, 226, 198)  # aged, yellowed paper
NOISE_SIGMA = 6  # grey levels of scanner noise on every channel
NOISE_SEED = 11
JPEG_QUALITY = 90
# grey levels below this are black in the 1-bit variant: the faults, the symbols' red, the
# label grey and the darkest unit
BILEVEL_CUT = 140


# ---------------------------------------------------------------- pixels


def rgb_bands(rgb: numpy.ndarray) -> tuple:
    """(bands, colour map or None): RGB as three bands."""
    return rgb.transpose(2, 0, 1), None


def rgba_bands(rgb: numpy.ndarray) -> tuple:
    """RGB plus an opaque alpha band."""
    alpha = numpy.full(rgb.shape[:2] + (1,), 255, dtype=numpy.uint8)
    return numpy.concatenate([rgb, alpha], axis=2).transpose(2, 0, 1), None


def grey_bands(rgb: numpy.ndarray) -> tuple:
    """One band of ITU-R 601 luma (Pillow's "L")."""
    return numpy.asarray(Image.fromarray(rgb).convert("L"))[numpy.newaxis], None


def palette_bands(rgb: numpy.ndarray) -> tuple:
    """One band of indices into a colour map of the map's own colours (it has few)."""
    packed = (rgb[..., 0].astype(numpy.uint32) << 16) | (rgb[..., 1].astype(numpy.uint32) << 8) \
        | rgb[..., 2]
    colours, index = numpy.unique(packed, return_inverse=True)
    if len(colours) > 256:
        raise ValueError(f"{len(colours)} colours do not fit a palette")
    colormap = {n: (int(c >> 16), int(c >> 8 & 255), int(c & 255), 255)
                for n, c in enumerate(colours)}
    return index.reshape(rgb.shape[:2]).astype(numpy.uint8)[numpy.newaxis], colormap


def cmyk_bands(rgb: numpy.ndarray) -> tuple:
    """Cyan, magenta, yellow and a real black (K = 255 - max(R, G, B)), as press files
    separate them."""
    values = rgb.astype(numpy.float32)
    k = 255 - values.max(axis=2)
    room = numpy.where(k < 255, 255 - k, 1)
    cmy = (255 - values - k[..., numpy.newaxis]) * 255 / room[..., numpy.newaxis]
    cmyk = numpy.concatenate([cmy, k[..., numpy.newaxis]], axis=2)
    return numpy.rint(cmyk).astype(numpy.uint8).transpose(2, 0, 1), None


def uint16_bands(rgb: numpy.ndarray) -> tuple:
    """RGB stretched to 16 bits (x 257: 255 becomes 65535)."""
    return rgb.transpose(2, 0, 1).astype(numpy.uint16) * 257, None


def tinted_bands(rgb: numpy.ndarray) -> tuple:
    """Paper tinted, then scanner noise on every pixel (seeded: the same bytes each time)."""
    paper = (rgb == 255).all(axis=2)
    tinted = numpy.where(paper[..., numpy.newaxis], numpy.array(TINT, numpy.uint8), rgb)
    noise = numpy.random.default_rng(NOISE_SEED).normal(0, NOISE_SIGMA, rgb.shape)
    noisy = numpy.clip(tinted + numpy.rint(noise), 0, 255).astype(numpy.uint8)
    return noisy.transpose(2, 0, 1), None


def skewed(rgb: numpy.ndarray, degrees: float, surround, pad: float = 0.04) -> tuple:
    """(pixels, sheet mask): the sheet turned by `degrees` inside a surround of one colour
    (a scanner bed, a warped map's collar), `pad` of the size added on each side."""
    sheet = Image.fromarray(rgb).rotate(degrees, resample=Image.Resampling.NEAREST,
                                        expand=True, fillcolor=tuple(surround))
    inside = Image.new("L", (rgb.shape[1], rgb.shape[0]), 255).rotate(
        degrees, resample=Image.Resampling.NEAREST, expand=True, fillcolor=0)
    margin = (round(pad * rgb.shape[1]), round(pad * rgb.shape[0]))
    size = (sheet.width + 2 * margin[0], sheet.height + 2 * margin[1])
    canvas = Image.new("RGB", size, tuple(surround))
    canvas.paste(sheet, margin)
    mask = Image.new("L", size, 0)
    mask.paste(inside, margin)
    return numpy.asarray(canvas), numpy.asarray(mask) > 0


def noisy(rgb: numpy.ndarray, sigma: float = NOISE_SIGMA) -> numpy.ndarray:
    noise = numpy.random.default_rng(NOISE_SEED).normal(0, sigma, rgb.shape)
    return numpy.clip(rgb + numpy.rint(noise), 0, 255).astype(numpy.uint8)


def collar_bands(rgb: numpy.ndarray) -> tuple:
    """A warped map: the sheet turned 3 degrees in a collar of 0, nodata 0. Its darkest
    ink is lifted off 0, as a resampled scan's is, so that only the collar is nodata."""
    lifted = numpy.maximum(rgb, 12)
    pixels, _ = skewed(lifted, 3, (0, 0, 0))
    return pixels.transpose(2, 0, 1), None


def mask_band_bands(rgb: numpy.ndarray) -> tuple:
    """The sheet turned 2 degrees in a dark noisy surround that an internal mask band
    (GDAL's per-dataset mask) marks invalid."""
    pixels, sheet = skewed(rgb, 2, (40, 40, 40))
    surround = noisy(pixels, 20)
    pixels = numpy.where(sheet[..., None], pixels, surround)
    return pixels.transpose(2, 0, 1), None, sheet


def bed_bands(rgb: numpy.ndarray) -> tuple:
    """A scan: the sheet turned 2 degrees on a grey scanner bed, noise on everything, and
    no mask at all."""
    pixels, _ = skewed(rgb, 2, (96, 96, 100), pad=0.06)
    return noisy(pixels, 4).transpose(2, 0, 1), None


def miniswhite_bands(rgb: numpy.ndarray) -> tuple:
    """Grey stored as MINISWHITE (0 is white), as some scanners write it."""
    grey, _ = grey_bands(rgb)
    return 255 - grey, None


def grey_alpha_bands(rgb: numpy.ndarray) -> tuple:
    """Grey plus alpha: the sheet turned 2 degrees, transparent (and black) around it."""
    pixels, sheet = skewed(rgb, 2, (0, 0, 0))
    grey = numpy.asarray(Image.fromarray(pixels).convert("L"))
    alpha = numpy.where(sheet, 255, 0).astype(numpy.uint8)
    return numpy.stack([grey, alpha]), None


def float32_bands(rgb: numpy.ndarray) -> tuple:
    """RGB as 32-bit floats from 0 to 1 (what a processing chain leaves)."""
    return (rgb.transpose(2, 0, 1) / 255.0).astype(numpy.float32), None


def bilevel_bands(rgb: numpy.ndarray) -> tuple:
    """One bit a pixel, black ink (0) on white (1): a fax-style scan, luma below 140."""
    grey, _ = grey_bands(rgb)
    return (grey >= BILEVEL_CUT).astype(numpy.uint8), None


# ---------------------------------------------------------------- the variants


@dataclass(frozen=True)
class Variant:
    """One way of writing the map: rasterio's creation profile, how RGB becomes bands, the
    CRS (None: no georeferencing at all) and what describe() must show on reading back."""

    name: str
    what: str
    profile: dict
    expect: dict
    bands: object = rgb_bands
    crs: str | None = sample_map.CRS

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None


GTIFF = {"driver": "GTiff"}
TILED = {"tiled": True, "blockxsize": 256, "blockysize": 256}
VARIANT_LIST = [
    Variant("strips", "uncompressed 8-bit RGB in strips (what sample_map wrote before)",
            {**GTIFF}, {"compress": None, "tiled": False}),
    Variant("lzw", "LZW", {**GTIFF, "compress": "lzw"}, {"compress": "lzw"}),
    Variant("deflate", "deflate with a horizontal predictor, in UTM zone 13N (NAD83)",
            {**GTIFF, "compress": "deflate", "predictor": 2},
            {"compress": "deflate", "crs": UTM_13N_NAD83}, crs=UTM_13N_NAD83),
    Variant("jpeg", "JPEG in YCbCr, quality 90 (lossy: colours and edges blur)",
            {**GTIFF, **TILED, "compress": "jpeg", "photometric": "ycbcr",
             "jpeg_quality": JPEG_QUALITY}, {"compress": "jpeg", "photometric": "ycbcr"}),
    Variant("packbits", "PackBits", {**GTIFF, "compress": "packbits"},
            {"compress": "packbits"}),
    Variant("tiled", "uncompressed, 256 px tiles", {**GTIFF, **TILED},
            {"compress": None, "tiled": True}),
    Variant("cog", "Cloud-Optimized GeoTIFF (as the CDR serves maps), UTM zone 13N (WGS 84)",
            {"driver": "COG", "compress": "deflate", "blocksize": 256,
             "overview_resampling": "nearest"},
            {"compress": "deflate", "tiled": True, "overviews": True, "crs": UTM_13N_WGS84,
             "colorinterp": ["red", "green", "blue"]},
            crs=UTM_13N_WGS84),
    Variant("cog_nocrs", "Cloud-Optimized GeoTIFF without a CRS or transform",
            {"driver": "COG", "compress": "lzw", "blocksize": 256,
             "overview_resampling": "nearest"},
            {"compress": "lzw", "tiled": True, "overviews": True, "crs": None,
             "transform": False}, crs=None),
    Variant("bigtiff", "BigTIFF (64-bit offsets), LZW",
            {**GTIFF, "compress": "lzw", "bigtiff": "YES"}, {"bigtiff": True}),
    Variant("palette", "one band of indices with a colour map",
            {**GTIFF, "compress": "lzw", "photometric": "palette"},
            {"count": 1, "colormap": True, "colorinterp": ["palette"]}, bands=palette_bands),
    Variant("grey", "one band of grey levels", {**GTIFF, "compress": "lzw"},
            {"count": 1, "colormap": False, "colorinterp": ["gray"]}, bands=grey_bands),
    Variant("rgba", "RGB plus an alpha band", {**GTIFF, "compress": "lzw", "alpha": "YES"},
            {"count": 4, "colorinterp": ["red", "green", "blue", "alpha"]}, bands=rgba_bands),
    Variant("cmyk", "CMYK (PHOTOMETRIC=SEPARATED) with a real black",
            {**GTIFF, "compress": "lzw", "photometric": "cmyk"},
            {"count": 4, "photometric": "cmyk"}, bands=cmyk_bands),
    Variant("uint16", "16 bits per channel", {**GTIFF, "compress": "lzw", "photometric": "rgb"},
            {"dtype": "uint16", "colorinterp": ["red", "green", "blue"]}, bands=uint16_bands),
    Variant("band_interleaved", "band-interleaved (PLANARCONFIG=SEPARATE), LZW",
            {**GTIFF, "compress": "lzw", "interleave": "band"}, {"interleave": "band"}),
    Variant("tinted", "tinted paper with scanner noise", {**GTIFF, "compress": "lzw"},
            {"compress": "lzw"}, bands=tinted_bands),
    Variant("plain", "no georeferencing at all (most scans), LZW, tiled: the demo map",
            {**GTIFF, **TILED, "compress": "lzw"}, {"crs": None, "transform": False},
            crs=None),
]
COG = {"driver": "COG", "blocksize": 256}
# The kinds of issue 23: COGs as GDAL's COG driver writes them by default (CUBIC
# overviews), masks, collars and beds, and the odd photometrics
KIND_LIST = [
    Variant("cog_cubic", "COG, deflate, with the driver's default (CUBIC) overviews",
            {**COG, "compress": "deflate"}, {"compress": "deflate", "overviews": True}),
    Variant("cog_jpeg75", "COG, YCbCr JPEG at quality 75",
            {**COG, "compress": "jpeg", "quality": 75},
            {"compress": "jpeg", "photometric": "ycbcr", "overviews": True}),
    Variant("cog_zstd", "COG, ZSTD", {**COG, "compress": "zstd"}, {"compress": "zstd"}),
    Variant("cog_webp", "COG, WEBP (lossy, level 75)", {**COG, "compress": "webp"},
            {"compress": "webp"}),
    Variant("cog_lerc", "COG, LERC", {**COG, "compress": "lerc"}, {"compress": "lerc"}),
    Variant("collar", "warped: turned 3 degrees in a nodata collar (0)",
            {**GTIFF, **TILED, "compress": "lzw", "nodata": 0}, {"compress": "lzw"},
            bands=collar_bands),
    Variant("mask_band", "turned 2 degrees, the surround masked by an internal mask band",
            {**GTIFF, **TILED, "compress": "deflate"}, {"compress": "deflate"},
            bands=mask_band_bands),
    Variant("scanner_bed", "a noisy scan turned 2 degrees on a grey scanner bed",
            {**GTIFF, **TILED, "compress": "lzw"}, {"compress": "lzw"}, bands=bed_bands,
            crs=None),
    Variant("miniswhite", "one band of grey stored MINISWHITE",
            {**GTIFF, "compress": "lzw", "photometric": "miniswhite"},
            {"count": 1, "colorinterp": ["undefined"]}, bands=miniswhite_bands, crs=None),
    Variant("grey_alpha", "grey plus alpha, transparent around a turned sheet",
            {**GTIFF, "compress": "lzw", "photometric": "minisblack", "alpha": "YES"},
            {"count": 2, "colorinterp": ["gray", "alpha"]}, bands=grey_alpha_bands),
    Variant("float32", "RGB as 32-bit floats 0..1", {**GTIFF, "compress": "lzw",
                                                     "photometric": "rgb"},
            {"dtype": "float32"}, bands=float32_bands),
    Variant("g4", "1-bit black and white, CCITT G4",
            {**GTIFF, "compress": "ccittfax4", "nbits": 1},
            {"count": 1, "compress": "ccittfax4", "colorinterp": ["palette"]},
            bands=bilevel_bands, crs=None),
]
VARIANTS = {v.name: v for v in VARIANT_LIST}
KINDS = {v.name: v for v in KIND_LIST}
ALL = {**VARIANTS, **KINDS}


# ---------------------------------------------------------------- writing and reading back


def bounds_in(crs: str) -> tuple:
    """The sample map's ground (EPSG:4267 bounds) as (west, south, east, north) in crs."""
    if crs == sample_map.CRS:
        return sample_map.BOUNDS
    return transform_bounds(sample_map.CRS, crs, *sample_map.BOUNDS, densify_pts=21)


def write_variant(v: Variant, rgb: numpy.ndarray, path: str) -> str:
    """Write the (rows, columns, 3) RGB pixels as variant v at path; path."""
    bands, colormap, *mask = v.bands(rgb)
    height, width = bands.shape[1:]
    profile = {**v.profile, "width": width, "height": height, "count": bands.shape[0],
               "dtype": bands.dtype.name}
    if v.georeferenced:
        profile.update(crs=v.crs,
                       transform=sample_map.transform_of(bounds_in(v.crs), width, height))
    # the COG driver copies a scratch dataset that does not say its bands are RGB
    colorinterp = RGB if v.profile["driver"] == "COG" else None
    return sample_map.write_raster(path, bands, profile, colormap=colormap,
                                   colorinterp=colorinterp, mask=mask[0] if mask else None)


def describe(path: str) -> dict:
    """What GDAL sees in the file: the facts a Variant's `expect` names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            structure = src.tags(ns="IMAGE_STRUCTURE")
            try:
                src.colormap(1)
                colormap = True
            except ValueError:
                colormap = False
            facts = {
                "driver": src.driver,
                "count": src.count,
                "dtype": src.dtypes[0],
                "compress": src.compression.name.lower() if src.compression else None,
                "tiled": bool(src.profile.get("tiled")),
                "interleave": src.interleaving.name.lower() if src.interleaving else None,
                "photometric": structure.get("SOURCE_COLOR_SPACE",
                                             src.photometric.name if src.photometric
                                             else "").lower() or None,
                "colorinterp": [c.name for c in src.colorinterp],
                "colormap": colormap,
                "crs": src.crs.to_string() if src.crs else None,
                "transform": not src.transform.is_identity,
                "overviews": bool(src.overviews(1)),
                "size": (src.width, src.height),
            }
    with open(path, "rb") as f:
        facts["bigtiff"] = f.read(4)[2:4] == b"+\x00"
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write every variant of the sample map.")
    parser.add_argument("dest", help="folder to write <variant>.tif into")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--drawing", default="peach", choices=sorted(sample_map.DRAWINGS))
    args = parser.parse_args(argv)
    rgb = sample_map.draw_sample_map(args.width, args.height,
                                     sample_map.DRAWINGS[args.drawing])
    for name in args.only or ALL:
        path = write_variant(ALL[name], rgb, os.path.join(args.dest, f"{name}.tif"))
        print(f"{name:18} {os.path.getsize(path):>10} bytes  {ALL[name].what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
