"""Stand-in for the TA1 georeference module: ground control points for the map.

Run: python modules/georeference.py --input_path MAP.tif --support_data_dir DIR
     --output_path OUT.json --temp_dir DIR --gpu_id N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Finds the map area on a decimated read (as legend_segment does). Then, with georeferencing
GDAL reads (GeoTIFF tags, a world file, an .aux.xml, or GCPs in the file):
- GCPs in the file are passed on as they are;
- otherwise five points in the map area (four corners inset by a tenth, and the centre)
  get their position from the map's geotransform.
Either way latitude/longitude are transformed from the map's CRS to EPSG:4326 degrees
(rasterio.warp.transform), and the map's own CRS is reported as "crs".

Without georeferencing (most scanned maps: finding GCPs is the real module's job), four
placeholder GCPs sit at the corners of the map area and get a unit square: longitude 0 at
the left edge to 1 at the right, latitude 1 at the top to 0 at the bottom. Those are
honest non-places (one degree square at 0/0, north up) that keep the rest of the graph
working; the output says "estimated": true, "crs": null, and a WARNING is logged.

Writes OUT.json: {"map_name", "crs": "EPSG:nnnn" or null, "estimated": bool,
"gcps": [{gcp_id, rows_from_top, columns_from_left, latitude, longitude,
"crs": "EPSG:4326"}]} and run.log beside it. support_data_dir, temp_dir and gpu_id are only
logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import raster  # noqa: E402
from rasterio.warp import transform  # noqa: E402

NAME = "georeference"
GCP_CRS = "EPSG:4326"


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input_path", required=True)
    parser.add_argument("--support_data_dir", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--temp_dir", required=True)
    parser.add_argument("--gpu_id", required=True)
    return parser.parse_args(argv)


def crs_name(crs):
    """'EPSG:nnnn' for a CRS with an EPSG code, else None."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else None


def to_degrees(crs, xs: list, ys: list) -> tuple:
    """(longitudes, latitudes) in EPSG:4326 of positions in crs."""
    if crs is None:
        raise common.ModuleFailed("the map's georeferencing has no CRS")
    lons, lats = transform(crs, GCP_CRS, xs, ys)
    return list(lons), list(lats)


def gcp(n: int, row: float, column: float, latitude: float, longitude: float) -> dict:
    return {"gcp_id": f"gcp_{n}", "rows_from_top": row, "columns_from_left": column,
            "latitude": latitude, "longitude": longitude, "crs": GCP_CRS}


def from_file_gcps(dataset) -> tuple:
    """(crs, gcps) from GCPs stored in the file, or (None, None) if there are none or
    they have no CRS (their positions could not be put in degrees)."""
    points, crs = dataset.gcps
    if not points or crs is None:
        return None, None
    lons, lats = to_degrees(crs, [p.x for p in points], [p.y for p in points])
    return crs, [gcp(n, p.row, p.col, lat, lon)
                 for n, (p, lon, lat) in enumerate(zip(points, lons, lats, strict=True), 1)]


def from_geotransform(dataset, area: tuple) -> list:
    x0, y0, x1, y1 = area
    inset_x, inset_y = (x1 - x0) // 10, (y1 - y0) // 10
    places = [(x0 + inset_x, y0 + inset_y), (x1 - inset_x, y0 + inset_y),
              (x0 + inset_x, y1 - inset_y), (x1 - inset_x, y1 - inset_y),
              ((x0 + x1) // 2, (y0 + y1) // 2)]
    xs, ys = zip(*(dataset.transform @ place for place in places), strict=True)
    lons, lats = to_degrees(dataset.crs, list(xs), list(ys))
    return [gcp(n, row, column, lat, lon) for n, ((column, row), lon, lat)
            in enumerate(zip(places, lons, lats, strict=True), start=1)]


def placeholders(area: tuple) -> list:
    """The corners of the map area on a unit square: lon 0..1 left to right, lat 1..0
    top to bottom."""
    x0, y0, x1, y1 = area
    corners = [(x0, y0, 1.0, 0.0), (x1, y0, 1.0, 1.0), (x0, y1, 0.0, 0.0), (x1, y1, 0.0, 1.0)]
    return [gcp(n, row, column, lat, lon)
            for n, (column, row, lat, lon) in enumerate(corners, start=1)]


def work(args, log) -> None:
    map_name = os.path.splitext(os.path.basename(args.input_path))[0]
    with raster.open_map(args.input_path, log) as reader:
        log.info("read %s (%s); support data %s, temp %s and gpu %s are not used",
                 args.input_path, reader.describe(), args.support_data_dir, args.temp_dir,
                 args.gpu_id)
        layout = raster.Layout(reader)
        area = layout.box(*layout.map_area())
        dataset = reader.dataset
        crs, gcps = from_file_gcps(dataset)
        estimated = False
        if gcps:
            log.info("the map holds %d GCPs in %s", len(gcps), crs)
        elif dataset.crs is not None and not dataset.transform.is_identity:
            crs, gcps = dataset.crs, from_geotransform(dataset, area)
            log.info("georeferenced in %s, geotransform %s", crs, tuple(dataset.transform)[:6])
        else:
            if not dataset.transform.is_identity or dataset.gcps[0]:
                log.warning("the map has a geotransform or GCPs but no CRS: they cannot be "
                            "put in degrees")
            gcps, estimated = placeholders(area), True
            log.warning("the map has no georeferencing GDAL can read (GeoTIFF tags, world "
                        "file, .aux.xml or GCPs): %d placeholder GCPs at the corners of the "
                        "map area on a unit square at 0/0, marked estimated", len(gcps))
    common.write_json(args.output_path, {"map_name": map_name, "crs": crs_name(crs),
                                         "estimated": estimated, "gcps": gcps})
    log.info("wrote %d GCPs (crs %s, estimated %s) in the map area %s to %s",
             len(gcps), crs_name(crs), estimated, list(area), args.output_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output_path))
    return common.run(NAME, args, folder, os.path.join(folder, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
