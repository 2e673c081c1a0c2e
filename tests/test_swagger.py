"""Swagger UI 5 at GET /docs, against the real server: a page that loads only its own
files, each answered with its type, no inline script, Swagger UI 5 on /openapi.json, the
same basic auth, and no file outside the table, whatever the path says.

Run: .venv/bin/python -m pytest -q tests/test_swagger.py
"""

import base64
import html.parser
import http.client
import json
import os
import re

from mip.web import swagger

TYPES = {".js": "application/javascript", ".css": "text/css", ".png": "image/png"}


class Page(html.parser.HTMLParser):
    """What a page loads (src and href), its inline scripts and its on* attributes."""

    def __init__(self):
        super().__init__()
        self.loads, self.inline, self.handlers = [], [], []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.loads += [attrs[k] for k in ("src", "href") if attrs.get(k)]
        self.handlers += [k for k in attrs if k.startswith("on")]
        self.in_script = tag == "script"
        if tag == "script" and not attrs.get("src"):
            self.inline.append("<script> without src")

    def handle_endtag(self, tag):
        self.in_script = False

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.inline.append(data)


def raw_get(server, path: str, auth: bool = True) -> tuple:
    """(status, headers, body) of a GET of `path` sent exactly as written: requests and
    urllib3 would tidy away the '..' a path trick needs."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {}
    if auth:
        token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_docs_page_loads_only_local_files_and_no_inline_script(inproc):
    resp = inproc.get("/docs")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    page = Page()
    page.feed(resp.text)
    assert not page.inline and not page.handlers
    assert "http:" not in resp.text and "https:" not in resp.text and "//" not in resp.text
    assert page.loads and all(src.startswith("/docs/static/") for src in page.loads)
    assert "/docs/static/swagger-ui-bundle.js" in page.loads
    assert f"/docs/static/{swagger.INIT}" in page.loads
    for src in page.loads:
        asset = inproc.get(src)
        assert asset.status_code == 200, src
        kind = asset.headers["Content-Type"].split(";")[0]
        assert kind == TYPES[os.path.splitext(src)[1]], src
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
        assert asset.content
        name = src.rsplit("/", 1)[1]
        if name != swagger.INIT:
            with open(os.path.join(swagger.VENDOR, name), "rb") as f:
                assert asset.content == f.read(), src
            assert int(asset.headers["Content-Length"]) == len(asset.content)
        if kind == "text/css":
            assert not re.search(rb"url\(\s*['\"]?(https?:)?//", asset.content), src


def test_swagger_ui_is_version_5_started_on_our_document(inproc):
    bundle = inproc.get("/docs/static/swagger-ui-bundle.js")
    version = re.search(rb'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle.content)
    assert version and version.group(1) == b"5", "Swagger UI 5 reads OpenAPI 3.1; 4 refuses it"
    init = inproc.get(f"/docs/static/{swagger.INIT}").text
    assert 'url: "/openapi.json"' in init and "validatorUrl: null" in init
    assert "http" not in init
    assert inproc.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_docs_are_behind_basic_auth(server):
    for path in ("/docs", "/docs/static/swagger-ui-bundle.js", f"/docs/static/{swagger.INIT}"):
        status, headers, body = raw_get(server, path, auth=False)
        assert status == 401, path
        assert json.loads(body)["error"] == "unauthorized"
        assert headers["WWW-Authenticate"] == 'Basic realm="mip"'


TRICKS = [
    "/docs/static/index.html",  # in the package, but its inline script loads the internet
    "/docs/static/__init__.py",
    "/docs/static/../../mip_server.py",
    "/docs/static/..%2f..%2fmip_server.py",
    "/docs/static/%2e%2e%2f%2e%2e%2fmip_server.py",
    "/docs/static/..%5c..%5cmip_server.py",
    "/docs/static/%2e%2e",
    "/docs/static/..",
    "/docs/static/.%2e/swagger_ui/__init__.py",
    "/docs/static/swagger-ui.css%00.png",
    "/docs/static/%252e%252e%252fmip_server.py",
    "/docs/static//etc/passwd",
    "/docs/static/%2fetc%2fpasswd",
    "/docs/static/swagger-ui-bundle.js/..%2f__init__.py",
    "/docs/static/SWAGGER-UI.CSS",
    "/docs/static/swagger%ff.css",
    "/docs/../mip_server.py",
]


def test_path_tricks_get_a_json_error(server):
    for path in TRICKS:
        status, headers, body = raw_get(server, path)
        assert status in (400, 404), (path, status)
        assert headers["Content-Type"] == "application/json", path
        assert set(json.loads(body)) == {"error", "message"}, path
        assert b"import" not in body and b"root:" not in body, path
    # a trailing slash is dropped everywhere, and names are matched exactly
    assert raw_get(server, "/docs/static/swagger-ui-bundle.js/")[0] == 200


def test_only_the_vendor_scripts_styles_and_icons_are_served():
    files = swagger.vendor_files()
    assert {"swagger-ui-bundle.js", "swagger-ui.css"} <= set(files)
    assert "index.html" not in files
    assert all(os.path.splitext(n)[1] in TYPES for n in files)
    assert all(os.path.dirname(p) == swagger.VENDOR for p in files.values())


def test_docs_routes_are_declared(inproc):
    paths = inproc.get("/openapi.json").json()["paths"]
    page = paths["/docs"]["get"]
    assert set(page["responses"]["200"]["content"]) == {"text/html"}
    assert page["security"] == [{"basic": []}]
    static = paths["/docs/static/{file}"]["get"]
    assert set(static["responses"]["200"]["content"]) == {"application/javascript",
                                                          "text/css", "image/png"}
    assert "404" in static["responses"]
