"""Stand-in for the TA1 geopackage module: put the extracted features in a GeoPackage.

Run: python modules/geopackage.py --nongeoref_map_dir MAP_DIR --layout_output_dir DESC_DIR
     --georef_output_dir GEOREF_DIR --poly_output_dir POLY_DIR --ln_output_dir LINE_DIR
     --pt_output_dir POINT_DIR --output_dir GPKG_DIR --georef_map_output DIR --map_name MAP
     --log_path DIR/run.log [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads <map>_points.geojson, <map>_lines.geojson and <map>_polygons.geojson (pixel
coordinates), the GCPs of georeference's <map>.json (latitude/longitude in EPSG:4326) and
the legend descriptions of <map>_{point,line,polygon}.json. Fits an affine pixel ->
longitude/latitude transform to the GCPs by least squares (numpy), applies it to every
geometry (shapely), and writes GPKG_DIR/<map>.gpkg through GDAL (pyogrio) in EPSG:4326
with three layers: points (Point), lines (LineString, MultiLineString if any stroke is
one) and polygons (one MultiPolygon per map unit), each with legend_id, description and
pixel_geometry (the pixel-space GeoJSON) fields. When georeference's GCPs are estimated
placeholders the coordinates are placeholders too: the layers say so in their
description, and a WARNING is logged. The map folder must hold the map; no georeferenced
copy of it is written to --georef_map_output.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import pyogrio  # noqa: E402
import shapely  # noqa: E402
from shapely.geometry import shape  # noqa: E402

NAME = "geopackage"
GCP_CRS = "EPSG:4326"

# (layer, input switch, file suffix, legend description kind)
LAYERS = [
    ("points", "pt_output_dir", "points", "point"),
    ("lines", "ln_output_dir", "lines", "line"),
    ("polygons", "poly_output_dir", "polygons", "polygon"),
]
FIELDS = ["legend_id", "description", "pixel_geometry"]


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    for switch in ("nongeoref_map_dir", "layout_output_dir", "georef_output_dir",
                   "poly_output_dir", "ln_output_dir", "pt_output_dir", "output_dir",
                   "georef_map_output", "map_name", "log_path"):
        parser.add_argument(f"--{switch}", required=True)
    return parser.parse_args(argv)


def fit_affine(gcps: list) -> np.ndarray:
    """A 3 x 2 matrix M with [x, y, 1] @ M = [lon, lat], fitted to the GCPs."""
    if len(gcps) < 3:
        raise common.ModuleFailed(f"need at least 3 GCPs for a transform, got {len(gcps)}")
    pixels = np.array([[g["columns_from_left"], g["rows_from_top"], 1.0] for g in gcps])
    degrees = np.array([[g["longitude"], g["latitude"]] for g in gcps])
    if np.linalg.matrix_rank(pixels) < 3:
        raise common.ModuleFailed("the GCPs are collinear: no affine transform")
    matrix, *_ = np.linalg.lstsq(pixels, degrees, rcond=None)
    return matrix


def to_degrees(geometry, matrix: np.ndarray):
    """The geometry with every pixel (x, y) mapped to (lon, lat)."""
    return shapely.transform(geometry, lambda xy: xy @ matrix[:2] + matrix[2])


def layer_geometries(features: list, layer: str) -> tuple:
    """(shapely geometries, OGR layer type) for one layer, polygons as MultiPolygons."""
    geometries = [shape(f["geometry"]) for f in features]
    if layer == "polygons":
        geometries = [shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g
                      for g in geometries]
        return geometries, "MultiPolygon"
    if layer == "lines":
        if any(g.geom_type == "MultiLineString" for g in geometries):
            geometries = [shapely.MultiLineString([g]) if g.geom_type == "LineString" else g
                          for g in geometries]
            return geometries, "MultiLineString"
        return geometries, "LineString"
    return geometries, "Point"


def write_layer(path: str, layer: str, features: list, legend: dict, matrix, note: str):
    """Write one layer (appended to the GeoPackage at path); returns its feature count."""
    geometries, kind = layer_geometries(features, layer)
    geo = [to_degrees(g, matrix) for g in geometries]
    invalid = [n for n, g in enumerate(geo) if not g.is_valid]
    if invalid:
        raise common.ModuleFailed(f"{layer}: {len(invalid)} invalid geometries, e.g. "
                                  f"{shapely.is_valid_reason(geo[invalid[0]])}")
    ids = [str(f["properties"].get("legend_id", "")) for f in features]
    fields = [
        np.array(ids, dtype=object),
        np.array([legend.get(i, {}).get("description") for i in ids], dtype=object),
        np.array([json.dumps(f["geometry"]) for f in features], dtype=object),
    ]
    pyogrio.raw.write(path, np.array(shapely.to_wkb(geo), dtype=object), fields, FIELDS,
                      layer=layer, driver="GPKG", geometry_type=kind, promote_to_multi=False,
                      crs=GCP_CRS,
                      layer_options={"DESCRIPTION": note}, append=False)
    return len(geo)


def work(args, log) -> None:
    tif = common.find_map_tif(args.nongeoref_map_dir)
    georef_path = os.path.join(args.georef_output_dir, f"{args.map_name}.json")
    georef = common.read_json(georef_path, "georeference output")
    gcps = georef.get("gcps") or []
    matrix = fit_affine(gcps)
    estimated = bool(georef.get("estimated"))
    note = (f"map {args.map_name}, {GCP_CRS} from {len(gcps)} GCPs"
            + (": ESTIMATED placeholder GCPs, coordinates are not real places"
               if estimated else ""))
    log.info("map %s; %d GCPs (map CRS %s) from %s", tif, len(gcps), georef.get("crs"),
             georef_path)
    if estimated:
        log.warning("georeference's GCPs are estimated placeholders: the GeoPackage's "
                    "coordinates are placeholders on a unit square, not real places")

    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, f"{args.map_name}.gpkg")
    tmp = out + ".tmp.gpkg"
    if os.path.exists(tmp):
        os.remove(tmp)
    counts = []
    try:
        for layer, switch, suffix, kind in LAYERS:
            path = os.path.join(getattr(args, switch), f"{args.map_name}_{suffix}.geojson")
            collection = common.read_json(path, f"{suffix} extraction output")
            legend_path = os.path.join(args.layout_output_dir, f"{args.map_name}_{kind}.json")
            legend = common.read_json(legend_path, "legend_item_description output")
            count = write_layer(tmp, layer, collection["features"], legend, matrix, note)
            log.info("layer %s: %d features from %s, descriptions from %s", layer, count,
                     path, legend_path)
            counts.append(f"{layer}: {count}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s (%s); no georeferenced map copy in %s from the stand-in", out,
             ", ".join(counts), args.georef_map_output)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.georef_map_output, args.log_path, work)


if __name__ == "__main__":
    sys.exit(main())
