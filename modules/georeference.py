"""Stand-in for the TA1 georeference module: ground control points from the GeoTIFF tags.

Run: python modules/georeference.py --input_path MAP.tif --support_data_dir DIR
     --output_path OUT.json --temp_dir DIR --gpu_id N
     [--sleep S] [--fail] [--fail-unless-exists PATH]

Finds the map area (the widest block of non-white columns, as legend_segment does), picks
five points in it (four corners inset by a tenth, and the centre) and computes their
longitude/latitude from ModelPixelScale (33550) and ModelTiepoint (33922), with the CRS from
the GeoKeyDirectory (34735). Writes OUT.json:
{"map_name", "crs", "gcps": [{gcp_id, rows_from_top, columns_from_left, latitude, longitude,
crs}]} and run.log beside it. support_data_dir, temp_dir and gpu_id are only logged.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NAME = "georeference"


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input_path", required=True)
    parser.add_argument("--support_data_dir", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--temp_dir", required=True)
    parser.add_argument("--gpu_id", required=True)
    return parser.parse_args(argv)


def work(args, log) -> None:
    image = common.read_tiff(args.input_path)
    map_name = os.path.splitext(os.path.basename(args.input_path))[0]
    log.info("read %s (%d x %d); support data %s, temp %s and gpu %s are not used",
             args.input_path, image.width, image.height, args.support_data_dir,
             args.temp_dir, args.gpu_id)
    lon0, lat0, dx, dy = common.geotiff_transform(image)
    epsg = common.geotiff_epsg(image)
    if epsg is None:
        raise common.ModuleFailed(f"no EPSG code in the GeoKeyDirectory of {args.input_path}")
    crs = f"EPSG:{epsg}"
    log.info("GeoTIFF: origin (%.6f, %.6f), pixel size (%g, %g), %s", lon0, lat0, dx, dy, crs)

    min_gap = max(8, image.width // 50)
    x0, x1 = common.widest(common.column_blocks(image, 0, image.height, min_gap))
    y0, y1 = common.widest(common.row_blocks(image, x0, x1, 0, image.height, min_gap))
    inset_x, inset_y = (x1 - x0) // 10, (y1 - y0) // 10
    places = [(x0 + inset_x, y0 + inset_y), (x1 - inset_x, y0 + inset_y),
              (x0 + inset_x, y1 - inset_y), (x1 - inset_x, y1 - inset_y),
              ((x0 + x1) // 2, (y0 + y1) // 2)]
    gcps = []
    for n, (column, row) in enumerate(places, start=1):
        gcps.append({
            "gcp_id": f"gcp_{n}",
            "rows_from_top": row,
            "columns_from_left": column,
            "latitude": lat0 - row * dy,
            "longitude": lon0 + column * dx,
            "crs": crs,
        })
    common.write_json(args.output_path, {"map_name": map_name, "crs": crs, "gcps": gcps})
    log.info("wrote %d GCPs in the map area [%d, %d, %d, %d] to %s",
             len(gcps), x0, y0, x1, y1, args.output_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output_path))
    return common.run(NAME, args, folder, os.path.join(folder, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
