"""Stand-in for the TA1 line_extract module: trace the line symbols on the map patches.

Run: python modules/line_extract.py --config CFG.yaml --trained_model_dir DIR
     --map_legend_json DESC_DIR --cropped_image_dir PATCH_DIR --prediction_dir OUT
     --map_name MAP --cuda_visible_device N [--predict_raster] [--predict_vector]
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads the line legend items (and their colours) from legend_item_description's
<map>_line.json and the map_crop patches in PATCH_DIR (<map>_g<size>_s<stride>_wo_legend,
patch (row, col) at pixel (col*stride, row*stride)). Samples the patches on a 3-pixel grid
in whole-map coordinates, keeps the samples close to a line colour, groups them into
8-connected strokes, and follows each stroke along its longer axis to a polyline.
--predict_vector writes OUT/<map>_lines.geojson (LineStrings in pixel coordinates, x right,
y down); --predict_raster writes OUT/<map>_lines_mask.png, one pixel per grid cell, black
where a line was seen. The config, model folder and device are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "line_extract"
STEP = 3
TOLERANCE = 120
MIN_EXTENT = 6  # grid cells; shorter strokes are specks, not lines
BIN = 8  # grid cells per polyline vertex along the stroke


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--trained_model_dir", required=True)
    parser.add_argument("--map_legend_json", required=True)
    parser.add_argument("--cropped_image_dir", required=True)
    parser.add_argument("--prediction_dir", required=True)
    parser.add_argument("--map_name", required=True)
    parser.add_argument("--cuda_visible_device", required=True)
    parser.add_argument("--predict_raster", action="store_true")
    parser.add_argument("--predict_vector", action="store_true")
    return parser.parse_args(argv)


def scan_patches(patches: list, stride: int, colours: list) -> tuple:
    """({colour index: set of (gx, gy) grid cells}, (grid width, grid height))."""
    cells = {n: set() for n in range(len(colours))}
    width = height = 0
    for row, col, path in patches:
        patch = common.read_png(path)
        ox, oy = col * stride, row * stride
        width, height = max(width, ox + patch.width), max(height, oy + patch.height)
        # start where the whole-map grid falls, so overlapping patches agree on cells
        start_x, start_y = (-ox) % STEP, (-oy) % STEP
        for x, y, r, g, b in common.samples(patch, start_x, start_y, patch.width,
                                            patch.height, STEP):
            if r > 235 and g > 235 and b > 235:
                continue
            for n, colour in enumerate(colours):
                if abs(r - colour[0]) + abs(g - colour[1]) + abs(b - colour[2]) <= TOLERANCE:
                    cells[n].add(((ox + x) // STEP, (oy + y) // STEP))
    return cells, (width // STEP + 1, height // STEP + 1)


def polyline(group: list) -> list:
    """Vertices along a stroke's longer axis, each the mean of BIN cells' worth of samples."""
    xs = [gx for gx, _ in group]
    ys = [gy for _, gy in group]
    along_x = max(xs) - min(xs) >= max(ys) - min(ys)
    bins = {}
    for gx, gy in group:
        major = gx if along_x else gy
        bins.setdefault(major // BIN, []).append((gx, gy))
    vertices = []
    for key in sorted(bins):
        members = bins[key]
        mx = sum(p[0] for p in members) / len(members)
        my = sum(p[1] for p in members) / len(members)
        vertices.append([round(mx * STEP, 1), round(my * STEP, 1)])
    if len(vertices) == 1:
        vertices = [[min(xs) * STEP, min(ys) * STEP], [max(xs) * STEP, max(ys) * STEP]]
    return vertices


def length(vertices: list) -> float:
    return sum(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
               for a, b in zip(vertices, vertices[1:], strict=False))


def work(args, log) -> None:
    legend_path = os.path.join(args.map_legend_json, f"{args.map_name}_line.json")
    legend = common.read_json(legend_path, "legend_item_description output")
    patches = common.list_patches(args.cropped_image_dir)
    _, stride = common.patch_grid(args.cropped_image_dir)
    log.info("read %s (%d line items) and %d patches from %s", legend_path, len(legend),
             len(patches), args.cropped_image_dir)
    log.info("config %s, model folder %s and device %s are not used", args.config,
             args.trained_model_dir, args.cuda_visible_device)

    names = sorted(legend)
    colours = [common.hex_to_rgb(legend[name]["color"]) for name in names]
    cells, grid_size = scan_patches(patches, stride, colours)
    features = []
    for n, name in enumerate(names):
        before = len(features)
        for group in common.components(cells[n]):
            xs = [gx for gx, _ in group]
            ys = [gy for _, gy in group]
            if max(max(xs) - min(xs), max(ys) - min(ys)) < MIN_EXTENT:
                continue
            vertices = polyline(group)
            features.append({
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": vertices},
                "properties": {"legend_id": name, "type": "line",
                               "length_px": round(length(vertices), 1)},
            })
        log.info("line item %s: %d strokes", name, len(features) - before)

    if args.predict_vector:
        out = os.path.join(args.prediction_dir, f"{args.map_name}_lines.geojson")
        common.write_json(out, common.feature_collection(features, map_name=args.map_name))
        log.info("wrote %d line features to %s", len(features), out)
    else:
        log.info("no --predict_vector: no GeoJSON written")
    if args.predict_raster:
        out = os.path.join(args.prediction_dir, f"{args.map_name}_lines_mask.png")
        seen = set().union(*cells.values())
        width, height = grid_size
        rows = (b"".join(b"\x00\x00\x00" if (gx, gy) in seen else b"\xff\xff\xff"
                         for gx in range(width)) for gy in range(height))
        common.write_png(out, width, height, rows)
        log.info("wrote a %d x %d line mask (one pixel per %d px cell) to %s",
                 width, height, STEP, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.prediction_dir,
                      os.path.join(args.prediction_dir, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
