"""Stand-in for the TA1 legend_item_segment module: find the legend swatches.

Run: python modules/legend_item_segment.py --input_image MAP.tif
     --input_legend_segmentation SEG.json --output_dir OUT --log OUT/run.log
     --path_to_intermediate DIR --postprocessing_for_crs True|False
     --competition_custom True|False --version V --only_poly True|False
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads only the legend areas that legend_segment reported (windows of the map, on a grid
of 2 px, coarser on maps over 8,000 px; a legend in several columns has an area of each
kind per column), marks ink (pixels further from the paper than
legend_segment's threshold), and groups it into 8-connected blobs (GDAL's polygonize).
The blobs starting in the legend's leftmost column are the swatches (the blobs right of
them are label text); each swatch's colour is read at its centre. Specks (at most 6 px)
and paper-coloured swatches are dropped and logged. Swatches in the
polygon legend become polygon units; in the point/line legend a wide, thin swatch is a
line and anything else a point.
Writes, in pixel coordinates (x right, y down):
  OUT/<map>_PolygonType.geojson           one rectangle per polygon swatch
  OUT/<map>_PointLineType.geojson         one rectangle per point or line swatch
  OUT/<map>_PolygonType_internal.json     labelme-style swatch boxes plus the map area
--only_poly True leaves the point/line file empty; the other flags are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import raster  # noqa: E402
from rasterio import features as rio_features  # noqa: E402
from shapely.geometry import shape  # noqa: E402

NAME = "legend_item_segment"
STEP = 2
MIN_CELLS = 4
# blobs starting within this share of the legend's width from its left edge anchor the
# swatch column
COLUMN_SHARE = 0.1
# map pixels: a swatch no longer than this either way is a speck
MIN_SWATCH_PX = 6


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


def legend_grid(reader, box) -> tuple:
    """(rgb sampled every step px of the legend window box, step)."""
    x0, y0, x1, y1 = box
    step = max(STEP, -(-max(reader.width, reader.height) // 4000))
    shape = (-(-(y1 - y0) // step), -(-(x1 - x0) // step))
    return reader.rgb(box, out_shape=shape), step


def junk(swatch, paper, threshold: int):
    """Why a swatch is no legend item (None if it is one): a speck a few pixels wide, or
    paper-coloured (a hole, a halo, an outline's inside: a unit of paper would claim the
    whole blank map)."""
    x0, y0, x1, y1, colour = swatch
    if max(x1 - x0, y1 - y0) < MIN_SWATCH_PX:
        return f"a speck of {x1 - x0} x {y1 - y0} px"
    if raster.ink_mask(np.array([colour], dtype=np.uint8), paper, threshold)[0] == 0:
        return "the paper's colour"
    return None


def find_swatches(reader, box, paper, threshold: int, log) -> list:
    """[(x0, y0, x1, y1, (r, g, b))] of the swatches in a legend box, top to bottom."""
    x0, y0, _, _ = box
    rgb, step = legend_grid(reader, box)
    ink = raster.ink_mask(rgb, paper, threshold)
    # GDAL polygonises the 8-connected ink blobs; a blob's bounds are in grid cells
    blobs = []
    for geometry, _ in rio_features.shapes(ink.astype(np.uint8), mask=ink, connectivity=8):
        blob = shape(geometry)
        if blob.area >= MIN_CELLS:
            blobs.append(tuple(int(round(v)) for v in blob.bounds))
    if not blobs:
        return []
    left = min(b[0] for b in blobs)
    reach = left + COLUMN_SHARE * ink.shape[1]
    column_right = max(b[2] for b in blobs if b[0] <= reach)
    swatches = []
    for gx0, gy0, gx1, gy1 in blobs:
        if gx0 >= column_right:
            continue  # label text right of the swatch column
        colour = tuple(int(v) for v in rgb[(gy0 + gy1) // 2, (gx0 + gx1) // 2])
        swatch = (x0 + gx0 * step, y0 + gy0 * step, x0 + gx1 * step, y0 + gy1 * step, colour)
        why = junk(swatch, paper, threshold)
        if why:
            log.info("dropped a swatch at %s colour %s: %s", swatch[:4],
                     common.hex_colour(colour), why)
            continue
        swatches.append(swatch)
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
    map_name = os.path.splitext(os.path.basename(args.input_image))[0]
    areas = {label: [tuple(int(v) for v in box) for box in boxes]
             for label, boxes in common.segmentation_areas(segmentation).items()}
    boxes = {label: found[0] for label, found in areas.items()}
    paper = segmentation.get("paper", (255, 255, 255))
    threshold = int(segmentation.get("ink_threshold", 24))
    with raster.open_map(args.input_image, log) as reader:
        log.info("read %s (%s) and %s with areas %s; paper %s, ink threshold %d",
                 args.input_image, reader.describe(), args.input_legend_segmentation,
                 sorted(boxes), common.hex_colour(paper), threshold)
        polygon_swatches = []
        for box in areas.get("legend_polygons", []):
            polygon_swatches += find_swatches(reader, box, paper, threshold, log)
        point_line_swatches = []
        for box in [] if args.only_poly else areas.get("legend_points_lines", []):
            point_line_swatches += find_swatches(reader, box, paper, threshold, log)
    log.info("version %s, postprocessing_for_crs=%s, competition_custom=%s: coordinates "
             "stay in pixels; intermediate folder %s is not used", args.version,
             args.postprocessing_for_crs, args.competition_custom, args.path_to_intermediate)
    if "map" not in boxes:
        raise common.ModuleFailed(f"no 'map' area in {args.input_legend_segmentation}")

    polygons = []
    if "legend_polygons" in boxes:
        for n, swatch in enumerate(polygon_swatches, start=1):
            polygons.append((f"U{n}_poly", "polygon", swatch))
    else:
        log.warning("no legend_polygons area: no polygon units")
    points_lines = []
    if args.only_poly:
        log.info("--only_poly True: skipping point and line swatches")
    elif "legend_points_lines" in boxes:
        counts = {"line": 0, "point": 0}
        for swatch in point_line_swatches:
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
