"""Stand-in for the TA1 map_crop module: cut the map into PNG patches.

Run: python modules/map_crop.py --input_dir MAP_DIR --legend_dir SEG_DIR --output_dir OUT
     --log_path OUT/run.log --map_name MAP --patch_sizes 1000 256 640
     --strides 1000 200 320 --only_crop_map_area True True True
     [--sleep S] [--fail] [--fail-unless-exists PATH]

For each (patch size, stride, only-map-area) triple writes OUT/<map>_g<size>_s<stride>_wo_legend/
holding <map>_<row>_<col>.png, where row and col index a grid laid over the whole image,
so patch (row, col) starts at pixel (col*stride, row*stride). With only-map-area True,
everything outside the "map" box of legend_segment's <map>_map_segmentation.json is white
and patches that miss the box are not written. Edge patches are padded with white.

The map is read one band of patch rows at a time (a window of the map area, `size` rows
high), never whole, and each patch is written by Pillow at zlib level 1: patches are
intermediate files, and encoding them is most of this module's time on a big map.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

common.lighter_rasterio()

import numpy as np  # noqa: E402
import patches  # noqa: E402
import raster  # noqa: E402

NAME = "map_crop"


def parse_args(argv):
    parser = common.make_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--legend_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--log_path", required=True)
    parser.add_argument("--map_name", required=True)
    parser.add_argument("--patch_sizes", required=True, nargs="+", type=int)
    parser.add_argument("--strides", required=True, nargs="+", type=int)
    parser.add_argument("--only_crop_map_area", required=True, nargs="+", type=common.parse_bool)
    args = parser.parse_args(argv)
    if not len(args.patch_sizes) == len(args.strides) == len(args.only_crop_map_area):
        parser.error("--patch_sizes, --strides and --only_crop_map_area need as many values each")
    if min(args.patch_sizes + args.strides) < 1:
        parser.error("patch sizes and strides must be positive")
    return args


def crop(reader, area, map_name: str, folder: str, size: int, stride: int) -> int:
    """Write the patches of one grid into folder; returns how many were written."""
    os.makedirs(folder, exist_ok=True)
    ax0, ay0, ax1, ay1 = area
    columns = 1 + math.ceil(max(0, reader.width - size) / stride)
    rows = 1 + math.ceil(max(0, reader.height - size) / stride)
    written = 0
    with patches.pool() as threads:
        for row in range(rows):
            y0 = row * stride
            top, bottom = max(y0, ay0), min(y0 + size, ay1)
            if top >= bottom:
                continue
            band = reader.rgb((ax0, top, ax1, bottom))

            def write(col, band=band, row=row, y0=y0, top=top, bottom=bottom):
                x0 = col * stride
                left, right = max(x0, ax0), min(x0 + size, ax1)
                patch = np.full((size, size, 3), 255, dtype=np.uint8)
                patch[top - y0:bottom - y0, left - x0:right - x0] = \
                    band[:, left - ax0:right - ax0]
                patches.write_png(os.path.join(folder, f"{map_name}_{row}_{col}.png"), patch)

            # a patch row at a time, so only one band is held
            inside = [col for col in range(columns)
                      if col * stride < ax1 and col * stride + size > ax0]
            list(threads.map(write, inside))
            written += len(inside)
    return written


def work(args, log) -> None:
    seg_path = os.path.join(args.legend_dir, f"{args.map_name}_map_segmentation.json")
    boxes = common.segmentation_boxes(common.read_json(seg_path, "legend_segment output"))
    tif = common.find_map_tif(args.input_dir)
    with raster.open_map(tif, log) as reader:
        log.info("read %s (%s) and %s", tif, reader.describe(), seg_path)
        whole = (0, 0, reader.width, reader.height)
        grids = zip(args.patch_sizes, args.strides, args.only_crop_map_area, strict=True)
        for size, stride, only_map in grids:
            if only_map and "map" not in boxes:
                raise common.ModuleFailed(f"no 'map' area in {seg_path}")
            area = whole
            if only_map:
                x0, y0, x1, y1 = (int(v) for v in boxes["map"])
                area = (max(0, x0), max(0, y0), min(reader.width, x1), min(reader.height, y1))
            folder = os.path.join(args.output_dir,
                                  f"{args.map_name}_g{size}_s{stride}_wo_legend")
            count = crop(reader, area, args.map_name, folder, size, stride)
            log.info("wrote %d patches of %d px, stride %d, area %s, to %s",
                     count, size, stride, list(area), folder)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir, args.log_path, work)


if __name__ == "__main__":
    sys.exit(main())
