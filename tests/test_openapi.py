"""GET /openapi.json is a valid OpenAPI 3.1 document that declares every route and status,
and schemathesis, fuzzing the live server from it, finds no server error, no answer that
contradicts it and no valid request refused."""

import os
import re
import shutil
import subprocess
import sys
import time

import openapi_spec_validator
import pytest
from conftest import MAP
from conftest import ROOT
from conftest import Server
from conftest import kill_leftover_runs
from conftest import payload
from conftest import zero_work

import mip_server
from mip import journal
from mip.catalogue import NAME_RE
from mip.catalogue import check_name
from mip.errors import UsageError
from mip.settings import Settings


@pytest.fixture
def mip_env(mip_env):
    """The zero-work catalogue (tests/config.yml): these tests check the API and the
    journal's state, not what a module computes."""
    return zero_work(mip_env)


FUZZ_CONFIG = os.path.join(ROOT, "tests", "schemathesis.toml")
# 503 and 507 are declared answers, but out of reach here: the fuzzer would take them for
# server errors. The failed-login throttle stays out of the way of the fuzzer's own
# requests without credentials.
OUT_OF_REACH = {"MIP_MAX_QUEUED": "100000", "MIP_MIN_FREE_MB": "0", "MIP_THREADS": "16",
                "MIP_MAX_DOWNLOADS": "15", "MIP_AUTH_FAILURES": "10000"}


def app_routes(env: dict, tmp_path) -> list:
    """(method, OpenAPI path) of every route the app registers, from bottle itself."""
    cfg = mip_server.Config(settings=Settings.from_env(env),
                            users={"u": mip_server.hash_password("p")})
    db = journal.Journal(str(tmp_path / "routes.db"))
    db.migrate()
    app = mip_server.make_app(cfg, db, mip_server.RunQueue(cfg, db))
    db.close()
    return [(r.method, re.sub(r"<(\w+)>", r"{\1}", r.rule)) for r in app.routes]


def test_document_is_valid_and_declares_every_route(inproc, tmp_path):
    spec = inproc.get("/openapi.json").json()
    openapi_spec_validator.validate(spec)
    routes = app_routes(inproc.env, tmp_path)
    assert len(routes) > 20
    for method, path in routes:
        op = spec["paths"][path][method.lower()]
        declared = {int(code) for code in op["responses"]}
        # every route: bad path or Content-Length, another method, a body over the limit,
        # a journal deleted or replaced under the server
        assert {200, 400, 405, 413, 503} <= declared, (method, path)
        if "security" in op:
            assert {401, 429} <= declared, (method, path)
        if "{" in path:
            assert 404 in declared, (method, path)
    assert sum(len(ops) for ops in spec["paths"].values()) == len(routes)


@pytest.mark.parametrize("method, path, codes", [
    ("post", "/runs", {400, 401, 403, 404, 405, 409, 413, 422, 429, 503, 507}),
    ("post", "/runs/{run_id}/rerun", {400, 401, 403, 404, 405, 409, 413, 422, 429, 503, 507}),
    ("get", "/modules/{job}/{module}/outputs", {400, 401, 404, 405, 413, 429, 502, 503}),
    ("get", "/jobs/{job}/{module}/logs", {400, 401, 404, 405, 413, 429, 502, 503}),
    ("post", "/cdr", {400, 403, 404, 405, 413, 422, 503}),
    ("post", "/jobs/{job}/publish", {400, 401, 403, 404, 405, 409, 413, 429, 503}),
    ("get", "/health", {400, 405, 413, 503}),
    ("delete", "/jobs/{job}", {400, 401, 403, 404, 405, 409, 413, 429, 502, 503}),
    ("delete", "/jobs/{job}/{module}", {400, 401, 403, 404, 405, 409, 413, 429, 502, 503}),
    ("delete", "/runs/{run_id}", {400, 401, 403, 404, 405, 409, 413, 429, 503}),
])
def test_statuses_declared_per_route(inproc, method, path, codes):
    op = inproc.get("/openapi.json").json()["paths"][path][method]
    assert {int(c) for c in op["responses"]} == {200} | codes
    for code in codes - {200}:
        content = op["responses"][str(code)]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/Error"}
    for code in codes & {429, 503}:
        assert "Retry-After" in op["responses"][str(code)]["headers"]


def test_path_parameters_carry_the_server_patterns(inproc):
    spec = inproc.get("/openapi.json").json()
    params = {p["name"]: p["schema"] for ops in spec["paths"].values() for op in ops.values()
              for p in op.get("parameters", []) if p["in"] == "path"}
    assert set(params) == {"run_id", "job", "module", "cog_id", "name", "file"}
    samples = ["a", "A_b.c-d", "_x", "9" * 64, "9" * 65, ".x", "-x", "a/b", "é", "a b", "",
               "..", "a%2e"]
    for name in ("job", "module", "cog_id"):
        for value in samples:
            declared = re.search(params[name]["pattern"], value) is not None
            try:
                enforced = check_name(name, value) == value
            except UsageError:
                enforced = False
            assert declared == enforced, (name, value)
    run_id = journal.new_run_id()
    assert re.fullmatch(params["run_id"]["pattern"].strip("^$"), run_id)
    assert NAME_RE.match(run_id)
    assert "RunPayload" in params["name"]["enum"] and "Error.json" in params["name"]["enum"]


def test_schema_defs_are_lifted_into_components(inproc):
    """The catalogue schema's own `#/$defs/...` references would dangle in the document."""
    components = inproc.get("/openapi.json").json()["components"]["schemas"]
    catalogue = components["Catalogue"]
    assert "$defs" not in catalogue
    assert catalogue["properties"]["runner"] == {"$ref": "#/components/schemas/Catalogue_runner"}
    assert "Catalogue_module" in components


def test_run_payload_names_the_catalogue_modules(inproc):
    schema = inproc.get("/openapi.json").json()["components"]["schemas"]["RunPayload"]
    modules = [m["module_name"] for m in inproc.get("/modules").json()]
    assert schema["properties"]["modules"]["items"]["enum"] == ["ALL", *modules]
    assert schema["properties"]["extra_switches"]["propertyNames"]["enum"] == modules


@pytest.fixture
def fuzz_server(server_env):
    srv = Server(dict(server_env, **OUT_OF_REACH)).start()
    yield srv
    srv.stop()
    kill_leftover_runs(server_env)


def test_fuzz_the_live_server(fuzz_server, tmp_path):
    """schemathesis's coverage and fuzzing phases, with every check (server errors, status
    codes, content types, response schemas and headers, valid data refused, invalid data
    accepted, unsupported methods, requests without credentials), against a server with a
    real passed job whose names the fuzzer draws half of the time. The map is then taken
    away, so that no fuzzed run starts: POST /runs and reruns end at 404 unknown_map after
    every other check."""
    srv = fuzz_server
    run = srv.post("/runs", json=payload("fuzzed", "georeference")).json()
    assert srv.wait_run(run["run_id"])["status"] == "passed"
    doomed = srv.post("/runs", json=payload("doomed", "georeference")).json()
    assert srv.wait_run(doomed["run_id"])["status"] == "passed"
    shutil.rmtree(os.path.join(srv.env["TA1_INPUTS_DIR"], "maps", MAP))
    with open(FUZZ_CONFIG, encoding="utf-8") as f:
        config = f.read()
    for name, value in (("FUZZ_JOB", "fuzzed"), ("FUZZ_RUN", run["run_id"]),
                        ("FUZZ_MODULE", "georeference"), ("FUZZ_DOOMED_JOB", "doomed"),
                        ("FUZZ_DOOMED_RUN", doomed["run_id"]), ("FUZZ_USER", srv.user),
                        ("FUZZ_PASSWORD", srv.password)):
        config = config.replace("${" + name + "}", value)
    (tmp_path / "schemathesis.toml").write_text(config)
    argv = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "--config-file",
            str(tmp_path / "schemathesis.toml"), "run", f"{srv.url}/openapi.json",
            "--checks", "all", "--no-color"]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert cases and int(cases.group(1)) >= 200, done.stdout[-3000:]
    assert not re.search(r" 5\d\d [\d.]+ ms$", srv.output(), re.M), "a server error"
    assert srv.get(f"/runs/{run['run_id']}").json()["status"] == "passed"
    print(f"schemathesis: {cases.group(1)} cases in {took:.0f} s")


def test_rerun_checks_the_key_as_run_payload_does(inproc):
    """Found by the fuzzer: a rerun took an OpenAI key of any length (RunPayload allows 512
    characters), and a refused key was echoed back in the error message."""
    run = inproc.post("/runs", json=payload("keylen", "georeference")).json()
    inproc.wait_run(run["run_id"])
    key = "sk-" + "k" * 600
    for resp in (inproc.post(f"/runs/{run['run_id']}/rerun", json={"openai_key": key}),
                 inproc.post("/runs", json=payload("keylen", "georeference", openai_key=key))):
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] == "invalid_payload"
        assert "openai_key" in resp.json()["message"] and "kkkk" not in resp.text
    assert inproc.get("/runs").json() == [run["run_id"]]
