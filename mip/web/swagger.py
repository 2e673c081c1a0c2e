"""swagger: Swagger UI 5 at GET /docs, on the server's own /openapi.json, behind the same
basic auth, with nothing loaded from the internet.

Handlers of two rows of mip_server.py's route table (docs, docs_static). The document is
OpenAPI 3.1, which Swagger UI 4 (PyPI's swagger-ui-bundle) refuses; the files of Swagger UI
5 come from the installed openapi-ui-bundles package (requirements.txt), never from this
repository. GET /docs/static/{file} serves only the script, style and icon files found in
that package's folder, looked up by name in a table made at start-up, so no path reaches
the disk from a request. The page has no inline script: the call that starts Swagger UI is
a file of its own (INIT), so a Content-Security-Policy may forbid inline scripts.
"""

import functools
import os

import bottle
from openapi_ui_bundles import swagger_ui

from mip.web.apierror import ApiError

VENDOR = str(swagger_ui.static_path)
TYPES = {".js": "application/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png"}
INIT = "mip-docs.js"
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mip API (Swagger UI)</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="stylesheet" href="/docs/static/index.css">
<link rel="icon" type="image/png" sizes="32x32" href="/docs/static/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/mip-docs.js"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to validator.swagger.io
INIT_JS = """"use strict";
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""


def vendor_files(folder: str = VENDOR) -> dict:
    """{name: path} of the files of `folder` that the page may load (scripts, styles,
    icons): not its index.html, whose inline script loads a document from the internet."""
    return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if os.path.splitext(name)[1] in TYPES
            and os.path.isfile(os.path.join(folder, name))}


# the console's policy, but Swagger UI's style sheet draws its icons as data: images
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@functools.cache
def served_files() -> dict:
    """vendor_files(), read once: no path from a request ever reaches the disk."""
    files = vendor_files()
    files.pop(INIT, None)
    return files


def docs(ctx):
    """Swagger UI on this API's OpenAPI document, for a browser."""
    bottle.response.content_type = "text/html; charset=utf-8"
    bottle.response.set_header("Content-Security-Policy", CSP)
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    return PAGE


def docs_static(ctx, file):
    """A script, style or icon of the Swagger UI page. Raises 404 for any other name."""
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    bottle.response.set_header("Cache-Control", "private, max-age=3600")
    if file == INIT:
        bottle.response.content_type = TYPES[".js"]
        return INIT_JS
    path = served_files().get(file)
    if path is None:
        raise ApiError(404, "unknown_file",
                       f"no file {file!r} among Swagger UI's; GET /docs loads those it needs")
    bottle.response.content_type = TYPES[os.path.splitext(file)[1]]
    bottle.response.set_header("Content-Length", str(os.path.getsize(path)))
    return open(path, "rb")


# the media types GET /docs/static/{file} answers in
STATIC_TYPES = tuple(t.split(";")[0] for t in TYPES.values())
