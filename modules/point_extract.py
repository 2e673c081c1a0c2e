"""Stand-in for the TA1 point_extract module: find the point symbols on the map patches.

Run: python modules/point_extract.py --map_dir MAPS_DIR --map_metadata_dir DESC_DIR
     --map_patches_dir PATCH_DIR --model_weights_dir DIR --symbol_info_json_file FILE
     --strike_model_dir DIR --output_dir_root OUT --gpu_id N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

The switches name no map, so the map name comes from PATCH_DIR
(<map>_g<size>_s<stride>_wo_legend); MAPS_DIR/<map>/<map>.tif must exist and gives the
map size. Reads the point legend items and colours from legend_item_description's
<map>_point.json, samples the patches on a 3-pixel grid in whole-map coordinates, groups
the samples near a point colour into 8-connected blobs and reports each blob's centre.
Writes OUT/output-per-symbol/<map>_points.geojson (Points in pixel coordinates, x right,
y down) and OUT/run.log. The model folders, symbol info and GPU are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "point_extract"
STEP = 3
TOLERANCE = 90
MIN_CELLS = 2


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--map_dir", required=True)
    parser.add_argument("--map_metadata_dir", required=True)
    parser.add_argument("--map_patches_dir", required=True)
    parser.add_argument("--model_weights_dir", required=True)
    parser.add_argument("--symbol_info_json_file", required=True)
    parser.add_argument("--strike_model_dir", required=True)
    parser.add_argument("--output_dir_root", required=True)
    parser.add_argument("--gpu_id", required=True)
    return parser.parse_args(argv)


def work(args, log) -> None:
    folder = os.path.basename(os.path.normpath(args.map_patches_dir))
    _, stride = common.patch_grid(folder)
    map_name = folder.rsplit("_g", 1)[0]
    tif = os.path.join(args.map_dir, map_name, f"{map_name}.tif")
    image = common.read_tiff(tif, pixels=False)
    legend_path = os.path.join(args.map_metadata_dir, f"{map_name}_point.json")
    legend = common.read_json(legend_path, "legend_item_description output")
    patches = common.list_patches(args.map_patches_dir)
    log.info("read %s (%d x %d), %s (%d point items) and %d patches from %s", tif,
             image.width, image.height, legend_path, len(legend), len(patches),
             args.map_patches_dir)
    log.info("models %s and %s, symbol info %s and gpu %s are not used",
             args.model_weights_dir, args.strike_model_dir, args.symbol_info_json_file,
             args.gpu_id)

    names = sorted(legend)
    colours = [common.hex_to_rgb(legend[name]["color"]) for name in names]
    cells = {n: set() for n in range(len(names))}
    for row, col, path in patches:
        patch = common.read_png(path)
        ox, oy = col * stride, row * stride
        # padding beyond the map's edge is white, so only the real pixels are scanned
        width = min(patch.width, image.width - ox)
        height = min(patch.height, image.height - oy)
        for x, y, r, g, b in common.samples(patch, (-ox) % STEP, (-oy) % STEP,
                                            width, height, STEP):
            if r > 235 and g > 235 and b > 235:
                continue
            for n, colour in enumerate(colours):
                if abs(r - colour[0]) + abs(g - colour[1]) + abs(b - colour[2]) <= TOLERANCE:
                    cells[n].add(((ox + x) // STEP, (oy + y) // STEP))

    features = []
    for n, name in enumerate(names):
        found = 0
        for group in common.components(cells[n]):
            if len(group) < MIN_CELLS:
                continue
            xs = [gx * STEP for gx, _ in group]
            ys = [gy * STEP for _, gy in group]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Point",
                             "coordinates": [round(sum(xs) / len(xs), 1),
                                             round(sum(ys) / len(ys), 1)]},
                "properties": {"legend_id": name, "type": "point", "score": 1.0,
                               "bbox": [min(xs), min(ys), max(xs) + STEP, max(ys) + STEP]},
            })
            found += 1
        log.info("point item %s: %d symbols", name, found)
    out = os.path.join(args.output_dir_root, "output-per-symbol", f"{map_name}_points.geojson")
    common.write_json(out, common.feature_collection(features, map_name=map_name))
    log.info("wrote %d point features to %s", len(features), out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir_root,
                      os.path.join(args.output_dir_root, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
