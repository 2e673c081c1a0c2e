"""front: the server behind a TLS proxy (deploy/Caddyfile): which proxy's forwarded headers
are believed, and the warning when credentials would cross the network in clear.

    MIP_TRUSTED_PROXY=127.0.0.1 python mip_server.py    # Caddy on this host, in front

waitress itself applies the forwarded headers (its trusted_proxy settings), before any of
our code sees a request: from the trusted proxy, X-Forwarded-For becomes REMOTE_ADDR,
X-Forwarded-Proto wsgi.url_scheme and X-Forwarded-Host HTTP_HOST; from anyone else those
headers are dropped. So the request log, the wrong-password throttle and the origin check
read the real client's address and the public scheme and host with no code of their own.
This file never parses a forwarded header.
"""

import ipaddress
import socket

# what Caddy's reverse_proxy sends; `Forwarded` (RFC 7239) is not, and waitress refuses
# to trust it beside these
HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})


def waitress_settings(trusted_proxy: str | None) -> dict:
    """The keyword arguments of waitress.create_server for this proxy (or none)."""
    if trusted_proxy is None:
        # forwarded headers from anyone are dropped all the same, so nothing downstream
        # can mistake a client's claim for the proxy's
        return {"clear_untrusted_proxy_headers": True}
    # one proxy: only the last hop of X-Forwarded-For, the one it appended, is believed
    return {"trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
            "trusted_proxy_headers": set(HEADERS), "clear_untrusted_proxy_headers": True}


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1).
    0.0.0.0, ::, other addresses and names that do not resolve are not."""
    try:
        return loopback_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(loopback_address(a) for a in addresses)


def loopback_address(text: str) -> bool:
    """True for a loopback address, ::ffff:127.0.0.1 included (Python 3.11 says False for
    it). Raises ValueError when `text` is not an address."""
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def start_warnings(host: str, trusted_proxy: str | None) -> list:
    """What the server must say, loudly, at start-up about how it is exposed."""
    if is_loopback(host):
        return []
    if trusted_proxy is None:
        return [f"!!! CREDENTIALS TRAVEL UNENCRYPTED: the server listens on {host}, beyond "
                "loopback, over plain HTTP, and no TLS proxy is configured: every basic-auth "
                "password (and every result) crosses the network in clear. Bind 127.0.0.1 "
                "(MIP_HOST) and put Caddy in front (deploy/Caddyfile) with "
                "MIP_TRUSTED_PROXY=127.0.0.1; see docs/operators.md, 'Behind TLS' !!!"]
    if trusted_proxy == "*":
        return [f"!!! MIP_TRUSTED_PROXY=* on {host}, beyond loopback: any client that reaches "
                "this port can claim any address in X-Forwarded-For and so escape the "
                "wrong-password throttle. Name the proxy's address instead !!!"]
    if loopback_address(trusted_proxy):
        # the proxy is on this host, so nothing but a clear-text client needs this address
        return [f"!!! CREDENTIALS MAY TRAVEL UNENCRYPTED: the TLS proxy is on this host "
                f"(MIP_TRUSTED_PROXY={trusted_proxy}), yet the server also listens on {host}, "
                "where clients can skip it and send basic auth over plain HTTP. Set "
                "MIP_HOST=127.0.0.1 !!!"]
    return []


def over_tls(environ: dict) -> bool:
    """True when the request reached us over HTTPS (at the proxy, if one is trusted)."""
    return environ.get("wsgi.url_scheme") == "https"
