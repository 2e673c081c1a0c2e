"""Shared helpers for the stand-in TA1 modules in this folder.

Not run on its own: each `modules/<name>.py` imports it (after putting this folder on
sys.path) for argument parsing, the five test switches, logging, and file and JSON
helpers. Standard library only; reading maps is raster.py's, PNG patches patches.py's.

Sections: errors, arguments, running, files.
"""

import argparse
import json
import logging
import os
import sys
import time
import traceback
from datetime import UTC
from datetime import datetime

# when this process started, near enough: each module imports common first, before the
# heavier packages, so --sleep counts their import time too
STARTED = time.monotonic()

EXIT_OK = 0
EXIT_FAILED = 1


# ---------------------------------------------------------------- errors


class ModuleFailed(Exception):
    """An expected failure: logged as one line, the module exits 1."""


def lighter_rasterio() -> None:
    """Call before importing rasterio in a module's own process: rasterio imports boto3
    whenever it is installed (the server's S3 copies put it in the venv), which doubles
    its start-up, and the stand-ins only ever read local files."""
    sys.modules.setdefault("boto3", None)


# ---------------------------------------------------------------- arguments


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser that rejects abbreviations, with the test switches added."""
    # allow_abbrev=False: a misspelt catalogue switch must fail (exit 2), not match a prefix
    parser = argparse.ArgumentParser(prog=name, description=description, allow_abbrev=False)
    tests = parser.add_argument_group("test switches")
    tests.add_argument("--sleep", type=float, default=0.0, metavar="SECONDS",
                       help="take at least this long, sleeping")
    tests.add_argument("--fail", action="store_true", help="log why, then exit 1")
    tests.add_argument("--fail-unless-exists", metavar="PATH",
                       help="log and exit 1 unless PATH exists")
    tests.add_argument("--hold-mb", type=hold_size, default=0, metavar="MB",
                       help=f"hold this many MB of memory (resident) for {HOLD_SECONDS:g} s, "
                            f"at most {HOLD_MAX_MB}")
    tests.add_argument("--hold", metavar="PATH",
                       help="wait while PATH exists (a test removes it to let the module go "
                            f"on), at most {HOLD_MAX_WAIT:g} s")
    return parser


# --hold: how long a module waits at most for its file to go, and how often it looks
HOLD_MAX_WAIT = 300.0
HOLD_POLL = 0.05
HOLD_SECONDS = 2.0
# an API user's extra switch reaches this: no asking the server's host for all its memory
HOLD_MAX_MB = 1024


def hold_size(text: str) -> int:
    try:
        mb = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if not 0 <= mb <= HOLD_MAX_MB:
        raise argparse.ArgumentTypeError(f"expected 0 to {HOLD_MAX_MB} MB, got {mb}")
    return mb
PAGE = 4096


def parse_bool(text: str) -> bool:
    """The catalogue's booleans arrive as the strings True/False."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ---------------------------------------------------------------- running


def run(name: str, args: argparse.Namespace, output_dir: str, log_path: str, work) -> int:
    """Create the output folder and log, honour the test switches, then call work(args, log).

    Returns the exit code: 0 on success, 1 when work raises (ModuleFailed is logged as one
    line, anything else with its traceback).
    """
    os.makedirs(output_dir, exist_ok=True)
    log = open_log(name, log_path)
    started = time.monotonic()
    log.info("%s stand-in started; output folder %s", name, output_dir)
    # the GPU the module was given, and when it ran (to the microsecond), as tests read them
    log.info("gpu: CUDA_VISIBLE_DEVICES=%s NVIDIA_VISIBLE_DEVICES=%s start=%s",
             os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
             os.environ.get("NVIDIA_VISIBLE_DEVICES", "unset"), iso_now(6))
    try:
        honour_test_switches(args, log)
        work(args, log)
    except ModuleFailed as exc:
        log.error("FAILED: %s", exc)
        return EXIT_FAILED
    except Exception:
        log.error("FAILED with an unexpected error:\n%s", traceback.format_exc())
        return EXIT_FAILED
    finally:
        # --sleep is a minimum duration of the whole process, so a slow test module stays
        # slow even if it fails, and takes no longer than that when its work is quick
        remaining = args.sleep - (time.monotonic() - STARTED)
        if remaining > 0:
            time.sleep(remaining)
        log.info("gpu: stop=%s", iso_now(6))
    log.info("%s done in %.3f s", name, time.monotonic() - started)
    return EXIT_OK


def iso_now(digits: int = 3) -> str:
    """Now as ISO 8601 UTC with a Z, the one time format of every log a module run leaves."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}"[:digits] + "Z"


class IsoUtcFormatter(logging.Formatter):
    """Log records stamped like mipper's and the journal's times: 2026-12-04T19:01:52.123Z."""

    def formatTime(self, record, datefmt=None) -> str:
        then = datetime.fromtimestamp(record.created, UTC)
        return then.strftime("%Y-%m-%dT%H:%M:%S.") + f"{then.microsecond // 1000:03d}Z"


def open_log(name: str, log_path: str) -> logging.Logger:
    """A logger writing the same lines to log_path and to stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = logging.getLogger(f"mip.module.{name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    formatter = IsoUtcFormatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in (logging.FileHandler(log_path, encoding="utf-8"),
                    logging.StreamHandler(sys.stdout)):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def honour_test_switches(args: argparse.Namespace, log: logging.Logger) -> None:
    """Raises ModuleFailed for --fail, and for --fail-unless-exists with a missing path."""
    if args.sleep > 0:
        log.info("--sleep %.3f: this run takes at least that long", args.sleep)
    if args.hold is not None:
        hold_while_exists(args.hold, log)
    if args.hold_mb > 0:
        hold_memory(args.hold_mb, log)
    if args.fail:
        raise ModuleFailed("asked to fail by --fail")
    if args.fail_unless_exists is not None:
        if not os.path.exists(args.fail_unless_exists):
            raise ModuleFailed(f"--fail-unless-exists: {args.fail_unless_exists} does not exist")
        log.info("--fail-unless-exists: %s exists", args.fail_unless_exists)


def hold_while_exists(path: str, log: logging.Logger) -> None:
    """Wait until `path` is gone, so a test holds the module running exactly as long as it
    needs instead of guessing a --sleep; bounded, so a forgotten file cannot hold it forever."""
    log.info("--hold: waiting while %s exists (at most %g s)", path, HOLD_MAX_WAIT)
    deadline = time.monotonic() + HOLD_MAX_WAIT
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(HOLD_POLL)
    log.info("--hold: %s", "released" if not os.path.exists(path) else "timed out")


def hold_memory(mb: int, log: logging.Logger) -> None:
    """Make `mb` MB resident (every page written: a fresh zeroed block is not) for
    HOLD_SECONDS, then let it go."""
    block = bytearray(mb * 1024 * 1024)
    block[::PAGE] = b"\1" * len(range(0, len(block), PAGE))
    log.info("--hold-mb %d: holding %d MB for %g s", mb, mb, HOLD_SECONDS)
    time.sleep(HOLD_SECONDS)
    del block


# ---------------------------------------------------------------- files


def require(path: str, what: str) -> str:
    """Return path; raises ModuleFailed naming `what` if it does not exist."""
    if not os.path.exists(path):
        raise ModuleFailed(f"missing input ({what}): {path}")
    return path


def find_map_tif(map_dir: str) -> str:
    """The map GeoTIFF inside a map folder: <folder>/<folder name>.tif, else the only .tif.

    Raises ModuleFailed if there is none.
    """
    require(map_dir, "map folder")
    name = os.path.basename(os.path.normpath(map_dir))
    preferred = os.path.join(map_dir, name + ".tif")
    if os.path.exists(preferred):
        return preferred
    tifs = sorted(f for f in os.listdir(map_dir) if f.lower().endswith((".tif", ".tiff")))
    if not tifs:
        raise ModuleFailed(f"missing input (map GeoTIFF): no .tif in {map_dir}")
    return os.path.join(map_dir, tifs[0])


def read_json(path: str, what: str):
    """Parse a predecessor's JSON file; raises ModuleFailed if missing or malformed."""
    require(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise ModuleFailed(f"bad JSON in {what} {path}: {exc}") from exc


def write_json(path: str, data) -> None:
    """Write JSON atomically (temp file + os.replace) so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def feature_collection(features: list, **properties) -> dict:
    """A GeoJSON FeatureCollection; extra keyword arguments become top-level members."""
    return {"type": "FeatureCollection", **properties, "features": features}


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list:
    """A closed GeoJSON polygon ring (counter-clockwise in x-right, y-up terms)."""
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def segmentation_boxes(segmentation: dict) -> dict:
    """legend_segment's labelme-style shapes as {label: (x0, y0, x1, y1)}, the first of
    each label (a legend in several columns has several boxes of a label)."""
    return {label: boxes[0] for label, boxes in segmentation_areas(segmentation).items()}


def segmentation_areas(segmentation: dict) -> dict:
    """legend_segment's labelme-style shapes as {label: [(x0, y0, x1, y1), ...]}."""
    areas = {}
    for shape in segmentation.get("shapes", []):
        (x0, y0), (x1, y1) = shape["points"]
        areas.setdefault(shape["label"], []).append(
            (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return areas


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def hex_to_rgb(text: str) -> tuple:
    """'#rrggbb' -> (r, g, b)."""
    return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
