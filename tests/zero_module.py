"""A module that does no work: it writes the outputs tests/config.yml declares for it (empty
files, or folders for outputs without a suffix,
as small as the catalogue's checks allow) and honours the stand-ins' test switches
(--sleep, --fail, --fail-unless-exists, --hold-mb, --hold) through modules/common.py.

Run by mipper for the API and state tests (tests/config.yml, MIP_CONFIG):
    python tests/zero_module.py --zero_name NAME --zero_folder DIR --zero_outputs PATH...
    [--warn TEXT] [the catalogue's own options, ignored] [test switches]
It starts in a few tens of milliseconds: no rasterio, no numpy, no map read.
"""

import os
import sqlite3
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "modules"))

import common  # noqa: E402


def write_least(path: str) -> None:
    """The least output the catalogue's checks accept: JSON that parses, a GeoJSON with no
    features, a GeoPackage with its three feature layers (SQLite, as the format is:
    gpkg_contents names its feature tables) of one row each, without a geometry: a run's
    final product with no feature at all is what a run warning is for (mipper's
    warn_if_empty), and a zero-work run stands for one that went well."""
    suffix = os.path.splitext(path)[1]
    if suffix == ".gpkg":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY,"
                       " data_type TEXT NOT NULL)")
            for layer in ("points", "lines", "polygons"):
                db.execute(f"CREATE TABLE {layer} (fid INTEGER PRIMARY KEY, geom BLOB)")
                db.execute(f"INSERT INTO {layer} (geom) VALUES (NULL)")
                db.execute("INSERT INTO gpkg_contents VALUES (?, 'features')", (layer,))
        db.close()
        return
    text = {".json": "{}", ".geojson": '{"type": "FeatureCollection", "features": []}'}
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.get(suffix, ""))


def main(argv=None) -> int:
    parser = common.make_parser("zero_module", __doc__.splitlines()[0])
    parser.add_argument("--zero_name", required=True)
    parser.add_argument("--zero_folder", required=True)
    parser.add_argument("--zero_outputs", nargs="+", required=True)
    parser.add_argument("--warn", action="append", default=[], metavar="TEXT",
                        help="log TEXT as a WARNING (repeatable); the module still passes")
    # the catalogue's own options (and a test's stray words) are the real module's business
    args, _ = parser.parse_known_args(argv)

    def work(args, log):
        for path in args.zero_outputs:
            if os.path.splitext(path)[1]:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_least(path)
            else:
                # a folder of patches: the catalogue's checks ask for at least one file
                os.makedirs(path, exist_ok=True)
                open(os.path.join(path, "zero.png"), "wb").close()
        log.info("%s: wrote %d outputs, doing nothing else", args.zero_name,
                 len(args.zero_outputs))
        for text in args.warn:
            log.warning("%s", text)
        # as the legend_item_description stand-in does: whether the key reached it, never it
        log.info("OPENAI_API_KEY is %s", "set" if os.environ.get("OPENAI_API_KEY") else "not set")

    return common.run(args.zero_name, args, args.zero_folder,
                      os.path.join(args.zero_folder, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
