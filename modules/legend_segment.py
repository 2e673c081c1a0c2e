"""Stand-in for the TA1 legend_segment module: find the map area and the legend areas.

Run: python modules/legend_segment.py --input MAP_DIR --model MODEL_DIR --output OUT_DIR
     --workdir TEMP_DIR [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads MAP_DIR/<map>.tif and looks for blocks of non-white columns: the widest is the map
area, the others beside it the legend panel. The panel is split at its largest vertical
gap into polygon swatches (above) and point/line swatches (below). Writes
OUT_DIR/<map>_map_segmentation.json, labelme-style like the real module:
{"shapes": [{"label": "map" | "legend_polygons" | "legend_points_lines",
"points": [[x0, y0], [x1, y1]], "shape_type": "rectangle"}]}, in pixels with x1/y1
exclusive. The model and workdir switches are accepted and only logged.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

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
    image = common.read_tiff(tif)
    log.info("read %s (%d x %d); model %s and workdir %s are not used by the stand-in",
             tif, image.width, image.height, args.model, args.workdir)

    min_gap = max(8, image.width // 50)
    columns = common.column_blocks(image, 0, image.height, min_gap)
    map_x = common.widest(columns)
    map_y = common.widest(common.row_blocks(image, *map_x, 0, image.height, min_gap))
    shapes = [shape("map", map_x[0], map_y[0], map_x[1], map_y[1])]

    # the legend is whatever ink lies beside the map, preferably to its right
    right = [block for block in columns if block[0] >= map_x[1]]
    left = [block for block in columns if block[1] <= map_x[0]]
    beside = right or left
    if beside:
        legend_x = (beside[0][0], beside[-1][1])
        item_rows = common.row_blocks(image, *legend_x, 0, image.height, 3)
        polygons, points_lines = split_legend(item_rows)
        for label, rows in (("legend_polygons", polygons), ("legend_points_lines", points_lines)):
            if rows:
                shapes.append(shape(label, legend_x[0], rows[0][0], legend_x[1], rows[-1][1]))
    else:
        log.warning("no legend panel found beside the map area")
    for item in shapes:
        log.info("found %s at %s", item["label"], item["points"])

    out = os.path.join(args.output, f"{map_name}_map_segmentation.json")
    common.write_json(out, {
        "version": "stand-in",
        "imagePath": os.path.basename(tif),
        "imageWidth": image.width,
        "imageHeight": image.height,
        "shapes": shapes,
    })
    log.info("wrote %s", out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output, os.path.join(args.output, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
