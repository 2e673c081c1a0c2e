"""The console's pages and the browser safety rules, over HTTP against the real server:
HTML for browsers and JSON for API clients at `/`, the headers every page carries, escaping,
paging, bad input, and 403 cross_origin for a POST from another site's page."""

import html
import io
import json
import re
import zipfile

import pytest
from conftest import MAP
from conftest import ZERO_CONFIG
from conftest import payload
from conftest import wait_for
from conftest import zero_work

from mip import gpus
from mip import journal
from mip.catalogue import load_catalogue
from mip.web import console
from mip.web import guards
from mip.web.apierror import error_body


@pytest.fixture
def mip_env(mip_env):
    """The zero-work catalogue (tests/config.yml): these tests check the API and the
    journal's state, not what a module computes."""
    return zero_work(mip_env)


HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def page(server, path: str):
    resp = server.get(path, headers=HTML)
    assert resp.status_code == 200, (path, resp.text[:300])
    assert resp.headers["Content-Type"].startswith("text/html")
    return resp


def test_browsers_get_the_console_and_clients_keep_json(inproc):
    home = page(inproc, "/")
    assert "<title>Runs · mip</title>" in home.text
    for accept in (None, "application/json", "*/*"):
        headers = {"Accept": accept} if accept else {}
        info = inproc.get("/", headers=headers)
        assert info.headers["Content-Type"] == "application/json"
        assert info.json()["name"] == "mip"
    # the console wants the same credentials
    assert inproc.get("/", headers=HTML, auth=None).status_code == 401
    assert inproc.get("/ui/runs", auth=None).status_code == 401


def test_pages_carry_a_strict_content_security_policy(inproc):
    run_id = inproc.post("/runs", json=payload("csp", "georeference")).json()["run_id"]
    inproc.wait_run(run_id)
    for path in ("/ui", "/ui/runs", f"/ui/runs/{run_id}", "/ui/jobs", "/ui/jobs/csp",
                 "/ui/maps", "/ui/modules", "/ui/new", f"/ui/new?from={run_id}",
                 "/ui/modules/csp/georeference/log"):
        resp = page(inproc, path)
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
        resp = inproc.get(f"/ui/{name}", auth=None)
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(media)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_run_page_shows_the_graph_the_modules_and_no_secret(inproc):
    body = payload("graph", "map_crop", openai_key="sk-secret-value-123",
                   extra_switches={"map_crop": ["--fail"]})
    run_id = inproc.post("/runs", json=body).json()["run_id"]
    inproc.wait_run(run_id)
    text = page(inproc, f"/ui/runs/{run_id}").text
    states = dict(re.findall(r'data-module="(\w+)" data-state="(\w+)"', text))
    assert states == {"legend_segment": "passed", "map_crop": "failed"}
    assert 'href="/modules/graph/map_crop/logs"' in text
    assert 'data-post="/runs/' + run_id + '/rerun"' in text
    assert 'id="cancel"' not in text  # the run is over
    assert 'data-watch=""' in text  # and its page polls no more
    assert "sk-secret-value-123" not in text and "openai_key" not in text
    # ALL draws the whole catalogue; what never started in a finished run is `not_run`
    run_id = inproc.post("/runs", json=payload("graph", "ALL")).json()["run_id"]
    text = page(inproc, f"/ui/runs/{run_id}").text
    drawn = re.findall(r'<g class="node[^"]*" data-module="(\w+)"', text)
    assert len(drawn) == 9 and "geopackage" in drawn
    if 'id="cancel"' in text:  # still going: its page polls it
        assert f'data-watch="/runs/{run_id}"' in text
    inproc.wait_run(run_id)


def test_shown_payload_hides_keys_tokens_and_url_credentials():
    shown = console.shown({"job": "j", "openai_key": "sk-1", "notify_url":
                           "https://user:pw@hooks.example/x?token=abc",
                           "extra": {"api_token": "t", "list": ["http://a.example/?k=v"]}})
    text = json.dumps(shown)
    for secret in ("sk-1", "pw", "abc", '"t"', "k=v"):
        assert secret not in text
    assert shown["job"] == "j" and shown["notify_url"] == "https://(hidden)@hooks.example/(hidden)"
    # Slack's and Discord's webhooks carry their token in the path
    for url in ("https://hooks.slack.com/services/T0/B0/SeCrEt", "http://h.example:81/a/SeCrEt#x",
                "https://discord.com/api/webhooks/1/SeCrEt", "https://a@b@h.example/SeCrEt"):
        assert "SeCrEt" not in console.shown(url) and console.shown(url).endswith("/(hidden)")
    assert console.shown("http://h.example:81/") == "http://h.example:81"


def test_hostile_values_are_escaped(inproc):
    hostile = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'
    refused = inproc.post("/runs", json=payload("<script>alert(1)</script>", "map_crop"))
    assert refused.status_code == 422
    run_id = inproc.post("/runs", json=payload("esc", "map_crop",
                                               extra_switches={"map_crop": [hostile]})).json()
    inproc.wait_run(run_id["run_id"])
    for path in (f"/ui/runs/{run_id['run_id']}", "/ui/jobs/esc"):
        text = page(inproc, path).text
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "onerror=alert" not in text or "&lt;img src=x onerror=alert(2)&gt;" in text
    text = page(inproc, f"/ui/runs/{run_id['run_id']}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_runs_page_is_newest_first_filtered_and_paged(inproc, monkeypatch):
    db = journal.Journal(inproc.env["TA1_RUNS_DIR"] + "/journal.db")
    first = inproc.post("/runs", json=payload("pa", "georeference")).json()["run_id"]
    inproc.wait_run(first)
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
    text = page(inproc, "/ui/runs").text
    shown = re.findall(r'<tr data-run="([^"]+)"', text)
    assert shown == ids[::-1][:console.PAGE_SIZE]
    assert "121 runs, page 1 of 3" in text
    last = page(inproc, "/ui/runs?page=3").text
    assert re.findall(r'<tr data-run="([^"]+)"', last) == ids[::-1][100:]
    # past the end: the last page
    assert re.findall(r'<tr data-run="([^"]+)"', page(inproc, "/ui/runs?page=99").text) == \
        ids[::-1][100:]
    passed = page(inproc, "/ui/runs?status=passed&job=pa").text
    assert "41 runs" in passed and 'class="state st-failed"' not in passed
    assert "No runs" in page(inproc, "/ui/runs?job=nosuchjob").text
    assert page(inproc, "/ui/runs?status=&job=&page=0").text.count("<tr data-run=") == 50


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
def test_bad_input_gets_a_json_error_and_a_browser_a_page_for_404(inproc, path, status, code):
    """API clients get the JSON error whatever they accept; a browser gets a 404 as a
    console page saying the same, and every other error as the same JSON."""
    answers = [inproc.get(path, headers=headers)
               for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"})]
    for resp in answers:
        assert resp.status_code == status, resp.text
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.json()["error"] == code
        assert resp.content == answers[0].content
    browser = inproc.get(path, headers=HTML)
    assert browser.status_code == status
    if status == 404:
        error_page(browser, answers[0].json())
    else:
        assert browser.content == answers[0].content


def error_page(resp, error: dict) -> str:
    """Assert that `resp` is the console page of the JSON error `error`; its text."""
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert int(resp.headers["Content-Length"]) == len(resp.content)
    text = resp.text
    assert f"<title>{console.ERROR_TITLES[resp.status_code]} · mip</title>" in text
    notice = re.search(r'<p class="notice">([^<]*)</p>', text).group(1)
    assert html.unescape(notice) == error["message"]
    assert f"HTTP {resp.status_code} · {error['error']}" in text
    assert 'href="/ui"' in text and 'href="/ui/runs"' in text  # a way back, the header
    return text


def test_browsers_get_401_and_500_as_pages_clients_keep_json(inproc):
    # 401: the browser still asks for the password, and shows the page if it is cancelled
    for path in ("/ui/runs", "/runs"):
        client = inproc.get(path, auth=None)
        assert client.status_code == 401 and client.headers["Content-Type"] == "application/json"
        browser = inproc.get(path, headers=HTML, auth=None)
        assert browser.status_code == 401
        assert browser.headers["WWW-Authenticate"] == client.headers["WWW-Authenticate"] == \
            'Basic realm="mip"'
        error_page(browser, client.json())
    # 500: a journal row damaged behind the server's back (as test_server.py does it)
    run_id = inproc.post("/runs", json=payload("broken", "georeference")).json()["run_id"]
    inproc.wait_run(run_id)
    # and its watcher done with it: it reads the row once more as it lets the run go
    wait_for(lambda: not inproc.queue.running)
    db = journal.Journal(inproc.env["TA1_RUNS_DIR"] + "/journal.db")
    with db.transaction() as conn:
        conn.execute("UPDATE runs SET payload = '{broken' WHERE run_id = ?", (run_id,))
    db.close()
    for path in ("/jobs/broken", f"/ui/runs/{run_id}"):
        client = inproc.get(path)
        assert client.status_code == 500
        assert client.content == error_body(
            "internal_error", "internal error; the server log has the details").encode()
        browser = inproc.get(path, headers=HTML)
        assert browser.status_code == 500
        text = error_page(browser, client.json())
        assert "Traceback" not in text and "JSONDecodeError" not in text


@pytest.mark.parametrize("accept, html_page", [
    (HTML["Accept"], True),
    ("text/html", True),
    ("text/html;q=0.5, application/json", False),
    ("application/json, text/html;q=0.9", False),
    ("text/*;q=0.9, application/json;q=0.5", True),
    ("*/*", False),
    ("", False),
    ("text/html;q=0, */*", False),
    ("text/html;q=nan, */*;q=0.1", False),
])
def test_prefers_html_reads_accept_as_a_browser_means_it(accept, html_page):
    assert console.prefers_html(accept) is html_page


def test_jobs_maps_and_modules_pages(inproc):
    run_id = inproc.post("/runs", json=payload("jp", "georeference")).json()["run_id"]
    inproc.wait_run(run_id)
    jobs = page(inproc, "/ui/jobs").text
    assert 'href="/ui/jobs/jp"' in jobs and f'href="/ui/runs/{run_id}"' in jobs
    job = page(inproc, "/ui/jobs/jp").text
    assert 'href="/modules/jp/georeference/outputs"' in job and "st-passed" in job
    # times: UTC in the text and tooltip, for console.js to show in the browser's zone
    times = re.findall(r'<time datetime="([^"]+)" title="([^"]+)"><span class="day">([^<]+)'
                       r'</span> <span class="clock">([^<]+)</span></time>', jobs + job)
    assert len(times) >= 4
    for stamp, title, day, clock in times:
        text = f"{day} {clock}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
        assert title == text == stamp.replace("T", " ").replace("Z", " UTC")
    # the module log's size (one stat), its page and its raw text; a zip's size is not known
    log = inproc.get("/modules/jp/georeference/log")
    size = console.size_text(len(log.content))
    assert re.search(r"\d+ B|\d+(\.\d)? [kM]B", size)
    assert ('<a href="/ui/modules/jp/georeference/log" title="the module\'s own log, '
            f'followed live">module log</a>\n<span class="size">({size})</span>') in job
    assert 'href="/modules/jp/georeference/log"' in job
    log_page = page(inproc, "/ui/modules/jp/georeference/log").text
    assert "<title>Log of georeference in job jp · mip</title>" in log_page
    assert 'data-log="/modules/jp/georeference/log"' in log_page
    assert f'href="/ui/runs/{run_id}"' in log_page and 'data-finished="yes"' in log_page
    assert f'raw text</a>\n<span class="size">({size})</span>' in log_page
    missing = inproc.get("/ui/modules/jp/map_crop/log", headers=HTML)
    assert missing.status_code == 404 and "has not run in job" in missing.text
    maps = page(inproc, "/ui/maps").text
    assert payload("x")["map"] in maps and 'href="/ui/jobs/jp"' in maps
    modules = page(inproc, "/ui/modules").text
    assert modules.count("<tr id=\"module-") == 9
    assert 'href="#module-legend_segment"' in modules


def test_a_job_caught_mid_deletion_is_a_404(inproc):
    """DELETE /jobs/{job} removes the job's runs and its record in one transaction, but a
    page reads the record and then the runs: a job found without runs is gone."""
    db = journal.Journal(inproc.env["TA1_RUNS_DIR"] + "/journal.db")
    with db.transaction() as conn:
        conn.execute("INSERT INTO jobs (job, map, created) VALUES ('going', ?, ?)",
                     (payload("x")["map"], journal.utcnow()))
    db.close()
    for path in ("/ui/jobs/going", "/jobs/going"):
        resp = inproc.get(path)
        assert resp.status_code == 404, (path, resp.text)
        assert resp.json()["error"] == "unknown_job"


# ---------------------------------------------------------------------------- origin

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
    {"Referer": "http://evil.example/page"},
    {"Origin": "https://{host}"},  # another scheme
    {"Origin": "http://evil.example", "Referer": "{own}/ui/runs"},  # Origin wins
])
def test_a_cross_site_post_is_refused(inproc, headers):
    host = inproc.url.split("//", 1)[1]
    headers = {k: v.format(host=host, own=inproc.url) for k, v in headers.items()}
    resp = inproc.post("/runs", json=payload("xs", "georeference"), headers=headers)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"] == "cross_origin"
    # refused before credentials are even looked at, and for every POST route
    assert inproc.post("/runs/20990101-000000-000000-ffff/cancel", headers=headers,
                       auth=None).status_code == 403
    assert inproc.get("/runs").json() == []


@pytest.mark.parametrize("headers", [
    {},  # curl, mip_client.py, the CDR: neither header
    {"Origin": "{own}"},
    {"Origin": "{own_upper}"},
    {"Referer": "{own}/ui/runs/x"},
])
def test_same_origin_and_plain_clients_pass(inproc, headers):
    own_upper = inproc.url.replace("http://", "HTTP://")
    headers = {k: v.format(own=inproc.url, own_upper=own_upper) for k, v in headers.items()}
    resp = inproc.post("/runs", json=payload("ok", "georeference"), headers=headers)
    assert resp.status_code == 200, resp.text
    inproc.wait_run(resp.json()["run_id"])
    # GET is never refused: links from elsewhere keep working
    assert inproc.get("/runs", headers={"Origin": "http://evil.example"}).status_code == 200


def test_origin_parsing():
    assert guards.origin_of("http://Example.org") == ("http", "example.org", 80)
    assert guards.origin_of("https://example.org:443/x?y") == ("https", "example.org", 443)
    assert guards.origin_of("http://[::1]:8080") == ("http", "::1", 8080)
    for bad in ("null", "", "file:///etc/passwd", "http://", "http://h:99999", "javascript:1",
                "//example.org"):
        assert guards.origin_of(bad) is None, bad
    assert guards.own_origin({"wsgi.url_scheme": "http", "HTTP_HOST": "127.0.0.1:8080"}) == \
        ("http", "127.0.0.1", 8080)
    assert guards.own_origin({"wsgi.url_scheme": "http", "SERVER_NAME": "h",
                              "SERVER_PORT": "80"}) == ("http", "h", 80)


def test_openapi_declares_the_pages_and_403_on_every_post(inproc):
    spec = inproc.get("/openapi.json").json()
    for path in ("/ui", "/ui/runs", "/ui/runs/{run_id}", "/ui/jobs", "/ui/jobs/{job}",
                 "/ui/maps", "/ui/modules", "/ui/new", "/ui/modules/{job}/{module}/log"):
        assert "text/html" in spec["paths"][path]["get"]["responses"]["200"]["content"]
    # a browser gets 401 and 404 as pages: declared beside the JSON error
    for path, code in (("/runs/{run_id}", "404"), ("/runs", "401")):
        content = spec["paths"][path]["get"]["responses"][code]["content"]
        assert set(content) == {"application/json", "text/html"}
    assert set(spec["paths"]["/"]["get"]["responses"]["200"]["content"]) == {
        "application/json", "text/html"}
    posts = [(p, op) for p, ops in spec["paths"].items() for m, op in ops.items()
             if m in ("post", "delete")]
    assert len(posts) >= 4
    for path, op in posts:
        assert "403" in op["responses"], path


def test_the_run_list_page_watches_cheap_json_answers(inproc):
    text = page(inproc, "/ui/runs?job=w").text
    watch = html.unescape(re.search(r'data-watch="([^"]*)"', text).group(1)).split()
    assert watch == ["/runs?status=not_started&job=w", "/runs?status=running&job=w",
                     "/runs?offset=0&job=w"]
    run_id = inproc.post("/runs", json=payload("w", "georeference")).json()["run_id"]
    # what the page polls changes when a run appears, so the page knows to refresh
    wait_for(lambda: inproc.get(watch[2]).json() == [run_id])
    inproc.wait_run(run_id)
    # filtered by a status, it still polls the short lists, never every run of that status
    for status in ("passed", "failed"):
        text = page(inproc, f"/ui/runs?status={status}&job=w").text
        watch = html.unescape(re.search(r'data-watch="([^"]*)"', text).group(1)).split()
        assert watch == ["/runs?status=not_started&job=w", "/runs?status=running&job=w",
                         "/runs?offset=1&job=w"], status


def test_module_tables_show_what_each_module_used(inproc):
    run_id = inproc.post("/runs", json=payload("use", "georeference")).json()["run_id"]
    inproc.wait_run(run_id)
    used = inproc.get("/modules/use/georeference").json()["resources"]
    assert used["cpu_seconds"] is not None and used["peak_rss_bytes"] is not None
    line = f"CPU {used['cpu_seconds']:.1f} s · RSS {used['peak_rss_bytes'] / 1e6:.0f} MB"
    for path in (f"/ui/runs/{run_id}", "/ui/jobs/use"):
        row = re.search(r'<tr data-module="georeference">.*?</tr>', page(inproc, path).text,
                        re.S).group(0)
        assert f'<td data-label="Resources" class="resources">{line}</td>' in row, path
    # a GPU module's figures (no GPU here: as NVML would have recorded them), and a value
    # that is not what the schema says is shown escaped, never as markup
    db = journal.Journal(inproc.env["TA1_RUNS_DIR"] + "/journal.db")
    with db.transaction() as conn:
        conn.execute("UPDATE executions SET resources = ? WHERE job = 'use'", (json.dumps(
            {"cpu_seconds": 12.345, "peak_rss_bytes": 84_000_000, "gpu_device": "<b>1</b>",
             "gpu_memory_peak_bytes": 2_100_000_000, "gpu_util_mean": 43.4,
             "waited_for_gpu_seconds": 3}),))
    db.close()
    text = page(inproc, "/ui/jobs/use").text
    assert ("CPU 12.3 s · RSS 84 MB · GPU &lt;b&gt;1&lt;/b&gt; · GPU memory 2100 MB · "
            "GPU use 43% · waited 3.0 s") in text


def test_sizes_and_times_as_shown():
    assert [console.size_text(n) for n in (None, 0, 999, 1000, 12_345, 4_200_000, 5 * 10**9)] \
        == ["", "0 B", "999 B", "1.0 kB", "12 kB", "4.2 MB", "5.0 GB"]
    assert console.time_tag("2026-12-04T21:31:05.123456Z") == (
        '<time datetime="2026-12-04T21:31:05Z" title="2026-12-04 21:31:05 UTC">'
        '<span class="day">2026-12-04</span> <span class="clock">21:31:05 UTC</span></time>')
    assert console.time_tag("2026-12-04 21:31:05") == console.time_tag("2026-12-04T21:31:05Z")
    assert console.time_tag(None) == console.time_tag("") == ""
    assert console.time_tag("<b>") == "&lt;b&gt;"


def test_usage_leaves_out_what_is_unknown():
    assert console.usage(None) == ""
    assert console.usage(json.dumps({"cpu_seconds": None, "peak_rss_bytes": 5e6,
                                     "gpu_device": None, "waited_for_gpu_seconds": 2})) == \
        "RSS 5 MB"
    assert console.usage(json.dumps({"cpu_seconds": True, "gpu_device": "0",
                                     "gpu_util_mean": "x"})) == "GPU 0"
    assert console.usage("not json") == console.usage("[1]") == ""


def test_warnings_and_a_wait_for_a_gpu_are_shown(inproc):
    """A run's warnings in a box on its page and its job's, each module's in its row and
    graph box (escaped); a module waiting for a GPU has its own badge, not `running`."""
    run_id, now = journal.new_run_id(), journal.utcnow()
    warned = ["the GeoPackage m.gpkg holds no features", "no <b>GPU</b>"]
    db = journal.Journal(inproc.env["TA1_RUNS_DIR"] + "/journal.db")
    with db.transaction() as conn:  # made by hand: no run need be paid for
        conn.execute("INSERT INTO jobs (job, map, created) VALUES ('warn', 'm', ?)", (now,))
        conn.execute("INSERT INTO runs (run_id, job, map, modules, payload, status,"
                     " submit_time, start_time, log_path, warnings) VALUES (?, 'warn', 'm',"
                     " '[\"map_crop\"]', '{}', 'running', ?, ?, '/nonexistent.log', ?)",
                     (run_id, now, now, json.dumps(warned)))
        for module, message, says in (("legend_segment", None, ["no legend found"]),
                                      ("map_crop", gpus.WAITING, None)):
            conn.execute("INSERT INTO executions (run_id, job, module, status, start_time,"
                         " log_path, message, warnings) VALUES (?, 'warn', ?, ?, ?,"
                         " '/nonexistent.log', ?, ?)",
                         (run_id, module, "running" if message else "passed", now, message,
                          says and json.dumps(says)))
    db.close()
    text = page(inproc, f"/ui/runs/{run_id}").text
    box = re.search(r'<div class="warnings" id="warnings".*?</div>', text, re.S).group(0)
    assert "3 warnings" in box and "no &lt;b&gt;GPU&lt;/b&gt;" in box and "<b>GPU" not in box
    assert "legend_segment: no legend found" in box
    row = re.search(r'<tr data-module="legend_segment">.*?</tr>', text, re.S).group(0)
    assert "⚠ no legend found" in row
    assert re.search(r'data-module="legend_segment" data-state="passed"[^>]*>\s*<title>'
                     r'[^<]*warning: no legend found', text)
    assert 'data-module="map_crop" data-state="waiting_gpu"' in text
    waiting = re.search(r'<tr data-module="map_crop">.*?</tr>', text, re.S).group(0)
    assert '<span class="state st-waiting_gpu">waiting for a GPU</span>' in waiting
    assert ">running<" not in waiting
    job = page(inproc, "/ui/jobs/warn").text
    assert "3 warnings" in job and '<span class="state st-waiting_gpu">' in job
    assert ".st-waiting_gpu" in inproc.get("/ui/console.css", auth=None).text


# ---------------------------------------------------------------------------- new runs

def states_of(text: str) -> dict:
    """{module: (state, earlier run)} of a run page's graph."""
    return {m: (s, e) for m, s, e in re.findall(
        r'data-module="(\w+)" data-state="(\w+)" data-earlier="([^"]*)"', text)}


def test_earlier_passes_and_the_job_page_of_every_module(inproc):
    first = inproc.post("/runs", json=payload("ep", "ALL", extra_switches={
        "map_crop": ["--fail"]})).json()["run_id"]
    inproc.wait_run(first)
    before = states_of(page(inproc, f"/ui/runs/{first}").text)
    assert before["map_crop"] == ("failed", "") and before["geopackage"] == ("not_run", "")
    assert {e for _, e in before.values()} == {""}
    # the job page after the failure: every module, geopackage among them as not run
    job = page(inproc, "/ui/jobs/ep").text
    rows = dict(re.findall(r'<tr data-module="(\w+)">\s*<td[^>]*>\w+</td>\s*'
                           r'<td data-label="State"><span class="state st-(\w+)"', job))
    assert list(rows) == list(inproc.queue.catalogue)
    assert rows["geopackage"] == "not_run" and rows["map_crop"] == "failed"
    assert 'href="/modules/ep/geopackage/' not in job  # nothing to download of it
    assert '<span class="state st-failed" id="job-status">failed</span>' in job
    assert f'data-post="/runs/{first}/rerun"' in job and f'href="/ui/new?from={first}"' in job
    assert "No GeoPackage yet" in job

    second = inproc.post("/runs", json=payload("ep", "ALL")).json()["run_id"]
    inproc.wait_run(second)
    after = states_of(page(inproc, f"/ui/runs/{second}").text)
    skipped = {m for m, (s, _) in before.items() if s == "passed"}
    assert skipped and "map_crop" not in skipped
    for module, (state, earlier) in after.items():
        assert state == "passed", module
        assert earlier == (first if module in skipped else ""), module
    text = page(inproc, f"/ui/runs/{second}").text
    assert text.count(f'<a class="earlier" href="/ui/runs/{first}"') == len(skipped)
    assert f'href="/ui/new?from={second}"' in text
    # the GeoPackage, where it lies and its download
    job = page(inproc, "/ui/jobs/ep").text
    link = re.search(r'<p id="product">.*?</p>', job, re.S).group(0)
    gpkg = f"ep_geopackage_outputs/gpkg_outputs/{MAP}.gpkg"
    assert 'href="/modules/ep/geopackage/outputs"' in link and gpkg in link
    assert f"$TA1_OUTPUTS_DIR/ep/geopackage/gpkg_outputs/{MAP}.gpkg" in link
    zipped = zipfile.ZipFile(io.BytesIO(inproc.get("/modules/ep/geopackage/outputs").content))
    assert gpkg in zipped.namelist()


def test_a_forced_or_downstream_module_is_no_earlier_pass():
    catalogue = load_catalogue(ZERO_CONFIG)
    passes = {name: {"run_id": "r1"} for name in catalogue}
    run = {"modules": ["map_crop"], "force_rerun": True}
    assert set(console.skipped_passes(catalogue, run, passes)) == {"legend_segment"}
    run = {"modules": ["ALL"], "force_rerun": False}
    del passes["legend_item_segment"]
    assert set(console.skipped_passes(catalogue, run, passes)) == {
        "legend_segment", "georeference", "map_crop"}
    assert console.skipped_passes(catalogue, {"modules": ["gone"], "force_rerun": False},
                                  passes) == {}


def test_the_new_run_page_and_its_prefill(inproc):
    new = page(inproc, "/ui/new").text
    assert 'href="/ui/new"' in new  # in the header's nav
    form = re.search(r'<form id="new-run".*?</form>', new, re.S).group(0)
    assert 'data-submit="/runs"' in form
    assert " name=" not in form  # without the script, a plain submit sends no key in a URL
    assert f'<option value="{MAP}">' in form  # the only one, so the one chosen
    assert re.search(r'id="all-modules" value="ALL" data-modules-all checked', form)
    boxes = re.findall(r'<input type="checkbox" id="module-(\w+)"[^>]*>', form)
    assert boxes == list(inproc.queue.catalogue)
    assert " checked" not in "".join(re.findall(r"<input[^>]*data-module-box[^>]*>", form))
    assert form.count("<textarea") == len(boxes)
    for field in ("job", "map", "modules", "extra_switches.map_crop", "notify_url", ""):
        assert f'data-error-for="{field}"' in form, field
    assert f'href="/ui/new?map={MAP}"' in page(inproc, "/ui/maps").text
    # Edit and rerun: the run's payload, its secrets left out
    run_id = inproc.post("/runs", json=payload(
        "pre", "map_crop", "georeference", force_rerun=True, openai_key="sk-secret-456",
        extra_switches={"map_crop": ["--fail", "<b>x</b>"]})).json()["run_id"]
    inproc.wait_run(run_id)
    assert f'href="/ui/new?from={run_id}"' in page(inproc, f"/ui/runs/{run_id}").text
    filled = page(inproc, f"/ui/new?from={run_id}").text
    assert 'id="job" value="pre"' in filled
    assert f'href="/ui/runs/{run_id}"' in filled and "give it again" in filled
    assert re.search(r'id="all-modules" value="ALL" data-modules-all>', filled)
    checked = re.findall(r'id="module-(\w+)" value="\w+" data-module-box[^>]* checked>', filled)
    assert checked == ["georeference", "map_crop"]
    assert 'data-switches="map_crop" aria-label="extra switches of map_crop" ' \
           'spellcheck="false">--fail\n&lt;b&gt;x&lt;/b&gt;</textarea>' in filled
    assert re.search(r'id="force_rerun"[^>]* checked>', filled)
    assert "sk-secret-456" not in filled
    # ?map= chooses the map, even one gone since (POST /runs then says so, at the field)
    assert '<option value="Gone_map" selected>' in page(inproc, "/ui/new?map=Gone_map").text
    for path, status in (("/ui/new?from=20990101-000000-000000-ffff", 404),
                         ("/ui/new?from=x%20y", 400), ("/ui/new?map=..", 400)):
        assert inproc.get(path, headers=HTML).status_code == status, path


def test_prefill_leaves_hidden_parts_to_be_given_again():
    catalogue = load_catalogue(ZERO_CONFIG)
    form = console.prefill({"job": "j", "map": "m", "modules": ["ALL", "gone"],
                            "notify_url": "https://hooks.example/T0/SeCrEt",
                            "extra_switches": {"map_crop": ["--url", "https://h.example/k"]}},
                           catalogue)
    assert form["notify_url"] == "" and form["modules"] == ["ALL"]
    assert form["switches"]["map_crop"] == "--url\nhttps://h.example/(hidden)"
    assert "SeCrEt" not in json.dumps(form) and "/k" not in json.dumps(form)
    assert form["hidden"] == ["the extra switches of map_crop",
                              "the notify URL (it went to https://hooks.example)"]


def test_a_switch_named_like_a_secret_is_shown_hidden():
    """Modules take keys as switches: the run page and Edit and rerun show their values
    hidden, in both forms, and the form names them to be given again."""
    catalogue = load_catalogue(ZERO_CONFIG)
    switches = {"map_crop": ["--api-key=sk-SeCrEt", "--token", "t0KeN", "--password",
                             "--sleep", "3", "--fail"]}
    assert console.shown({"extra_switches": switches})["extra_switches"]["map_crop"] == [
        "--api-key=(hidden)", "--token", "(hidden)", "--password", "--sleep", "3", "--fail"]
    form = console.prefill({"job": "j", "map": "m", "extra_switches": switches}, catalogue)
    assert "SeCrEt" not in json.dumps(form) and "t0KeN" not in json.dumps(form)
    assert form["hidden"] == ["the extra switches of map_crop"]


def test_the_new_run_form_posts_as_the_api_takes_it(inproc):
    """What console.js sends: JSON from the page's own origin with an Idempotency-Key; a
    refusal opens with the field the form shows it at."""
    body = payload("form", "georeference", extra_switches={"georeference": ["--sleep", "0"]})
    own = {"Origin": inproc.url, "Idempotency-Key": "a1b2c3d4e5f60718293a4b5c6d7e8f90"}
    evil = dict(own, Origin="http://evil.example")
    refused = inproc.post("/runs", json=body, headers=evil)
    assert refused.status_code == 403 and refused.json()["error"] == "cross_origin"
    assert inproc.get("/runs").json() == []
    one = inproc.post("/runs", json=body, headers=own)
    two = inproc.post("/runs", json=body, headers=own)  # a double click
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert one.json()["run_id"] == two.json()["run_id"]
    assert two.headers["Idempotent-Replayed"] == "true"
    assert inproc.get("/runs").json() == [one.json()["run_id"]]
    inproc.wait_run(one.json()["run_id"])
    for bad, field in ((dict(body, modules=[]), "modules"),
                       (dict(body, job=""), "job"),
                       (dict(body, extra_switches={"map_crop": ["x\u0000"]}),
                        "extra_switches.map_crop[0]"),
                       (dict(body, map="Nowhere"), "map")):
        resp = inproc.post("/runs", json=bad, headers={"Origin": inproc.url})
        assert 400 <= resp.status_code < 500, resp.text
        assert resp.json()["message"].startswith(field + ": "), resp.text
