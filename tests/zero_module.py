"""A module that does no work: it writes the outputs tests/config.yml declares for it (empty
files, or folders for outputs without a suffix) and honours the stand-ins' test switches
(--sleep, --fail, --fail-unless-exists, --hold-mb, --hold) through modules/common.py.

Run by mipper for the API and state tests (tests/config.yml, MIP_CONFIG):
    python tests/zero_module.py --zero_name NAME --zero_folder DIR --zero_outputs PATH...
    [the catalogue's own options, ignored] [test switches]
It starts in a few tens of milliseconds: no rasterio, no numpy, no map read.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "modules"))

import common  # noqa: E402


def main(argv=None) -> int:
    parser = common.make_parser("zero_module", __doc__.splitlines()[0])
    parser.add_argument("--zero_name", required=True)
    parser.add_argument("--zero_folder", required=True)
    parser.add_argument("--zero_outputs", nargs="+", required=True)
    # the catalogue's own options (and a test's stray words) are the real module's business
    args, _ = parser.parse_known_args(argv)

    def work(args, log):
        for path in args.zero_outputs:
            if os.path.splitext(path)[1]:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "w").close()
            else:
                os.makedirs(path, exist_ok=True)
        log.info("%s: wrote %d outputs, doing nothing else", args.zero_name,
                 len(args.zero_outputs))
        # as the legend_item_description stand-in does: whether the key reached it, never it
        log.info("OPENAI_API_KEY is %s", "set" if os.environ.get("OPENAI_API_KEY") else "not set")

    return common.run(args.zero_name, args, args.zero_folder,
                      os.path.join(args.zero_folder, "run.log"), work)


if __name__ == "__main__":
    sys.exit(main())
