"""checks: what a module's outputs must hold once it exits 0, as the catalogue's `checks`
name them (the original TA1 tool's run_post did the same with minimum counts).

Used by mipper after a module exits 0: `failure(check)` says which check failed and what
was found, or None; and after a run passes, `featureless(paths)` names its final products
that hold no feature. It reads files without following links; a GeoPackage is read through
SQLite, which is what the format is, so mipper needs no GDAL for it. Never writes.
"""

import json
import os
import sqlite3
import stat
import urllib.parse

MAX_GEOJSON = 64 * 1024 * 1024  # a larger GeoJSON is not parsed: its size shows it has content


def failure(check: dict) -> str | None:
    """Why the output at check["path"] fails its check; None when it passes."""
    path = check["path"]
    name = os.path.basename(path.rstrip("/"))
    try:
        info = os.lstat(path)
    except OSError:
        return f"check of {name}: it does not exist"
    if stat.S_ISLNK(info.st_mode):
        return f"check of {name}: it is a link, not the module's own output"
    if "min_files" in check:
        found = count_files(path) if stat.S_ISDIR(info.st_mode) else 0
        if found < check["min_files"]:
            return f"check of {name}: expected at least {check['min_files']} files, found {found}"
    if "min_bytes" in check and (not stat.S_ISREG(info.st_mode)
                                 or info.st_size < check["min_bytes"]):
        return (f"check of {name}: expected at least {check['min_bytes']} bytes, found "
                f"{info.st_size if stat.S_ISREG(info.st_mode) else 'no file'}")
    if "layers" in check or "min_features" in check:
        try:
            layers = feature_counts(path, info.st_size)
        except (OSError, ValueError, sqlite3.Error) as e:
            return f"check of {name}: cannot read its features: {e}"
        missing = [layer for layer in check.get("layers", ()) if layer not in layers]
        if missing:
            return (f"check of {name}: expected the layers {', '.join(check['layers'])}, "
                    f"missing {', '.join(missing)}")
        found = sum(n for n in layers.values() if n is not None)
        if found < check.get("min_features", 0):
            return (f"check of {name}: expected at least {check['min_features']} features, "
                    f"found {found}")
    return None


def featureless(paths: list) -> list:
    """Those of the feature files (GeoPackage, GeoJSON) at `paths` that hold no feature in
    any layer; a file that cannot be read, or too large to count, is not among them."""
    empty = []
    for path in paths:
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                continue
            counts = feature_counts(path, info.st_size)
        except (OSError, ValueError, sqlite3.Error):
            continue
        if all(n == 0 for n in counts.values()):
            empty.append(path)
    return empty


def count_files(folder: str) -> int:
    """Regular files under `folder`, at any depth, links not followed."""
    count = 0
    for _, _, files in os.walk(folder):
        count += len(files)
    return count


def feature_counts(path: str, size: int) -> dict:
    """{layer: features} of a GeoPackage, or {"features": n} of a GeoJSON file (None when it
    is too large to parse here). Raises OSError, ValueError or sqlite3.Error."""
    if path.lower().endswith(".gpkg"):
        return geopackage_counts(path)
    if size > MAX_GEOJSON:
        return {"features": None}
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise ValueError("not a GeoJSON FeatureCollection")
    return {"features": len(data["features"])}


def geopackage_counts(path: str) -> dict:
    """{table: rows} of a GeoPackage's feature tables, listed in its gpkg_contents."""
    uri = f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1"
    with sqlite3.connect(uri, uri=True) as db:
        tables = [row[0] for row in db.execute(
            "SELECT table_name FROM gpkg_contents WHERE data_type = 'features'")]
        counts = {}
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            counts[table] = db.execute(f"SELECT COUNT(*) FROM {quoted}").fetchone()[0]
    db.close()
    return counts
