"""What a run loads: an inline run never imports boto3, in mipper or in its luigi workers
(issue 22 point 5: boto3 only for S3 or ECS); nor what luigi would load for nothing
(requests, tornado), nor jsonschema when the server vouches for the catalogue."""

import json
import os
import subprocess
import sys

import pytest
from conftest import MAP
from conftest import ROOT
from conftest import ZERO_CONFIG
from conftest import zero_work

from mip import catalogue
from mip.errors import CatalogueError

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
    # luigi's optional imports, of no use to a run, are kept from it (mipper.py)
    assert not {"requests", "tornado"} & set(main["loaded"])
    assert len(modules) == MODULES
    # luigi's forked workers: each in a process of its own, none with boto3
    assert all(m["aws"] == [] and m["pid"] != main["pid"] for m in modules)


def test_a_catalogue_the_server_checked_is_not_checked_again_without_jsonschema():
    """A run's mipper given the digest of its config.yml (CHECKED_ENV, as the server sets
    it) loads the catalogue without importing jsonschema, nor requests or tornado."""
    catalogue.load_catalogue(ZERO_CONFIG)
    code = ("import sys; sys.argv = ['mipper.py']; import mipper; from mip import catalogue;"
            f" catalogue.load_catalogue({ZERO_CONFIG!r}, {sorted(catalogue.CHECKED)!r});"
            " print(sorted({'jsonschema', 'requests', 'tornado'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_changed_catalogue_is_checked_again_whatever_digest_it_is_given(tmp_path):
    """The digest vouches for one text only: a config.yml changed since fails the schema
    as it would without one."""
    catalogue.load_catalogue(ZERO_CONFIG)
    vouched = sorted(catalogue.CHECKED)
    with open(ZERO_CONFIG, encoding="utf-8") as f:
        text = f.read()
    broken = tmp_path / "config.yml"
    broken.write_text(text.replace('version: "0.1.0"', "version: 1", 1), encoding="utf-8")
    with pytest.raises(CatalogueError, match="version"):
        catalogue.load_catalogue(str(broken), vouched)
