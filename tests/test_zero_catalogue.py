"""tests/config.yml, the zero-work catalogue of the API and state tests, stays the real
catalogue in all but the work: a test run on it sees the same modules, graph, options and
outputs, so the server's checks (switch rules, GPU flags, outputs) are the same."""

import os

import yaml
from conftest import ROOT
from conftest import ZERO_CONFIG
from conftest import mipper
from conftest import read
from conftest import zero_work

ZERO_OPTIONS = ("zero_name", "zero_folder", "zero_outputs")


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_zero_catalogue_matches_the_real_one():
    real, zero = load(os.path.join(ROOT, "config.yml")), load(ZERO_CONFIG)
    assert real["runner"] == zero["runner"] and real["container"] == zero["container"]
    assert [m["name"] for m in real["modules"]] == [m["name"] for m in zero["modules"]]
    for ours, theirs in zip(real["modules"], zero["modules"], strict=True):
        assert theirs["command"] == ["python", "zero_module.py"]
        options = dict(theirs["options"])
        assert [options.pop(k) for k in ZERO_OPTIONS] == [
            ours["name"], f"$OUTPUT_DIR/{ours['name']}", ours["outputs"]]
        assert options == ours["options"], ours["name"]
        for key in set(ours) | set(theirs):
            if key not in ("command", "options"):
                assert ours.get(key) == theirs.get(key), (ours["name"], key)


def test_zero_modules_write_every_declared_output(mip_env):
    env = zero_work(mip_env)
    done = mipper(env, "--job", "zero", "--map", "WY_CO_Peach", "--module", "ALL")
    assert done.returncode == 0, done.stdout + done.stderr
    zero = load(ZERO_CONFIG)
    out = os.path.join(env["TA1_OUTPUTS_DIR"], "zero")
    for module in zero["modules"]:
        for path in module["outputs"]:
            path = path.replace("$OUTPUT_DIR", out).replace("$MAP_NAME", "WY_CO_Peach")
            assert os.path.exists(path), path
        assert "doing nothing else" in read(os.path.join(out, f"{module['name']}.log"))
