"""Every setting is in docs/settings.md, every route in README.md or a docs/ page, and the
payload examples there are valid."""

import glob
import json
import os
import re

import jsonschema
from conftest import ROOT
from docpages import docs_text
from docpages import page

import mip_server
from mip import journal
from mip.settings import Settings


def test_every_environment_variable_is_documented():
    names = set()
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".sh")):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                names |= set(re.findall(r"\b((?:MIP|TA1)_[A-Z_]*[A-Z])\b", f.read()))
    names -= {"MIP_HOME"}  # set by env.sh for itself
    text = page("settings.md")
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/settings.md does not document {missing}"


def test_every_route_is_documented(mip_env, tmp_path):
    settings = Settings.from_env(mip_env)
    cfg = mip_server.Config(settings=settings, users={"u": mip_server.hash_password("p")})
    db = journal.Journal(str(tmp_path / "j.db"))
    db.migrate()
    app = mip_server.make_app(cfg, db, mip_server.RunQueue(cfg, db))
    text = docs_text()
    for route in app.routes:
        path = re.sub(r"<(\w+)>", r"{\1}", route.rule)
        documented = re.sub(r"/(logs|outputs|temps)$", "/logs", path)
        assert f"{route.method} {documented}" in text or f"`{documented}`" in text \
            or f"{route.method} {path}" in text, f"{route.method} {path} not in the docs"
    db.close()


def test_readme_payload_examples_are_valid():
    with open(os.path.join(ROOT, "schema", "RunPayload.json")) as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    examples = re.findall(r"'(\{\"job\".*?\})'", docs_text())
    assert examples
    for example in examples:
        validator.validate(json.loads(example))


def test_every_schema_is_valid():
    paths = glob.glob(os.path.join(ROOT, "schema", "**", "*.json"), recursive=True)
    assert len(paths) >= 9
    for path in paths:
        with open(path) as f:
            jsonschema.Draft202012Validator.check_schema(json.load(f))
