"""A queued run's OpenAI key: sealed at rest (keystore.py), kept across a restart,
delivered to the module, gone once the run starts, and never in clear on disk."""

import hashlib
import os
import stat
import subprocess
import sys

import pytest
from conftest import ROOT
from conftest import Server
from conftest import hold_file
from conftest import kill_leftover_runs
from conftest import read
from conftest import release

from mip import journal
from mip import keystore

KEY = "sk-queued-" + "Q8eue" * 6


def test_sealed_key_opens_only_with_its_key_file(tmp_path):
    path = tmp_path / "sub" / "keystore.key"
    store = keystore.KeyStore(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sealed = store.seal(KEY)
    assert KEY not in sealed and store.open(sealed) == KEY
    # the same file opens it again after a restart
    assert keystore.KeyStore(str(path)).open(sealed) == KEY
    other = keystore.KeyStore(str(tmp_path / "other.key"))
    with pytest.raises(keystore.KeyStoreError, match="does not open"):
        other.open(sealed)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(keystore.KeyStoreError, match="does not hold a Fernet key"):
        keystore.KeyStore(str(bad))


def probe_catalogue(tmp_path) -> str:
    path = tmp_path / "probe.yml"
    path.write_text(f"""runner: inline
modules:
  - name: probe
    version: "1"
    requires: []
    command: [python, {ROOT}/tests/key_probe.py]
    options:
      output: $OUTPUT_DIR/probe/result.txt
    outputs:
      - $OUTPUT_DIR/probe/result.txt
""")
    return str(path)


def data_files_holding(root: str, text: str) -> list:
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                if text.encode() in f.read():
                    found.append(path)
    return found


def test_queued_key_survives_a_restart_sealed(server_env, tmp_path):
    env = dict(server_env, MIP_MAX_RUNS="1", MIP_CONFIG=probe_catalogue(tmp_path),
               KEY_PROBE_SHA256=hashlib.sha256(KEY.encode()).hexdigest())
    data = os.path.dirname(env["TA1_RUNS_DIR"])
    # the busy run holds the only run slot until the next server is up
    hold = hold_file(env, "busy")
    srv = Server(env).start()
    try:
        busy = srv.post("/runs", json={"job": "busy", "map": "WY_CO_Peach", "modules": ["probe"],
                                       "extra_switches": {"probe": ["--hold", hold]}}).json()
        keyed = srv.post("/runs", json={"job": "keyed", "map": "WY_CO_Peach",
                                        "modules": ["probe"], "openai_key": KEY})
        assert keyed.status_code == 200, keyed.text
        keyed = keyed.json()
        assert keyed["status"] == "not_started"
        # the server stops while the keyed run waits; the busy run's mipper goes on
        srv.stop()
        first_output = srv.output()
        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        assert db.run(keyed["run_id"])["status"] == "not_started"
        assert db.run_key(keyed["run_id"]) is not None
        db.close()
        assert not data_files_holding(data, KEY)

        srv.start()
        release(hold)
        final = srv.wait_run(keyed["run_id"], timeout=60)
        assert final["status"] == "passed", final["log"]
        assert srv.wait_run(busy["run_id"])["status"] == "passed"
        result = os.path.join(env["TA1_OUTPUTS_DIR"], "keyed", "probe", "result.txt")
        assert read(result).strip() == "same"
        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        assert db.run_key(keyed["run_id"]) is None  # deleted once the run started
        db.close()
        key_file = os.path.join(env["TA1_RUNS_DIR"], "keystore.key")
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert not data_files_holding(data, KEY)
        assert KEY not in first_output and KEY not in srv.output()
    finally:
        release(hold)
        srv.stop()
        kill_leftover_runs(env)


def test_bad_key_file_is_one_line_at_start(server_env, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    env = dict(server_env, MIP_KEY_FILE=str(bad))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mip_server: error: MIP_KEY_FILE")
    assert "Traceback" not in proc.stderr


def test_a_key_sealed_under_a_replaced_key_file_fails_its_run(server_env, tmp_path):
    env = dict(server_env, MIP_MAX_RUNS="1", MIP_CONFIG=probe_catalogue(tmp_path))
    hold = hold_file(env, "hold")
    srv = Server(env).start()
    try:
        srv.post("/runs", json={"job": "hold", "map": "WY_CO_Peach", "modules": ["probe"],
                                "extra_switches": {"probe": ["--hold", hold]}})
        keyed = srv.post("/runs", json={"job": "lost", "map": "WY_CO_Peach",
                                        "modules": ["probe"], "openai_key": KEY}).json()
        srv.stop()
        os.remove(os.path.join(env["TA1_RUNS_DIR"], "keystore.key"))
        srv.start()
        release(hold)
        final = srv.wait_run(keyed["run_id"], timeout=60)
        assert final["status"] == "failed"
        assert "does not open with the key file" in final["log"]
        assert env["TA1_RUNS_DIR"] not in final["log"]
    finally:
        release(hold)
        srv.stop()
        kill_leftover_runs(env)
