"""The one settings table (mip/settings.py, VARS): docs/settings.md documents exactly its
variables, nothing reads a variable outside it, a bad value of any of them stops the
server with one line naming it, and a user is named in one place only.

All in process: the readers are called on a dict, and mip_server.main() returns before it
binds a socket when a setting is bad.
"""

import dataclasses
import glob
import os
import re

import pytest
from conftest import ROOT

import mip_server
from mip import catalogue
from mip import runners
from mip import settings
from mip.errors import EXIT_USAGE
from mip.settings import VARS
from mip.settings import ServerSettings
from mip.settings import SettingError

NAME = r"\b((?:MIP|TA1)_[A-Z0-9_]*[A-Z0-9])\b"
# Documented, and named in the code, but not settings of the server or mipper: each is
# found where it is said to be read or set.
ELSEWHERE = {
    "MIP_CLIENT_USER": "mip_client.py",
    "MIP_CLIENT_PASSWORD": "mip_client.py",
    "MIP_CLIENT_URL": "mip_client.py",
    "MIP_DOMAIN": "deploy/Caddyfile",
    runners.RUN_ENV: "mip/runners.py",  # set by the server for each run's mipper, read there
    catalogue.CHECKED_ENV: "mip/catalogue.py",  # the same
}
# a value each type refuses
BAD = {settings.Int: "many", settings.Flag: "yes", settings.Choice: "podman",
       settings.Seconds: "soon", settings.Networks: "10.0.0.0/8,not-a-network",
       settings.ProxyAddress: "caddy.local", settings.Devices: "0,gpu"}


def text(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def fake_hash(password: str) -> str:
    return f"pbkdf2_sha256$fake${password}"


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict:
    """The folders and a password, nothing else; os.environ holds the same, for main()."""
    for name in list(os.environ):
        if name.startswith(("MIP_", "TA1_")):
            monkeypatch.delenv(name)
    values = {f"TA1_{n}_DIR": str(tmp_path / n.lower())
              for n in ("INPUTS", "OUTPUTS", "TEMPS", "RUNS", "REPOS")}
    values.update(MIP_PASSWORD="pw", MIP_GPUS="none")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


# ---------------------------------------------------------------------------- the docs

def documented() -> list:
    """The names of docs/settings.md's table, in order: rows `| `NAME` | type | default |
    what it does |`."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|(.*)\|\s*$", text("docs/settings.md"), re.M)
    for name, rest in rows:
        cells = [c.strip() for c in rest.split("|")]
        assert len(cells) == 3 and all(cells), f"docs/settings.md: the row of {name}"
    return [name for name, _ in rows]


def test_every_setting_is_documented_and_every_documented_one_is_read():
    names = documented()
    assert len(names) == len(set(names)), "docs/settings.md names a variable twice"
    missing = sorted(set(VARS) - set(names))
    assert not missing, f"docs/settings.md does not document {missing}"
    unread = sorted(n for n in set(names) - set(VARS)
                    if n not in ELSEWHERE or n not in text(ELSEWHERE[n]))
    assert not unread, f"docs/settings.md documents {unread}, which nothing reads"


def test_no_variable_is_read_outside_the_table():
    """Every MIP_*/TA1_* name the server, mipper and mip/ mention is a row of VARS, or one
    of the few read or set elsewhere; read() itself takes no other name."""
    paths = ["mip_server.py", "mipper.py", *glob.glob("mip/**/*.py", root_dir=ROOT,
                                                      recursive=True)]
    named = {n: p for p in paths for n in re.findall(NAME, text(p))}
    strays = sorted(f"{n} ({p})" for n, p in named.items() if n not in VARS
                    and n not in ELSEWHERE)
    assert not strays, f"not in mip/settings.py's VARS: {strays}"
    with pytest.raises(KeyError):
        settings.read({"MIP_NOT_A_SETTING": "1"}, "MIP_NOT_A_SETTING")


def test_every_row_says_its_type_and_what_it_does():
    for var in VARS.values():
        assert var.kind.label and len(var.help) > 10, var.name


def test_the_defaults_of_the_table_are_those_of_the_dataclasses(env):
    """Read with nothing set, the settings equal the dataclasses' own defaults (which tests
    build directly), so that the two cannot drift apart."""
    cfg = ServerSettings.from_env(env, fake_hash)
    folders = dataclasses.asdict(cfg.settings)
    expected = settings.Settings(**{k: folders[k] for k in (
        "inputs_dir", "outputs_dir", "temps_dir", "runs_dir", "repos_dir", "config_path",
        "key_file")})
    assert cfg.settings == expected
    assert cfg.settings.key_file == os.path.join(env["TA1_RUNS_DIR"], "keystore.key")
    assert cfg == ServerSettings(settings=expected, users={"mip": fake_hash("pw")},
                                 max_downloads=4)
    assert (cfg.connection_limit, cfg.channel_timeout, cfg.cleanup_interval) == (1000, 60, 10)


# ---------------------------------------------------------------------------- bad values

CHECKED = sorted(n for n, v in VARS.items() if type(v.kind) in BAD)


@pytest.mark.parametrize("name", CHECKED)
def test_a_bad_value_of_any_setting_is_refused_naming_it(env, name):
    bad = BAD[type(VARS[name].kind)]
    with pytest.raises(SettingError) as caught:
        ServerSettings.from_env(dict(env, **{name: bad}), fake_hash)
    message = str(caught.value)
    assert message.startswith(name) and "\n" not in message, message


def test_out_of_range_and_dependent_limits(env):
    for name, value, words in (("MIP_CONNECTION_LIMIT", "0", "expected 1 to 100000"),
                               ("MIP_CHANNEL_TIMEOUT", "-5", "expected 1 to 86400"),
                               ("MIP_MAX_DOWNLOADS", "8", "MIP_MAX_DOWNLOADS=8: expected 1 to 7")):
        with pytest.raises(SettingError, match=re.escape(words)):
            ServerSettings.from_env(dict(env, **{name: value}), fake_hash)
    with pytest.raises(SettingError, match="TA1_RUNS_DIR is not set"):
        ServerSettings.from_env({k: v for k, v in env.items() if k != "TA1_RUNS_DIR"},
                                fake_hash)


def test_the_server_exits_2_with_one_line_naming_the_variable(env, monkeypatch, capsys):
    monkeypatch.setenv("MIP_CONNECTION_LIMIT", "lots")
    assert mip_server.main(["--port", "0"]) == EXIT_USAGE
    out = capsys.readouterr()
    assert out.err == "mip_server: error: MIP_CONNECTION_LIMIT='lots': expected a whole number\n"
    assert out.out == ""
    assert not os.path.exists(env["TA1_RUNS_DIR"]), "nothing is made before the settings hold"


# ---------------------------------------------------------------------------- users

def users_file(tmp_path, *names: str) -> str:
    path = tmp_path / "users"
    path.write_text("# team\n" + "".join(f"{n}:{fake_hash(n + '-pw')}\n" for n in names))
    return str(path)


@pytest.mark.parametrize("given", [{"MIP_USER": "alice"}, {}])  # MIP_USER's default is mip
def test_a_user_named_by_mip_user_and_the_users_file_is_refused(env, tmp_path, given):
    user = given.get("MIP_USER", "mip")
    path = users_file(tmp_path, "bob", user)
    with pytest.raises(SettingError) as caught:
        settings.read_users(dict(env, MIP_USERS_FILE=path, **given), fake_hash)
    assert str(caught.value) == (f"user {user!r} is named by MIP_USER (with MIP_PASSWORD) "
                                 f"and by MIP_USERS_FILE {path}: name each user in one place")


def test_the_same_with_a_password_file_stops_the_server(env, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MIP_PASSWORD")
    monkeypatch.setenv("MIP_USER", "alice")
    monkeypatch.setenv("MIP_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("MIP_USERS_FILE", users_file(tmp_path, "alice"))
    assert mip_server.main(["--port", "0"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'alice' is named by MIP_USER (with MIP_PASSWORD_FILE)" in err


def test_distinct_users_in_both_places_are_all_let_in(env, tmp_path):
    path = users_file(tmp_path, "bob", "carol")
    users, password_file = settings.read_users(dict(env, MIP_USER="alice",
                                                    MIP_USERS_FILE=path), fake_hash)
    assert users == {"alice": fake_hash("pw"), "bob": fake_hash("bob-pw"),
                     "carol": fake_hash("carol-pw")}
    assert password_file is None
