"""The console's pages and the browser safety rules, over HTTP against the real server:
HTML for browsers and JSON for API clients at `/`, the headers every page carries, escaping,
paging, bad input, and 403 cross_origin for a POST from another site's page."""

import html
import json
import re

import pytest
from conftest import payload
from conftest import wait_for

import console
import journal
import origin

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def page(server, path: str):
    resp = server.get(path, headers=HTML)
    assert resp.status_code == 200, (path, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("text/html")
    return resp


def test_browsers_get_the_console_and_clients_keep_json(server):
    home = page(server, "/")
    assert "<title>Runs · mip</title>" in home.text
    for accept in (None, "application/json", "*/*"):
        headers = {"Accept": accept} if accept else {}
        info = server.get("/", headers=headers)
        assert info.headers["Content-Type"] == "application/json"
        assert info.json()["name"] == "mip"
    # the console wants the same credentials
    assert server.get("/", headers=HTML, auth=None).status_code == 401
    assert server.get("/ui/runs", auth=None).status_code == 401


def test_pages_carry_a_strict_content_security_policy(server):
    run_id = server.post("/runs", json=payload("csp", "georeference")).json()["run_id"]
    server.wait_run(run_id)
    for path in ("/ui", "/ui/runs", f"/ui/runs/{run_id}", "/ui/jobs", "/ui/jobs/csp",
                 "/ui/maps", "/ui/modules"):
        resp = page(server, path)
        csp = resp.headers["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["script-src"] == "'self'"
        assert directives["object-src"] == "'none'"
        assert directives["frame-ancestors"] == "'none'"
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        # no inline script or style, no resource from elsewhere
        assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text), path
        assert " style=" not in resp.text and "<style" not in resp.text, path
        assert not re.search(r"(src|href)=\"(https?:)?//", resp.text), path
    for name, media in (("console.js", "text/javascript"), ("console.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")):
        resp = server.get(f"/ui/{name}", auth=None)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(media)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_run_page_shows_the_graph_the_modules_and_no_secret(server):
    body = payload("graph", "map_crop", openai_key="sk-secret-value-123",
                   extra_switches={"map_crop": ["--fail"]})
    run_id = server.post("/runs", json=body).json()["run_id"]
    server.wait_run(run_id)
    text = page(server, f"/ui/runs/{run_id}").text
    states = dict(re.findall(r'data-module="(\w+)" data-state="(\w+)"', text))
    assert states == {"legend_segment": "passed", "map_crop": "failed"}
    assert 'href="/modules/graph/map_crop/logs"' in text
    assert 'data-post="/runs/' + run_id + '/rerun"' in text
    assert 'id="cancel"' not in text  # the run is over
    assert "sk-secret-value-123" not in text and "openai_key" not in text
    # ALL draws the whole catalogue; what never started in a finished run is `not_run`
    run_id = server.post("/runs", json=payload("graph", "ALL")).json()["run_id"]
    text = page(server, f"/ui/runs/{run_id}").text
    drawn = re.findall(r'<g class="node[^"]*" data-module="(\w+)"', text)
    assert len(drawn) == 9 and "geopackage" in drawn
    server.wait_run(run_id)


def test_shown_payload_hides_keys_tokens_and_url_credentials():
    shown = console.shown({"job": "j", "openai_key": "sk-1", "notify_url":
                           "https://user:pw@hooks.example/x?token=abc",
                           "extra": {"api_token": "t", "list": ["http://a.example/?k=v"]}})
    text = json.dumps(shown)
    for secret in ("sk-1", "pw", "abc", '"t"', "k=v"):
        assert secret not in text
    assert shown["job"] == "j" and shown["notify_url"].startswith("https://(hidden)@hooks")


def test_hostile_values_are_escaped(server):
    hostile = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'
    refused = server.post("/runs", json=payload("<script>alert(1)</script>", "map_crop"))
    assert refused.status_code == 422
    run_id = server.post("/runs", json=payload("esc", "map_crop",
                                               extra_switches={"map_crop": [hostile]})).json()
    server.wait_run(run_id["run_id"])
    for path in (f"/ui/runs/{run_id['run_id']}", "/ui/jobs/esc"):
        text = page(server, path).text
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "onerror=alert" not in text or "&lt;img src=x onerror=alert(2)&gt;" in text
    text = page(server, f"/ui/runs/{run_id['run_id']}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_runs_page_is_newest_first_filtered_and_paged(server, monkeypatch):
    db = journal.Journal(server.env["TA1_RUNS_DIR"] + "/journal.db")
    first = server.post("/runs", json=payload("pa", "georeference")).json()["run_id"]
    server.wait_run(first)
    ids = [first]
    with db.transaction() as conn:  # a long history, made quickly
        for n in range(120):
            run_id = journal.new_run_id()
            ids.append(run_id)
            conn.execute("INSERT INTO runs (run_id, job, map, modules, payload, status,"
                         " submit_time, log_path) VALUES (?, 'pa', ?, '[\"georeference\"]',"
                         " '{}', ?, ?, '/nonexistent.log')",
                         (run_id, payload("x")["map"], "failed" if n % 3 else "passed",
                          journal.utcnow()))
    db.close()
    text = page(server, "/ui/runs").text
    shown = re.findall(r'<tr data-run="([^"]+)"', text)
    assert shown == ids[::-1][:console.PAGE_SIZE]
    assert "121 runs, page 1 of 3" in text
    last = page(server, "/ui/runs?page=3").text
    assert re.findall(r'<tr data-run="([^"]+)"', last) == ids[::-1][100:]
    # past the end: the last page
    assert re.findall(r'<tr data-run="([^"]+)"', page(server, "/ui/runs?page=99").text) == \
        ids[::-1][100:]
    passed = page(server, "/ui/runs?status=passed&job=pa").text
    assert "41 runs" in passed and 'class="state st-failed"' not in passed
    assert "No runs" in page(server, "/ui/runs?job=nosuchjob").text
    assert page(server, "/ui/runs?status=&job=&page=0").text.count("<tr data-run=") == 50


@pytest.mark.parametrize("path, status, code", [
    ("/ui/runs?status=finished", 400, "bad_query"),
    ("/ui/runs?job=../etc", 400, "bad_query"),
    ("/ui/runs?page=-1", 400, "bad_query"),
    ("/ui/runs?page=%C2%B2", 400, "bad_query"),
    ("/ui/runs/20990101-000000-000000-ffff", 404, "unknown_run"),
    ("/ui/runs/a%20b", 400, "bad_run_name"),
    ("/ui/jobs/nosuchjob", 404, "unknown_job"),
    ("/ui/jobs/%3Cscript%3E", 400, "bad_job_name"),
    ("/ui/jobs?page=x", 400, "bad_query"),
    ("/ui/nosuchpage", 404, "not_found"),
])
def test_bad_input_gets_a_json_error(server, path, status, code):
    resp = server.get(path, headers=HTML)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json()["error"] == code


def test_jobs_maps_and_modules_pages(server):
    run_id = server.post("/runs", json=payload("jp", "georeference")).json()["run_id"]
    server.wait_run(run_id)
    jobs = page(server, "/ui/jobs").text
    assert 'href="/ui/jobs/jp"' in jobs and f'href="/ui/runs/{run_id}"' in jobs
    job = page(server, "/ui/jobs/jp").text
    assert 'href="/modules/jp/georeference/outputs"' in job and "st-passed" in job
    maps = page(server, "/ui/maps").text
    assert payload("x")["map"] in maps and 'href="/ui/jobs/jp"' in maps
    modules = page(server, "/ui/modules").text
    assert modules.count("<tr id=\"module-") == 9
    assert 'href="#module-legend_segment"' in modules


# ---------------------------------------------------------------------------- origin

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
    {"Referer": "http://evil.example/page"},
    {"Origin": "https://{host}"},  # another scheme
    {"Origin": "http://evil.example", "Referer": "{own}/ui/runs"},  # Origin wins
])
def test_a_cross_site_post_is_refused(server, headers):
    host = server.url.split("//", 1)[1]
    headers = {k: v.format(host=host, own=server.url) for k, v in headers.items()}
    resp = server.post("/runs", json=payload("xs", "georeference"), headers=headers)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"] == "cross_origin"
    # refused before credentials are even looked at, and for every POST route
    assert server.post("/runs/20990101-000000-000000-ffff/cancel", headers=headers,
                       auth=None).status_code == 403
    assert server.get("/runs").json() == []


@pytest.mark.parametrize("headers", [
    {},  # curl, mip_client.py, the CDR: neither header
    {"Origin": "{own}"},
    {"Origin": "{own_upper}"},
    {"Referer": "{own}/ui/runs/x"},
])
def test_same_origin_and_plain_clients_pass(server, headers):
    own_upper = server.url.replace("http://", "HTTP://")
    headers = {k: v.format(own=server.url, own_upper=own_upper) for k, v in headers.items()}
    resp = server.post("/runs", json=payload("ok", "georeference"), headers=headers)
    assert resp.status_code == 200, resp.text
    server.wait_run(resp.json()["run_id"])
    # GET is never refused: links from elsewhere keep working
    assert server.get("/runs", headers={"Origin": "http://evil.example"}).status_code == 200


def test_origin_parsing():
    assert origin.origin_of("http://Example.org") == ("http", "example.org", 80)
    assert origin.origin_of("https://example.org:443/x?y") == ("https", "example.org", 443)
    assert origin.origin_of("http://[::1]:8080") == ("http", "::1", 8080)
    for bad in ("null", "", "file:///etc/passwd", "http://", "http://h:99999", "javascript:1",
                "//example.org"):
        assert origin.origin_of(bad) is None, bad
    assert origin.own_origin({"wsgi.url_scheme": "http", "HTTP_HOST": "127.0.0.1:8080"}) == \
        ("http", "127.0.0.1", 8080)
    assert origin.own_origin({"wsgi.url_scheme": "http", "SERVER_NAME": "h",
                              "SERVER_PORT": "80"}) == ("http", "h", 80)


def test_openapi_declares_the_pages_and_403_on_every_post(server):
    spec = server.get("/openapi.json").json()
    for path in ("/ui", "/ui/runs", "/ui/runs/{run_id}", "/ui/jobs", "/ui/jobs/{job}",
                 "/ui/maps", "/ui/modules"):
        assert "text/html" in spec["paths"][path]["get"]["responses"]["200"]["content"]
    assert set(spec["paths"]["/"]["get"]["responses"]["200"]["content"]) == {
        "application/json", "text/html"}
    posts = [(p, op) for p, ops in spec["paths"].items() for m, op in ops.items()
             if m in ("post", "delete")]
    assert len(posts) >= 4
    for path, op in posts:
        assert "403" in op["responses"], path


def test_the_run_list_page_watches_cheap_json_answers(server):
    text = page(server, "/ui/runs?job=w").text
    watch = html.unescape(re.search(r'data-watch="([^"]*)"', text).group(1)).split()
    assert watch == ["/runs?status=not_started&job=w", "/runs?status=running&job=w",
                     "/runs?offset=0&job=w"]
    run_id = server.post("/runs", json=payload("w", "georeference")).json()["run_id"]
    # what the page polls changes when a run appears, so the page knows to refresh
    wait_for(lambda: server.get(watch[2]).json() == [run_id])
    server.wait_run(run_id)
