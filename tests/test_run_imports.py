"""What a run loads: an inline run never imports boto3, in mipper or in its luigi workers
(issue 22 point 5: boto3 only for S3 or ECS)."""

import json
import os
import subprocess
import sys

from conftest import MAP
from conftest import ROOT
from conftest import zero_work

MODULES = 9  # config.yml's graph, and tests/config.yml's, its zero-work copy


def probe(env: dict, result, *args) -> list:
    """Run mipper through tests/import_probe.py; its JSON lines."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "import_probe.py"),
                           str(result), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    with open(result, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_an_inline_run_never_imports_boto3(mip_env, tmp_path):
    # what mipper and its workers import, not what the modules (processes of their own)
    # compute: the zero-work catalogue
    seen = probe(zero_work(mip_env), tmp_path / "seen.jsonl", "--job", "plain", "--map", MAP,
                 "--module", "ALL")
    *modules, main = seen
    assert main["module"] is None and main["aws"] == []
    assert len(modules) == MODULES
    # luigi's forked workers: each in a process of its own, none with boto3
    assert all(m["aws"] == [] and m["pid"] != main["pid"] for m in modules)
