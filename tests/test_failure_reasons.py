"""A failed module says why, in its own words, wherever a person looks: its ModuleStatus, the
run log (at ERROR), and the client's last error lines."""

import json
import os
import signal

from conftest import payload
from test_client import client
from test_client import client_env

from mip import runners


def write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_the_reason_is_the_modules_last_error_line(tmp_path):
    log = write(tmp_path / "m.log", "# m 0.1: header\n# switches: --x\n"
                "2026-12-04T10:00:00Z mip.module.m INFO reading\n"
                "2026-12-04T10:00:01Z mip.module.m ERROR first problem\n"
                "2026-12-04T10:00:02Z mip.module.m ERROR asked to fail by --fail\n"
                "2026-12-04T10:00:03Z mip.module.m INFO exiting\n")
    assert runners.failure_reason(log) == "asked to fail by --fail"


def test_a_traceback_gives_its_exception(tmp_path):
    log = write(tmp_path / "m.log", "x ERROR FAILED with an unexpected error:\n"
                "Traceback (most recent call last):\n  File \"m.py\", line 3, in <module>\n"
                "ZeroDivisionError: division by zero\n")
    assert runners.failure_reason(log) == ("FAILED with an unexpected error: "
                                           "ZeroDivisionError: division by zero")


def test_without_an_error_line_the_last_lines_serve(tmp_path):
    log = write(tmp_path / "m.log", "# header\nSegmentation fault\ncore dumped\n")
    assert runners.failure_reason(log) == "Segmentation fault / core dumped"
    assert runners.failure_reason(write(tmp_path / "e.log", "# header only\n")) is None
    assert runners.failure_reason(str(tmp_path / "missing.log")) is None


def test_the_reason_is_one_bounded_line_and_never_follows_a_link(tmp_path):
    log = write(tmp_path / "m.log", "x ERROR " + "\x1b[31mforged\n" + "y" * 5000 + "\n")
    reason = runners.failure_reason(log)
    assert "\n" not in reason and "\x1b" not in reason
    assert len(reason) <= runners.REASON_CHARS
    secret = write(tmp_path / "secret", "x ERROR the secret\n")
    os.symlink(secret, tmp_path / "link.log")
    assert runners.failure_reason(str(tmp_path / "link.log")) is None


def test_a_signal_is_named():
    assert runners.exit_message(-signal.SIGKILL) == "killed by signal 9 (SIGKILL)"
    assert runners.exit_message(3) == "exited with code 3"


def test_a_failed_run_says_why_everywhere(server, tmp_path):
    data = json.dumps(payload("why", "georeference",
                              extra_switches={"georeference": ["--fail"]}))
    proc = client("--post", "--url", f"{server.url}/runs", "--data", data, "--wait",
                  env=client_env(server), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    final = json.loads(proc.stdout)
    last = proc.stderr.strip().splitlines()[-1]
    # the client's final error line names the run, and why its module failed
    assert last.startswith(f"mip_client: error: run {final['run_id']} failed (module "
                           "georeference failed: exited with code 1: FAILED: asked to fail "
                           "by --fail)"), proc.stderr
    module = server.get("/modules/why/georeference").json()
    assert module["message"] == "exited with code 1: FAILED: asked to fail by --fail"
    log = server.get(f"/runs/{final['run_id']}/log").text
    assert "ERROR module georeference failed after" in log
    assert "asked to fail by --fail" in log


def test_a_modules_warnings_are_its_warning_lines_bounded_and_escaped(tmp_path):
    lines = ["# m 0.1: header with WARNING in it\n",
             "2026-12-04T10:00:00Z mip.module.m INFO reading\n",
             "2026-12-04T10:00:01Z mip.module.m WARNING no legend found\n",
             "2026-12-04T10:00:01Z mip.module.m WARNING no legend found\n",  # said once
             "WARNING: \x1b[31mforged " + "y" * 5000 + "\n"]
    lines += [f"x WARNING number {n}\n" for n in range(10)]
    log = write(tmp_path / "m.log", "".join(lines))
    found = runners.logged_warnings(log)
    assert found[0] == "no legend found"
    assert "\x1b" not in found[1] and found[1].startswith("\\x1b[31mforged")
    assert len(found[1]) <= runners.WARNING_CHARS
    assert found[2:5] == ["number 0", "number 1", "number 2"]
    assert found[5] == "and 7 more WARNING lines in its log"
    assert runners.logged_warnings(write(tmp_path / "quiet.log", "x INFO fine\n")) == []
    os.symlink(log, tmp_path / "link.log")
    assert runners.logged_warnings(str(tmp_path / "link.log")) == []
