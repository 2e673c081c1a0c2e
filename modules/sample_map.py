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
from dataclasses import dataclass

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
# (kind, colour index, shape): ellipses are (cx, cy, rx, ry), rectangles (x0, y0, x1, y1),
# polygons a tuple of (x, y) vertices
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
# design pixels from a swatch's right edge to its label, and from the last unit's slot to
# the line's: the fixture's own spacing
LABEL_GUTTER = LEGEND_LABEL_X - LEGEND_SWATCH_X[1]
LEGEND_GROUP_GAP = LEGEND_LINE_Y - LEGEND_SWATCH_HEIGHT // 2 - LEGEND_UNIT_TOP \
    - len(UNIT_COLOURS) * LEGEND_UNIT_PITCH


@dataclass(frozen=True)
class Drawing:
    """One toy map in design coordinates (1000 x 800): its units (colour 0 fills the map
    area), faults and point symbols, and a legend whose items (units, then the line, then
    the point) run down columns from `legend_origin`, `legend_rows` items a column,
    `column_pitch` design px apart; the line item comes after a wider gap."""

    name: str
    map_area: tuple = MAP_AREA
    colours: tuple = tuple(UNIT_COLOURS)
    labels: tuple = tuple(UNIT_LABELS)
    shapes: tuple = tuple(UNIT_SHAPES)
    faults: tuple = tuple(FAULTS)
    points: tuple = tuple(POINT_SYMBOLS)
    line_colour: tuple = BLACK
    point_colour: tuple = RED
    legend_origin: tuple = (LEGEND_SWATCH_X[0], LEGEND_UNIT_TOP)
    legend_rows: int = 8
    column_pitch: int = 0
    row_pitch: int = LEGEND_UNIT_PITCH
    swatch_size: tuple = (LEGEND_SWATCH_X[1] - LEGEND_SWATCH_X[0], LEGEND_SWATCH_HEIGHT)
    legend_side: str = "right"

    def legend_slots(self) -> list:
        """[(kind, design x, top y)] of each legend item: 'unit' n, 'line', 'point'."""
        kinds = [("unit", n) for n in range(len(self.colours))] + [("line", 0), ("point", 0)]
        slots = []
        for n, kind in enumerate(kinds):
            column, row = divmod(n, self.legend_rows)
            x = self.legend_origin[0] + column * self.column_pitch
            y = self.legend_origin[1] + row * self.row_pitch
            # the line and points sit below a wider gap when they share a column with units
            if kind[0] != "unit" and row >= len(self.colours) - column * self.legend_rows > 0:
                y += LEGEND_GROUP_GAP
            slots.append((kind, x, y))
        return slots


# Each drawing's unit colours, symbol and line colours have grey levels at least 15 apart
# (as the fixture's), so that a grey copy still tells them apart.
# The fixture: the map every other test uses, legend right in one column
PEACH = Drawing("peach")
# legend on the left, map on the right: wide and narrow units, a polygon unit, dark ink
LEFT = Drawing(
    "left", map_area=(300, 30, 980, 770),
    colours=((200, 230, 240), (240, 200, 80), (150, 200, 110), (230, 120, 150),
             (110, 120, 200), (140, 100, 70)),
    labels=("Qt  Terrace", "Tgr  Green River", "Kf  Frontier", "Jn  Nugget", "Pp  Park City",
            "Wr  Gneiss"),
    shapes=(("rect", 1, (340, 60, 940, 200)),
            ("polygon", 2, ((360, 260), (620, 240), (700, 420), (420, 480))),
            ("ellipse", 3, (820, 380, 110, 150)),
            ("rect", 4, (360, 560, 560, 740)),
            ("ellipse", 5, (760, 650, 60, 60))),
    faults=(((320, 520), (960, 500)), ((640, 60), (700, 740))),
    points=((420, 220), (880, 240), (500, 330), (900, 560), (420, 520), (620, 600),
            (860, 740), (700, 120), (560, 700)),
    line_colour=(60, 40, 30), point_colour=(200, 0, 160),
    legend_origin=(40, 80), row_pitch=60, swatch_size=(70, 36), legend_side="left")
# legend below the map, in two columns
BELOW = Drawing(
    "below", map_area=(30, 20, 970, 520),
    colours=((235, 235, 150), (250, 180, 160), (150, 190, 240), (200, 160, 100),
             (120, 170, 120), (90, 90, 160)),
    shapes=(("rect", 1, (60, 50, 400, 250)), ("ellipse", 2, (650, 180, 200, 110)),
            ("polygon", 3, ((100, 300), (420, 330), (380, 500), (80, 480))),
            ("ellipse", 4, (820, 420, 90, 70)), ("rect", 5, (500, 380, 640, 500))),
    faults=(((50, 280), (950, 300)), ((480, 40), (520, 500)), ((700, 500), (950, 340))),
    points=((200, 150), (800, 100), (250, 400), (600, 300), (900, 250)),
    line_colour=BLACK, point_colour=(200, 0, 0),
    legend_origin=(60, 560), legend_rows=4, column_pitch=420, row_pitch=45,
    legend_side="below")
# legend right in two columns, small units
COLUMNS = Drawing(
    "columns", map_area=(20, 20, 560, 780),
    labels=("Qs  Sand", "Tb  Basalt", "Kc  Chalk", "Js  Shale", "Tr  Redbed", "Xq  Quartz"),
    shapes=(("ellipse", 1, (150, 150, 80, 70)), ("rect", 2, (350, 100, 560, 300)),
            ("ellipse", 3, (200, 450, 120, 100)), ("rect", 4, (380, 520, 560, 740)),
            ("polygon", 5, ((60, 600), (250, 640), (200, 760), (50, 750)))),
    faults=(((40, 360), (540, 330)), ((300, 40), (330, 760))),
    points=((100, 300), (500, 420), (150, 700), (450, 60), (540, 760), (260, 560), (80, 80)),
    legend_origin=(610, 60), legend_rows=4, column_pitch=190, legend_side="right")
# legend above the map, in three columns of three, big units
ABOVE = Drawing(
    "above", map_area=(20, 200, 980, 780),
    colours=((250, 225, 140), (180, 220, 200), (240, 170, 170), (160, 160, 220),
             (210, 140, 60), (80, 120, 80)),
    labels=("Qa  Alluvium", "Tv  Volcanics", "Kp  Pierre Sh.", "Jsm  Sundance",
            "Pmc  Minnelusa", "Xgr  Granite"),
    shapes=(("rect", 1, (40, 220, 480, 480)), ("ellipse", 2, (740, 360, 200, 130)),
            ("polygon", 3, ((60, 540), (500, 520), (560, 760), (40, 760))),
            ("rect", 4, (620, 560, 960, 760)), ("ellipse", 5, (780, 660, 80, 60))),
    faults=(((30, 500), (970, 520)), ((560, 210), (600, 770))),
    points=((200, 300), (400, 420), (850, 260), (300, 650), (700, 700), (900, 560)),
    line_colour=BLACK, point_colour=(0, 0, 200),
    legend_origin=(40, 30), legend_rows=3, column_pitch=320, row_pitch=45,
    legend_side="above")
DRAWINGS = {d.name: d for d in (PEACH, LEFT, BELOW, COLUMNS, ABOVE)}

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


def draw_map_area(sheet: Sheet, drawing: Drawing, thickness: int, symbol: int) -> None:
    sheet.rect(drawing.map_area, drawing.colours[0])
    for kind, unit, shape in drawing.shapes:
        if kind == "rect":
            sheet.rect(shape, drawing.colours[unit])
        elif kind == "polygon":
            sheet.draw.polygon([sheet.xy(*p) for p in shape], fill=drawing.colours[unit])
        else:
            sheet.ellipse(shape, drawing.colours[unit])
    for start, end in drawing.faults:
        sheet.line(start, end, thickness, drawing.line_colour)
    for centre in drawing.points:
        sheet.triangle(centre, symbol, drawing.point_colour)
    frame = max(2, round(2 * sheet.scale))
    sheet.draw.rectangle(sheet.box(*drawing.map_area), outline=FRAME_GREY, width=frame)


def draw_legend(sheet: Sheet, drawing: Drawing, thickness: int, symbol: int) -> None:
    font = ImageFont.load_default(size=max(10, round(14 * sheet.scale)))
    width, height = drawing.swatch_size
    texts = list(drawing.labels) + [LINE_LABEL, POINT_LABEL]
    for ((kind, n), x, top), text in zip(drawing.legend_slots(), texts, strict=True):
        middle = top + height / 2
        if kind == "unit":
            sheet.rect((x, top, x + width, top + height), drawing.colours[n])
        elif kind == "line":
            middle = top + LEGEND_SWATCH_HEIGHT // 2
            sheet.line((x + 2, middle), (x + width - 2, middle), thickness,
                       drawing.line_colour)
        else:
            middle = top + LEGEND_SWATCH_HEIGHT // 2
            sheet.triangle((x + width / 2, middle), symbol, drawing.point_colour)
        sheet.label(x + width + LABEL_GUTTER, middle, text, font)


def draw_sample_map(width: int = 1000, height: int = 800,
                    drawing: Drawing = PEACH) -> numpy.ndarray:
    """A drawing's pixels (the fixture's by default): a (height, width, 3) uint8 RGB
    array. Raises ValueError below 200 x 160 pixels."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"the sample map needs at least {MIN_WIDTH} x {MIN_HEIGHT} pixels")
    sheet = Sheet(width, height)
    # line and symbol sizes keep a floor so small test maps stay detectable
    thickness = max(4, round(4 * sheet.scale))
    symbol = max(11, round(15 * sheet.scale))
    draw_map_area(sheet, drawing, thickness, symbol)
    draw_legend(sheet, drawing, thickness, symbol)
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
                 colorinterp=None, mask=None) -> str:
    """Write (bands, rows, columns) pixels with rasterio to path atomically, with a colour
    map for band 1 ({index: (r, g, b, a)}), the bands' colour interpretations (a list of
    rasterio ColorInterp) and a (rows, columns) bool mask band (True: valid) when given;
    path."""
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
                if mask is not None:
                    dst.write_mask(mask)
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
