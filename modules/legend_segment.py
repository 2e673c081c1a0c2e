"""Stand-in for the TA1 legend_segment module: find the map area and the legend areas.

Run: python modules/legend_segment.py --input MAP_DIR --model MODEL_DIR --output OUT_DIR
     --workdir TEMP_DIR [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads MAP_DIR/<map>.tif (any TIFF GDAL reads) decimated to at most 2,000 px along its
longer side, estimates the paper colour from it (raster.estimate_paper) and looks for
blocks of columns holding ink (pixels far enough from the paper): the widest is the map
area, the others beside it the legend panel. The panel is split at its largest vertical
gap into polygon swatches (above) and point/line swatches (below). Writes
OUT_DIR/<map>_map_segmentation.json, labelme-style like the real module:
{"shapes": [{"label": "map" | "legend_polygons" | "legend_points_lines",
"points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}], "paper": [r, g, b],
"ink_threshold": n}, in map pixels with x1/y1 exclusive (on a decimated read the boxes
are widened by one decimation step, e.g. 6 px on a 12,000 px map). The model and workdir
switches are accepted and only logged.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import raster  # noqa: E402

NAME = "legend_segment"


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the map folder holding <map>.tif")
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", required=True)
    return parser.parse_args(argv)


def split_legend(item_rows: list) -> tuple:
    """Split legend item rows at the largest gap when it clearly stands out."""
    gaps = [b[0] - a[1] for a, b in zip(item_rows, item_rows[1:], strict=False)]
    if len(gaps) >= 2:
        largest = max(gaps)
        if largest > 1.5 * statistics.median(gaps):
            cut = gaps.index(largest) + 1
            return item_rows[:cut], item_rows[cut:]
    return item_rows, []


def shape(label: str, x0: int, y0: int, x1: int, y1: int) -> dict:
    return {"label": label, "points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}


def work(args, log) -> None:
    tif = common.find_map_tif(args.input)
    map_name = os.path.splitext(os.path.basename(tif))[0]
    with raster.open_map(tif) as reader:
        log.info("read %s (%s); model %s and workdir %s are not used by the stand-in",
                 tif, reader.describe(), args.model, args.workdir)
        layout = raster.Layout(reader)
    log.info("paper colour %s, ink beyond %d per channel (on a %d x %d read)",
             common.hex_colour(layout.paper), layout.threshold, layout.rgb.shape[1],
             layout.rgb.shape[0])

    map_box = layout.map_area()
    shapes = [shape("map", *layout.box(*map_box))]
    # the legend is whatever ink lies beside the map, preferably to its right
    right = [block for block in layout.columns if block[0] >= map_box[2]]
    left = [block for block in layout.columns if block[1] <= map_box[0]]
    beside = right or left
    if beside:
        legend_x = (beside[0][0], beside[-1][1])
        gap = max(1, round(3 / layout.sy))
        item_rows = layout.row_blocks(*legend_x, gap)
        polygons, points_lines = split_legend(item_rows)
        for label, rows in (("legend_polygons", polygons), ("legend_points_lines", points_lines)):
            if rows:
                box = layout.box(legend_x[0], rows[0][0], legend_x[1], rows[-1][1])
                shapes.append(shape(label, *box))
    else:
        log.warning("no legend panel found beside the map area")
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
