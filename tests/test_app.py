"""The app make_app returns, called in process as a WSGI app: every route of the table is
served with every check of mip_server.install (auth, CSRF, limits), and every answer,
errors and log reads included, carries X-Content-Type-Options: nosniff.

Run: .venv/bin/python -m pytest -q tests/test_app.py
"""

import base64
import io
import json
import re
import sys
import types

import pytest

import mip_server
from mip import journal
from mip.settings import Settings

AUTH = "Basic " + base64.b64encode(b"u:p").decode()


@pytest.fixture
def app(mip_env):
    settings = Settings.from_env(mip_env)
    settings.make_dirs()
    cfg = mip_server.Config(settings=settings, users={"u": mip_server.hash_password("p")})
    db = journal.Journal(settings.journal_path)
    db.migrate()
    run_id = db.create_run("j", "m", ["georeference"], False,
                           {"job": "j", "map": "m", "modules": ["georeference"]},
                           settings.runs_dir)
    yield types.SimpleNamespace(wsgi=mip_server.make_app(cfg, db, mip_server.RunQueue(cfg, db)),
                                cfg=cfg, run_id=run_id)
    db.close()


def call(app, method: str, path: str, body: bytes = b"", **headers) -> tuple:
    """(status code, headers, body) of one request to the WSGI app."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "",
               "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080",
               "HTTP_HOST": "127.0.0.1:8080", "REMOTE_ADDR": "127.0.0.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)), "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.errors": sys.stderr}
    environ.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
    started = []
    data = b"".join(app(environ, lambda s, h, e=None: started.append((s, h))))
    status, answer_headers = started[0]
    names = [name.lower() for name, _ in answer_headers]
    assert len(names) == len(set(names)), f"a header twice: {answer_headers}"
    return int(status[:3]), dict(answer_headers), data


def test_every_route_of_the_table_is_served_and_declared(app):
    rows = [(r.method, r.path) for r in mip_server.route_table(app.cfg)]
    assert len(rows) == len(set(rows))
    served = {(r.method, re.sub(r"<(\w+)>", r"{\1}", r.rule)) for r in app.wsgi.routes}
    assert set(rows) == served
    status, _, body = call(app.wsgi, "GET", "/openapi.json", authorization=AUTH)
    declared = {(m.upper(), p) for p, ops in json.loads(body)["paths"].items() for m in ops}
    assert status == 200 and declared == set(rows)


@pytest.mark.parametrize("method, path, headers, code", [
    ("GET", "/health", {}, 200),
    ("GET", "/ui/console.css", {}, 200),  # sets nosniff itself: sent once all the same
    ("GET", "/runs/{run}", {"authorization": AUTH}, 200),
    ("GET", "/runs/{run}/log", {"authorization": AUTH}, 200),
    ("GET", "/runs/{run}", {}, 401),
    ("GET", "/runs/20990101-000000-000000-abcd", {"authorization": AUTH}, 404),
    ("GET", "/no/such/route", {}, 404),
    ("PUT", "/health", {}, 405),
    ("GET", "/runs/%ff", {"authorization": AUTH}, 400),
    ("POST", "/runs", {"authorization": AUTH, "origin": "http://evil.example"}, 403),
    ("POST", "/runs", {"authorization": AUTH}, 400),
])
def test_checks_apply_and_every_answer_says_nosniff(app, method, path, headers, code):
    status, answer_headers, _ = call(app.wsgi, method, path.replace("{run}", app.run_id),
                                     **headers)
    assert status == code
    assert answer_headers.get("X-Content-Type-Options") == "nosniff"
