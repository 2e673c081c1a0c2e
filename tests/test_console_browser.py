"""The console in a real browser: Playwright driving Debian's chromium (its executable_path;
Playwright's own browser download is never used) against the real server.

A failing test saves a screenshot in test-results/ (git-ignored); the run page's screenshot
of docs/console.md, docs/console-run.png, is made here too.
"""

import os
import re
import shutil
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from zoneinfo import ZoneInfo

import pytest
from conftest import CONSOLE_POLL_MS
from conftest import ROOT
from conftest import hold_file
from conftest import payload
from conftest import release
from conftest import wait_for

from mip import journal

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
RESULTS = os.path.join(ROOT, "test-results")
SCREENSHOT = os.path.join(ROOT, "docs", "console-run.png")
# docs/console.md's screenshot is taken on every run, but only replaces the committed one when it
# is missing or asked for (UPDATE_SCREENSHOTS=1 make test): a test run leaves the tree clean
UPDATE_SCREENSHOT = os.environ.get("UPDATE_SCREENSHOTS") == "1" or not os.path.exists(SCREENSHOT)
WAIT_MS = 90_000  # generous: the machine is shared and busy
HOSTILE = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(2)>"
# every tab's zone: the console shows times in it, named, and UTC in their tooltips
ZONE = "America/Denver"


def slow(module: str, seconds: float) -> dict:
    return {module: ["--sleep", str(seconds)]}


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    with sync_api.sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


class Tab:
    """A browser page logged in to the server, with what it logged and the dialogs it
    opened."""

    def __init__(self, browser, server, width: int = 1100):
        self.server = server
        self.context = browser.new_context(
            viewport={"width": width, "height": 900}, timezone_id=ZONE,
            http_credentials={"username": server.user, "password": server.password,
                              "send": "always"})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors = []
        self.dialogs = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("dialog", self.answer)

    def answer(self, dialog) -> None:
        self.dialogs.append((dialog.type, dialog.message))
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    def open(self, path: str):
        resp = self.page.goto(self.server.url + path)
        assert resp.status == 200, (path, resp.status)
        # a mark that a reload would wipe: what follows happens without one
        self.page.evaluate("window.__same_page = true")
        return resp

    def not_reloaded(self) -> bool:
        return self.page.evaluate("window.__same_page === true")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server, request):
    """A logged-in page on the server; a screenshot in test-results/ when the test fails.
    Closed before the server stops, so that its polling never meets a dead server."""
    t = Tab(browser, server)
    yield t
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        os.makedirs(RESULTS, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::")[-1])
        t.page.screenshot(path=os.path.join(RESULTS, f"{name}.png"), full_page=True)
    t.close()


def submit(server, body: dict) -> str:
    resp = server.post("/runs", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()["run_id"]


def node_state(tab: Tab, module: str) -> str | None:
    return tab.page.get_attribute(f'svg.graph g[data-module="{module}"]', "data-state")


def wait_state(tab: Tab, module: str, state: str) -> None:
    tab.page.wait_for_selector(f'svg.graph g[data-module="{module}"][data-state="{state}"]')


def in_zone(stamp: str, layout: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
    """A `...Z` time as the console shows it in ZONE: 2026-12-04 14:31:05 MST."""
    return datetime.fromisoformat(stamp).astimezone(ZoneInfo(ZONE)).strftime(layout)


def check_time(el) -> None:
    """The <time> element `el` (a locator) shows its datetime in ZONE, named, and UTC in
    its tooltip."""
    stamp = el.get_attribute("datetime")
    assert el.inner_text() == in_zone(stamp), stamp
    assert el.get_attribute("title") == stamp.replace("T", " ").replace("Z", " UTC")
    assert re.search(r" M[SD]T$", el.inner_text())


# words of headers and module names broken over two lines (a Range over a word has boxes
# at two heights), at the page's present width
BROKEN_WORDS = """() => {
  const broken = [];
  const names = "th, td[data-label=Module], td[data-label=Modules], td[data-label=Requires] a,"
    + " td[data-label='Required by'] a, td[data-label=Run], td[data-label=Job]";
  for (const el of document.querySelectorAll(names)) {
    const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walk.nextNode(); node; node = walk.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0)
                             .map(r => Math.round(r.top)));
        if (tops.size > 1) {
          broken.push(m[0]);
        }
      }
    }
  }
  return broken;
}"""


# ---------------------------------------------------------------------------- tests

def test_a_submitted_run_appears_and_passes_without_a_reload(tab, server):
    tab.open("/ui/runs")
    assert "No runs" in tab.page.inner_text("#runs")
    run_id = submit(server, payload("shown", "ALL", extra_switches=slow("georeference", 3)))
    row = f'tr[data-run="{run_id}"]'
    tab.page.wait_for_selector(row)
    tab.page.wait_for_selector(f"{row} .st-passed")
    assert tab.page.inner_text(f"{row} td[data-label=Job]") == "shown"
    # the row came in a swapped region: its times were shown in the browser's zone too
    check_time(tab.page.locator(f"{row} td[data-label=Ended] time"))
    assert tab.not_reloaded()
    assert server.get(f"/runs/{run_id}").json()["status"] == "passed"

    # the run page, all green, is docs/console.md's screenshot
    tab.open(f"/ui/runs/{run_id}")
    for module in ("legend_segment", "map_crop", "geopackage"):
        assert node_state(tab, module) == "passed"
    check_time(tab.page.locator("#summary time").first)
    ended = server.get("/modules/shown/geopackage").json()["stop_time"][:19] + "Z"
    when = tab.page.locator('svg.graph g[data-module="geopackage"] text.when')
    shown = when.evaluate("el => [...el.childNodes].filter(n => n.nodeType === 3)"
                          ".map(n => n.data).join('')")
    assert shown == in_zone(ended, "%H:%M:%S %Z")
    assert when.locator("title").text_content() == ended.replace("T", " ").replace("Z", " UTC")
    tab.page.wait_for_function("() => document.getElementById('log').textContent.length > 200")
    os.makedirs(RESULTS, exist_ok=True)
    shot = os.path.join(RESULTS, "console-run.png")
    tab.page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    if UPDATE_SCREENSHOT:
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    assert tab.errors == []


def test_a_run_from_the_new_run_page_fails_then_passes_edited(tab, server):
    """A geologist's round: the New run form, a failure that says why, the job page, and
    Edit and rerun without the switch that failed it."""
    tab.open("/ui/new")
    # no job name: the server's refusal is shown at the field it names
    tab.page.click("#submit-run")
    tab.page.wait_for_selector('[data-error-for="job"]:not([hidden])')
    assert tab.page.inner_text('[data-error-for="job"]').startswith("job: ")
    assert tab.page.is_checked("#all-modules")
    tab.page.fill("#job", "fromform")
    tab.page.fill('textarea[data-switches="map_crop"]', "--fail")
    tab.page.dblclick("#submit-run")  # one form, one run
    tab.page.wait_for_url(re.compile(r"/ui/runs/"))
    run_id = tab.page.url.rsplit("/", 1)[1]
    tab.page.evaluate("window.__same_page = true")
    wait_state(tab, "map_crop", "failed")
    tab.page.wait_for_selector("#run-status.st-failed")
    assert tab.not_reloaded()
    assert server.get("/runs").json() == [run_id]
    for module in ("line_extract", "point_extract", "geopackage"):
        assert node_state(tab, module) == "not_run", module
    for module in ("legend_segment", "legend_item_segment", "georeference"):
        assert node_state(tab, module) == "passed", module
    row = 'tr[data-module="map_crop"]'
    assert tab.page.inner_text(f"{row} td[data-label='Exit code']") == "1"
    assert "asked to fail" in tab.page.inner_text(f"{row} td[data-label=Message]")
    # its downloads are linked
    href = tab.page.get_attribute(f"{row} a:text('logs')", "href")
    assert href == "/modules/fromform/map_crop/logs"
    assert server.get(href).headers["Content-Type"] == "application/zip"

    # the job page lists every module, geopackage too, and offers to edit the payload
    tab.open("/ui/jobs/fromform")
    state = tab.page.inner_text('#job-modules tr[data-module="geopackage"] td[data-label=State]')
    assert state.strip() == "not run"
    assert tab.page.inner_text("#job-status") == "failed"
    tab.page.click("#edit-rerun")
    tab.page.wait_for_url(re.compile(r"/ui/new\?from=" + run_id))
    assert tab.page.input_value("#job") == "fromform"
    assert tab.page.input_value('textarea[data-switches="map_crop"]') == "--fail"
    tab.page.fill('textarea[data-switches="map_crop"]', "")
    tab.page.click("#submit-run")
    tab.page.wait_for_url(re.compile(r"/ui/runs/(?!" + run_id + ")"))
    tab.page.wait_for_selector("#run-status.st-passed")
    # what passed before and was skipped shows as passed, linked to the run it passed in
    wait_state(tab, "geopackage", "passed")
    assert tab.page.get_attribute('svg.graph g[data-module="legend_segment"]',
                                  "data-earlier") == run_id
    assert tab.page.locator(f'tr[data-module="georeference"] a[href="/ui/runs/{run_id}"]'
                            ).count() == 1
    assert len(server.get("/runs").json()) == 2
    # the one refusal, which chromium logs as any failed request
    assert tab.errors == ["Failed to load resource: the server responded with a status of 422 "
                          "(Unprocessable Entity)"]


def test_the_cancel_button_stops_a_running_run(tab, server):
    run_id = submit(server, payload("stopme", "georeference",
                                    extra_switches=slow("georeference", 120)))
    tab.open(f"/ui/runs/{run_id}")
    wait_state(tab, "georeference", "running")
    tab.page.click("#cancel")
    tab.page.wait_for_selector("#run-status.st-cancelled")
    wait_state(tab, "georeference", "cancelled")
    assert tab.dialogs and tab.dialogs[0][0] == "confirm" and run_id in tab.dialogs[0][1]
    assert server.get(f"/runs/{run_id}").json()["status"] == "cancelled"
    assert tab.page.locator("#cancel").count() == 0
    assert tab.not_reloaded()
    assert tab.errors == []


def test_the_rerun_button_asks_then_opens_the_new_run(tab, server):
    run_id = submit(server, payload("again", "georeference"))
    server.wait_run(run_id)
    tab.open(f"/ui/runs/{run_id}")
    tab.page.click("#rerun")
    tab.page.wait_for_url(re.compile(r"/ui/runs/(?!" + run_id + ")"))
    new_id = tab.page.url.rsplit("/", 1)[1]
    assert server.get("/runs").json() == [run_id, new_id]
    assert tab.dialogs[0][0] == "confirm"
    assert tab.errors == []


def test_the_log_panel_grows_while_a_module_sleeps(tab, server):
    # held, not slept: each module goes on when the test has seen what it waits for
    geo, items = (hold_file(server.env, "logs", name) for name in ("geo", "items"))
    run_id = submit(server, payload("logs", "georeference", "legend_item_segment",
                                    extra_switches={"georeference": ["--hold", geo],
                                                    "legend_item_segment": ["--hold", items]}))
    asked = []
    tab.page.on("request", lambda r: "/log?offset=" in r.url and asked.append(r.url))
    tab.open(f"/ui/runs/{run_id}")
    wait_state(tab, "georeference", "running")
    # functions, not expressions: the page's CSP forbids the eval() a polled expression needs
    log = "document.getElementById('log').textContent"
    tab.page.wait_for_function(f"() => {log}.includes('legend_segment')")
    first = tab.page.evaluate(f"() => {log}.length")
    # legend_item_segment starts and ends while georeference still sleeps
    release(items)
    tab.page.wait_for_function(f"() => {log}.length > {first}")
    assert server.get(f"/runs/{run_id}").json()["status"] == "running"
    assert node_state(tab, "georeference") == "running"
    # the module log page, opened from the downloads, follows georeference's own log
    link = tab.page.get_attribute('tr[data-module="georeference"] a:text("module log")', "href")
    assert link == "/ui/modules/logs/georeference/log"
    follower = tab.context.new_page()
    follower.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
    follower.goto(server.url + link)
    assert follower.inner_text("main h1") == "Log of georeference in job logs"
    assert follower.locator("header nav a").count() >= 4
    follower.wait_for_function(f"() => {log}.includes('--hold: waiting')")
    assert "--hold: released" not in follower.evaluate(f"() => {log}")
    release(geo)
    follower.wait_for_function(f"() => {log}.includes('--hold: released')")
    follower.wait_for_selector('#summary[data-finished="yes"] .st-passed')
    own = server.get(link.removeprefix("/ui")).text
    wait_for(lambda: follower.evaluate(f"() => {log}") == own, timeout=30)
    assert follower.get_attribute("a:text('raw text')", "href") == link.removeprefix("/ui")
    follower.close()
    wait_state(tab, "georeference", "passed")
    tab.page.wait_for_selector("#run-status.st-passed")
    full = server.get(f"/runs/{run_id}/log").text
    wait_for(lambda: tab.page.evaluate(f"() => {log}") == full, timeout=30)
    # it asked only for what it had not seen yet
    offsets = [int(url.rsplit("=", 1)[1]) for url in asked]
    assert offsets[0] == 0 and max(offsets) > 0 and offsets == sorted(offsets)
    assert tab.not_reloaded()
    assert tab.errors == []


def test_hostile_text_is_shown_as_text(tab, server):
    refused = server.post("/runs", json=payload(HOSTILE, "map_crop"))
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_payload"
    run_id = submit(server, payload("hostile", "map_crop",
                                    extra_switches={"map_crop": [HOSTILE, HOSTILE_IMG]}))
    server.wait_run(run_id)
    for path in (f"/ui/runs/{run_id}", "/ui/runs", "/ui/jobs/hostile"):
        tab.open(path)
        tab.page.wait_for_timeout(500)
    tab.open(f"/ui/runs/{run_id}")
    shown = tab.page.inner_text("pre.payload")
    assert HOSTILE in shown and HOSTILE_IMG in shown
    tab.page.wait_for_function("() => document.getElementById('log').textContent.length > 0")
    tab.page.wait_for_timeout(1000)
    assert tab.page.locator("img").count() == 0
    assert tab.page.locator("script:not([src])").count() == 0
    assert tab.dialogs == []
    assert tab.errors == []


class Attacker:
    """Another site (another loopback origin) whose page posts to the API with the
    credentials the browser holds, by fetch and by a form."""

    def __init__(self, api: str):
        body = payload("csrf", "georeference")
        # a text/plain form sends name=value: this name and value make valid JSON
        form_name = ('{"job":"csrf-form","modules":["georeference"],"map":"' + body["map"]
                     + '","extra_switches":{"georeference":["')
        page = f"""<!doctype html><title>attacker</title>
<form id="f" method="post" action="{api}/runs" enctype="text/plain" target="sink">
<input type="hidden" name='{form_name}' value='"]}}}}'></form>
<iframe name="sink"></iframe>
<script>
fetch("{api}/runs", {{method: "POST", mode: "no-cors", credentials: "include",
  body: JSON.stringify({{"job": "csrf", "modules": ["georeference"], "map": "{body['map']}"}})}})
  .finally(() => document.getElementById("f").submit());
</script>""".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_a_cross_site_post_is_refused(tab, server):
    attacker = Attacker(server.url)
    answers = []
    tab.page.on("response", lambda r: r.request.method == "POST" and answers.append(
        (r.url, r.status, r.request.headers.get("origin"))))
    try:
        tab.page.goto(attacker.url)
        # sync Playwright hands over events only inside its own calls: wait in the page
        wait_for(lambda: tab.page.wait_for_timeout(100) or len(answers) >= 2, timeout=60)
    finally:
        attacker.stop()
    assert [(url, status) for url, status, _ in answers] == [(server.url + "/runs", 403)] * 2
    assert all(origin == attacker.url.rstrip("/") for _, _, origin in answers)
    assert server.get("/runs").json() == []
    assert server.get("/jobs").json() == []
    # the same request from the console's own pages, with the same stored credentials, works
    tab.open("/ui/runs")
    status = tab.page.evaluate("""body => fetch("/runs", {method: "POST", body: body})
        .then(r => r.status)""", '{"job": "own", "modules": ["georeference"], '
                                 f'"map": "{payload("x")["map"]}"}}')
    assert status == 200
    assert len(server.get("/runs").json()) == 1


def pages(server, run_id: str) -> list:
    return ["/", "/ui", "/ui/runs", "/ui/runs?status=passed&job=every", f"/ui/runs/{run_id}",
            "/ui/jobs", "/ui/jobs/every", "/ui/maps", "/ui/modules"]


def test_no_page_logs_a_javascript_error(tab, server):
    run_id = submit(server, payload("every", "map_crop",
                                    extra_switches=slow("legend_segment", 2)))
    for path in pages(server, run_id):
        tab.open(path)
        assert tab.page.locator("main h1").count() == 1, path
        tab.page.wait_for_timeout(2 * CONSOLE_POLL_MS)  # a poll or two
    server.wait_run(run_id)
    tab.open(f"/ui/runs/{run_id}")
    tab.page.wait_for_timeout(3 * CONSOLE_POLL_MS)
    assert tab.errors == []


def test_swagger_ui_shows_the_api_under_its_policy(tab, server):
    tab.open("/docs")
    assert "script-src 'self'" in tab.page.evaluate(
        "fetch('/docs').then(r => r.headers.get('content-security-policy'))")
    tab.page.wait_for_selector("#operations-default-post_runs, .opblock-summary-path")
    paths = tab.page.locator(".opblock-summary-path").all_inner_texts()
    assert any(p.replace("\u200b", "") == "/runs" for p in paths), paths[:5]
    assert tab.errors == []


NOT_FOUND = "/ui/runs/20990101-000000-000000-ffff"
# its JavaScript errors are looked for by the log panel's test, which follows one
MODULE_LOG = "/ui/modules/every/legend_segment/log"


def test_every_page_fits_375_px(browser, server):
    """Every page, a 404 too, fits a phone's 375 px; at 1366 px none breaks a header or a
    module name inside a word. A 404 and a 500 opened in the browser are console pages."""
    run_id = submit(server, payload("every", "ALL", extra_switches={"map_crop": ["--fail"]}))
    broken = submit(server, payload("broken", "georeference"))
    server.wait_run(run_id)
    server.wait_run(broken)
    narrow = Tab(browser, server, width=375)
    try:
        missing = narrow.page.goto(server.url + NOT_FOUND)
        assert missing.status == 404 and missing.headers["content-type"].startswith("text/html")
        assert narrow.page.inner_text("main h1") == "Not found"
        assert "no run '20990101-000000-000000-ffff'" in narrow.page.inner_text("#error")
        assert narrow.page.locator("header nav a[href='/ui/runs']").count() == 1
        assert narrow.page.get_attribute("#error a:text('The runs')", "href") == "/ui"
        # the way back: shown by the script where there is a page to go back to
        assert narrow.page.locator("button[data-back]").is_visible()
        # the New run form's script is checked in its own test; its layout here
        for path in [*pages(server, run_id), f"/ui/new?from={run_id}", MODULE_LOG,
                     NOT_FOUND]:
            if path != NOT_FOUND:
                narrow.open(path)
            else:
                narrow.page.goto(server.url + path)
            width = narrow.page.evaluate("document.scrollingElement.scrollWidth")
            assert width <= 375, (path, width)
            box = narrow.page.locator("main h1").bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, path
        narrow.open(f"/ui/runs/{run_id}")
        # read at once: the page may swap the graph for a fresh one at any moment
        graph = narrow.page.evaluate(
            "() => document.querySelector('svg.graph').getBoundingClientRect().right")
        assert 0 < graph <= 375
        narrow.page.set_viewport_size({"width": 1366, "height": 900})
        for path in [*pages(server, run_id), f"/ui/new?from={run_id}", MODULE_LOG]:
            narrow.open(path)
            assert narrow.page.evaluate(BROKEN_WORDS) == [], path
            width = narrow.page.evaluate("document.scrollingElement.scrollWidth")
            assert width <= 1366, (path, width)
        # a 500, provoked as tests/test_server.py does: a journal row damaged behind the
        # server's back (last: the runs pages read that row too)
        db = journal.Journal(os.path.join(server.env["TA1_RUNS_DIR"], "journal.db"))
        with db.transaction() as conn:
            conn.execute("UPDATE runs SET payload = '{broken' WHERE run_id = ?", (broken,))
        db.close()
        crash = narrow.page.goto(f"{server.url}/ui/runs/{broken}")
        assert crash.status == 500 and narrow.page.inner_text("main h1") == "Server error"
        assert "the server log has the details" in narrow.page.inner_text("#error")
        assert "Traceback" not in narrow.page.content()
        # chromium logs each error answer itself, as it opens the page
        failed = "Failed to load resource: the server responded with a status of "
        assert narrow.errors == [failed + "404 (Not Found)"] * 2 + [
            failed + "500 (Internal Server Error)"]
    finally:
        narrow.close()
