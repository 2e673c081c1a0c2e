"""Stand-in for the TA1 polygon_extract module: map each legend unit's colour.

Run: python modules/polygon_extract.py --path_to_tif MAP.tif
     --path_to_legend_description POLY.json --path_to_legend_solution POLY.geojson
     --path_to_json POLY_internal.json --path_to_model CKPT --dir_to_integrated_output OUT
     --log OUT/run.log --dir_to_intermediate DIR --version V --trade_off N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Samples the map area (from the internal JSON of legend_item_segment) on a grid of
max(4, 2 * trade_off) pixels, gives each sample the legend unit whose colour (from
legend_item_description's <map>_polygon.json) is nearest within a tolerance, and turns each
unit's cells into rectangles (runs along a row, merged down the rows). Writes
OUT/<map>_polygons.geojson: one MultiPolygon feature per unit found, in pixel coordinates
(x right, y down). The model, version and intermediate folder are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

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


def nearest_unit(rgb, units: list):
    """Index of the unit colour nearest to rgb, or None if none is within TOLERANCE."""
    best, best_distance = None, TOLERANCE + 1
    for n, colour in enumerate(units):
        distance = abs(rgb[0] - colour[0]) + abs(rgb[1] - colour[1]) + abs(rgb[2] - colour[2])
        if distance < best_distance:
            best, best_distance = n, distance
    return best


def rectangles(cells: set) -> list:
    """Cover grid cells with rectangles (col0, row0, col1, row1), exclusive ends."""
    by_row = {}
    for col, row in cells:
        by_row.setdefault(row, []).append(col)
    done, open_runs = [], {}
    for row in range(min(by_row), max(by_row) + 2):
        still_open = {}
        for span in common.runs_of(sorted(by_row.get(row, []))):
            # a run with the same columns as one in the row above extends that rectangle
            still_open[span] = open_runs.pop(span, row)
        for (start, end), top in open_runs.items():
            done.append((start, top, end, row))
        open_runs = still_open
    return sorted(done, key=lambda r: (r[1], r[0]))


def work(args, log) -> None:
    descriptions = common.read_json(args.path_to_legend_description,
                                    "legend_item_description output")
    solution = common.read_json(args.path_to_legend_solution, "legend_item_segment output")
    internal = common.read_json(args.path_to_json, "legend_item_segment internal output")
    image = common.read_tiff(args.path_to_tif)
    map_name = os.path.splitext(os.path.basename(args.path_to_tif))[0]
    log.info("read %s (%d x %d), %s (%d units), %s (%d swatches), %s", args.path_to_tif,
             image.width, image.height, args.path_to_legend_description, len(descriptions),
             args.path_to_legend_solution, len(solution["features"]), args.path_to_json)
    log.info("model %s, version %s and intermediate folder %s are not used",
             args.path_to_model, args.version, args.dir_to_intermediate)

    names = sorted(descriptions)
    units = [common.hex_to_rgb(descriptions[name]["color"]) for name in names]
    x0, y0, x1, y1 = (int(v) for v in internal["map_area"])
    cell = max(4, 2 * args.trade_off)
    found = {n: set() for n in range(len(names))}
    # sample the middle of each cell, so a cell is judged by its centre pixel
    for x, y, r, g, b in common.samples(image, x0 + cell // 2, y0 + cell // 2, x1, y1, cell):
        unit = nearest_unit((r, g, b), units)
        if unit is not None:
            found[unit].add(((x - x0) // cell, (y - y0) // cell))

    features = []
    for n, cells in found.items():
        if not cells:
            log.info("unit %s: no pixels of %s on the map", names[n],
                     descriptions[names[n]]["color"])
            continue
        polygons = []
        for c0, r0, c1, r1 in rectangles(cells):
            polygons.append(common.rectangle(x0 + c0 * cell, y0 + r0 * cell,
                                             min(x1, x0 + c1 * cell), min(y1, y0 + r1 * cell)))
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon", "coordinates": polygons},
            "properties": {"legend_id": names[n], "type": "polygon",
                           "color": descriptions[names[n]]["color"],
                           "cells": len(cells), "area_px": len(cells) * cell * cell},
        })
        log.info("unit %s: %d cells of %d px, %d rectangles", names[n], len(cells), cell,
                 len(polygons))
    out = os.path.join(args.dir_to_integrated_output, f"{map_name}_polygons.geojson")
    common.write_json(out, common.feature_collection(features, map_name=map_name))
    log.info("wrote %d polygon features to %s", len(features), out)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.dir_to_integrated_output, args.log, work)


if __name__ == "__main__":
    sys.exit(main())
