"""A test-only module: writes whether OPENAI_API_KEY is the key the test expects.

    python tests/key_probe.py --output RESULT [--sleep SECONDS] [--hold PATH]

--hold waits while PATH exists (at most a minute), so that a test holds the module
running exactly until it removes the file.

The test gives the expected key's SHA-256 in KEY_PROBE_SHA256 (never the key itself);
RESULT gets `same`, `different` or `absent`.
"""

import argparse
import hashlib
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="key_probe.py", allow_abbrev=False)
    parser.add_argument("--output", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--hold")
    args = parser.parse_args(argv)
    time.sleep(args.sleep)
    deadline = time.monotonic() + 60
    while args.hold and os.path.exists(args.hold) and time.monotonic() < deadline:
        time.sleep(0.05)
    key = os.environ.get("OPENAI_API_KEY")
    if key is None:
        verdict = "absent"
    elif hashlib.sha256(key.encode()).hexdigest() == os.environ.get("KEY_PROBE_SHA256"):
        verdict = "same"
    else:
        verdict = "different"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(verdict + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
