"""The real server (waitress on a free loopback port) driving real mipper runs."""

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile

import jsonschema
import pytest
import requests
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import alive
from conftest import kill_leftover_runs
from conftest import payload
from conftest import wait_for
from conftest import zero_work

from mip import journal

SCHEMAS = {}
for name in ("RunPayload", "RunStatus", "JobStatus", "ModuleStatus", "ModuleDescription",
             "Error"):
    with open(os.path.join(ROOT, "schema", f"{name}.json")) as f:
        SCHEMAS[name] = jsonschema.Draft202012Validator(json.load(f))


@pytest.fixture
def mip_env(mip_env):
    """The zero-work catalogue (tests/config.yml): these tests check the API and the
    journal's state, not what a module computes; the seed's walk-through runs the real
    stand-ins (seed_server)."""
    return zero_work(mip_env)


@pytest.fixture
def seed_server(server_env):
    """The real server on the real catalogue (../config.yml), stopped after the test."""
    env = dict(server_env, MIP_CONFIG=os.path.join(ROOT, "config.yml"))
    srv = Server(env).start()
    yield srv
    srv.stop()
    kill_leftover_runs(env)


def ok(resp, schema=None):
    """A 200 JSON answer, valid against `schema`; its body."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    if schema:
        SCHEMAS[schema].validate(body)
    return body


def error(resp, status, code=None):
    """An error answer with the one JSON shape; its body."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    SCHEMAS["Error"].validate(body)
    assert "Traceback" not in resp.text
    if code:
        assert body["error"] == code, body
    return body


def slow(module, seconds):
    return {module: ["--sleep", str(seconds)]}


def module_processes(marker):
    """Pids of live module processes whose command line contains `marker`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and b"modules/" in cmdline and alive(int(pid)):
            pids.append(int(pid))
    return pids


# ---------------------------------------------------------------------------- walk-through

def test_seed_walk_through(seed_server):
    """POST a map_crop run, poll it to passed, GET the job, download logs and outputs, from
    the real stand-ins."""
    server = seed_server
    resp = server.post("/runs", json=payload("alpha", "map_crop"))
    status = ok(resp, "RunStatus")
    run_id = status["run_id"]
    assert resp.headers["Location"] == f"/runs/{run_id}"
    assert status["status"] in ("not_started", "running")
    assert status["stop_time"] is None and status["log"] is None

    final = server.wait_run(run_id)
    SCHEMAS["RunStatus"].validate(final)
    assert final["status"] == "passed", final["log"]
    assert final["stop_time"] and "map_crop passed" in final["log"]
    assert final["module_status"] == {"legend_segment": "passed", "map_crop": "passed"}

    job = ok(server.get("/jobs/alpha"), "JobStatus")
    assert job["status"] == "passed" and job["map"] == MAP and job["modules"] == ["map_crop"]
    assert ok(server.get("/jobs")) == ["alpha"]
    assert ok(server.get("/runs")) == [run_id]
    assert ok(server.get("/modules/alpha")) == ["legend_segment", "map_crop"]
    module = ok(server.get("/modules/alpha/map_crop"), "ModuleStatus")
    assert module["status"] == "passed" and module["run_id"] == run_id

    for prefix in ("/modules", "/jobs"):
        logs = server.get(f"{prefix}/alpha/map_crop/logs")
        assert logs.status_code == 200
        assert logs.headers["Content-Type"] == "application/zip"
        assert logs.headers["Content-Disposition"] == \
            'attachment; filename="alpha_map_crop_logs.zip"'
        names = zipfile.ZipFile(io.BytesIO(logs.content)).namelist()
        assert "alpha_map_crop_logs/map_crop.log" in names
        assert "alpha_map_crop_logs/run.log" in names

        outputs = server.get(f"{prefix}/alpha/map_crop/outputs")
        assert outputs.headers["Content-Type"] == "application/zip"
        archive = zipfile.ZipFile(io.BytesIO(outputs.content))
        assert archive.testzip() is None
        patches = [i for i in archive.infolist() if i.filename.endswith(".png")]
        assert patches and all(i.compress_type == zipfile.ZIP_STORED for i in patches)
        folder = os.path.join(server.env["TA1_OUTPUTS_DIR"], "alpha", "map_crop")
        on_disk = sum(len(files) for _, _, files in os.walk(folder))
        assert len(archive.namelist()) == on_disk
        first = patches[0]
        rel = first.filename.split("/", 1)[1]
        with open(os.path.join(folder, rel), "rb") as f:
            assert archive.read(first) == f.read()

    temps = server.get("/modules/alpha/map_crop/temps")
    assert temps.status_code == 200 and temps.headers["Content-Type"] == "application/zip"
    text = server.get(f"/runs/{run_id}/log")
    assert text.status_code == 200 and "map_crop passed" in text.text


def test_whole_graph_run(inproc):
    run_id = ok(inproc.post("/runs", json=payload("all", "ALL")))["run_id"]
    final = inproc.wait_run(run_id)
    assert final["status"] == "passed", final["log"]
    assert len(final["module_status"]) == 9
    assert set(final["module_status"].values()) == {"passed"}
    modules = ok(inproc.get("/modules"))
    for item in modules:
        SCHEMAS["ModuleDescription"].validate(item)
    assert {m["module_name"] for m in modules} == set(final["module_status"])


def test_original_client_conventions(inproc):
    """No Content-Type on POST bodies, trailing slashes, 200 and exact content types."""
    body = json.dumps(payload("compat", "georeference")).encode()
    resp = inproc.post("/runs/", data=body,
                         headers={"Content-Type": ""})
    run_id = ok(resp, "RunStatus")["run_id"]
    inproc.wait_run(run_id)
    assert ok(inproc.get("/runs/")) == [run_id]
    assert ok(inproc.get(f"/runs/{run_id}/"))["status"] == "passed"
    assert ok(inproc.get("/jobs/compat/"))["status"] == "passed"
    text_plain = inproc.post("/runs", data=body,
                               headers={"Content-Type": "text/plain"})
    ok(text_plain, "RunStatus")
    assert inproc.get("/modules/compat/georeference/outputs/").headers["Content-Type"] == \
        "application/zip"


# ---------------------------------------------------------------------------- async runs

def test_post_returns_at_once_while_a_slow_run_goes_on(inproc):
    # the first POST /runs of a inproc loads GDAL for the map check, once: not timed here
    warm = ok(inproc.post("/runs", json=payload("warm", "georeference")))["run_id"]
    assert inproc.wait_run(warm)["status"] == "passed"
    started = time.monotonic()
    resp = inproc.post("/runs", json=payload("slow", "georeference",
                                             extra_switches=slow("georeference", 3)))
    took = time.monotonic() - started
    run_id = ok(resp)["run_id"]
    assert took < 1.0
    running = inproc.wait_run(run_id, until=("running",))
    assert running["stop_time"] is None
    # the inproc keeps answering while the run goes on
    assert ok(inproc.get("/jobs"))
    assert inproc.wait_run(run_id)["status"] == "passed"


def test_same_job_runs_serialized_different_jobs_parallel(inproc):
    a1 = ok(inproc.post("/runs", json=payload("ja", "georeference",
                                              extra_switches=slow("georeference", 2))))
    a2 = ok(inproc.post("/runs", json=payload("ja", "legend_segment")))
    b1 = ok(inproc.post("/runs", json=payload("jb", "georeference",
                                              extra_switches=slow("georeference", 2))))
    # ja's first run and jb's run execute together while ja's second one waits
    wait_for(lambda: all(inproc.get(f"/runs/{r['run_id']}").json()["status"] == "running"
                         for r in (a1, b1)))
    assert inproc.get(f"/runs/{a2['run_id']}").json()["status"] == "not_started"
    done = [inproc.wait_run(r["run_id"]) for r in (a1, a2, b1)]
    assert [d["status"] for d in done] == ["passed"] * 3
    assert done[1]["start_time"] >= done[0]["stop_time"]
    assert done[2]["start_time"] < done[0]["stop_time"]


def test_many_posts_in_the_same_second_all_succeed(inproc):
    answers = []

    def post(i):
        answers.append(inproc.post("/runs", json=payload(f"burst{i}", "georeference")))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [a.status_code for a in answers] == [200] * 20
    ids = [a.json()["run_id"] for a in answers]
    assert len(set(ids)) == 20
    assert ok(inproc.get("/runs")) == sorted(ids)
    for run_id in ids:
        inproc.wait_run(run_id)


def test_cancel_kills_the_running_module(inproc):
    run_id = ok(inproc.post("/runs", json=payload("cancelme", "georeference",
                                                  extra_switches=slow("georeference", 60))))[
        "run_id"]
    marker = os.path.join(inproc.env["TA1_OUTPUTS_DIR"], "cancelme")
    wait_for(lambda: module_processes(marker))
    wait_for(lambda: inproc.get("/modules/cancelme/georeference").status_code == 200)
    status = ok(inproc.post(f"/runs/{run_id}/cancel"), "RunStatus")
    assert status["status"] == "cancelled"
    wait_for(lambda: not module_processes(marker), timeout=10)
    module = ok(inproc.get("/modules/cancelme/georeference"), "ModuleStatus")
    assert module["status"] == "cancelled"
    # cancelling a finished run changes nothing
    again = ok(inproc.post(f"/runs/{run_id}/cancel"))
    assert again["status"] == "cancelled" and again["stop_time"] == status["stop_time"]
    assert "cancelled" in inproc.get(f"/runs/{run_id}/log").text


def test_cancel_a_queued_run(inproc):
    first = ok(inproc.post("/runs", json=payload("q", "georeference",
                                                 extra_switches=slow("georeference", 2))))
    queued = ok(inproc.post("/runs", json=payload("q", "legend_segment")))
    assert ok(inproc.post(f"/runs/{queued['run_id']}/cancel"))["status"] == "cancelled"
    assert inproc.wait_run(first["run_id"])["status"] == "passed"
    assert inproc.get(f"/runs/{queued['run_id']}").json()["module_status"] == {}


def test_rerun_reexecutes_only_what_failed(inproc):
    # an extra switch may only name paths in the job's own output or temp folder
    flag = os.path.join(inproc.env["TA1_TEMPS_DIR"], "re", "ready")
    body = payload("re", "ALL", extra_switches={
        "map_crop": ["--fail-unless-exists", str(flag)]})
    first = inproc.wait_run(ok(inproc.post("/runs", json=body))["run_id"])
    assert first["status"] == "failed"
    assert first["module_status"]["map_crop"] == "failed"
    assert "geopackage" not in first["module_status"]
    before = {m: ok(inproc.get(f"/modules/re/{m}")) for m in first["module_status"]}

    open(flag, "w").close()
    second = ok(inproc.post(f"/runs/{first['run_id']}/rerun"), "RunStatus")
    assert second["run_id"] != first["run_id"]
    assert second["payload"] == first["payload"]
    final = inproc.wait_run(second["run_id"])
    assert final["status"] == "passed", final["log"]
    assert set(final["module_status"]) == {"map_crop", "line_extract", "point_extract",
                                           "geopackage"}
    for name in ("legend_segment", "georeference", "polygon_extract"):
        assert ok(inproc.get(f"/modules/re/{name}"))["start_time"] == before[name]["start_time"]


def test_list_filters_and_paging(inproc):
    ids = []
    for job in ("f1", "f2", "f1"):
        ids.append(ok(inproc.post("/runs", json=payload(job, "georeference")))["run_id"])
    for run_id in ids:
        inproc.wait_run(run_id)
    assert ok(inproc.get("/runs?job=f1")) == [ids[0], ids[2]]
    assert ok(inproc.get("/runs?status=passed&limit=2")) == ids[:2]
    assert ok(inproc.get("/runs?offset=1&limit=1")) == [ids[1]]
    assert ok(inproc.get("/runs?status=failed")) == []
    assert ok(inproc.get("/jobs?limit=1&offset=1")) == ["f2"]
    error(inproc.get("/runs?limit=-1"), 400, "bad_query")
    error(inproc.get("/runs?status=bogus"), 400, "bad_query")
    assert ok(inproc.get("/maps")) == [MAP]
    info = ok(inproc.get("/"))
    assert info["limits"]["max_runs"] == 2 and "geopackage" in info["modules"]


# ---------------------------------------------------------------------------- restarts

def test_restart_after_sigkill_reconciles_runs(server_env, tmp_path):
    env = dict(server_env, MIP_MAX_RUNS="1")
    srv = Server(env).start()
    try:
        alive = ok(srv.post("/runs", json=payload("r1", "georeference",
                                                  extra_switches=slow("georeference", 3))))
        queued = ok(srv.post("/runs", json=payload("r2", "georeference")))
        srv.wait_run(alive["run_id"], until=("running",))
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()

        db = journal.Journal(os.path.join(env["TA1_RUNS_DIR"], "journal.db"))
        assert db.run(alive["run_id"])["status"] == "running"
        assert db.run(queued["run_id"])["status"] == "not_started"
        db.close()

        srv.start()
        # the live mipper is watched to its end; the queued run is queued again
        assert srv.wait_run(alive["run_id"])["status"] == "passed"
        assert srv.wait_run(queued["run_id"])["status"] == "passed"

        doomed = ok(srv.post("/runs", json=payload("r3", "georeference",
                                                   extra_switches=slow("georeference", 60))))
        srv.wait_run(doomed["run_id"], until=("running",))
        # the run is `running` a moment before its module's execution is recorded
        wait_for(lambda: srv.get("/modules/r3/georeference").status_code == 200)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        srv.stop()
        kill_leftover_runs(env)  # the run's process dies with the server this time
        srv.start()
        lost = srv.wait_run(doomed["run_id"], timeout=10)
        assert lost["status"] == "failed"
        assert "server restarted" in srv.get(f"/runs/{doomed['run_id']}/log").text
        assert ok(srv.get("/modules/r3/georeference"))["status"] == "failed"
    finally:
        srv.stop()
        kill_leftover_runs(env)


# ---------------------------------------------------------------------------- errors

def test_errors_have_one_shape_and_the_right_status(inproc, sample_tif):
    from conftest import add_map

    # 401: no, wrong or malformed credentials
    for auth in (None, ("tester", "wrong"), ("nobody", inproc.password)):
        resp = inproc.get("/runs", auth=auth)
        error(resp, 401, "unauthorized")
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="mip"'
    bad_header = inproc.get("/runs", auth=None,
                              headers={"Authorization": "Basic !!!notbase64"})
    error(bad_header, 401)
    assert inproc.get("/health", auth=None).status_code == 200

    # 404s
    error(inproc.get("/nowhere"), 404, "not_found")
    error(inproc.get("/runs/20260101-000000-000000-abcd"), 404, "unknown_run")
    error(inproc.get("/jobs/nojob"), 404, "unknown_job")
    error(inproc.get("/modules/nojob"), 404, "unknown_job")
    error(inproc.get("/schema/Nope"), 404, "unknown_schema")
    error(inproc.post("/runs", json=payload("x", "georeference") | {"map": "NoMap"}), 404,
          "unknown_map")
    # 405
    error(inproc.delete("/runs"), 405)
    # 400: malformed, empty, path tricks
    error(inproc.post("/runs", data=b"{not json"), 400, "malformed_json")
    error(inproc.post("/runs", data=b"\xff\xfe"), 400, "malformed_json")
    error(inproc.post("/runs", data=b""), 400, "empty_body")
    # requests would fold a literal "/.." away, so the dots are percent-encoded
    for path in ("/jobs/%2e%2e", "/modules/%2e%2e", "/modules/.hidden/map_crop",
                 "/runs/%2e%2e", "/jobs/a%00b", "/modules/alpha/%2e%2e%00/outputs",
                 "/jobs/%2e%2e%2fetc/map_crop/outputs", "/modules/alpha/%2e%2e/logs"):
        resp = inproc.get(path)
        assert resp.status_code in (400, 404), path
        error(resp, resp.status_code)
    error(inproc.get("/jobs/%2e%2e"), 400, "bad_job_name")
    error(inproc.get("/modules/alpha/%2e%2e/logs"), 400)
    # 413
    error(inproc.post("/runs", data=b"x" * (1024 * 1024 + 1)), 413, "body_too_large")
    # 422: valid JSON, wrong shape; the message names the field
    cases = [
        ([1, 2], "body"),
        ({"job": "x", "map": MAP}, "modules"),
        ({"job": "x", "map": MAP, "modules": []}, "modules"),
        ({"job": "x", "map": MAP, "modules": "ALL"}, "modules"),
        ({"job": 5, "map": MAP, "modules": ["ALL"]}, "job"),
        ({"job": "x" * 65, "map": MAP, "modules": ["ALL"]}, "job"),
        ({"job": "x", "map": MAP, "modules": ["ALL"], "force_rerun": "yes"}, "force_rerun"),
        ({"job": "x", "map": MAP, "modules": ["ALL"], "colour": 1}, "colour"),
        ({"job": "x", "map": MAP, "modules": ["nope"]}, "nope"),
        ({"job": "x", "map": MAP, "modules": ["ALL"], "extra_switches": {"nope": []}}, "nope"),
        ({"job": "x", "map": MAP, "modules": ["ALL"], "extra_switches": {"map_crop": "--x"}},
         "extra_switches.map_crop"),
    ]
    for body, field in cases:
        message = error(inproc.post("/runs", json=body), 422)["message"]
        assert field in message, (body, message)
    assert ok(inproc.get("/runs")) == []  # nothing was recorded

    # 409: a job stays bound to its first map
    add_map(inproc.env, "Other_Map", sample_tif)
    run_id = ok(inproc.post("/runs", json=payload("bound", "georeference")))["run_id"]
    conflict = error(inproc.post("/runs", json=payload("bound", "georeference") |
                                 {"map": "Other_Map"}), 409)
    assert MAP in conflict["message"]
    inproc.wait_run(run_id)
    error(inproc.get("/modules/bound/map_crop"), 404, "module_not_run")
    error(inproc.get("/modules/bound/nomodule"), 404, "unknown_module")
    error(inproc.get("/modules/bound/map_crop/outputs"), 404)
    error(inproc.post(f"/runs/{run_id}/rerun", data=b'{"colour": 1}'), 422)


def test_error_shape_on_every_route(inproc):
    """Every route answers a bad name or id with a JSON error, never HTML or a 500."""
    spec = ok(inproc.get("/openapi.json"))
    for path, ops in spec["paths"].items():
        url = re.sub(r"{\w+}", "..", path)
        for method in ops:
            resp = inproc.request(method, url.replace("..", "%2e%2e"))
            if resp.status_code == 200:
                continue
            assert 400 <= resp.status_code < 500, (method, url, resp.status_code)
            error(resp, resp.status_code)


def test_unexpected_errors_are_json_without_traceback(server):
    run_id = ok(server.post("/runs", json=payload("broken", "georeference")))["run_id"]
    server.wait_run(run_id)
    # damage the journal row behind the server's back
    db = journal.Journal(os.path.join(server.env["TA1_RUNS_DIR"], "journal.db"))
    with db.transaction() as conn:
        conn.execute("UPDATE runs SET payload = '{broken' WHERE run_id = ?", (run_id,))
    db.close()
    body = error(server.get("/jobs/broken"), 500, "internal_error")
    assert "JSONDecodeError" not in body["message"]
    wait_for(lambda: "Traceback" in server.output())


# ---------------------------------------------------------------------------- secrets

def test_openai_key_reaches_modules_and_nothing_else(server):
    secret = "sk-test-" + "S3CR3T" * 4
    body = payload("keyed", "legend_item_description", openai_key=secret)
    status = ok(server.post("/runs", json=body), "RunStatus")
    assert "openai_key" not in status["payload"]
    final = server.wait_run(status["run_id"])
    assert final["status"] == "passed"
    module_log = server.get("/modules/keyed/legend_item_description/logs").content
    archive = zipfile.ZipFile(io.BytesIO(module_log))
    texts = [archive.read(n).decode() for n in archive.namelist()]
    assert any(re.search(r"OPENAI_API_KEY.*(present|set)", t, re.I) for t in texts)
    seen = [json.dumps(final), server.get(f"/runs/{status['run_id']}/log").text,
            json.dumps(ok(server.get("/jobs/keyed"))), server.output()]
    seen += texts
    for root, _, files in os.walk(os.path.dirname(server.env["TA1_INPUTS_DIR"])):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                seen.append(f.read().decode("latin-1"))
    assert not [s for s in seen if secret in s]
    assert server.password not in server.output()


def test_server_refuses_to_start_without_credentials(mip_env):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"), "--port", "0"],
                          env=mip_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no credentials" in proc.stderr


def test_port_in_use_gives_one_line(server, server_env):
    port = server.url.rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"), "--port", port],
                          env=server_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_no_auth_is_announced(mip_env):
    srv = Server(mip_env, "--no-auth").start()
    try:
        assert requests.get(srv.url + "/runs", timeout=10).status_code == 200
        assert "AUTHENTICATION IS OFF" in srv.output()
    finally:
        srv.stop()


def test_users_file_and_generated_password(mip_env, tmp_path):
    hashed = subprocess.run([sys.executable, os.path.join(ROOT, "mip_server.py"),
                             "--hash-password"], input="alice-pw\n", capture_output=True,
                            text=True, timeout=30, env=mip_env)
    assert hashed.returncode == 0 and "alice-pw" not in hashed.stdout
    users = tmp_path / "users"
    users.write_text(f"# team\nalice:{hashed.stdout.strip()}\n")
    password_file = tmp_path / "pw"
    env = dict(mip_env, MIP_USERS_FILE=str(users), MIP_PASSWORD_FILE=str(password_file),
               MIP_USER="demo")
    srv = Server(env).start()
    try:
        generated = password_file.read_text().strip()
        assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
        assert str(password_file) in srv.output() and generated not in srv.output()
        assert requests.get(srv.url + "/jobs", auth=("alice", "alice-pw"), timeout=10).ok
        assert requests.get(srv.url + "/jobs", auth=("demo", generated), timeout=10).ok
        assert requests.get(srv.url + "/jobs", auth=("alice", "nope"), timeout=10) \
            .status_code == 401
    finally:
        srv.stop()
    # the password is made once: a restart keeps it
    srv = Server(env).start()
    try:
        assert password_file.read_text().strip() == generated
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- documents

def test_openapi_and_schemas(inproc):
    spec = ok(inproc.get("/openapi.json"))
    assert spec["openapi"].startswith("3.")
    for path in ("/runs", "/runs/{run_id}", "/jobs/{job}", "/modules/{job}/{module}",
                 "/modules/{job}/{module}/logs", "/jobs/{job}/{module}/outputs", "/maps",
                 "/health", "/runs/{run_id}/cancel", "/runs/{run_id}/rerun", "/schema/{name}"):
        assert path in spec["paths"], path
    assert spec["paths"]["/runs"]["post"]["requestBody"]
    assert "RunStatus" in spec["components"]["schemas"]
    payload_schema = ok(inproc.get("/schema/RunPayload"))
    assert payload_schema["title"] == "RunPayload"
    assert ok(inproc.get("/schema/RunStatus.json"))["title"] == "RunStatus"


# ---------------------------------------------------------------------------- zips

def test_zip_skips_symlinks_even_those_that_stay_in_the_folder(inproc, tmp_path):
    run_id = ok(inproc.post("/runs", json=payload("links", "georeference")))["run_id"]
    inproc.wait_run(run_id)
    folder = os.path.join(inproc.env["TA1_OUTPUTS_DIR"], "links", "georeference")
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    os.symlink(outside, os.path.join(folder, "escape.txt"))
    os.symlink(os.path.join(folder, f"{MAP}.json"), os.path.join(folder, "inside.json"))
    archive = zipfile.ZipFile(io.BytesIO(inproc.get("/modules/links/georeference/outputs")
                                         .content))
    names = [n.split("/", 1)[1] for n in archive.namelist()]
    # a link is never followed, not even to a file of the folder: that file is served itself
    assert "escape.txt" not in names and "inside.json" not in names and f"{MAP}.json" in names


def test_zip_of_a_large_folder_streams(server):
    run_id = ok(server.post("/runs", json=payload("big", "georeference")))["run_id"]
    server.wait_run(run_id)
    folder = os.path.join(server.env["TA1_OUTPUTS_DIR"], "big", "georeference")
    with open(os.path.join(folder, "blob.bin"), "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1024 * 1024))
    started = time.monotonic()
    with server.get("/modules/big/georeference/outputs", stream=True) as resp:
        chunks = resp.iter_content(64 * 1024)
        first = next(chunks)
        first_byte = time.monotonic() - started
        data = first + b"".join(chunks)
    assert first.startswith(b"PK")
    assert first_byte < 1.0
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.getinfo("big_georeference_outputs/blob.bin").file_size == 64 * 1024 * 1024
    assert archive.testzip() is None


@pytest.mark.parametrize("route", ["/runs/{id}", "/runs/{id}/log"])
def test_run_routes_refuse_bad_ids(inproc, route):
    error(inproc.get(route.replace("{id}", "bad%20id")), 400)
