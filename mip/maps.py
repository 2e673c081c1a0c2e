"""maps: the maps under $TA1_INPUTS_DIR/maps, and the check at the door: can GDAL read this
map? Asked by POST /runs, the CDR link and mipper.

A library, not a program:

    reason = maps.unreadable("/data/inputs/maps/m/m.tif", shown="maps/m/m.tif")
    if reason: ...refuse the map, saying `reason`...

The server imports rasterio (GDAL) here and nowhere else, and only on the first check: the
import takes seconds, which start-up need not pay. GDAL opens the file and reads its first
and last blocks, so a truncated file is caught as well as one that is no image at all. The
verdict is cached per (path, size, modification time), so asking again about an unchanged
map costs one stat; a map replaced or rewritten is checked again. Never reads more than a
few blocks, never changes a file.
"""

import os
import subprocess
import sys
import threading
import time
import warnings

from mip.catalogue import NAME_RE
from mip.catalogue import check_name
from mip.errors import Invalid
from mip.errors import UsageError
from mip.settings import Settings

MAX_CACHED = 4096
# rasterio's wrapper around the GDAL error that caused it: says nothing itself
GENERIC = "See previous exception for details"

_cache = {}  # (path, size, mtime_ns) -> the reason, or None for a readable map
_lock = threading.Lock()
_rasterio = None


def unreadable(path: str, shown: str | None = None) -> str | None:
    """Why GDAL cannot read the map at `path`, or None when it can; `shown` replaces the
    path in the reason (so that an answer does not reveal the server's folders)."""
    try:
        stat = os.stat(path)
    except OSError as e:
        return f"{shown or path}: {e.strerror}"
    key = (path, stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _cache:
            reason = _cache[key]
            return reason.replace(path, shown) if reason and shown else reason
    # outside the lock: two first checks of one map may both read it, which is harmless,
    # while a slow map must not hold up the checks of others
    reason = _read(path)
    with _lock:
        if len(_cache) >= MAX_CACHED:
            _cache.pop(next(iter(_cache)))  # the oldest entry
        _cache[key] = reason
    return reason.replace(path, shown) if reason and shown else reason


def forget() -> None:
    """Drop every cached verdict."""
    with _lock:
        _cache.clear()


def _read(path: str) -> str | None:
    """GDAL's reason for failing to open the file or read its first and last blocks."""
    rasterio = _load()
    from rasterio.windows import Window

    # an un-georeferenced map is no fault of the map: most scans have no georeferencing.
    # Set on every call, as a caller (a test) may have reset the filters since the last.
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    try:
        with rasterio.open(path) as dataset:
            # blocks are stored in order, so a file cut short loses its last one first
            for col, row in ((0, 0), (dataset.width - 1, dataset.height - 1)):
                dataset.read(window=Window(col, row, 1, 1))
    except (rasterio.errors.RasterioError, OSError) as e:
        return _gdal_reason(e)
    return None


def _load():
    """rasterio, imported on first use."""
    global _rasterio
    if _rasterio is None:
        import rasterio
        import rasterio.enums
        import rasterio.errors

        _rasterio = rasterio
    return _rasterio


def _gdal_reason(error: BaseException) -> str:
    """The messages of an exception and the GDAL errors chained to it, most general first,
    without rasterio's generic wrapper or repeats."""
    messages = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip()
        if text and GENERIC not in text and not any(text in m for m in messages):
            messages.append(text)
        error = error.__cause__ or error.__context__
    return " / ".join(messages) or "GDAL could not read it"


def map_file(settings: Settings, map_name: str) -> str:
    return os.path.join(settings.inputs_dir, "maps", map_name, f"{map_name}.tif")


def list_maps(settings: Settings) -> list:
    """Names of the maps present under $TA1_INPUTS_DIR/maps, sorted."""
    try:
        names = sorted(os.listdir(os.path.join(settings.inputs_dir, "maps")))
    except OSError:
        return []
    return [n for n in names if NAME_RE.fullmatch(n) and os.path.isfile(map_file(settings, n))]


class _Listing:
    """What listed_maps() knows of one maps folder: the folder's (inode, mtime) when it was
    listed, the sorted names holding their map file, and those that did not yet."""

    def __init__(self, stamp: tuple, present: list, pending: set, recheck: bool):
        self.stamp, self.present, self.pending, self.recheck = stamp, present, pending, recheck


_listings = {}  # maps folder -> _Listing
_listing_lock = threading.Lock()
# a folder changed this close before it was listed may change again within the same
# mtime tick unseen (git's "racy" entries): its listing is redone at the next call
RACY_NS = 2 * 10**9


def listed_maps(settings: Settings) -> list:
    """list_maps(), kept between calls: the folder is listed again only when its mtime says
    a map folder came or went; a folder still waiting for its map file (being downloaded)
    is looked at again on every call. One stat while nothing changed, where list_maps()
    stats every map. Not seen: a map file removed from a folder that stays; a caller that
    shows a map checks its file (the console does, for its page)."""
    folder = os.path.join(settings.inputs_dir, "maps")
    try:
        st = os.stat(folder)
    except OSError:
        return []
    stamp = (st.st_ino, st.st_mtime_ns)
    with _listing_lock:
        kept = _listings.get(folder)
        if kept is None or kept.stamp != stamp or kept.recheck:
            kept = _relist(settings, folder, stamp, kept)
            _listings[folder] = kept
        else:
            arrived = {n for n in kept.pending if os.path.isfile(map_file(settings, n))}
            if arrived:
                kept.pending -= arrived
                kept.present = sorted([*kept.present, *arrived])
        return kept.present


def _relist(settings: Settings, folder: str, stamp: tuple, kept: "_Listing | None") -> _Listing:
    """A new listing of `folder`; only names not known to hold a map are stat'ed."""
    listed_at = time.time_ns()
    known = set(kept.present) if kept else set()
    try:
        names = sorted(n for n in os.listdir(folder) if n in known or NAME_RE.fullmatch(n))
    except OSError:
        names = []
    present, pending = [], set()
    for name in names:
        if name in known or os.path.isfile(map_file(settings, name)):
            present.append(name)
        else:
            pending.add(name)
    return _Listing(stamp, present, pending, stamp[1] > listed_at - RACY_NS)


def check_map(settings: Settings, map_name: str) -> None:
    """Raises UsageError unless the map exists."""
    check_name("map", map_name)
    if not os.path.isfile(map_file(settings, map_name)):
        known = ", ".join(list_maps(settings)) or "none"
        raise UsageError(f"no map {map_name!r}: expected $TA1_INPUTS_DIR/maps/{map_name}/"
                         f"{map_name}.tif; maps present: {known}")


def check_readable(settings: Settings, map_name: str, in_child: bool = False) -> None:
    """Refuse a map GDAL cannot read (Invalid unreadable_map, with GDAL's reason) before any
    module meets it; `in_child` asks a short-lived child process (unreadable_in_child)."""
    shown = f"$TA1_INPUTS_DIR/maps/{map_name}/{map_name}.tif"
    ask = unreadable_in_child if in_child else unreadable
    reason = ask(map_file(settings, map_name), shown)
    if reason:
        raise Invalid(f"map {map_name!r}: GDAL cannot read {shown}: {reason}", "unreadable_map")


CHILD_TIMEOUT = 120  # seconds: a huge map on a slow disk still opens well within this


def unreadable_in_child(path: str, shown: str) -> str | None:
    """unreadable(), asked of a short-lived child process: mipper stays without rasterio,
    whose import alone costs about 40 MB for the whole run."""
    try:
        done = subprocess.run([sys.executable, "-m", "mip.maps", path, shown],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return f"{shown}: GDAL did not open it within {CHILD_TIMEOUT} s"
    if done.returncode == 0:
        return None
    lines = done.stdout.strip().splitlines() or done.stderr.strip().splitlines()[-1:]
    return lines[-1] if lines else f"{shown}: the check ended with code {done.returncode}"


CONTENT_SIDE = 256  # the longer side of the decimated read that tells a blank map
INK_STEP = 48 / 255  # a pixel this far from the band's usual value (of its full scale) is ink
INK_PIXELS = 8  # at least this many such pixels: a map, not scanner noise or a speck


def has_content(path: str) -> bool:
    """True unless the map is blank: every band of a small decimated read (overviews used
    where the file has them) holds nearly one value, or every pixel is masked. A palette
    band is compared through its colours, an alpha band is left out (it is the mask), and a
    float band's scale is the larger of its range and its usual value. Raises OSError or
    rasterio's errors for a file GDAL cannot read."""
    rasterio = _load()
    import numpy

    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    with rasterio.open(path) as dataset:
        scale = max(1, -(-max(dataset.width, dataset.height) // CONTENT_SIDE))
        shape = (dataset.count, -(-dataset.height // scale), -(-dataset.width // scale))
        data = dataset.read(out_shape=shape, masked=True)
        bits = dataset.tags(ns="IMAGE_STRUCTURE").get("NBITS")
        bands = []
        for index, band in enumerate(data, start=1):
            if dataset.colorinterp[index - 1] == rasterio.enums.ColorInterp.alpha:
                continue  # the mask, already applied
            try:
                colours = dataset.colormap(index)
            except ValueError:  # no colour map
                colours = None
            if colours:
                lut = numpy.zeros((max(colours) + 1, 3), dtype=numpy.int64)
                for value, rgba in colours.items():
                    lut[value] = rgba[:3]
                picked = lut[numpy.clip(band.filled(0), 0, len(lut) - 1)]
                bands += [(numpy.ma.array(picked[..., i], mask=numpy.ma.getmaskarray(band)),
                           255.0) for i in range(3)]
            elif band.dtype.kind in "ui":
                bands.append((band, float(2 ** int(bits) - 1 if bits else
                                          numpy.iinfo(band.dtype).max)))
            else:
                bands.append((band, None))
    for band, full in bands:
        values = band.compressed()
        values = values[numpy.isfinite(values)].astype(numpy.float64)
        if not values.size:
            continue
        usual = numpy.median(values)
        if full is None:  # a float band: its scale is its values' own
            full = max(float(values.max() - values.min()), abs(float(usual)))
        if full and numpy.count_nonzero(numpy.abs(values - usual) > full * INK_STEP) \
                >= min(INK_PIXELS, values.size):
            return True
    return False


def has_content_in_child(path: str) -> bool | None:
    """has_content(), asked of a short-lived child process (mipper stays without rasterio,
    see unreadable_in_child); None when it cannot tell."""
    try:
        done = subprocess.run([sys.executable, "-m", "mip.maps", "--content", path],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return None
    return {"content": True, "blank": False}.get(done.stdout.strip())


def main(argv=None) -> int:
    """`python -m mip.maps FILE [SHOWN]`: prints why GDAL cannot read FILE and exits 1, or
    exits 0 when it can. `python -m mip.maps --content FILE` prints `content` or `blank`
    (has_content), or exits 1 with GDAL's reason."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--content"]:
        try:
            print("content" if has_content(args[1]) else "blank")
        except Exception as e:  # noqa: BLE001 - rasterio's errors and numpy's, all one answer
            print(_gdal_reason(e))
            return 1
        return 0
    reason = unreadable(args[0], args[1] if len(args) > 1 else None)
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
