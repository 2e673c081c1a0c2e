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
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

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


def patch_rows(image, area, x0: int, y0: int, size: int):
    """The rows of one size x size patch at (x0, y0): area pixels, white elsewhere."""
    ax0, ay0, ax1, ay1 = area
    left, right = max(x0, ax0), min(x0 + size, ax1)
    blank = b"\xff" * (size * 3)
    pad_left = b"\xff" * ((left - x0) * 3)
    pad_right = b"\xff" * ((x0 + size - right) * 3)
    for y in range(y0, y0 + size):
        if ay0 <= y < ay1:
            yield pad_left + image.row(y, left, right) + pad_right
        else:
            yield blank


def crop(image, area, map_name: str, folder: str, size: int, stride: int) -> int:
    """Write the patches of one grid into folder; returns how many were written."""
    os.makedirs(folder, exist_ok=True)
    ax0, ay0, ax1, ay1 = area
    columns = 1 + math.ceil(max(0, image.width - size) / stride)
    rows = 1 + math.ceil(max(0, image.height - size) / stride)
    written = 0
    for row in range(rows):
        for col in range(columns):
            x0, y0 = col * stride, row * stride
            if x0 >= ax1 or x0 + size <= ax0 or y0 >= ay1 or y0 + size <= ay0:
                continue
            path = os.path.join(folder, f"{map_name}_{row}_{col}.png")
            common.write_png(path, size, size, patch_rows(image, area, x0, y0, size))
            written += 1
    return written


def work(args, log) -> None:
    seg_path = os.path.join(args.legend_dir, f"{args.map_name}_map_segmentation.json")
    boxes = common.segmentation_boxes(common.read_json(seg_path, "legend_segment output"))
    tif = common.find_map_tif(args.input_dir)
    image = common.read_tiff(tif)
    log.info("read %s (%d x %d) and %s", tif, image.width, image.height, seg_path)
    whole = (0, 0, image.width, image.height)
    grids = zip(args.patch_sizes, args.strides, args.only_crop_map_area, strict=True)
    for size, stride, only_map in grids:
        if only_map and "map" not in boxes:
            raise common.ModuleFailed(f"no 'map' area in {seg_path}")
        area = tuple(int(v) for v in boxes["map"]) if only_map else whole
        folder = os.path.join(args.output_dir, f"{args.map_name}_g{size}_s{stride}_wo_legend")
        count = crop(image, area, args.map_name, folder, size, stride)
        log.info("wrote %d patches of %d px, stride %d, area %s, to %s",
                 count, size, stride, list(area), folder)


def main(argv=None) -> int:
    args = parse_args(argv)
    return common.run(NAME, args, args.output_dir, args.log_path, work)


if __name__ == "__main__":
    sys.exit(main())
