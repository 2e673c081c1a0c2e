"""Stand-in for the TA1 legend_segment module: find the map area and the legend areas.

Run: python modules/legend_segment.py --input MAP_DIR --model MODEL_DIR --output OUT_DIR
     --workdir TEMP_DIR [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads MAP_DIR/<map>.tif (any TIFF GDAL reads) decimated to at most 2,000 px along its
longer side, estimates the paper colour from it (raster.estimate_paper), leaves out a
scanner bed or collar around the sheet and GDAL's masked pixels, and cuts the ink (pixels
far enough from the paper) into column and row blocks in turn: the biggest is the map
area. The legend is the ink on the side of it holding the most (right, left, below or
above). Its symbols are the blobs thicker than the label text; their x ranges give the
legend's columns, and each symbol's shape its kind: a solid box is a polygon swatch, a
long thin one a line, anything else a point. Each column gives a polygon box and a
point/line box (several columns: several boxes of each label). Writes
OUT_DIR/<map>_map_segmentation.json, labelme-style like the real module:
{"shapes": [{"label": "map" | "legend_polygons" | "legend_points_lines",
"points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}], "paper": [r, g, b],
"ink_threshold": n}, in map pixels with x1/y1 exclusive (on a decimated read the boxes
are widened by one decimation step, e.g. 6 px on a 12,000 px map). The model and workdir
switches are accepted and only logged.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import raster  # noqa: E402
from scipy import ndimage  # noqa: E402

NAME = "legend_segment"
# pixels of the legend's read: smaller ink is a speck, not a symbol
MIN_SYMBOL = 3
# the share of its box a polygon swatch fills at least
SOLID = 0.7
# the legend is read with its map's longer side at most this long
LEGEND_SIDE = 4000


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the map folder holding <map>.tif")
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", required=True)
    return parser.parse_args(argv)


def symbols(ink: np.ndarray) -> list:
    """[(x0, y0, x1, y1, kind)] of the legend's symbols (swatches, line and point symbols)
    in an ink window: blobs thicker than the label text's strokes (most blobs are
    glyphs, so their median thickness is the text's), specks a few pixels wide left out.
    kind is "polygon" for a solid box, "line" for a long thin one, else "point"."""
    labels, count = ndimage.label(ink, structure=np.ones((3, 3), dtype=bool))
    if not count:
        return []
    depth = ndimage.distance_transform_cdt(ink, metric="chessboard")
    thickness = ndimage.maximum(depth, labels, index=np.arange(1, count + 1))
    text = float(np.median(thickness))
    found = []
    for n, where in enumerate(ndimage.find_objects(labels)):
        height = where[0].stop - where[0].start
        width = where[1].stop - where[1].start
        if thickness[n] < max(2, 1.5 * text) or max(width, height) < MIN_SYMBOL:
            continue
        # a lossy file nibbles a swatch's edges and pits its inside; a triangle fills half
        fill = float(ndimage.binary_fill_holes(labels[where] == n + 1).mean())
        kind = "line" if width >= 3 * height else "polygon" if fill >= SOLID else "point"
        found.append((where[1].start, where[0].start, where[1].stop, where[0].stop, kind))
    return found


def swatch_columns(found: list) -> list:
    """[(x0, x1)] of the columns of symbols (overlapping x ranges merged), left to right."""
    columns = []
    for x0, _, x1, _, _ in sorted(found):
        if columns and x0 < columns[-1][1]:
            columns[-1] = (columns[-1][0], max(columns[-1][1], x1))
        else:
            columns.append((x0, x1))
    return columns


def legend_areas(reader, layout, legend: tuple) -> list:
    """[(label, (x0, y0, x1, y1))] in map pixels: for each legend column, the box of its
    polygon swatches and the box of its point and line symbols, each reaching right to
    the next column so that the labels are inside. The legend is read again, finer than
    the layout: a decimated read thins a small map's line symbol to its text's strokes."""
    lx0, ly0, lx1, ly1 = layout.box(*legend)
    step = max(1, math.ceil(max(reader.width, reader.height) / LEGEND_SIDE))
    shape = (math.ceil((ly1 - ly0) / step), math.ceil((lx1 - lx0) / step))
    window = (lx0, ly0, lx1, ly1)
    rgb = reader.rgb(window, out_shape=shape)
    ink = raster.ink_mask(rgb, layout.paper, layout.threshold) & reader.valid(window, shape)
    found = symbols(ink)
    columns = swatch_columns(found)
    areas = []
    for n, (cx0, cx1) in enumerate(columns):
        right = columns[n + 1][0] - 1 if n + 1 < len(columns) else ink.shape[1]
        rows = raster.runs(ink[:, cx0:right].any(axis=1), 1)
        for label, kinds in (("legend_polygons", ("polygon",)),
                             ("legend_points_lines", ("line", "point"))):
            mine = [f for f in found if cx0 <= f[0] < cx1 and f[4] in kinds]
            if not mine:
                continue
            spans = [row_of(rows, (f[1] + f[3]) // 2, f[1], f[3]) for f in mine]
            box = (cx0, min(a for a, _ in spans), right, max(b for _, b in spans))
            areas.append((label, (lx0 + box[0] * step, ly0 + box[1] * step,
                                  min(lx1, lx0 + box[2] * step), min(ly1, ly0 + box[3] * step))))
    return areas


def row_of(rows: list, y: int, y0: int, y1: int) -> tuple:
    """The row block holding y (a symbol and its label), else the symbol's own rows."""
    for a, b in rows:
        if a <= y < b:
            return min(a, y0), max(b, y1)
    return y0, y1


def shape(label: str, x0: int, y0: int, x1: int, y1: int) -> dict:
    return {"label": label, "points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}


def work(args, log) -> None:
    tif = common.find_map_tif(args.input)
    map_name = os.path.splitext(os.path.basename(tif))[0]
    with raster.open_map(tif, log) as reader:
        log.info("read %s (%s); model %s and workdir %s are not used by the stand-in",
                 tif, reader.describe(), args.model, args.workdir)
        layout = raster.Layout(reader)
        log.info("paper colour %s, ink beyond %d per channel (on a %d x %d read)",
                 common.hex_colour(layout.paper), layout.threshold, layout.rgb.shape[1],
                 layout.rgb.shape[0])
        map_box = layout.map_area()
        shapes = [shape("map", *layout.box(*map_box))]
        legend = layout.legend_side(map_box)
        areas = legend_areas(reader, layout, legend[1]) if legend else []
    if areas:
        log.info("legend %s of the map area, %d column(s)", legend[0],
                 len({box[0] for _, box in areas}))
    else:
        log.warning("no legend found beside the map area")
    shapes += [shape(label, *box) for label, box in areas]
    for item in shapes:
        log.info("found %s at %s", item["label"], item["points"])

    out = os.path.join(args.output, f"{map_name}_map_segmentation.json")
    common.write_json(out, {
        "version": "stand-in",
        "imagePath": os.path.basename(tif),
        "imageWidth": layout.width,
        "imageHeight": layout.height,
        "shapes": shapes,
        "paper": list(layout.paper),
        "ink_threshold": layout.threshold,
    })
    log.info("wrote %s", out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output, os.path.join(args.output, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
