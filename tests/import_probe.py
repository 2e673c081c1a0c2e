"""A test-only wrapper: runs mipper's main() and records, as each module passes, which
process ran it and whether boto3 or botocore was loaded there, and the same of this
process after the run.

    python tests/import_probe.py RESULT mipper-arguments...

RESULT gets JSON lines: {"module", "pid", "aws"} per passed module, then {"module": null,
"pid", "aws"} for this process (the one that ran luigi) at the end; `aws` lists the loaded
boto3/botocore modules' top names, `loaded` those of requests, tornado and jsonschema.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# luigi through mipper, which imports it its own way (without its optional imports)
import mipper  # noqa: E402


def seen(module) -> dict:
    tops = {m.split(".")[0] for m in sys.modules}
    return {"module": module, "pid": os.getpid(), "aws": sorted(tops & {"boto3", "botocore"}),
            "loaded": sorted(tops & {"requests", "tornado", "jsonschema"})}


def main(result: str, argv: list) -> int:
    # a SUCCESS handler runs where the task ran: in luigi's forked worker, or in a thread
    @mipper.ModuleTask.event_handler(mipper.luigi.Event.SUCCESS)
    def passed(task):
        with open(result, "a", encoding="utf-8") as f:
            f.write(json.dumps(seen(task.module)) + "\n")

    code = mipper.main(argv)
    with open(result, "a", encoding="utf-8") as f:
        f.write(json.dumps(seen(None)) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
