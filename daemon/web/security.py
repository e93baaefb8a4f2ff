"""Who may use the web UI, and how its changes are kept safe from other web pages.

The same rules as the API: anyone who may connect may look; changes are for admins —
on the Unix socket the peer's credentials decide (:class:`~daemon.api.security.Authoriser`),
on the TCP listener the token does. A browser cannot send the bearer header, so on TCP
a login page takes the token once and sets a session cookie (HttpOnly, SameSite=Strict,
``Path=/ui``): an HMAC of its issue time and a random nonce keyed by the token, checked
in constant time, valid for ``SESSION_SECONDS`` (a new token ends every session; so
does logging out, in this process). The listener lets ``/ui/`` requests without the
bearer header through as ``session`` (a valid cookie) or ``anonymous`` (only the
login page and the static files answer those); nothing else gets past it.

Every change is a POST that must pass three checks, whoever sends it:

- ``Sec-Fetch-Site`` (when the browser sends it) is ``same-origin`` or ``none``, and
  ``Origin`` (when sent) names the host the request was sent to;
- a CSRF token: an HMAC, keyed by a secret kept in the state directory, of the
  browser's own random ``captiond_csrf`` cookie (HttpOnly, SameSite=Strict). A page
  on another origin can neither read the token nor compute it, not even one on
  another port of localhost that can set cookies for it (it lacks the secret);
- the request is an admin's (above).

On the Unix socket, reached through ``ssh -L``, the browser talks to localhost: the
``Host`` header must be a loopback name (or one listed in ``ui.allowed_hosts``), so a
page on a DNS name rebound to 127.0.0.1 cannot use the peer credentials of the SSH
connection. Every answer carries a Content-Security-Policy that allows scripts,
styles, images and fetches from the daemon only, no inline code, no framing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import urlsplit

from daemon.api.browsers import host_allowed
from daemon.api.http import HTTPError, Request

SESSION_COOKIE = "captiond_session"
CSRF_COOKIE = "captiond_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
SESSION_SECONDS = 7 * 24 * 3600
LOGIN_FAILURES_PER_MINUTE = 10  # wrong tokens accepted per minute before 429s

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
UI_PREFIX = "/ui"


def cookies(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's cookies (a malformed Cookie header counts as none)."""
    raw = headers.get("Cookie") or ""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


def cookie_header(name: str, value: str, *, max_age: int | None = None) -> str:
    out = f"{name}={value}; Path={UI_PREFIX}; HttpOnly; SameSite=Strict"
    if max_age is not None:
        out += f"; Max-Age={max_age}"
    return out


def load_secret(path: Path) -> bytes:
    """The CSRF key: 32 random bytes in a 0600 file, made on first use (a restart keeps
    the pages that are open working). A file others may read is replaced."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077 and len(data) == 32:
            return data
        path.unlink()
    secret = secrets.token_bytes(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return secret


class WebAuth:
    """Sessions for the TCP listener, CSRF tokens, the login rate limit."""

    def __init__(
        self,
        *,
        token: bytes | None,
        secret: bytes,
        allowed_hosts: Iterable[str] = (),
        clock=time.time,
    ) -> None:
        self.token = token
        self.secret = secret
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.clock = clock
        self._revoked: set[str] = set()
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    # -- the TCP listener's second way in ----------------------------------------------
    def tcp_gate(self, path: str, headers: Mapping[str, str]) -> str | None:
        """For a TCP request without the bearer token: ``session`` (a valid cookie) or
        ``anonymous`` for the UI's paths; None (refused) for every other path."""
        if path != UI_PREFIX and not path.startswith(UI_PREFIX + "/"):
            return None
        value = cookies(headers).get(SESSION_COOKIE)
        return "session" if value and self.session_ok(value) else "anonymous"

    # -- sessions ---------------------------------------------------------------------
    def _session_mac(self, issued: str, nonce: str) -> str:
        assert self.token is not None
        msg = f"captiond-ui-session|{issued}|{nonce}".encode()
        return hmac.new(self.token, msg, hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        issued, nonce = str(int(self.clock())), secrets.token_hex(16)
        return f"{issued}.{nonce}.{self._session_mac(issued, nonce)}"

    def session_ok(self, value: str) -> bool:
        if self.token is None or len(value) > 200:
            return False
        parts = value.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return False
        issued, nonce, mac = parts
        if not hmac.compare_digest(mac, self._session_mac(issued, nonce)):
            return False
        age = self.clock() - int(issued)
        return 0 <= age <= SESSION_SECONDS and value not in self._revoked

    def revoke(self, value: str) -> None:
        with self._lock:
            self._revoked.add(value)

    def login(self, given: str) -> bool:
        """Whether ``given`` is the token. After ``LOGIN_FAILURES_PER_MINUTE`` wrong
        ones within a minute every attempt is refused (429) until the minute is over."""
        now = self.clock()
        with self._lock:
            while self._failures and self._failures[0] < now - 60:
                self._failures.popleft()
            if len(self._failures) >= LOGIN_FAILURES_PER_MINUTE:
                raise HTTPError(
                    429,
                    "too many wrong tokens; wait a minute",
                    "too_many_requests",
                    headers={"Retry-After": "60"},
                )
        ok = self.token is not None and hmac.compare_digest(given.strip().encode(), self.token)
        if not ok:
            with self._lock:
                self._failures.append(now)
        return ok

    # -- cross-site request forgery ----------------------------------------------------
    def csrf_token(self, cookie_value: str) -> str:
        return hmac.new(self.secret, f"csrf|{cookie_value}".encode(), hashlib.sha256).hexdigest()

    def check_change(self, req: Request, form: Mapping[str, str]) -> None:
        """Refuse (403) a change that may come from another site (see the module doc)."""
        site = req.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise HTTPError(403, f"cross-site request refused (Sec-Fetch-Site: {site})", "csrf")
        origin = req.headers.get("Origin")
        if origin is not None:
            host = req.headers.get("Host") or ""
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                raise HTTPError(403, "cross-site request refused (Origin)", "csrf")
        cookie = cookies(req.headers).get(CSRF_COOKIE)
        given = req.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD) or ""
        if not cookie or not hmac.compare_digest(given, self.csrf_token(cookie)):
            raise HTTPError(
                403, "missing or wrong CSRF token: reload the page and try again", "csrf"
            )

    def host_ok(self, req: Request) -> bool:
        """On the Unix socket: the Host header is a loopback name or an allowed host."""
        return host_allowed(req.headers.get("Host") or "", self.allowed_hosts)


def new_csrf_cookie() -> str:
    return secrets.token_urlsafe(24)
