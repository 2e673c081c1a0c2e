"""Stand-in for the TA1 geopackage module: put the extracted features in a GeoPackage.

Run: python modules/geopackage.py --nongeoref_map_dir MAP_DIR --layout_output_dir DESC_DIR
     --georef_output_dir GEOREF_DIR --poly_output_dir POLY_DIR --ln_output_dir LINE_DIR
     --pt_output_dir POINT_DIR --output_dir GPKG_DIR --georef_map_output DIR --map_name MAP
     --log_path DIR/run.log [--sleep S] [--fail] [--fail-unless-exists PATH]

Reads <map>_points.geojson, <map>_lines.geojson and <map>_polygons.geojson (pixel
coordinates), the GCPs of georeference's <map>.json and the legend descriptions of
<map>_{point,line,polygon}.json. Fits an affine pixel -> longitude/latitude transform to the
GCPs by least squares, and writes GPKG_DIR/<map>.gpkg with sqlite3: a GeoPackage 1.3
(application_id 'GPKG', user_version 10300) with gpkg_spatial_ref_sys, gpkg_contents,
gpkg_geometry_columns and three feature tables, points (POINT), lines (LINESTRING) and
polygons (MULTIPOLYGON), whose geometries are GeoPackage binary (a 'GP' header with an
envelope, then little-endian WKB). The map folder must hold the map; no georeferenced
copy of it is written to --georef_map_output.
"""

import json
import os
import sqlite3
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "geopackage"
APPLICATION_ID = 0x47504B47  # 'GPKG'
USER_VERSION = 10300  # GeoPackage 1.3.0

WKT = {
    4267: 'GEOGCS["NAD27",DATUM["North_American_Datum_1927",SPHEROID["Clarke 1866",'
          '6378206.4,294.978698213898,AUTHORITY["EPSG","7008"]],AUTHORITY["EPSG","6267"]],'
          'PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,'
          'AUTHORITY["EPSG","9122"]],AUTHORITY["EPSG","4267"]]',
    4326: 'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,'
          'AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,'
          'AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,'
          'AUTHORITY["EPSG","9122"]],AUTHORITY["EPSG","4326"]]',
}

# The core tables as GeoPackage 1.3 defines them (section 1.1.2, 1.1.3, 2.1.5)
SCHEMA = """
CREATE TABLE gpkg_spatial_ref_sys (
  srs_name TEXT NOT NULL,
  srs_id INTEGER PRIMARY KEY,
  organization TEXT NOT NULL,
  organization_coordsys_id INTEGER NOT NULL,
  definition TEXT NOT NULL,
  description TEXT
);
CREATE TABLE gpkg_contents (
  table_name TEXT NOT NULL PRIMARY KEY,
  data_type TEXT NOT NULL,
  identifier TEXT UNIQUE,
  description TEXT DEFAULT '',
  last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE,
  srs_id INTEGER,
  CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id)
);
CREATE TABLE gpkg_geometry_columns (
  table_name TEXT NOT NULL,
  column_name TEXT NOT NULL,
  geometry_type_name TEXT NOT NULL,
  srs_id INTEGER NOT NULL,
  z TINYINT NOT NULL,
  m TINYINT NOT NULL,
  CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name),
  CONSTRAINT uk_gc_table_name UNIQUE (table_name),
  CONSTRAINT fk_gc_tn FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name),
  CONSTRAINT fk_gc_srs FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id)
);
"""

# (table, input switch, file suffix, geometry type name, legend description kind)
LAYERS = [
    ("points", "pt_output_dir", "points", "POINT", "point"),
    ("lines", "ln_output_dir", "lines", "LINESTRING", "line"),
    ("polygons", "poly_output_dir", "polygons", "MULTIPOLYGON", "polygon"),
]
WKB_TYPES = {"Point": 1, "LineString": 2, "Polygon": 3, "MultiPolygon": 6}


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    for switch in ("nongeoref_map_dir", "layout_output_dir", "georef_output_dir",
                   "poly_output_dir", "ln_output_dir", "pt_output_dir", "output_dir",
                   "georef_map_output", "map_name", "log_path"):
        parser.add_argument(f"--{switch}", required=True)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- transform


def solve3(matrix: list, vector: list) -> list:
    """Solve a 3x3 linear system by Gaussian elimination with partial pivoting."""
    rows = [list(matrix[i]) + [vector[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-12:
            raise common.ModuleFailed("the GCPs are collinear: no affine transform")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(3):
            if r != col:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [rows[i][3] / rows[i][i] for i in range(3)]


def fit_affine(gcps: list):
    """A function (x, y) -> (lon, lat) fitted to the GCPs by least squares."""
    if len(gcps) < 3:
        raise common.ModuleFailed(f"need at least 3 GCPs for a transform, got {len(gcps)}")
    basis = [(g["columns_from_left"], g["rows_from_top"], 1.0) for g in gcps]
    normal = [[sum(b[i] * b[j] for b in basis) for j in range(3)] for i in range(3)]

    def fit(values):
        sums = [sum(b[i] * v for b, v in zip(basis, values, strict=True)) for i in range(3)]
        return solve3(normal, sums)

    lon = fit([g["longitude"] for g in gcps])
    lat = fit([g["latitude"] for g in gcps])
    return lambda x, y: (lon[0] * x + lon[1] * y + lon[2], lat[0] * x + lat[1] * y + lat[2])


def transform_coordinates(coordinates, to_geo):
    """Apply to_geo to every [x, y] in a nested GeoJSON coordinate array."""
    if coordinates and isinstance(coordinates[0], (int, float)):
        return list(to_geo(coordinates[0], coordinates[1]))
    return [transform_coordinates(part, to_geo) for part in coordinates]


# ---------------------------------------------------------------- GeoPackage binary


def wkb(geometry: dict) -> bytes:
    """Little-endian WKB for a GeoJSON Point, LineString, Polygon or MultiPolygon."""
    kind, coords = geometry["type"], geometry["coordinates"]
    head = struct.pack("<BI", 1, WKB_TYPES[kind])

    def points(seq):
        return struct.pack("<I", len(seq)) + b"".join(struct.pack("<dd", *p[:2]) for p in seq)

    if kind == "Point":
        return head + struct.pack("<dd", *coords[:2])
    if kind == "LineString":
        return head + points(coords)
    if kind == "Polygon":
        return head + struct.pack("<I", len(coords)) + b"".join(points(r) for r in coords)
    return head + struct.pack("<I", len(coords)) + b"".join(
        wkb({"type": "Polygon", "coordinates": polygon}) for polygon in coords)


def flatten(coordinates) -> list:
    if coordinates and isinstance(coordinates[0], (int, float)):
        return [coordinates]
    return [p for part in coordinates for p in flatten(part)]


def envelope(geometry: dict) -> tuple:
    """(min_x, max_x, min_y, max_y), the order a GeoPackage header stores."""
    points = flatten(geometry["coordinates"])
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return min(xs), max(xs), min(ys), max(ys)


def gpkg_blob(geometry: dict, srs_id: int) -> bytes:
    # flags 0x03: little-endian (bit 0) with an xy envelope (envelope code 1 in bits 1-3)
    header = b"GP" + bytes([0, 0x03]) + struct.pack("<i", srs_id)
    return header + struct.pack("<4d", *envelope(geometry)) + wkb(geometry)


# ---------------------------------------------------------------- writing


def write_gpkg(path: str, srs_id: int, layers: list) -> None:
    """Write a fresh GeoPackage at path (via a temp file) from [(table, type, features)]."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {USER_VERSION}")
        db.execute("BEGIN")
        # one statement at a time: executescript() would COMMIT the open transaction
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", [
            ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian"),
            ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic"),
            ("WGS 84 geodetic", 4326, "EPSG", 4326, WKT[4326], "longitude/latitude WGS 84"),
        ])
        if srs_id != 4326:
            db.execute("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)",
                       (f"EPSG:{srs_id}", srs_id, "EPSG", srs_id,
                        WKT.get(srs_id, "undefined"), "the map's CRS, from its GeoTIFF"))
        for table, geometry_type, features in layers:
            db.execute(f"CREATE TABLE {table} (fid INTEGER PRIMARY KEY AUTOINCREMENT, "
                       f"geom {geometry_type}, legend_id TEXT, description TEXT, "
                       "pixel_geometry TEXT)")
            boxes = []
            for feature, pixel_json, description in features:
                geometry = feature["geometry"]
                boxes.append(envelope(geometry))
                db.execute(f"INSERT INTO {table} (geom, legend_id, description, pixel_geometry)"
                           " VALUES (?, ?, ?, ?)",
                           (gpkg_blob(geometry, srs_id), feature["properties"].get("legend_id"),
                            description, pixel_json))
            bounds = (min(b[0] for b in boxes), min(b[2] for b in boxes),
                      max(b[1] for b in boxes), max(b[3] for b in boxes)) if boxes else (None,) * 4
            db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, min_x, "
                       "min_y, max_x, max_y, srs_id) VALUES (?, 'features', ?, ?, ?, ?, ?, ?)",
                       (table, table, *bounds, srs_id))
            db.execute("INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', ?, ?, 0, 0)",
                       (table, geometry_type, srs_id))
        db.execute("COMMIT")
    except BaseException:
        db.close()
        os.remove(tmp)
        raise
    db.close()
    os.replace(tmp, path)


def work(args, log) -> None:
    tif = common.find_map_tif(args.nongeoref_map_dir)
    georef_path = os.path.join(args.georef_output_dir, f"{args.map_name}.json")
    georef = common.read_json(georef_path, "georeference output")
    gcps = georef.get("gcps", [])
    to_geo = fit_affine(gcps)
    crs = georef.get("crs") or gcps[0].get("crs", "")
    if not crs.startswith("EPSG:"):
        raise common.ModuleFailed(f"unsupported CRS {crs!r} in {georef_path}")
    srs_id = int(crs.split(":")[1])
    log.info("map %s; %d GCPs in %s from %s", tif, len(gcps), crs, georef_path)

    layers = []
    for table, switch, suffix, geometry_type, kind in LAYERS:
        path = os.path.join(getattr(args, switch), f"{args.map_name}_{suffix}.geojson")
        collection = common.read_json(path, f"{suffix} extraction output")
        legend_path = os.path.join(args.layout_output_dir, f"{args.map_name}_{kind}.json")
        legend = common.read_json(legend_path, "legend_item_description output")
        features = []
        for feature in collection["features"]:
            pixel = feature["geometry"]
            geo = {"type": pixel["type"],
                   "coordinates": transform_coordinates(pixel["coordinates"], to_geo)}
            legend_id = feature["properties"].get("legend_id")
            description = legend.get(legend_id, {}).get("description")
            features.append(({"geometry": geo, "properties": feature["properties"]},
                             json.dumps(pixel), description))
        log.info("read %d features from %s and %d legend items from %s",
                 len(features), path, len(legend), legend_path)
        layers.append((table, geometry_type, features))

    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, f"{args.map_name}.gpkg")
    write_gpkg(out, srs_id, layers)
    log.info("wrote %s (%s); no georeferenced map copy in %s from the stand-in", out,
             ", ".join(f"{t}: {len(f)}" for t, _, f in layers), args.georef_map_output)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.georef_map_output, args.log_path, work)


if __name__ == "__main__":
    sys.exit(main())
