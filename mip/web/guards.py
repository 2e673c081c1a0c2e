"""origin: refuses POST and DELETE requests that a browser sends from another site's page.

Not run directly: mip_server's one before_request hook (before_routing) calls `check` for
every POST and DELETE, so it guards every such route of the API, not only the console's.
A browser sends the basic-auth credentials it has stored for this server with any request
to it, whichever page made the request; such a request carries an `Origin` header (or at
least a `Referer`) naming that page's site. One that names another site gets 403
`cross_origin`. A request with neither header is not from a page (curl, mip_client.py, the
CDR webhook) and passes, so no client needs a custom header. This file only reads headers;
it never looks at credentials or bodies.
"""

from urllib.parse import urlsplit

import bottle

from mip.web.apierror import ApiError

GUARDED = ("POST", "DELETE")
DEFAULT_PORTS = {"http": 80, "https": 443}


def check() -> None:
    """Raises 403 cross_origin for a POST or DELETE from a page of another origin."""
    request = bottle.request
    if request.method not in GUARDED:
        return
    source = request.get_header("Origin")
    header = "Origin"
    if source is None:
        source, header = request.get_header("Referer"), "Referer"
    if source is None:
        return
    own = own_origin(request.environ)
    if own is None or origin_of(source) != own:
        raise ApiError(403, "cross_origin",
                       f"{request.method} refused: the request's {header} is not this server's "
                       "own origin (a page of another site cannot act with your credentials)")


def own_origin(environ: dict) -> tuple | None:
    """(scheme, host, port) of this server as the request addressed it (Host header)."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or (
        f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}")
    return origin_of(f"{scheme}://{host}")


def origin_of(url: str) -> tuple | None:
    """(scheme, host, port) of a URL, the port made explicit; None when it has none (the
    `null` origin of sandboxed pages and local files, or text that is not a URL)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]
