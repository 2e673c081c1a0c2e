"""Stand-in for the TA1 legend_item_segment module: find the legend swatches.

Run: python modules/legend_item_segment.py --input_image MAP.tif
     --input_legend_segmentation SEG.json --output_dir OUT --log OUT/run.log
     --path_to_intermediate DIR --postprocessing_for_crs True|False
     --competition_custom True|False --version V --only_poly True|False
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Scans the legend areas that legend_segment reported on a 2-pixel grid for "ink" (not
white, not the grey of label text), groups it into connected swatches, and reads each
swatch's colour at its centre. Swatches in the polygon legend become polygon units; in the
point/line legend a wide, thin swatch is a line and anything else a point. Writes, in
pixel coordinates (x right, y down):
  OUT/<map>_PolygonType.geojson           one rectangle per polygon swatch
  OUT/<map>_PointLineType.geojson         one rectangle per point or line swatch
  OUT/<map>_PolygonType_internal.json     labelme-style swatch boxes plus the map area
--only_poly True leaves the point/line file empty; the other flags are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "legend_item_segment"
STEP = 2
MIN_CELLS = 4


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input_image", required=True)
    parser.add_argument("--input_legend_segmentation", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--path_to_intermediate", required=True)
    parser.add_argument("--postprocessing_for_crs", required=True, type=common.parse_bool)
    parser.add_argument("--competition_custom", required=True, type=common.parse_bool)
    parser.add_argument("--version", required=True)
    parser.add_argument("--only_poly", required=True, type=common.parse_bool)
    return parser.parse_args(argv)


def find_swatches(image, box) -> list:
    """[(x0, y0, x1, y1, (r, g, b))] of the ink blobs in box, top to bottom."""
    x0, y0, x1, y1 = box
    cells = {((x - x0) // STEP, (y - y0) // STEP)
             for x, y, r, g, b in common.samples(image, x0, y0, x1, y1, STEP)
             if common.is_ink((r, g, b))}
    swatches = []
    for group in common.components(cells):
        if len(group) < MIN_CELLS:
            continue
        xs = [cx for cx, _ in group]
        ys = [cy for _, cy in group]
        left, top = x0 + min(xs) * STEP, y0 + min(ys) * STEP
        right, bottom = x0 + (max(xs) + 1) * STEP, y0 + (max(ys) + 1) * STEP
        colour = image.pixel((left + right) // 2, (top + bottom) // 2)
        swatches.append((left, top, right, bottom, colour))
    swatches.sort(key=lambda s: (s[1], s[0]))
    return swatches


def feature(name: str, kind: str, swatch) -> dict:
    x0, y0, x1, y1, colour = swatch
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": common.rectangle(x0, y0, x1, y1)},
        "properties": {"name": name, "abbreviation": name.rsplit("_", 1)[0], "type": kind,
                       "color": common.hex_colour(colour)},
    }


def work(args, log) -> None:
    segmentation = common.read_json(args.input_legend_segmentation, "legend_segment output")
    image = common.read_tiff(args.input_image)
    map_name = os.path.splitext(os.path.basename(args.input_image))[0]
    boxes = common.segmentation_boxes(segmentation)
    log.info("read %s (%d x %d) and %s with areas %s", args.input_image, image.width,
             image.height, args.input_legend_segmentation, sorted(boxes))
    log.info("version %s, postprocessing_for_crs=%s, competition_custom=%s: coordinates "
             "stay in pixels; intermediate folder %s is not used", args.version,
             args.postprocessing_for_crs, args.competition_custom, args.path_to_intermediate)
    if "map" not in boxes:
        raise common.ModuleFailed(f"no 'map' area in {args.input_legend_segmentation}")

    polygons = []
    if "legend_polygons" in boxes:
        for n, swatch in enumerate(find_swatches(image, boxes["legend_polygons"]), start=1):
            polygons.append((f"U{n}_poly", "polygon", swatch))
    else:
        log.warning("no legend_polygons area: no polygon units")
    points_lines = []
    if args.only_poly:
        log.info("--only_poly True: skipping point and line swatches")
    elif "legend_points_lines" in boxes:
        counts = {"line": 0, "point": 0}
        for swatch in find_swatches(image, boxes["legend_points_lines"]):
            width, height = swatch[2] - swatch[0], swatch[3] - swatch[1]
            kind = "line" if width >= 3 * height else "point"
            counts[kind] += 1
            suffix = "line" if kind == "line" else "pt"
            prefix = "L" if kind == "line" else "P"
            points_lines.append((f"{prefix}{counts[kind]}_{suffix}", kind, swatch))
    for name, kind, swatch in polygons + points_lines:
        log.info("swatch %s (%s) at %s colour %s", name, kind, swatch[:4],
                 common.hex_colour(swatch[4]))

    out = args.output_dir
    common.write_json(os.path.join(out, f"{map_name}_PolygonType.geojson"),
                      common.feature_collection([feature(*item) for item in polygons]))
    common.write_json(os.path.join(out, f"{map_name}_PointLineType.geojson"),
                      common.feature_collection([feature(*item) for item in points_lines]))
    common.write_json(os.path.join(out, f"{map_name}_PolygonType_internal.json"), {
        "map_name": map_name,
        "map_area": list(boxes["map"]),
        "shapes": [{"label": name, "points": [list(s[:2]), list(s[2:4])],
                    "color": list(s[4])} for name, _, s in polygons],
    })
    log.info("wrote %d polygon and %d point/line swatches to %s",
             len(polygons), len(points_lines), out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir, args.log, work)


if __name__ == "__main__":
    sys.exit(main())
