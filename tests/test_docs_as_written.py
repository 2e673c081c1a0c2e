"""What the docs say a command prints is what it prints, and the client says in one line how
to set what it lacks."""

import os
import re
import subprocess
import sys

from conftest import ROOT
from conftest import mipper
from docpages import page


def client(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mip_client.py"), *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_list_deps_prints_what_the_modules_page_shows(mip_env):
    shown = re.search(r"`--list-deps (\w+)` prints `(\w+)`", page("modules.md"))
    assert shown, "docs/modules.md no longer shows a --list-deps example"
    done = mipper(mip_env, "--list-deps", shown.group(1))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [shown.group(2)]


def test_a_path_as_url_says_how_to_set_the_base():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIP_CLIENT")}
    done = client("--get", "--url", "/runs", env=env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "export MIP_CLIENT_URL=http://127.0.0.1:8080" in last, done.stderr


def test_the_help_names_every_method():
    text = client("--help").stdout
    assert "GET, POST or DELETE" in text
    assert "--delete" in text
