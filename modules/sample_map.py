"""Write the small deterministic sample map GeoTIFF the stand-in modules are tested on.

Run: python modules/sample_map.py DEST.tif [--width 1000 --height 800]
Or import it: write_sample_map(path, width=1000, height=800).

The picture is a toy geological map: a map area on the left (about 75% of the width)
filled with six coloured polygon units, three straight black lines (faults) and six red
triangles (point symbols); on the right a legend panel with one swatch per unit, then a
line swatch and a point swatch, each followed by a grey bar standing in for label text.
The file is an uncompressed 8-bit RGB TIFF in strips with GeoTIFF tags placing it across
the Wyoming/Colorado border in EPSG:4267 (NAD27). No randomness and no timestamps, so
the same size always gives the same bytes. Standard library only.
"""

import argparse
import os
import struct
import sys

# Everything is laid out on a 1000 x 800 design canvas and scaled to the requested size.
DESIGN_WIDTH = 1000
DESIGN_HEIGHT = 800

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
RED = (220, 30, 30)
LABEL_GREY = (128, 128, 128)
UNIT_COLOURS = [
    (245, 225, 140),  # unit 1, the background of the map area
    (150, 200, 120),
    (240, 160, 110),
    (140, 170, 230),
    (200, 140, 200),
    (120, 200, 200),
]

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
LEGEND_LABEL_LENGTHS = [90, 70, 110, 60, 100, 80, 95, 75]
LEGEND_LINE_Y = 435
LEGEND_POINT_Y = 485

# Wyoming/Colorado border country: 0.5 x 0.4 degrees whatever the pixel size
WEST_LONGITUDE = -106.5
NORTH_LATITUDE = 41.25
SPAN_LONGITUDE = 0.5
SPAN_LATITUDE = 0.4
EPSG_NAD27 = 4267


# ---------------------------------------------------------------- drawing


class Canvas:
    """An RGB bytearray with the few fill operations the sample map needs."""

    def __init__(self, width: int, height: int):
        self.width = width
        self.height = height
        self.rgb = bytearray(b"\xff" * (width * height * 3))
        self.sx = width / DESIGN_WIDTH
        self.sy = height / DESIGN_HEIGHT

    def span(self, y: int, x0: int, x1: int, colour) -> None:
        """Fill row y from x0 up to x1 (pixels, clipped to the canvas)."""
        x0, x1 = max(0, x0), min(self.width, x1)
        if 0 <= y < self.height and x0 < x1:
            start = (y * self.width + x0) * 3
            self.rgb[start:start + (x1 - x0) * 3] = bytes(colour) * (x1 - x0)

    def rect(self, box, colour, clip=None) -> None:
        """Fill a design-space rectangle, optionally clipped to a design-space box."""
        x0, y0, x1, y1 = box
        if clip:
            x0, y0 = max(x0, clip[0]), max(y0, clip[1])
            x1, y1 = min(x1, clip[2]), min(y1, clip[3])
        for y in range(round(y0 * self.sy), round(y1 * self.sy)):
            self.span(y, round(x0 * self.sx), round(x1 * self.sx), colour)

    def ellipse(self, shape, colour, clip) -> None:
        """Fill a design-space ellipse (cx, cy, rx, ry) clipped to a design-space box."""
        cx, cy, rx, ry = (shape[0] * self.sx, shape[1] * self.sy,
                          shape[2] * self.sx, shape[3] * self.sy)
        left, top = round(clip[0] * self.sx), round(clip[1] * self.sy)
        right, bottom = round(clip[2] * self.sx), round(clip[3] * self.sy)
        for y in range(max(top, round(cy - ry)), min(bottom, round(cy + ry))):
            half = rx * max(0.0, 1 - ((y + 0.5 - cy) / ry) ** 2) ** 0.5
            self.span(y, max(left, round(cx - half)), min(right, round(cx + half)), colour)

    def line(self, start, end, thickness: int, colour) -> None:
        """Stamp a square brush along a design-space segment, one pixel step at a time."""
        x0, y0 = start[0] * self.sx, start[1] * self.sy
        x1, y1 = end[0] * self.sx, end[1] * self.sy
        steps = max(1, round(max(abs(x1 - x0), abs(y1 - y0))))
        for n in range(steps + 1):
            x = round(x0 + (x1 - x0) * n / steps) - thickness // 2
            y = round(y0 + (y1 - y0) * n / steps) - thickness // 2
            for row in range(y, y + thickness):
                self.span(row, x, x + thickness, colour)

    def triangle(self, centre, size: int, colour) -> None:
        """An upward triangle `size` pixels tall centred on a design-space point."""
        cx, cy = round(centre[0] * self.sx), round(centre[1] * self.sy)
        top = cy - size // 2
        for n in range(size):
            half = (n + 1) // 2
            self.span(top + n, cx - half, cx + half + 1, colour)


def draw_sample_map(width: int, height: int) -> bytearray:
    """The sample map's pixels, row after row, 3 bytes per pixel."""
    canvas = Canvas(width, height)
    scale = min(canvas.sx, canvas.sy)
    canvas.rect(MAP_AREA, UNIT_COLOURS[0])
    for kind, unit, shape in UNIT_SHAPES:
        if kind == "rect":
            canvas.rect(shape, UNIT_COLOURS[unit], clip=MAP_AREA)
        else:
            canvas.ellipse(shape, UNIT_COLOURS[unit], clip=MAP_AREA)
    # line and symbol sizes keep a floor so small test maps stay detectable on a 3 px grid
    thickness = max(4, round(4 * scale))
    symbol = max(11, round(15 * scale))
    for start, end in FAULTS:
        canvas.line(start, end, thickness, BLACK)
    for centre in POINT_SYMBOLS:
        canvas.triangle(centre, symbol, RED)

    sx0, sx1 = LEGEND_SWATCH_X
    labels = iter(LEGEND_LABEL_LENGTHS)
    for n, colour in enumerate(UNIT_COLOURS):
        top = LEGEND_UNIT_TOP + n * LEGEND_UNIT_PITCH
        canvas.rect((sx0, top, sx1, top + LEGEND_SWATCH_HEIGHT), colour)
        middle = top + LEGEND_SWATCH_HEIGHT / 2
        canvas.rect((LEGEND_LABEL_X, middle - 5, LEGEND_LABEL_X + next(labels), middle + 5),
                    LABEL_GREY)
    canvas.line((sx0 + 2, LEGEND_LINE_Y), (sx1 - 2, LEGEND_LINE_Y), thickness, BLACK)
    canvas.rect((LEGEND_LABEL_X, LEGEND_LINE_Y - 5, LEGEND_LABEL_X + next(labels),
                 LEGEND_LINE_Y + 5), LABEL_GREY)
    canvas.triangle(((sx0 + sx1) / 2, LEGEND_POINT_Y), symbol, RED)
    canvas.rect((LEGEND_LABEL_X, LEGEND_POINT_Y - 5, LEGEND_LABEL_X + next(labels),
                 LEGEND_POINT_Y + 5), LABEL_GREY)
    return canvas.rgb


# ---------------------------------------------------------------- TIFF


def geotiff_tags(width: int, height: int) -> list:
    """(tag, type, values) for ModelPixelScale, ModelTiepoint and GeoKeyDirectory."""
    dx, dy = SPAN_LONGITUDE / width, SPAN_LATITUDE / height
    geokeys = [
        1, 1, 0, 4,         # directory version 1.1.0, four keys
        1024, 0, 1, 2,      # GTModelTypeGeoKey: geographic
        1025, 0, 1, 1,      # GTRasterTypeGeoKey: PixelIsArea
        2048, 0, 1, EPSG_NAD27,  # GeographicTypeGeoKey
        2054, 0, 1, 9102,   # GeogAngularUnitsGeoKey: degree
    ]
    return [
        (33550, 12, [dx, dy, 0.0]),
        (33922, 12, [0.0, 0.0, 0.0, WEST_LONGITUDE, NORTH_LATITUDE, 0.0]),
        (34735, 3, geokeys),
    ]


def encode_tiff(width: int, height: int, rgb: bytes, extra_tags: list) -> bytes:
    """A little-endian baseline RGB TIFF: header, strips, then one IFD and its data."""
    row_bytes = width * 3
    rows_per_strip = max(1, 65536 // row_bytes)
    strips = [rgb[y * row_bytes:min(height, y + rows_per_strip) * row_bytes]
              for y in range(0, height, rows_per_strip)]
    offsets, pos = [], 8
    for strip in strips:
        offsets.append(pos)
        pos += len(strip)
    tags = sorted([
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [1]),
        (262, 3, [2]), (273, 4, offsets), (277, 3, [3]), (278, 4, [rows_per_strip]),
        (279, 4, [len(s) for s in strips]), (284, 3, [1]),
    ] + extra_tags)
    codes = {3: "H", 4: "I", 12: "d"}
    ifd_offset = pos + (pos & 1)  # IFDs start on a word boundary
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, blobs = [], []
    for tag, kind, values in tags:
        blob = struct.pack("<" + codes[kind] * len(values), *values)
        if len(blob) <= 4:
            entries.append(struct.pack("<HHI", tag, kind, len(values)) + blob.ljust(4, b"\x00"))
        else:
            entries.append(struct.pack("<HHII", tag, kind, len(values), data_offset))
            blob += b"\x00" * (len(blob) & 1)
            blobs.append(blob)
            data_offset += len(blob)
    return b"".join([
        b"II*\x00", struct.pack("<I", ifd_offset), *strips, b"\x00" * (ifd_offset - pos),
        struct.pack("<H", len(tags)), *entries, struct.pack("<I", 0), *blobs,
    ])


def write_sample_map(path: str, width: int = 1000, height: int = 800) -> str:
    """Write the sample map GeoTIFF to path atomically and return path."""
    if width < 200 or height < 160:
        raise ValueError("the sample map needs at least 200 x 160 pixels")
    rgb = draw_sample_map(width, height)
    data = encode_tiff(width, height, bytes(rgb), geotiff_tags(width, height))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the deterministic sample map GeoTIFF.")
    parser.add_argument("dest", help="where to write the .tif")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args(argv)
    try:
        write_sample_map(args.dest, args.width, args.height)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {args.dest} ({args.width} x {args.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
