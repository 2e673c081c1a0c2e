"""A newcomer's papercuts (issue 14, part 7): the docs' commands in a fresh shell, the
client's empty POST bodies, its shebang and run bit, Python 3.8, --version everywhere, and
which defaults are env.sh's.

Run: .venv/bin/python -m pytest -q tests/test_papercuts.py
"""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from conftest import payload
from docpages import docs_text

from mip import VERSION

CLIENT = os.path.join(ROOT, "mip_client.py")
VENV_BIN = os.path.dirname(sys.executable)


def readme() -> str:
    """README.md and the docs/ pages, where the commands and the settings are."""
    return docs_text()


def fresh_shell(command: str, tmp_path, stdin: str = "") -> subprocess.CompletedProcess:
    """`command` in a new login-less bash with a bare environment (no venv on PATH, no MIP_*
    variables), after `source env.sh` as the docs say."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "--noprofile", "--norc", "-c",
                           f"cd {ROOT} && source env.sh && {command}"],
                          env=env, input=stdin, capture_output=True, text=True, timeout=120)


# the docs' helper commands, as they write them (after `source env.sh`)
README_COMMANDS = [
    ("python mip_server.py --hash-password", "pw\n", r"^pbkdf2_sha256\$\d+\$[0-9a-f]+\$"),
    ("python mipper.py --list-modules", "", r"^map_crop "),
    ("python mipper.py --list-deps geopackage", "", r"map_crop"),
    ("python mip_client.py --help", "", r"--idempotency-key"),
    ("python modules/sample_map.py --help", "", r"usage"),
]


@pytest.mark.parametrize("command, stdin, expected", README_COMMANDS)
def test_readme_commands_run_in_a_fresh_shell(tmp_path, command, stdin, expected):
    assert f"`{command}" in readme() or f"    {command}" in readme() or \
        command.replace(" --help", "") in readme(), command
    proc = fresh_shell(command, tmp_path, stdin)
    assert proc.returncode == 0, proc.stderr
    assert re.search(expected, proc.stdout, re.M), proc.stdout


def test_env_sh_puts_the_venv_first_on_path_once(tmp_path):
    proc = fresh_shell("source env.sh; command -v python; echo $PATH", tmp_path)
    python, path = proc.stdout.split()
    assert python == os.path.join(ROOT, ".venv", "bin", "python")
    assert path.split(":").count(os.path.join(ROOT, ".venv", "bin")) == 1
    assert "source env.sh" in readme() and "`.venv/bin` first on `PATH`" in readme()


def test_client_posts_without_a_body_to_cancel_and_rerun(server, tmp_path):
    """docs/client.md's `--post --url .../runs/ID/rerun --wait` and `.../cancel` need no body."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIP_")}
    env.update(MIP_CLIENT_USER=server.user, MIP_CLIENT_PASSWORD=server.password)
    run = server.post("/runs", json=payload("cuts", "georeference")).json()
    assert server.wait_run(run["run_id"])["status"] == "passed"

    def client(*args):
        return subprocess.run([sys.executable, CLIENT, *args], env=env, cwd=tmp_path,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=180)

    rerun = client("--post", "--url", f"{server.url}/runs/{run['run_id']}/rerun", "--wait")
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads(rerun.stdout)
    assert again["status"] == "passed" and again["run_id"] != run["run_id"]
    cancel = client("--post", "--url", f"{server.url}/runs/{run['run_id']}/cancel")
    assert cancel.returncode == 0, cancel.stderr
    assert json.loads(cancel.stdout)["run_id"] == run["run_id"]
    assert "--post --url" in readme() and "/rerun --wait" in readme()


def test_client_runs_as_its_own_program(tmp_path):
    with open(CLIENT, encoding="utf-8") as f:
        assert f.readline() == "#!/usr/bin/env python3\n"
    assert os.access(CLIENT, os.X_OK)
    if os.path.exists(os.path.join(ROOT, ".git")):  # a checkout, not an unpacked copy
        staged = subprocess.run(["git", "ls-files", "-s", "mip_client.py"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30).stdout
        assert staged.startswith("100755 "), staged  # the run bit is in git, not only here
    env = dict(os.environ, PATH=f"{VENV_BIN}:/usr/bin:/bin")
    proc = subprocess.run(["./mip_client.py", "--version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mip_client {VERSION}"


# 3.9+ names the client must not use (it runs on Python 3.8)
NEWER_ATTRIBUTES = {"removeprefix", "removesuffix", "is_relative_to", "with_stem",
                    "randbytes", "cache", "lcm", "bit_count", "pairwise", "batched"}
NEWER_MODULES = {"zoneinfo", "graphlib", "tomllib"}
BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def test_client_is_python_3_8():
    with open(CLIENT, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, feature_version=(3, 8))
    found = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [a.annotation for a in args.args + args.kwonlyargs
                            + args.posonlyargs if a.annotation]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in filter(None, annotations):
            for sub in ast.walk(annotation):
                # evaluated when the def runs: `X | None` and `list[str]` fail on 3.8
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                    found.append(f"line {sub.lineno}: X | Y")
                if isinstance(sub, ast.Subscript) and getattr(sub.value, "id", "") in \
                        BUILTIN_GENERICS:
                    found.append(f"line {sub.lineno}: {sub.value.id}[...]")
        if isinstance(node, ast.Attribute) and node.attr in NEWER_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"line {node.lineno}: {n}" for n in names
                      if n.split(".")[0] in NEWER_MODULES]
    assert "from __future__ import annotations" not in source  # so the above is what runs
    assert not found, found


def test_ruff_checks_the_client_as_python_3_8():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'per-file-target-version = { "mip_client.py" = "py38" }' in f.read()
    # FA102: PEP 604/585 annotations a 3.8 target cannot evaluate
    proc = subprocess.run([os.path.join(VENV_BIN, "ruff"), "check", "--extend-select",
                           "FA102", "mip_client.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_everywhere(server):
    versions = {}
    for program in ("mip_server.py", "mipper.py", "mip_client.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, program), "--version"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        name, version = proc.stdout.split()
        assert name == program.removesuffix(".py")
        versions[program] = version
    assert set(versions.values()) == {VERSION}
    assert server.get("/").json()["version"] == VERSION


def test_settings_table_says_which_defaults_are_env_sh(tmp_path):
    """The names docs/settings.md lists as set by env.sh are exactly those env.sh exports."""
    with open(os.path.join(ROOT, "env.sh"), encoding="utf-8") as f:
        exported = set(re.findall(r"^\s*export ((?:MIP|TA1)_[A-Z0-9_]+)=", f.read(), re.M))
    exported.discard("MIP_HOME")
    text = " ".join(readme().split())
    match = re.search(r"`env\.sh` sets these \(its values are the defaults below\): (.*?)\. ",
                      text)
    assert match, "docs/settings.md does not list what env.sh sets"
    assert set(re.findall(r"`((?:MIP|TA1)_[A-Z0-9_]+)`", match.group(1))) == exported


def test_client_without_requests_says_what_to_install():
    """The client copied to a machine without `requests` names the missing package in one
    line, not a traceback."""
    script = ("import runpy, sys; sys.modules['requests'] = None; "
              f"sys.argv = [{CLIENT!r}, '--version']; runpy.run_path({CLIENT!r}, "
              "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("mip_client: error: the requests package is missing: "
                                   "pip install requests")
