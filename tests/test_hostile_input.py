"""Hostile input from outside: extra switches that would escape the job's folders, deeply
nested JSON, forged log lines, names with a trailing newline, undecodable paths, and a
queue flooded with runs. Each is answered with a 4xx (or 503) JSON error, never obeyed."""

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys

import pytest
import requests
from cdr_standin import StandInCdr
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import kill_leftover_runs
from conftest import mipper
from conftest import payload
from conftest import wait_for
from conftest import zero_work

from mip import catalogue as catalogue_module
from mip import errors
from mip import journal
from mip import sanitize
from mip import settings as settings_module
from mip.journal import Status
from mip.switches import Refused as SwitchRefused


@pytest.fixture
def mip_env(mip_env):
    """The zero-work catalogue (tests/config.yml): these tests check the API and the
    journal's state, not what a module computes."""
    return zero_work(mip_env)


NESTED = b"[" * 1000 + b"]" * 1000  # 2 KB, 1,000 levels
FAKE = "2026-11-29 07:00:00,000 INFO run FAKE passed"


def error(resp, status, code=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error", "message"}
    if code:
        assert body["error"] == code, body
    return body


def forged(lines) -> list:
    """Log lines that start with the fake record's text: a forgery that worked."""
    return [line for line in lines if line.startswith(FAKE[:23]) or FAKE in line.split("\\x0a")[0]]


# ---------------------------------------------------------------------------- extra switches

def refused(server, switches, status=422, code=None, module="georeference", job="w1"):
    body = payload(job, module, extra_switches={module: switches})
    return error(server.post("/runs", json=body), status, code)


def test_extra_switches_cannot_write_outside_the_job(inproc, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside / "pwned.json")
    # the catalogue's own switch, its prefixes, the = form, the other spelling
    for switches in (["--output_path", target], [f"--output_path={target}"],
                     ["--out", target], ["--o", target], ["--output-path", target],
                     ["--temp_dir", str(outside)], ["-output_path", target]):
        message = refused(inproc, switches, code="switch_not_allowed")["message"]
        assert switches[0].partition("=")[0] in message, message
    # a path value must stay inside the job's own output or temp folder
    data = os.path.dirname(inproc.env["TA1_INPUTS_DIR"])
    for value in ("/etc/shadow", str(outside), f"x={target}",
                  os.path.join(inproc.env["TA1_OUTPUTS_DIR"], "w1", "..", "other"),
                  os.path.join(inproc.env["TA1_INPUTS_DIR"], "maps", MAP, f"{MAP}.tif"),
                  inproc.env["TA1_REPOS_DIR"], os.path.join(data, "runs", "journal.db"),
                  "../../../../etc/passwd"):
        message = refused(inproc, ["--fail-unless-exists", value], code="path_not_allowed")
        assert "outside the job's own output and temp folders" in message["message"]
    # a symlink inside the job's folder that points out is followed, and refused
    job_out = os.path.join(inproc.env["TA1_OUTPUTS_DIR"], "w1")
    os.makedirs(job_out)
    os.symlink(str(outside), os.path.join(job_out, "link"))
    refused(inproc, ["--fail-unless-exists", os.path.join(job_out, "link", "x")],
            code="path_not_allowed")
    # control characters never reach a command line (the schema already refuses NUL)
    for value in ("a\nb", "--sleep\r", "x\x1b[2J"):
        refused(inproc, [value], code="switch_not_allowed")
    refused(inproc, ["a\x00b"])
    # nothing was recorded, nothing was written
    assert inproc.get("/runs").json() == []
    assert os.listdir(outside) == []


def test_extra_switches_inside_the_job_still_work(inproc):
    inside = os.path.join(inproc.env["TA1_TEMPS_DIR"], "w2", "ready")
    os.makedirs(os.path.dirname(inside))
    open(inside, "w").close()
    body = payload("w2", "georeference",
                   extra_switches={"georeference": ["--fail-unless-exists", inside,
                                                    "--sleep=0", "--fail-unless-exists",
                                                    "../ready"]})
    resp = inproc.post("/runs", json=body)
    assert resp.status_code == 200, resp.text
    assert inproc.wait_run(resp.json()["run_id"])["status"] == "passed"


def test_rerun_applies_the_rule_to_a_payload_recorded_before_it(inproc, tmp_path):
    db = journal.Journal(os.path.join(inproc.env["TA1_RUNS_DIR"], "journal.db"))
    target = str(tmp_path / "pwned.json")
    body = payload("old", "georeference",
                   extra_switches={"georeference": ["--output_path", target]})
    run_id = db.create_run("old", MAP, ["georeference"], False, body,
                           os.path.join(inproc.env["TA1_RUNS_DIR"], "logs"))
    assert db.set_run_status(run_id, Status.CANCELLED)
    db.close()
    error(inproc.post(f"/runs/{run_id}/rerun"), 422, "switch_not_allowed")
    assert inproc.get("/runs").json() == [run_id]
    assert not os.path.exists(target)


def test_mipper_refuses_the_same_switches(mip_env, tmp_path):
    target = str(tmp_path / "pwned.json")
    for switches in (["--output_path", target], ["--fail-unless-exists", "/etc/shadow"]):
        args = [a for s in switches for a in ("--extra-switch", f"georeference={s}")]
        result = mipper(mip_env, "--job", "m1", "--map", MAP, "--module", "georeference", *args)
        assert result.returncode == 2, result.stderr
        assert switches[0] in result.stderr or "outside the job" in result.stderr
    assert not os.path.exists(target)
    # refused before anything is recorded
    assert not os.path.exists(os.path.join(mip_env["TA1_RUNS_DIR"], "journal.db"))


def test_a_symlink_made_during_the_run_is_caught_before_the_module_starts(mip_env, tmp_path):
    link = os.path.join(mip_env["TA1_OUTPUTS_DIR"], "m2", "link")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "mipper.py"), "--job", "m2", "--map", MAP,
         "--module", "map_crop", "--extra-switch", "legend_segment=--sleep",
         "--extra-switch", "legend_segment=2", "--extra-switch",
         "map_crop=--fail-unless-exists", "--extra-switch", f"map_crop={link}/shadow"],
        env=mip_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.isdir(os.path.join(mip_env["TA1_OUTPUTS_DIR"], "m2",
                                                    "legend_segment")))
        (tmp_path / "shadow").write_text("x")
        os.symlink(str(tmp_path), link)
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    db = journal.Journal(os.path.join(mip_env["TA1_RUNS_DIR"], "journal.db"))
    row = db.latest_execution("m2", "map_crop")
    db.close()
    assert row["status"] == "failed"
    assert "extra switches refused" in row["message"] and "outside" in row["message"]


def test_docker_modules_see_container_paths_under_the_same_rule(mip_env):
    settings = settings_module.Settings.from_env(dict(mip_env, MIP_RUNNER="docker"))
    catalogue = catalogue_module.load_catalogue(settings.config_path)
    catalogue_module.check_extra(settings, catalogue, "d1",
                           {"georeference": ["--fail-unless-exists", "/ta1/outputs/d1/x"]})
    for value in ("/ta1/outputs/d2/x", "/ta1/inputs/maps", "/etc/passwd", "../x",
                  os.path.join(settings.outputs_dir, "d1", "x")):
        with pytest.raises(SwitchRefused):
            catalogue_module.check_extra(settings, catalogue, "d1",
                                   {"georeference": ["--fail-unless-exists", value]})


def test_openai_key_with_control_characters_is_refused(inproc):
    for key in ("sk-a\x00b", "sk-a\nb"):
        body = payload("k1", "georeference", openai_key=key)
        error(inproc.post("/runs", json=body), 422, "invalid_payload")
    assert inproc.get("/runs").json() == []


# ---------------------------------------------------------------------------- nested JSON

def test_deeply_nested_json_is_400_on_every_route_that_reads_a_body(inproc):
    assert len(NESTED) == 2000
    error(inproc.post("/runs", data=NESTED), 400, "bad_json")
    nested_in_field = b'{"job": "n", "map": "m", "modules": ' + NESTED + b"}"
    error(inproc.post("/runs", data=nested_in_field), 400, "bad_json")
    run_id = inproc.post("/runs", json=payload("n1", "georeference")).json()["run_id"]
    inproc.wait_run(run_id)
    error(inproc.post(f"/runs/{run_id}/rerun", data=NESTED), 400, "bad_json")
    # cancel reads no body: a nested one is ignored
    assert inproc.post(f"/runs/{run_id}/cancel", data=NESTED).status_code == 200
    # still answering
    assert inproc.get("/health").status_code == 200


def test_json_depth_is_counted_without_recursion():
    assert sanitize.depth(1) == 0
    assert sanitize.depth({"a": [1, {"b": []}]}) == 4
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert sanitize.depth(deep) > sanitize.MAX_JSON_DEPTH
    with pytest.raises(sanitize.TooDeep):
        sanitize.parse_json(b"[" * 100_000 + b"]" * 100_000)


SECRET = "webhook-secret-for-tests"


@pytest.fixture
def cdr_server(server_env, free_cdr):
    env = dict(server_env, MIP_CDR_URL=free_cdr.url + "/", MIP_CDR_TOKEN="t",
               MIP_CDR_SECRET=SECRET, MIP_CDR_CALLBACK_URL="http://127.0.0.1:9/cdr")
    srv = Server(env).start()
    yield srv
    srv.stop()
    kill_leftover_runs(env)


@pytest.fixture
def free_cdr():
    standin = StandInCdr("t").start()
    yield standin
    standin.stop()


def signed_post(srv, raw: bytes):
    signature = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return requests.post(srv.url + "/cdr", data=raw, timeout=10,
                         headers={"x-cdr-signature-256": signature,
                                  "Content-Type": "application/json"})


def test_cdr_webhook_nested_json_and_forged_event_ids(cdr_server):
    error(signed_post(cdr_server, NESTED), 400, "bad_json")
    # a signed event whose id holds a line break is logged on one line
    ping = {"id": f"x\n{FAKE}", "event": "ping", "payload": None}
    resp = signed_post(cdr_server, json.dumps(ping).encode())
    assert resp.status_code == 200, resp.text
    wait_for(lambda: any("CDR ping" in line for line in cdr_server.lines))
    assert not forged(cdr_server.lines), cdr_server.output()
    assert any("CDR ping x\\x0a2026" in line for line in cdr_server.lines)
    # a cog id names a job and a map: matched whole, so no trailing newline either
    event = {"id": "e1", "event": "map.process",
             "payload": {"cog_id": "cog1\n", "cog_url": "http://127.0.0.1:9/c.tif"}}
    error(signed_post(cdr_server, json.dumps(event).encode()), 422, "bad_event")
    error(cdr_server.post("/cdr/cogs/cog1%0A"), 400)


# ---------------------------------------------------------------------------- logs and names

def test_request_log_lines_cannot_be_forged(server):
    path = "/health%0A" + FAKE.replace(" ", "%20") + "%0D%0B%C2%85%E2%80%A8"
    assert server.get(path).status_code == 404
    wait_for(lambda: any("/health\\x0a" in line for line in server.lines))
    assert not forged(server.lines), server.output()
    line = next(line for line in server.lines if "/health\\x0a" in line)
    assert "\\x0d\\x0b\\x85\\u2028" in line


def test_names_are_matched_whole(inproc):
    for body in (payload("nljob\n", "georeference"), payload("nljob", "georeference\n"),
                 payload("nljob", "georeference") | {"map": MAP + "\n"},
                 payload("nljob", "georeference", extra_switches={"georeference\n": []})):
        assert inproc.post("/runs", json=body).status_code == 422, body
    for route in ("/jobs/nljob%0A", "/runs/x%0A", "/modules/nljob%0A/georeference"):
        assert inproc.get(route).status_code == 400, route
    assert inproc.get("/runs").json() == []
    for root in ("TA1_OUTPUTS_DIR", "TA1_TEMPS_DIR"):
        assert not [n for n in os.listdir(inproc.env[root]) if "\n" in n]
    assert not catalogue_module.NAME_RE.fullmatch("nljob\n")
    with pytest.raises(errors.UsageError):
        catalogue_module.check_name("job", "nljob\n")


def test_undecodable_paths_are_400_never_another_route(inproc):
    for path in ("/runs/%FF%FE", "/jobs/%FF", "/%FF", "/runs%C0%AF"):
        error(inproc.get(path), 400, "bad_path")
    assert inproc.get("/runs/%C3%A9").status_code == 400  # UTF-8, but not a run id


def test_query_numbers_must_be_ascii_digits(inproc):
    for query in ("limit=%B2", "offset=%B9", "limit=%C2%B2"):
        error(inproc.get("/runs?" + query), 400, "bad_query")
        error(inproc.get("/jobs?" + query), 400, "bad_query")


def test_one_line_formatter_escapes_messages_and_indents_tracebacks():
    import logging

    formatter = sanitize.OneLineFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("mip", logging.INFO, __file__, 1, "job %s", (f"a\n{FAKE}",),
                               None)
    assert formatter.format(record) == f"INFO job a\\x0a{FAKE}"
    try:
        raise ValueError(f"bad\n{FAKE}")
    except ValueError as e:
        record = logging.LogRecord("mip", logging.ERROR, __file__, 1, "boom", (), (
            type(e), e, e.__traceback__))
    lines = formatter.format(record).splitlines()
    assert lines[0] == "ERROR boom"
    assert all(line.startswith("    ") for line in lines[1:])


# ---------------------------------------------------------------------------- queue bound

def test_queue_is_bounded(server_env):
    env = dict(server_env, MIP_MAX_RUNS="1", MIP_MAX_QUEUED="2")
    srv = Server(env).start()
    try:
        slow = {"georeference": ["--sleep", "60"]}
        first = srv.post("/runs", json=payload("q0", "georeference", extra_switches=slow))
        assert first.status_code == 200, first.text
        srv.wait_run(first.json()["run_id"], until=("running",))
        queued = [srv.post("/runs", json=payload(f"q{i}", "georeference")) for i in (1, 2)]
        assert [r.status_code for r in queued] == [200, 200]
        full = srv.post("/runs", json=payload("q3", "georeference"))
        body = error(full, 503, "queue_full")
        assert "MIP_MAX_QUEUED" in body["message"]
        assert int(full.headers["Retry-After"]) > 0
        error(srv.post(f"/runs/{first.json()['run_id']}/rerun"), 503, "queue_full")
        assert len(srv.get("/runs").json()) == 3
        assert srv.get("/").json()["limits"]["max_queued"] == 2
        # a place frees up once a queued run is cancelled
        assert srv.post(f"/runs/{queued[0].json()['run_id']}/cancel").status_code == 200
        assert srv.post("/runs", json=payload("q3", "georeference")).status_code == 200
        for run_id in srv.get("/runs").json():
            srv.post(f"/runs/{run_id}/cancel", timeout=60)
    finally:
        srv.stop()
        kill_leftover_runs(env)


def test_queue_limit_is_checked_at_start_up(server_env):
    srv = Server(dict(server_env, MIP_MAX_QUEUED="0"))
    with pytest.raises(AssertionError):
        srv.start()
    assert re.search(r"MIP_MAX_QUEUED=0: expected 1 to", srv.output())
