"""Lists that grow with every map received, paged and sorted in SQL (issue 22 point 4):
GET /jobs, GET /cdr/events, /ui/jobs and /ui/maps give the same items as the whole lists
paged in Python did, at every page boundary; their queries, and those of start-up, read
an index, never a whole table or a sort of one. The app is called in process."""

import base64
import contextlib
import html
import io
import json
import os
import re
import shutil
import sys

import pytest

from mip import idempotency
from mip import journal
from mip import maps
from mip.links import cdr
from mip.settings import Settings
from mip.web import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mip_server  # noqa: E402

AUTH = "Basic " + base64.b64encode(b"u:p").decode()
# (job, map, created): j04 and j05 were made in the same millisecond
JOBS = [("j01", "m01", "2026-01-01T00:00:01.000Z"), ("j02", "m01", "2026-01-01T00:00:02.000Z"),
        ("j03", "m02", "2026-01-01T00:00:03.000Z"), ("j05", "m03", "2026-01-01T00:00:04.000Z"),
        ("j04", "m03", "2026-01-01T00:00:04.000Z"), ("j06", "m03", "2026-01-01T00:00:06.000Z"),
        ("j07", "m05", "2026-01-01T00:00:07.000Z"), ("j08", "m07", "2026-01-01T00:00:08.000Z")]
MAPS = ["m01", "m02", "m03", "m04", "m05", "m06", "m07"]
# (event id, cog, status, received): ties in time, recorded in this order
EVENTS = [("e1", "m01", "submitted", "2026-01-01T00:00:01.000Z"),
          ("e2", "m02", "failed", "2026-01-01T00:00:02.000Z"),
          ("e3", "m03", "duplicate", "2026-01-01T00:00:02.000Z"),
          ("e4", "m03", "received", "2026-01-01T00:00:02.000Z"),
          ("e5", "m05", "downloading", "2026-01-01T00:00:01.500Z"),
          ("e6", "m07", "submitted", "2026-01-01T00:00:09.000Z")]


@pytest.fixture(scope="module")
def users():
    return {"u": mip_server.hash_password("p")}


@contextlib.contextmanager
def small_site(root, users):
    """(app, journal, settings) on a small journal: JOBS with a run each (j06 has two,
    j03 none), EVENTS, and the MAPS folders, with a folder still waiting for its map file
    and names that are no map."""
    env = {f"TA1_{name.upper()}_DIR": str(root / name)
           for name in ("inputs", "outputs", "temps", "runs", "repos")}
    env["MIP_CONFIG"] = os.path.join(ROOT, "config.yml")
    settings = Settings.from_env(env)
    settings.make_dirs()
    for name in [*MAPS, "m08", ".hidden", "bad name"]:
        os.makedirs(os.path.join(settings.inputs_dir, "maps", name))
    for name in MAPS:
        open(maps.map_file(settings, name), "wb").close()
    db = journal.Journal(settings.journal_path)
    db.migrate()
    with db.transaction() as conn:
        conn.executemany("INSERT INTO jobs (job, map, created) VALUES (?, ?, ?)", JOBS)
    for job, map_name, _ in JOBS:
        if job != "j03":
            db.create_run(job, map_name, ["ALL"], False, {"job": job}, settings.runs_dir)
    latest = db.create_run("j06", "m03", ["ALL"], False, {"job": "j06"}, settings.runs_dir)
    db.set_run_status(latest, journal.Status.CANCELLED)
    for event_id, cog, status, received in EVENTS:
        db.add_event(event_id, "map.process", cog, f"https://cdr/{cog}.tif", status)
        with db.transaction() as conn:
            conn.execute("UPDATE cdr_events SET received = ? WHERE event_id = ?",
                         (received, event_id))
    cfg = mip_server.Config(settings=settings, users=users, cdr_settings=cdr.CdrSettings(
        url="http://127.0.0.1:9/", token="t", secret="s", callback_url="http://127.0.0.1:9/cdr",
        system="mip", version="0"))
    queue = mip_server.RunQueue(cfg, db)
    link = cdr.CdrLink(cfg.cdr_settings, settings, db, queue.submit)
    try:
        yield mip_server.make_app(cfg, db, queue, link), db, settings
    finally:
        link.client.close()
        db.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, users):
    """The small site, shared by the tests that only read it."""
    with small_site(tmp_path_factory.mktemp("site"), users) as made:
        yield made


@pytest.fixture
def own_site(tmp_path, users):
    """The small site, for a test that changes it."""
    with small_site(tmp_path, users) as made:
        yield made


def call(app, path: str) -> tuple:
    """(status, body) of a GET of `path` from the WSGI app, with credentials."""
    path_info, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path_info, "QUERY_STRING": query,
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_HOST": "127.0.0.1", "HTTP_AUTHORIZATION": AUTH,
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr}
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"] = int(status.split()[0])

    body = b"".join(app(environ, start_response))
    return answer["status"], body.decode()


def get_json(app, path: str):
    status, body = call(app, path)
    assert status == 200, (path, body)
    return json.loads(body)


# ---------------------------------------------------------------------------- what was

def all_jobs(db) -> list:
    """Every job row, sorted as GET /jobs always listed them: by creation, then name."""
    rows = db.connect().execute("SELECT job, map, created FROM jobs").fetchall()
    return sorted((tuple(r) for r in rows), key=lambda r: (r[2], r[0]))


def all_events(db) -> list:
    """Every event, newest first, as GET /cdr/events listed them: the oldest-first list
    (SQLite kept the recording order of ties) reversed."""
    rows = db.connect().execute("SELECT rowid, * FROM cdr_events").fetchall()
    rows = sorted(rows, key=lambda r: (r["received"], r["rowid"]))
    return [{k: r[k] for k in r.keys() if k != "rowid"} for r in reversed(rows)]


def shown_rows(page: str, attribute: str) -> list:
    return [html.unescape(v) for v in re.findall(rf'<tr {attribute}="([^"]*)"', page)]


# ---------------------------------------------------------------------------- the routes

@pytest.mark.parametrize("query, start, stop", [
    ("", 0, None), ("?limit=3", 0, 3), ("?offset=3&limit=3", 3, 6), ("?offset=6&limit=3", 6, 9),
    ("?offset=7", 7, None), ("?offset=8", 8, None), ("?offset=99", 99, None),
    ("?limit=0", 0, 0), ("?limit=99", 0, 99), ("?offset=1&limit=1", 1, 2)])
def test_jobs_are_paged_as_before(site, query, start, stop):
    app, db, _ = site
    assert get_json(app, f"/jobs{query}") == [r[0] for r in all_jobs(db)][start:stop]


@pytest.mark.parametrize("limit", [None, 0, 1, 3, 5, 6, 7, 10000])
def test_cdr_events_are_the_latest_as_before(site, limit):
    app, db, _ = site
    got = get_json(app, "/cdr/events" + ("" if limit is None else f"?limit={limit}"))
    assert got == all_events(db)[:100 if limit is None else limit]
    if limit is None:  # ties in time: the later recorded comes first
        assert [e["event_id"] for e in got] == ["e6", "e4", "e3", "e2", "e5", "e1"]


def test_the_jobs_page_is_the_job_list_newest_first(site, monkeypatch):
    app, db, _ = site
    monkeypatch.setattr(console, "PAGE_SIZE", 3)
    newest_first = [r[0] for r in reversed(all_jobs(db))]
    pages = [shown_rows(call(app, f"/ui/jobs?page={n}")[1], "data-job") for n in (1, 2, 3)]
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:9]]
    # past the last page is the last page, before the first is the first
    assert shown_rows(call(app, "/ui/jobs?page=9")[1], "data-job") == pages[2]
    assert shown_rows(call(app, "/ui/jobs?page=0")[1], "data-job") == pages[0]
    assert "8 jobs, page 2 of 3" in call(app, "/ui/jobs?page=2")[1]
    # each row shows its job's latest run, or none
    rows = {r["job"]: r for r in db.jobs_page(10, 0)}
    assert rows["j06"]["status"] == "cancelled" and rows["j06"]["run_id"] == db.run_ids("j06")[-1]
    assert rows["j03"]["run_id"] is None and rows["j01"]["status"] == "not_started"


def test_the_maps_page_pages_the_maps_with_their_jobs(site, monkeypatch):
    app, db, settings = site
    monkeypatch.setattr(console, "PAGE_SIZE", 3)
    listed = maps.list_maps(settings)
    assert listed == MAPS
    bound = {}
    for job, map_name, _ in all_jobs(db):
        bound.setdefault(map_name, []).append(job)
    for number in (1, 2, 3):
        page = call(app, f"/ui/maps?page={number}")[1]
        names = listed[(number - 1) * 3:number * 3]
        assert shown_rows(page, "data-map") == names
        for name in names:
            row = page.split(f'<tr data-map="{name}">', 1)[1].split("</tr>", 1)[0]
            assert re.findall(r'href="/ui/jobs/([^"]+)"', row) == bound.get(name, [])
    assert "7 maps, page 3 of 3" in page and 'href="/ui/maps?page=2"' in page
    assert shown_rows(call(app, "/ui/maps?page=5")[1], "data-map") == ["m07"]
    # it polls for new jobs, which costs what a page costs; not GET /maps, which stats
    # every map
    assert 'data-watch="/jobs?offset=8"' in page and get_json(app, "/jobs?offset=8") == []


def settled(folder: str) -> None:
    """Date the maps folder an hour back, past the window in which a listing is not
    trusted (maps.RACY_NS)."""
    os.utime(folder, ns=(os.stat(folder).st_atime_ns, os.stat(folder).st_mtime_ns - 3600 * 10**9))


def test_the_maps_listing_sees_maps_come_and_go(own_site, monkeypatch):
    _, _, settings = own_site
    folder = os.path.join(settings.inputs_dir, "maps")
    settled(folder)
    assert maps.listed_maps(settings) == MAPS
    # kept: the folder is not listed again while unchanged
    with monkeypatch.context() as m:
        m.setattr(maps.os, "listdir", lambda path: pytest.fail("listed again"))
        assert maps.listed_maps(settings) == MAPS
    # a folder made earlier gets its map file (a download ending): no change of the folder
    open(maps.map_file(settings, "m08"), "wb").close()
    assert maps.listed_maps(settings) == [*MAPS, "m08"]
    os.makedirs(os.path.join(folder, "m00"))
    open(maps.map_file(settings, "m00"), "wb").close()
    shutil.rmtree(os.path.join(folder, "m02"))
    expected = ["m00", "m01", *MAPS[2:], "m08"]
    assert maps.listed_maps(settings) == expected == maps.list_maps(settings)


def test_the_maps_page_leaves_out_a_map_file_removed_since_listing(own_site):
    app, _, settings = own_site
    settled(os.path.join(settings.inputs_dir, "maps"))
    maps.listed_maps(settings)
    os.remove(maps.map_file(settings, "m02"))
    assert "m02" not in shown_rows(call(app, "/ui/maps")[1], "data-map")


def test_unpublished_cdr_jobs_are_those_the_start_published_before(own_site):
    """The query that replaced reading every submitted event at start-up finds the same
    jobs: a submitted event whose run passed and whose job has no publication."""
    _, db, _ = own_site
    for event_id, job in (("p1", "j01"), ("p2", "j02"), ("p7", "j07")):
        run_id = db.run_ids(job)[-1]
        db.add_event(event_id, "map.process", job, "https://cdr/x.tif", "submitted")
        db.set_event(event_id, "submitted", run_id=run_id)
        db.set_run_status(run_id, journal.Status.RUNNING)
        db.set_run_status(run_id, journal.Status.PASSED)
    db.add_event("p1again", "map.process", "j01", "https://cdr/x.tif", "submitted")
    db.set_event("p1again", "submitted", run_id=db.run_ids("j01")[-1])
    db.set_publication("j02", "features", "published")
    before = []
    for event in db.events("submitted"):  # what CdrLink.start did
        run = db.run(event["run_id"]) if event["run_id"] else None
        if run and run["status"] == "passed" and not db.publications(run["job"]):
            before.append(run["job"])
    assert sorted(db.unpublished_cdr_jobs()) == sorted(set(before)) == ["j01", "j07"]


# ---------------------------------------------------------------------------- query plans

def statements(db, read) -> list:
    """The SQL statements (with their values) that `read()` runs on this thread's
    connection."""
    seen = []
    conn = db.connect()
    conn.set_trace_callback(seen.append)
    try:
        read()
    finally:
        conn.set_trace_callback(None)
    return [s for s in seen if not s.startswith(("BEGIN", "COMMIT", "ROLLBACK"))]


def plan(db, sql: str) -> list:
    return [row[3] for row in db.connect().execute(f"EXPLAIN QUERY PLAN {sql}")]


def whole_scans(steps: list) -> list:
    """Steps that read a whole table of history (not along an index), or sort with a
    temp b-tree."""
    subqueries = {m.group(1) for s in steps if (m := re.match(r"(?:CO-ROUTINE|MATERIALIZE) "
                                                               r"(\w+)", s))}
    return [s for s in steps if "TEMP B-TREE" in s
            or (re.fullmatch(r"SCAN (\w+)", s) and s.split()[1] not in subqueries)]


@pytest.mark.parametrize("name, read", [
    ("GET /jobs?limit=100", lambda db: db.jobs_json(100, 0)),
    ("GET /jobs?offset=N (the console's poll)", lambda db: db.jobs_json(None, 10**6)),
    ("/ui/jobs first page", lambda db: db.jobs_page(50, 0)),
    ("/ui/jobs last page", lambda db: db.jobs_page(50, 5)),
    ("/ui/jobs count", lambda db: db.count_jobs()),
    ("/ui/maps jobs of a page", lambda db: db.jobs_of_maps(["m03", "m01", "m02"])),
    ("GET /cdr/events?limit=100", lambda db: db.events_page(100)),
    ("start: unpublished CDR runs", lambda db: db.unpublished_cdr_jobs()),
    ("start: Idempotency-Keys never answered", lambda db: idempotency.Keys(db, b"k")),
])
def test_page_and_start_queries_read_an_index(site, name, read):
    _, db, _ = site
    # without ANALYZE's figures SQLite plans every table as a big one: these plans are
    # those of a journal of any size
    found = statements(db, lambda: read(db))
    assert found, name
    for sql in found:
        steps = plan(db, sql)
        assert not whole_scans(steps), (name, sql, steps)
        tables = set(re.findall(r"\b(?:SCAN|SEARCH) (\w+)", " ".join(steps)))
        assert tables, (name, steps)


def test_events_taken_up_at_start_are_found_by_their_state(site):
    """The events a restart takes up are searched by state; only those few are sorted."""
    _, db, _ = site
    (sql,) = statements(db, lambda: db.events("received", "downloading"))
    steps = plan(db, sql)
    assert any(s.startswith("SEARCH cdr_events USING INDEX cdr_events_status") for s in steps)
    assert not any(re.fullmatch(r"SCAN \w+", s) for s in steps), steps


def test_without_the_indexes_the_pages_scan_and_sort(own_site):
    """What the plan test guards against: the same queries without migration 8."""
    _, db, _ = own_site
    with db.transaction() as conn:
        for index in ("jobs_created", "jobs_map", "cdr_events_received"):
            conn.execute(f"DROP INDEX {index}")
    for read in (lambda: db.jobs_json(100, 0), lambda: db.events_page(100),
                 lambda: db.jobs_of_maps(["m01"])):
        (sql,) = statements(db, read)
        assert whole_scans(plan(db, sql))


def test_the_migration_is_recorded_with_its_indexes(site):
    _, db, _ = site
    conn = db.connect()
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 8
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_created", "jobs_map", "cdr_events_received", "cdr_events_status",
            "idempotency_keys_run"} <= names
    db.migrate()  # again: a no-op
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 8
