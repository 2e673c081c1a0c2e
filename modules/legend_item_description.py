"""Stand-in for the TA1 legend_item_description module: describe each legend item.

Run: python modules/legend_item_description.py --map_dir MAP_DIR --symbol_json_dir SYM_DIR
     --legend_json_dir SEG_DIR --output_dir OUT --log_path OUT/run.log --temp_dir DIR
     --map_name MAP [--sleep S] [--fail] [--fail-unless-exists PATH]

The real module asks GPT-4 to read the legend text. This one reads legend_item_segment's
swatches (<map>_PolygonType.geojson, <map>_PointLineType.geojson), checks each swatch's
colour on the map image, and measures the label text beside it (the span of ink, pixels
further from the paper than legend_segment's threshold, on the swatch's middle row right
of it, within the legend area legend_segment reported). It reads only those pixels (small
windows of the map), never the whole map. Writes
OUT/<map>_point.json, OUT/<map>_line.json and OUT/<map>_polygon.json, each
{item name: {"symbol name", "description", "color", "bbox": [x0, y0, x1, y1],
"label_bbox"}}. It logs whether OPENAI_API_KEY is set, never its value, and never uses it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import raster  # noqa: E402

NAME = "legend_item_description"


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--map_dir", required=True)
    parser.add_argument("--symbol_json_dir", required=True)
    parser.add_argument("--legend_json_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--log_path", required=True)
    parser.add_argument("--temp_dir", required=True)
    parser.add_argument("--map_name", required=True)
    return parser.parse_args(argv)


def label_extent(reader, bbox, right_edge: int, paper, threshold: int):
    """The [x0, y0, x1, y1] of the label text right of a swatch, or None."""
    x0, y0, x1, y1 = bbox
    middle = (y0 + y1) // 2
    start = min(x1 + 2, reader.width)  # a small gutter after the swatch
    if right_edge <= start:
        return None
    row = reader.rgb((start, middle, right_edge, middle + 1))
    inked = np.flatnonzero(raster.ink_mask(row[0], paper, threshold))
    if not inked.size:
        return None
    return [start + int(inked[0]), y0, start + int(inked[-1]) + 1, y1]


def describe(reader, feature, right_edge: int, paper, threshold: int) -> tuple:
    """(name, description record) for one swatch feature."""
    props = feature["properties"]
    ring = feature["geometry"]["coordinates"][0]
    xs = [int(p[0]) for p in ring]
    ys = [int(p[1]) for p in ring]
    bbox = [min(xs), min(ys), max(xs), max(ys)]
    cx = min(max(0, (bbox[0] + bbox[2]) // 2), reader.width - 1)
    cy = min(max(0, (bbox[1] + bbox[3]) // 2), reader.height - 1)
    seen = common.hex_colour(reader.rgb((cx, cy, cx + 1, cy + 1))[0, 0])
    label = label_extent(reader, bbox, right_edge, paper, threshold)
    text = f"{props['type']} unit {props['abbreviation']}, colour {seen}"
    if label:
        text += f"; label text {label[2] - label[0]} px wide (stand-in: not read)"
    return props["name"], {
        "symbol name": props["abbreviation"],
        "description": text,
        "color": seen,
        "bbox": bbox,
        "label_bbox": label,
    }


def legend_area(boxes: list, feature):
    """The legend box (of one column) holding the swatch's centre, else None."""
    ring = feature["geometry"]["coordinates"][0]
    cx = sum(p[0] for p in ring[:4]) / 4
    cy = sum(p[1] for p in ring[:4]) / 4
    for x0, y0, x1, y1 in boxes:
        if x0 <= cx <= x1 and y0 <= cy <= y1:
            return x0, y0, x1, y1
    return None


def work(args, log) -> None:
    key_state = "set" if os.environ.get("OPENAI_API_KEY") else "not set"
    log.info("OPENAI_API_KEY is %s; the stand-in never calls the API", key_state)
    seg_path = os.path.join(args.legend_json_dir, f"{args.map_name}_map_segmentation.json")
    segmentation = common.read_json(seg_path, "legend_segment output")
    areas = common.segmentation_areas(segmentation)
    paper = segmentation.get("paper", (255, 255, 255))
    threshold = int(segmentation.get("ink_threshold", 24))
    swatch_files = [os.path.join(args.symbol_json_dir, f"{args.map_name}_{kind}.geojson")
                    for kind in ("PolygonType", "PointLineType")]
    features = []
    for path in swatch_files:
        features += common.read_json(path, "legend_item_segment output")["features"]
    tif = common.find_map_tif(args.map_dir)
    log.info("read %s, %s and %s (%d swatches); temp folder %s is not used",
             seg_path, *swatch_files, len(features), args.temp_dir)

    by_kind = {"point": {}, "line": {}, "polygon": {}}
    with raster.open_map(tif, log) as reader:
        log.info("map %s (%s)", tif, reader.describe())
        for feature in features:
            kind = feature["properties"]["type"]
            area = legend_area(areas.get("legend_polygons" if kind == "polygon"
                                         else "legend_points_lines", []), feature)
            right_edge = min(int(area[2]), reader.width) if area else reader.width
            name, record = describe(reader, feature, right_edge, paper, threshold)
            by_kind[kind][name] = record
    for kind, records in by_kind.items():
        out = os.path.join(args.output_dir, f"{args.map_name}_{kind}.json")
        common.write_json(out, records)
        log.info("wrote %d %s descriptions to %s", len(records), kind, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir, args.log_path, work)


if __name__ == "__main__":
    sys.exit(main())
