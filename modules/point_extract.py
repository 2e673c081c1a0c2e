"""Stand-in for the TA1 point_extract module: find the point symbols on the map patches.

Run: python modules/point_extract.py --map_dir MAPS_DIR --map_metadata_dir DESC_DIR
     --map_patches_dir PATCH_DIR --model_weights_dir DIR --symbol_info_json_file FILE
     --strike_model_dir DIR --output_dir_root OUT --gpu_id N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

The switches name no map, so the map name comes from PATCH_DIR
(<map>_g<size>_s<stride>_wo_legend); MAPS_DIR/<map>/<map>.tif must exist and gives the
map size (GDAL reads only its header). Reads the point legend items and colours from
legend_item_description's <map>_point.json, samples the patches (one at a time, with
Pillow) on a 3-pixel grid in whole-map coordinates, labels the samples near a point colour
into 8-connected blobs (GDAL's polygonize) and reports the centre and bbox of each blob
about the size of the legend's symbol (within a factor of 2.5).
Writes OUT/output-per-symbol/<map>_points.geojson (Points in pixel coordinates, x right,
y down) and OUT/run.log. The model folders, symbol info and GPU are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import patches  # noqa: E402
import raster  # noqa: E402
from rasterio import features as rio_features  # noqa: E402
from shapely.geometry import shape  # noqa: E402

NAME = "point_extract"
STEP = 3
TOLERANCE = 90
MIN_CELLS = 2
# a symbol on the map is within this factor of the legend's in size, either way
SIZE_FACTOR = 2.5


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


def scan_patches(folder: str, size: tuple, colours: list) -> list:
    """[bool grid over the map, one cell per STEP px, true near colour] per colour."""
    width, height = size
    grids = [np.zeros((height // STEP + 1, width // STEP + 1), dtype=bool) for _ in colours]
    # padding beyond the map's edge is white, so only the real pixels are scanned
    for gx, gy, samples in patches.sample_patches(folder, STEP, limit=size):
        if not samples.size:
            continue
        for grid, colour in zip(grids, colours, strict=True):
            near = raster.colour_distance(samples, colour) <= TOLERANCE
            grid[gy:gy + near.shape[0], gx:gx + near.shape[1]] |= near
    return grids


def symbols(grid: np.ndarray, size=None) -> list:
    """[(centre x, centre y, bbox)] in map pixels of each blob of at least MIN_CELLS and,
    given the legend symbol's size in px, of about that size (a fault, a unit or a
    dithered dot of the same ink is no symbol)."""
    found = []
    # GDAL polygonises the 8-connected blobs, in grid cells (cell i spans [i, i + 1))
    for geometry, _ in rio_features.shapes(grid.astype(np.uint8), mask=grid, connectivity=8):
        blob = shape(geometry)
        if blob.area < MIN_CELLS:
            continue
        x0, y0, x1, y1 = (int(round(v)) * STEP for v in blob.bounds)
        if size and not size / SIZE_FACTOR <= max(x1 - x0, y1 - y0) <= size * SIZE_FACTOR:
            continue
        centre = blob.centroid
        # the centre of mass of the cells' own positions, as the samples were taken
        found.append((round((centre.x - 0.5) * STEP, 1), round((centre.y - 0.5) * STEP, 1),
                      [x0, y0, x1, y1]))
    found.sort(key=lambda item: (item[1], item[0]))
    return found


def symbol_size(record: dict):
    """The longer side in px of the legend's symbol (its swatch bbox), or None."""
    bbox = record.get("bbox")
    if not bbox:
        return None
    return max(bbox[2] - bbox[0], bbox[3] - bbox[1]) or None


def work(args, log) -> None:
    folder = os.path.basename(os.path.normpath(args.map_patches_dir))
    patches.patch_grid(folder)
    map_name = folder.rsplit("_g", 1)[0]
    tif = os.path.join(args.map_dir, map_name, f"{map_name}.tif")
    with raster.open_map(tif, log) as reader:
        size = (reader.width, reader.height)
    legend_path = os.path.join(args.map_metadata_dir, f"{map_name}_point.json")
    legend = common.read_json(legend_path, "legend_item_description output")
    found = patches.list_patches(args.map_patches_dir)
    log.info("read %s (%d x %d), %s (%d point items) and %d patches from %s", tif,
             size[0], size[1], legend_path, len(legend), len(found), args.map_patches_dir)
    log.info("models %s and %s, symbol info %s and gpu %s are not used",
             args.model_weights_dir, args.strike_model_dir, args.symbol_info_json_file,
             args.gpu_id)

    names = sorted(legend)
    colours = [common.hex_to_rgb(legend[name]["color"]) for name in names]
    grids = scan_patches(args.map_patches_dir, size, colours)
    features = []
    for name, grid in zip(names, grids, strict=True):
        blobs = symbols(grid, symbol_size(legend[name]))
        for x, y, bbox in blobs:
            features.append({
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [x, y]},
                "properties": {"legend_id": name, "type": "point", "score": 1.0,
                               "bbox": bbox},
            })
        log.info("point item %s: %d symbols", name, len(blobs))
    out = os.path.join(args.output_dir_root, "output-per-symbol", f"{map_name}_points.geojson")
    common.write_json(out, common.feature_collection(features, map_name=map_name))
    log.info("wrote %d point features to %s", len(features), out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir_root,
                      os.path.join(args.output_dir_root, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
