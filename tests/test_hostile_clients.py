"""Clients that are hostile or broken, as an attacker would be one: floods of slow
connections on either listener, slow bodies, absurd JSON, malformed request lines, and
hang-ups. Real sockets; floods come from another process."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.api import listeners
from daemon.api.http import HTTPError, Request
from daemon.api.listeners import ConnectionLimiter, ControlServer
from daemon.client import request
from tests.daemonproc import wait_for

pytestmark = pytest.mark.timeout(60)
TOKEN = b"0123456789abcdef-token"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cdh-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _server(sock_dir: Path, **kw) -> ControlServer:
    srv = ControlServer(sock_dir / "c.sock", **kw)
    srv.add_route("GET", "/health", lambda req: {"status": "ok"})
    srv.add_route("POST", "/echo", lambda req: {"got": req.json()})

    def admin_only(req: Request) -> None:
        if req.peer is None or req.peer.pid != os.getpid():
            raise HTTPError(403, "admins only")

    srv.router.add("POST", "/admin", lambda req: {"n": len(req.body)}, guard=admin_only)
    return srv


def _raw(path: Path | tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    return _answered(path, data, timeout)[0]


def _answered(
    path: Path | tuple[str, int], data: bytes, timeout: float = 10.0
) -> tuple[bytes, float, float]:
    """Send ``data`` and read the answer: (answer, seconds to its first bytes, seconds
    until the server closed)."""
    fam = socket.AF_UNIX if isinstance(path, Path) else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path) if isinstance(path, Path) else path)
        t0 = time.monotonic()
        s.sendall(data)
        out = s.recv(65536)
        first = time.monotonic() - t0
        while chunk := s.recv(65536):
            out += chunk
        return out, first, time.monotonic() - t0


def _flood(address: str | tuple[str, int], count: int, seconds: float, ready) -> None:
    """In another process: open ``count`` connections and trickle a byte now and then."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
        try:
            s.connect(address)
            s.sendall(b"G")
        except OSError:
            s.close()
            continue
        socks.append(s)
    ready.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"E")
        time.sleep(0.5)
    for s in socks:
        s.close()


def _start_flood(address, count: int, seconds: float) -> multiprocessing.process.BaseProcess:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_flood, args=(address, count, seconds, ready), daemon=True)
    proc.start()
    assert ready.wait(10)
    return proc


def test_limiter_keeps_a_reserve_for_privileged_peers_and_caps_each_peer() -> None:
    lim = ConnectionLimiter(total=4, per_peer=3, reserve=2)
    assert [lim.acquire(1000) for _ in range(4)] == [True, True, True, False]  # per peer
    assert lim.acquire(1001)  # another user: the 4th slot
    assert not lim.acquire(1002)  # full for everyone else
    assert lim.acquire(0, privileged=True) and lim.acquire(0, privileged=True)
    assert not lim.acquire(0, privileged=True)  # the reserve is bounded too
    for key in (0, 0, 1000):
        lim.release(key)
    assert lim.acquire(1002) and lim.in_use == 4


def test_a_socket_flood_by_one_user_leaves_room_for_an_admin(sock_dir: Path) -> None:
    """Another process (not privileged) fills every slot with connections that trickle
    one byte at a time; the privileged peer (this process) still gets its answer."""
    srv = _server(sock_dir, max_connections=4, privileged=lambda peer: peer.pid == os.getpid())
    with srv:
        flood = _start_flood(str(srv.path), 12, seconds=8)
        try:
            # the flood holds every slot (the server accepts them in its own time)
            assert wait_for(lambda: srv.connections()["socket"] >= 4, timeout=10)
            t0 = time.monotonic()
            assert request(srv.path, "GET", "/health", timeout=3) == (200, {"status": "ok"})
            assert time.monotonic() - t0 < 2
        finally:
            flood.kill()


def test_a_tcp_flood_cannot_starve_the_socket(sock_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(listeners, "MAX_TCP_CONNECTIONS", 4)
    srv = _server(sock_dir)
    srv.enable_tcp("127.0.0.1", 0, TOKEN)
    with srv:
        host, port = srv.tcp_address
        flood = _start_flood((host, port), 20, seconds=8)
        try:
            assert wait_for(lambda: srv.connections()["tcp"] == 4, timeout=10)  # its pool, full
            answer = _raw((host, port), b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503")  # one more TCP client is refused
            t0 = time.monotonic()
            assert request(srv.path, "GET", "/health", timeout=3)[0] == 200
            assert time.monotonic() - t0 < 2
        finally:
            flood.kill()


def test_unauthenticated_tcp_is_refused_before_its_body(sock_dir: Path) -> None:
    srv = _server(sock_dir)
    srv.enable_tcp("127.0.0.1", 0, TOKEN)
    with srv:
        # a body announced but never sent: the 401 comes at once; the connection is
        # closed after the short linger for a body on its way
        answer, first, closed = _answered(
            srv.tcp_address, b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 401") and first < listeners.LINGER_SECONDS
        assert closed < listeners.LINGER_SECONDS + 2


def test_a_slow_request_line_is_cut_at_the_deadline(sock_dir: Path, monkeypatch) -> None:
    """A deadline for the whole request line and headers, not a timeout per read: one
    byte every 0.3 s keeps a per-read timeout happy for ever, but not this."""
    monkeypatch.setattr(listeners, "HEADER_SECONDS", 1.0)
    srv = _server(sock_dir)
    with srv:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(srv.path))
        t0 = time.monotonic()
        closed = False
        for b in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 30:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            s.settimeout(0.3)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        s.close()
        assert closed and time.monotonic() - t0 < 4


def test_short_bodies_get_408_at_the_deadline_and_403_or_405_at_once(
    sock_dir: Path, monkeypatch
) -> None:
    monkeypatch.setattr(listeners, "BODY_GRACE_SECONDS", 0.5)
    srv = _server(sock_dir, privileged=lambda peer: False)
    with srv:
        t0 = time.monotonic()
        answer = _raw(srv.path, b'POST /echo HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"a"')
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
        assert b"did not arrive in time" in answer
        # a route the peer may not use answers before the body, which is never waited for
        srv.router.routes = [r for r in srv.router.routes if r.pattern != "/admin"]

        def deny(req: Request) -> None:
            raise HTTPError(403, "admins only")

        srv.router.add("POST", "/admin", lambda req: {}, guard=deny)
        answer, first, closed = _answered(
            srv.path, b"POST /admin HTTP/1.1\r\nContent-Length: 999\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 403") and first < listeners.LINGER_SECONDS
        assert closed < listeners.LINGER_SECONDS + 2  # the linger for the body is short
        answer, first, _ = _answered(
            srv.path, b"POST /health HTTP/1.1\r\nContent-Length: 999\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 405") and first < listeners.LINGER_SECONDS


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 5000 + b"]" * 5000, b"nested too deeply"),
        (b'{"n": ' + b"9" * 5000 + b"}", b"number too long"),
        (b'{"a": \xff}', b"not valid JSON"),
    ],
)
def test_absurd_json_gets_400_not_500(sock_dir: Path, body: bytes, why: bytes) -> None:
    srv = _server(sock_dir)
    with srv:
        head = b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        answer = _raw(srv.path, head % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 400") and why in answer


def test_a_malformed_request_line_gets_a_status_line_and_nothing_is_echoed(
    sock_dir: Path,
) -> None:
    srv = _server(sock_dir)
    with srv, structlog.testing.capture_logs() as logs:
        # keep-alive: a good request, then a line of garbage carrying a "secret"
        answer = _raw(
            srv.path,
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"my-private-caption-SECRET-words FOO BAR BAZ\r\n\r\n",
        )
    first, _, rest = answer.partition(b"HTTP/1.1 400")
    assert first.startswith(b"HTTP/1.1 200") and rest, answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert set(body) >= {"error", "error_type", "retryable"}
    assert b"SECRET" not in answer
    assert "SECRET" not in json.dumps(logs, default=str)


def test_a_body_never_reaches_the_log(sock_dir: Path) -> None:
    """A body longer than its Content-Length: the rest would be read as the next request
    line (and echoed into the log by http.server). It must never be logged."""
    srv = _server(sock_dir)
    with srv, structlog.testing.capture_logs() as logs:
        _raw(
            srv.path, b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}my caption SECRET\r\n\r\n"
        )
        _raw(
            srv.path,
            b'POST /echo HTTP/1.1\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{"x": SECRET}',
        )
    assert "SECRET" not in json.dumps(logs, default=str)


def test_clients_that_hang_up_are_not_errors(sock_dir: Path) -> None:
    srv = _server(sock_dir)
    srv.add_route("GET", "/big", lambda req: {"x": "y" * 4_000_000})
    with srv, structlog.testing.capture_logs() as logs:
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(srv.path))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(10)
            s.close()  # mid-answer
        time.sleep(0.5)
        assert request(srv.path, "GET", "/health")[0] == 200
    assert not [e for e in logs if e.get("log_level") == "error"], logs


def _browser(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        # a page elsewhere posts JSON as text/plain with a plain form (no preflight)
        (
            "POST",
            "/echo",
            {
                "Host": "localhost:8765",
                "User-Agent": CHROME,
                "Sec-Fetch-Site": "cross-site",
                "Origin": "https://evil.example",
                "Content-Type": "text/plain",
            },
            b'{"a": 1}',
            403,
        ),
        # an older browser: no Sec-Fetch headers, but the Origin gives it away
        (
            "POST",
            "/echo",
            {
                "Host": "localhost:8765",
                "User-Agent": CHROME,
                "Origin": "http://localhost:3000",
                "Content-Type": "text/plain",
            },
            b'{"a": 1}',
            403,
        ),
        # one older still, with no Origin either: the content type gives it away
        (
            "POST",
            "/echo",
            {"Host": "localhost:8765", "User-Agent": CHROME, "Content-Type": "text/plain"},
            b'{"a": 1}',
            415,
        ),
        # an empty form post from a same-site page
        (
            "POST",
            "/echo",
            {
                "Host": "localhost:8765",
                "User-Agent": CHROME,
                "Sec-Fetch-Site": "same-site",
                "Content-Type": "application/x-www-form-urlencoded",
            },
            b"",
            403,
        ),
        # DNS rebinding: "same-origin" to the browser, but the name is not ours
        (
            "GET",
            "/health",
            {
                "Host": "rebound.evil.example:8765",
                "User-Agent": CHROME,
                "Sec-Fetch-Site": "same-origin",
                "Sec-Fetch-Mode": "cors",
            },
            b"",
            403,
        ),
        # our own page's script: allowed
        (
            "POST",
            "/echo",
            {
                "Host": "localhost:8765",
                "User-Agent": CHROME,
                "Sec-Fetch-Site": "same-origin",
                "Origin": "http://localhost:8765",
                "Content-Type": "application/json",
            },
            b'{"a": 1}',
            200,
        ),
        # a browser opening the address typed by its user
        (
            "GET",
            "/health",
            {"Host": "127.0.0.1:8765", "User-Agent": CHROME, "Sec-Fetch-Site": "none"},
            b"",
            200,
        ),
        # programs: any Host, no browser headers
        ("GET", "/health", {"Host": "captiond", "User-Agent": "curl/8.5.0"}, b"", 200),
        (
            "POST",
            "/echo",
            {"Host": "captiond", "Content-Type": "application/json"},
            b'{"a": 1}',
            200,
        ),
    ],
)
def test_a_page_in_the_users_browser_cannot_use_the_forwarded_socket(
    sock_dir: Path, method: str, path: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    """``ssh -L`` forwards a port to the socket with the SSH user's credentials: pages
    the user's browser opens must not be able to use them."""
    with _server(sock_dir) as srv:
        out = _raw(srv.path, _browser(method, path, headers, body))
    assert out.split(b"\r\n", 1)[0].split()[1] == str(status).encode(), out[:300]
    if status == 200 and method == "POST":
        assert b'"got": {"a": 1}' in out or b'"got":{"a":1}' in out


def test_a_name_listed_in_allowed_hosts_may_reach_the_socket(sock_dir: Path) -> None:
    srv = _server(sock_dir)
    srv.allowed_hosts = frozenset({"nas.lan"})
    hdr = {"User-Agent": CHROME, "Sec-Fetch-Site": "same-origin"}
    with srv:
        ok = _raw(srv.path, _browser("GET", "/health", {"Host": "nas.lan:8765", **hdr}))
        bad = _raw(srv.path, _browser("GET", "/health", {"Host": "nas2.lan", **hdr}))
    assert ok.startswith(b"HTTP/1.1 200") or ok.startswith(b"HTTP/1.0 200"), ok[:200]
    assert b" 403 " in bad.split(b"\r\n", 1)[0]
