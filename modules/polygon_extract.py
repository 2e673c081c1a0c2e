"""Stand-in for the TA1 polygon_extract module: map each legend unit's colour.

Run: python modules/polygon_extract.py --path_to_tif MAP.tif
     --path_to_legend_description POLY.json --path_to_legend_solution POLY.geojson
     --path_to_json POLY_internal.json --path_to_model CKPT --dir_to_integrated_output OUT
     --log OUT/run.log --dir_to_intermediate DIR --version V --trade_off N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads the map area (from the internal JSON of legend_item_segment) decimated to one pixel
per cell of max(4, 2 * trade_off) px (the cell's centre pixel), gives each cell the legend
unit whose colour (from legend_item_description's <map>_polygon.json) is nearest within a
tolerance, polygonises the unit grid (rasterio.features.shapes: touching cells of a unit
merge) and unions each unit's parts with shapely into one valid MultiPolygon, clipped to
the map area. Writes OUT/<map>_polygons.geojson: one MultiPolygon feature per unit found,
in pixel coordinates (x right, y down), with legend_id, color, cells, area_px and parts.
The model, version and intermediate folder are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import raster  # noqa: E402
import shapely  # noqa: E402
from rasterio import features as rio_features  # noqa: E402
from rasterio.transform import Affine  # noqa: E402
from shapely.geometry import box as shapely_box  # noqa: E402
from shapely.geometry import mapping  # noqa: E402
from shapely.geometry import shape  # noqa: E402

NAME = "polygon_extract"
TOLERANCE = 60


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--path_to_tif", required=True)
    parser.add_argument("--path_to_legend_description", required=True)
    parser.add_argument("--path_to_legend_solution", required=True)
    parser.add_argument("--path_to_json", required=True)
    parser.add_argument("--path_to_model", required=True)
    parser.add_argument("--dir_to_integrated_output", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--dir_to_intermediate", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--trade_off", required=True, type=int)
    return parser.parse_args(argv)


def unit_grid(rgb: np.ndarray, units: list) -> np.ndarray:
    """int32 grid: 1 + the index of the nearest unit colour within TOLERANCE, else 0."""
    best = np.full(rgb.shape[:2], TOLERANCE + 1, dtype=np.int16)
    grid = np.zeros(rgb.shape[:2], dtype=np.int32)
    for n, colour in enumerate(units):
        distance = raster.colour_distance(rgb, colour)
        closer = distance < best
        best[closer] = distance[closer]
        grid[closer] = n + 1
    return grid


def unit_geometries(grid: np.ndarray, area: tuple) -> dict:
    """{unit index: valid MultiPolygon in map pixels} from the unit grid over area."""
    x0, y0, x1, y1 = area
    # the grid's cells span the area exactly (the last ones a little narrower than `cell`)
    to_pixels = Affine((x1 - x0) / grid.shape[1], 0, x0, 0, (y1 - y0) / grid.shape[0], y0)
    parts = {}
    for geometry, value in rio_features.shapes(grid, mask=grid > 0, connectivity=4,
                                               transform=to_pixels):
        parts.setdefault(int(value) - 1, []).append(shape(geometry))
    clip = shapely_box(x0, y0, x1, y1)
    found = {}
    for unit, polygons in parts.items():
        merged = shapely.union_all(polygons).intersection(clip)
        if not merged.is_valid:
            merged = shapely.make_valid(merged)
        polygons = [g for g in getattr(merged, "geoms", [merged])
                    if g.geom_type == "Polygon" and not g.is_empty]
        if polygons:
            found[unit] = shapely.MultiPolygon(polygons)
    return found


def work(args, log) -> None:
    descriptions = common.read_json(args.path_to_legend_description,
                                    "legend_item_description output")
    solution = common.read_json(args.path_to_legend_solution, "legend_item_segment output")
    internal = common.read_json(args.path_to_json, "legend_item_segment internal output")
    map_name = os.path.splitext(os.path.basename(args.path_to_tif))[0]
    names = sorted(descriptions)
    units = [common.hex_to_rgb(descriptions[name]["color"]) for name in names]
    x0, y0, x1, y1 = (int(v) for v in internal["map_area"])
    cell = max(4, 2 * args.trade_off)
    with raster.open_map(args.path_to_tif, log) as reader:
        log.info("read %s (%s), %s (%d units), %s (%d swatches), %s", args.path_to_tif,
                 reader.describe(), args.path_to_legend_description, len(descriptions),
                 args.path_to_legend_solution, len(solution["features"]), args.path_to_json)
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(reader.width, x1), min(reader.height, y1)
        if x1 <= x0 or y1 <= y0:
            raise common.ModuleFailed(f"empty map area {internal['map_area']} in "
                                      f"{args.path_to_json}")
        shape_cells = (-(-(y1 - y0) // cell), -(-(x1 - x0) // cell))
        # one pixel per cell, its centre pixel: the whole map area is never held
        rgb = reader.rgb((x0, y0, x1, y1), out_shape=shape_cells)
    log.info("model %s, version %s and intermediate folder %s are not used",
             args.path_to_model, args.version, args.dir_to_intermediate)

    grid = unit_grid(rgb, units)
    cells = np.bincount(grid.ravel(), minlength=len(units) + 1)
    geometries = unit_geometries(grid, (x0, y0, x1, y1))
    features = []
    for n, name in enumerate(names):
        if n not in geometries:
            log.info("unit %s: no pixels of %s on the map", name, descriptions[name]["color"])
            continue
        geometry = geometries[n]
        features.append({
            "type": "Feature",
            "geometry": mapping(geometry),
            "properties": {"legend_id": name, "type": "polygon",
                           "color": descriptions[name]["color"],
                           "cells": int(cells[n + 1]), "area_px": round(geometry.area),
                           "parts": len(geometry.geoms)},
        })
        log.info("unit %s: %d cells of %d px, %d part(s)", name, cells[n + 1], cell,
                 len(geometry.geoms))
    out = os.path.join(args.dir_to_integrated_output, f"{map_name}_polygons.geojson")
    common.write_json(out, common.feature_collection(features, map_name=map_name))
    log.info("wrote %d polygon features to %s", len(features), out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.dir_to_integrated_output, args.log, work)


if __name__ == "__main__":
    sys.exit(main())
