"""Stand-in for the TA1 line_extract module: trace the line symbols on the map patches.

Run: python modules/line_extract.py --config CFG.yaml --trained_model_dir DIR
     --map_legend_json DESC_DIR --cropped_image_dir PATCH_DIR --prediction_dir OUT
     --map_name MAP --cuda_visible_device N [--predict_raster] [--predict_vector]
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads the line legend items (and their colours) from legend_item_description's
<map>_line.json and the map_crop patches in PATCH_DIR (<map>_g<size>_s<stride>_wo_legend,
patch (row, col) at pixel (col*stride, row*stride)), one at a time with Pillow. Samples
the patches on a 3-pixel grid in whole-map coordinates, keeps the samples close to a line
colour (numpy, per patch), labels them into 8-connected strokes (scipy.ndimage), and
follows each stroke along its longer axis to a polyline (the mean position of each run of
8 grid cells). --predict_vector writes OUT/<map>_lines.geojson (LineStrings in pixel
coordinates, x right, y down); --predict_raster writes OUT/<map>_lines_mask.png, one
pixel per grid cell, black where a line was seen. The config, model folder and device are
only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import patches  # noqa: E402
from scipy import ndimage  # noqa: E402

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


def scan_patches(folder: str, colours: list) -> np.ndarray:
    """uint8 grid over the patches' extent: 1 + the index of the first line colour within
    TOLERANCE of each sample, else 0."""
    size, stride = patches.patch_grid(folder)
    found = patches.list_patches(folder)
    width = max(col for _, col, _ in found) * stride + size
    height = max(row for row, _, _ in found) * stride + size
    grid = np.zeros((height // STEP + 1, width // STEP + 1), dtype=np.uint8)
    for gx, gy, samples in patches.sample_patches(folder, STEP):
        seen = np.zeros(samples.shape[:2], dtype=np.uint8)
        for n, colour in reversed(list(enumerate(colours))):
            seen[near_colour(samples, colour)] = n + 1
        view = grid[gy:gy + seen.shape[0], gx:gx + seen.shape[1]]
        np.copyto(view, seen, where=seen > 0)
    return grid


def near_colour(samples: np.ndarray, colour) -> np.ndarray:
    # raster.colour_distance's sum, written here: importing raster would load GDAL, which
    # this module (it reads PNG patches) never needs
    distance = np.abs(samples.astype(np.int16) - np.asarray(colour, dtype=np.int16)).sum(-1)
    return distance <= TOLERANCE


def polyline(ys: np.ndarray, xs: np.ndarray) -> list:
    """Vertices along a stroke's longer axis: the mean cell of each BIN cells along it."""
    along_x = np.ptp(xs) >= np.ptp(ys)
    major, minor = (xs, ys) if along_x else (ys, xs)
    keys = (major - major.min()) // BIN
    counts = np.bincount(keys)
    used = counts > 0
    if used.sum() == 1:
        return [[int(xs.min()) * STEP, int(ys.min()) * STEP],
                [int(xs.max()) * STEP, int(ys.max()) * STEP]]
    mean_major = (np.bincount(keys, weights=major)[used] / counts[used]) * STEP
    mean_minor = (np.bincount(keys, weights=minor)[used] / counts[used]) * STEP
    pairs = zip(mean_major, mean_minor, strict=True)
    return [[round(float(a if along_x else b), 1), round(float(b if along_x else a), 1)]
            for a, b in pairs]


def length(vertices: list) -> float:
    return sum(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
               for a, b in zip(vertices, vertices[1:], strict=False))


def strokes(mask: np.ndarray) -> list:
    """[(ys, xs)] grid cells of each 8-connected stroke at least MIN_EXTENT cells long."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    found = []
    for n, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        extent = max(where[0].stop - where[0].start, where[1].stop - where[1].start)
        if extent <= MIN_EXTENT:
            continue
        ys, xs = np.nonzero(labels[where] == n)
        found.append((ys + where[0].start, xs + where[1].start))
    return found


def work(args, log) -> None:
    legend_path = os.path.join(args.map_legend_json, f"{args.map_name}_line.json")
    legend = common.read_json(legend_path, "legend_item_description output")
    found = patches.list_patches(args.cropped_image_dir)
    log.info("read %s (%d line items) and %d patches from %s", legend_path, len(legend),
             len(found), args.cropped_image_dir)
    log.info("config %s, model folder %s and device %s are not used", args.config,
             args.trained_model_dir, args.cuda_visible_device)

    names = sorted(legend)
    colours = [common.hex_to_rgb(legend[name]["color"]) for name in names]
    grid = scan_patches(args.cropped_image_dir, colours)
    features = []
    for n, name in enumerate(names):
        before = len(features)
        for ys, xs in strokes(grid == n + 1):
            vertices = polyline(ys, xs)
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
        patches.write_png(out, np.where(grid > 0, 0, 255).astype(np.uint8))
        log.info("wrote a %d x %d line mask (one pixel per %d px cell) to %s",
                 grid.shape[1], grid.shape[0], STEP, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.prediction_dir,
                      os.path.join(args.prediction_dir, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
