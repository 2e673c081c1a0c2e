"""Draw the deterministic sample map the stand-in modules are tested on, and write it as a
compressed, tiled GeoTIFF (or, with --no-georef, a plain TIFF the way most scans come).

Run: python modules/sample_map.py DEST.tif [--width 1000 --height 800] [--no-georef]
Or import it: draw_sample_map(width, height) gives the pixels (numpy, rows x columns x RGB);
write_sample_map(path, width=1000, height=800, georeferenced=True) writes the file.

The picture is a toy geological map. On the left (about 75% of the width) the map area,
inside a grey frame (neatline): six coloured polygon units, three black lines (faults) and
six red triangles (point symbols). On the right the legend: one swatch per unit, then a
line swatch and a point swatch, each followed by its label in grey text. The unit colours
have distinct grey levels, so a greyscale copy of the map still tells them apart.
Georeferenced, it sits across the Wyoming/Colorado border in EPSG:4267 (NAD27), 0.5 x 0.4
degrees whatever the pixel size. Drawn with Pillow (fills in C, no per-pixel Python, so
12,000 x 9,000 px takes seconds), written with rasterio (GDAL): LZW, 256 px tiles. No
randomness and no timestamps: the same size always gives the same bytes.
"""

import argparse
import os
import sys
import warnings

import numpy
import rasterio
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

# Everything is laid out on a 1000 x 800 design canvas and scaled to the requested size.
DESIGN_WIDTH = 1000
DESIGN_HEIGHT = 800
MIN_WIDTH = 200
MIN_HEIGHT = 160

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
RED = (220, 30, 30)
LABEL_GREY = (128, 128, 128)
FRAME_GREY = LABEL_GREY
# Grey levels (ITU-R 601 luma) about 226, 205, 187, 164, 147 and 108: twenty apart, clear
# of the label grey (128), the red of the points (87) and the paper.
UNIT_COLOURS = [
    (250, 228, 150),  # unit 1, the background of the map area
    (185, 225, 150),
    (245, 170, 120),
    (135, 165, 230),
    (190, 115, 195),
    (60, 130, 125),
]
UNIT_LABELS = ["Qal  Alluvium", "Tw  Wasatch Fm.", "Kmv  Mesaverde", "Jm  Morrison Fm.",
               "Trc  Chugwater", "Xg  Granite"]
LINE_LABEL = "Fault"
POINT_LABEL = "Mine or prospect"

MAP_AREA = (20, 20, 740, 780)
# (kind, colour index, shape): ellipses are (cx, cy, rx, ry), rectangles (x0, y0, x1, y1)
UNIT_SHAPES = [
    ("ellipse", 1, (200, 200, 140, 110)),
    ("ellipse", 2, (560, 420, 150, 120)),
    ("rect", 3, (60, 420, 330, 720)),
    ("ellipse", 4, (520, 700, 180, 80)),
    ("rect", 5, (420, 60, 700, 180)),
]
FAULTS = [((60, 120), (700, 260)), ((80, 740), (690, 560)), ((380, 330), (420, 500))]
POINT_SYMBOLS = [(150, 330), (620, 360), (250, 560), (480, 560), (660, 120), (100, 620)]

LEGEND_SWATCH_X = (790, 850)
LEGEND_LABEL_X = 865
LEGEND_UNIT_TOP = 60
LEGEND_UNIT_PITCH = 50
LEGEND_SWATCH_HEIGHT = 30
LEGEND_LINE_Y = 435
LEGEND_POINT_Y = 485

# Wyoming/Colorado border country: 0.5 x 0.4 degrees whatever the pixel size
WEST_LONGITUDE = -106.5
NORTH_LATITUDE = 41.25
SPAN_LONGITUDE = 0.5
SPAN_LATITUDE = 0.4
CRS = "EPSG:4267"
BOUNDS = (WEST_LONGITUDE, NORTH_LATITUDE - SPAN_LATITUDE,
          WEST_LONGITUDE + SPAN_LONGITUDE, NORTH_LATITUDE)
TILE = 256


# ---------------------------------------------------------------- drawing


class Sheet:
    """A Pillow canvas drawn in design coordinates (1000 x 800), scaled to its pixel size."""

    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (width, height), WHITE)
        self.draw = ImageDraw.Draw(self.image)
        self.draw.fontmode = "1"  # no anti-aliasing: every pixel is paper or one ink colour
        self.sx = width / DESIGN_WIDTH
        self.sy = height / DESIGN_HEIGHT
        self.scale = min(self.sx, self.sy)

    def xy(self, x: float, y: float) -> tuple:
        return round(x * self.sx), round(y * self.sy)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list:
        """Pillow's inclusive pixel box of the design box [x0, x1) x [y0, y1)."""
        left, top = self.xy(x0, y0)
        right, bottom = self.xy(x1, y1)
        return [left, top, max(left, right - 1), max(top, bottom - 1)]

    def rect(self, box, colour) -> None:
        self.draw.rectangle(self.box(*box), fill=colour)

    def ellipse(self, shape, colour) -> None:
        cx, cy, rx, ry = shape
        self.draw.ellipse(self.box(cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)

    def line(self, start, end, thickness: int, colour) -> None:
        self.draw.line([self.xy(*start), self.xy(*end)], fill=colour, width=thickness)

    def triangle(self, centre, size: int, colour) -> None:
        """An upward triangle `size` pixels tall centred on a design-space point."""
        cx, cy = self.xy(*centre)
        top, half = cy - size // 2, size // 2
        self.draw.polygon([(cx, top), (cx + half, top + size - 1), (cx - half, top + size - 1)],
                          fill=colour)

    def label(self, x: float, middle: float, text: str, font) -> None:
        self.draw.text(self.xy(x, middle), text, fill=LABEL_GREY, font=font, anchor="lm")


def draw_map_area(sheet: Sheet, thickness: int, symbol: int) -> None:
    sheet.rect(MAP_AREA, UNIT_COLOURS[0])
    for kind, unit, shape in UNIT_SHAPES:
        if kind == "rect":
            sheet.rect(shape, UNIT_COLOURS[unit])
        else:
            sheet.ellipse(shape, UNIT_COLOURS[unit])
    for start, end in FAULTS:
        sheet.line(start, end, thickness, BLACK)
    for centre in POINT_SYMBOLS:
        sheet.triangle(centre, symbol, RED)
    frame = max(2, round(2 * sheet.scale))
    sheet.draw.rectangle(sheet.box(*MAP_AREA), outline=FRAME_GREY, width=frame)


def draw_legend(sheet: Sheet, thickness: int, symbol: int) -> None:
    font = ImageFont.load_default(size=max(10, round(14 * sheet.scale)))
    sx0, sx1 = LEGEND_SWATCH_X
    for n, (colour, text) in enumerate(zip(UNIT_COLOURS, UNIT_LABELS, strict=True)):
        top = LEGEND_UNIT_TOP + n * LEGEND_UNIT_PITCH
        sheet.rect((sx0, top, sx1, top + LEGEND_SWATCH_HEIGHT), colour)
        sheet.label(LEGEND_LABEL_X, top + LEGEND_SWATCH_HEIGHT / 2, text, font)
    sheet.line((sx0 + 2, LEGEND_LINE_Y), (sx1 - 2, LEGEND_LINE_Y), thickness, BLACK)
    sheet.label(LEGEND_LABEL_X, LEGEND_LINE_Y, LINE_LABEL, font)
    sheet.triangle(((sx0 + sx1) / 2, LEGEND_POINT_Y), symbol, RED)
    sheet.label(LEGEND_LABEL_X, LEGEND_POINT_Y, POINT_LABEL, font)


def draw_sample_map(width: int = 1000, height: int = 800) -> numpy.ndarray:
    """The sample map's pixels: a (height, width, 3) uint8 RGB array.
    Raises ValueError below 200 x 160 pixels."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"the sample map needs at least {MIN_WIDTH} x {MIN_HEIGHT} pixels")
    sheet = Sheet(width, height)
    # line and symbol sizes keep a floor so small test maps stay detectable
    thickness = max(4, round(4 * sheet.scale))
    symbol = max(11, round(15 * sheet.scale))
    draw_map_area(sheet, thickness, symbol)
    draw_legend(sheet, thickness, symbol)
    return numpy.asarray(sheet.image)


# ---------------------------------------------------------------- writing


def transform_of(bounds: tuple, width: int, height: int) -> Affine:
    """The north-up pixel -> CRS transform of (west, south, east, north) over the pixels."""
    west, south, east, north = bounds
    return Affine((east - west) / width, 0.0, west, 0.0, (south - north) / height, north)


def geotiff_profile(width: int, height: int, georeferenced: bool = True) -> dict:
    """rasterio's profile for the sample map: 8-bit RGB, LZW, tiled; CRS and transform
    when georeferenced."""
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3,
               "dtype": "uint8", "photometric": "RGB", "compress": "lzw", "tiled": True,
               "blockxsize": TILE, "blockysize": TILE}
    if georeferenced:
        profile.update(crs=CRS, transform=transform_of(BOUNDS, width, height))
    return profile


def write_raster(path: str, bands: numpy.ndarray, profile: dict, colormap=None,
                 colorinterp=None) -> str:
    """Write (bands, rows, columns) pixels with rasterio to path atomically, with a colour
    map for band 1 ({index: (r, g, b, a)}) and the bands' colour interpretations (a list of
    rasterio ColorInterp) when given; path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with warnings.catch_warnings():
            # a map without georeferencing is what this writes on purpose
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(bands)
                if colormap:
                    dst.write_colormap(1, colormap)
                if colorinterp:
                    dst.colorinterp = colorinterp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".aux.xml"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def write_sample_map(path: str, width: int = 1000, height: int = 800,
                     georeferenced: bool = True) -> str:
    """Draw the sample map and write it to path (atomically); path.
    Raises ValueError below 200 x 160 pixels."""
    rgb = draw_sample_map(width, height)
    return write_raster(path, rgb.transpose(2, 0, 1),
                        geotiff_profile(width, height, georeferenced))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the deterministic sample map.")
    parser.add_argument("dest", help="where to write the .tif")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--no-georef", action="store_true",
                        help="write no CRS and no transform, as a plain scan comes")
    args = parser.parse_args(argv)
    try:
        write_sample_map(args.dest, args.width, args.height, not args.no_georef)
    except ValueError as exc:
        parser.error(str(exc))
    kind = "TIFF without georeferencing" if args.no_georef else f"GeoTIFF in {CRS}"
    print(f"wrote {args.dest} ({args.width} x {args.height}, {kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
