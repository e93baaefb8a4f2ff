"""Requests a web browser sends on behalf of a page: refused when the page is not ours.

The socket is often reached through ``ssh -L 8765:/run/captiond/captiond.sock``, and
then every page the user's browser opens can send requests to ``localhost:8765`` with
the SSH connection's credentials. Programs (the CLI, curl, scripts) are not affected:
they send none of the headers a browser adds. A browser's request is refused when

- ``Sec-Fetch-Site`` says another site sent it (``cross-site``, ``same-site``), or
  ``Origin`` names another origin than the ``Host`` it was sent to;
- it came over the socket with a ``Host`` that is not a loopback name (or one listed in
  ``ui.allowed_hosts``): a page on a DNS name rebound to 127.0.0.1 is "same-origin"
  in the browser's eyes, and only the name gives it away;
- it changes something with a body (or a content type) that is not
  ``application/json``: a page can post ``text/plain`` JSON with a plain form, but
  only a script of the same origin can send ``application/json``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from urllib.parse import urlsplit

from daemon.api.http import HTTPError

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``*.localhost``, 127.0.0.0/8 or ``[::1]``, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8080
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host: str, allowed: Collection[str]) -> bool:
    host = host.strip().lower()
    if not host:
        return True  # HTTP/1.0 tools, never a browser
    return is_loopback_host(host) or host in allowed or host.split(":")[0] in allowed


def from_browser(headers: Mapping[str, str]) -> bool:
    agent = headers.get("User-Agent") or ""
    return (
        headers.get("Sec-Fetch-Site") is not None
        or headers.get("Sec-Fetch-Mode") is not None
        or headers.get("Origin") is not None
        or agent.startswith("Mozilla/")
    )


def check_browser_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    *,
    on_socket: bool,
    allowed_hosts: Collection[str] = (),
    has_body: bool = False,
) -> None:
    """Raise 403 (or 415) for a browser request another site's page may have sent.
    The web UI (``/ui``) is left to its own checks (daemon/web/security.py): a link
    from another site may open its pages, and its refusals are pages, not JSON."""
    if path == "/ui" or path.startswith("/ui/") or not from_browser(headers):
        return
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise HTTPError(403, f"cross-site request refused (Sec-Fetch-Site: {site})", "csrf")
    host = headers.get("Host") or ""
    origin = headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
        raise HTTPError(403, "cross-site request refused (Origin)", "csrf")
    if on_socket and not host_allowed(host, allowed_hosts):
        raise HTTPError(
            403,
            "this host name may not reach captiond's socket from a browser: use "
            "http://localhost:PORT/ or add the name to ui.allowed_hosts",
            "forbidden",
        )
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if method in MUTATING and (has_body or ctype) and ctype != "application/json":
        raise HTTPError(415, "a browser's request body must be application/json")
