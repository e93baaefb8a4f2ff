"""The control socket server over a real Unix socket."""

from __future__ import annotations

import os
import select
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import __version__
from daemon.api import listeners
from daemon.api.http import HTTPError, Request, Response, Router
from daemon.api.listeners import (
    AlreadyRunningError,
    ControlServer,
    SocketPathError,
    peer_credentials,
)
from daemon.api.routes import health_handler
from daemon.client import DaemonNotRunning, UnixHTTPConnection, request

pytestmark = pytest.mark.timeout(30)


def create_health_server(path, mode, group, status_provider, health_provider=None):
    """A ControlServer with the daemon's own /health handler and a /status route."""
    srv = ControlServer(path, mode=mode, group=group)
    srv.add_route("GET", "/health", health_handler(health_provider or dict))
    srv.add_route("GET", "/status", lambda req: status_provider())
    return srv


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte sun_path limit; keep it short.
    d = Path(tempfile.mkdtemp(prefix="cd-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


STATUS = {
    "queue": {"pending": 12, "leased": 3, "done": 40, "failed": 1},
    "generators": {"wd_tagger": {"loaded": True, "available": True, "reason": ""}},
    "watchers": {"photos": {"mode": "inotify", "alive": True}},
    "recent_errors": [],
    "uptime_seconds": 5.0,
}


@pytest.fixture
def server(sock_dir: Path) -> Iterator[ControlServer]:
    srv = create_health_server(sock_dir / "run" / "captiond.sock", 0o660, None, lambda: STATUS)

    @srv.route("GET", "/boom")
    def boom(req: Request) -> dict:
        raise RuntimeError("handler exploded")

    @srv.route("POST", "/echo")
    def echo(req: Request) -> Response:
        return Response(201, {"len": len(req.body), "json": req.json(), "q": req.query})

    @srv.route("GET", "/jobs/{job_id}")
    def job(req: Request) -> tuple[int, dict]:
        return 200, {"job_id": req.params["job_id"]}

    @srv.route("GET", "/peer")
    def peer(req: Request) -> dict:
        assert req.peer is not None
        return req.peer._asdict()

    @srv.route("GET", "/conflict")
    def conflict(req: Request) -> dict:
        raise HTTPError(409, "job is leased", retryable=True)

    srv.start()
    yield srv
    srv.stop()


def test_health_and_status(server: ControlServer) -> None:
    status, body = request(server.path, "GET", "/health")
    assert status == 200
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["pid"] == os.getpid()
    assert 0 <= body["uptime_seconds"] < 30

    status, body = request(server.path, "GET", "/status")
    assert (status, body) == (200, STATUS)


def test_content_type_is_json(server: ControlServer) -> None:
    conn = UnixHTTPConnection(server.path)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("Content-Type") == "application/json"
    # keep-alive: a second request on the same connection works
    conn.request("GET", "/nope")
    resp = conn.getresponse()
    assert resp.status == 404
    assert resp.getheader("Content-Type") == "application/json"
    resp.read()
    conn.close()


def test_error_shapes(server: ControlServer) -> None:
    assert request(server.path, "GET", "/nope") == (
        404,
        {"error": "no such endpoint: /nope", "error_type": "not_found", "retryable": False},
    )
    status, body = request(server.path, "DELETE", "/health")
    assert status == 405
    assert body["error_type"] == "method_not_allowed"
    assert body["retryable"] is False
    assert request(server.path, "GET", "/conflict") == (
        409,
        {"error": "job is leased", "error_type": "conflict", "retryable": True},
    )


def test_405_lists_allowed_methods(server: ControlServer) -> None:
    conn = UnixHTTPConnection(server.path)
    conn.request("POST", "/health")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 405
    assert resp.getheader("Allow") == "GET, HEAD"
    conn.close()


def test_raising_handler_gives_500_and_server_keeps_serving(server: ControlServer) -> None:
    for _ in range(3):
        status, body = request(server.path, "GET", "/boom")
        assert status == 500
        assert body["error_type"] == "unexpected"
        assert body["retryable"] is False
        assert "handler exploded" in body["error"]
    assert request(server.path, "GET", "/health")[0] == 200
    assert server.running


def test_path_params_query_and_body(server: ControlServer) -> None:
    assert request(server.path, "GET", "/jobs/a%2Fb") == (200, {"job_id": "a/b"})
    status, body = request(server.path, "POST", "/echo?x=1&x=2&y=", body=b'{"a": 1}')
    assert status == 201
    assert body == {"len": 8, "json": {"a": 1}, "q": {"x": ["1", "2"], "y": [""]}}
    status, body = request(server.path, "POST", "/echo", body=b"{not json")
    assert status == 400
    assert body["error_type"] == "bad_request"


def test_body_size_limit(server: ControlServer) -> None:
    status, body = request(server.path, "POST", "/echo", body=b"x" * (server.max_body + 1))
    assert status == 413
    assert body["error_type"] == "payload_too_large"
    # exactly at the limit is accepted (and then rejected only as bad JSON)
    assert request(server.path, "POST", "/echo", body=b"x" * server.max_body)[0] == 400
    assert request(server.path, "GET", "/health")[0] == 200


def test_head_has_no_body(server: ControlServer) -> None:
    conn = UnixHTTPConnection(server.path)
    conn.request("HEAD", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b""
    assert int(resp.getheader("Content-Length")) > 0
    conn.close()


def test_malformed_request_line_gets_json_error(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501")
    assert b"application/json" in head
    assert b'"error_type": "not_implemented"' in body


def test_socket_mode_and_parent_dir(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o750


def test_mode_is_set_despite_umask(sock_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        srv = ControlServer(sock_dir / "m.sock", mode=0o660)
        srv.start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o660
    finally:
        srv.stop()


def test_group_is_applied(sock_dir: Path) -> None:
    gid = os.getgid()
    srv = ControlServer(sock_dir / "g.sock", group=str(gid))
    srv.start()
    try:
        assert os.stat(srv.path).st_gid == gid
    finally:
        srv.stop()


def test_unknown_group_is_a_clear_error(sock_dir: Path) -> None:
    srv = ControlServer(sock_dir / "g.sock", group="no-such-group-captiond")
    with pytest.raises(SocketPathError, match="does not exist"):
        srv.start()
    assert not srv.path.exists()


def test_stop_unlinks_socket(sock_dir: Path) -> None:
    srv = ControlServer(sock_dir / "s.sock")
    srv.start()
    assert srv.path.exists()
    srv.stop()
    assert not srv.path.exists()
    srv.stop()  # idempotent
    with pytest.raises(DaemonNotRunning):
        request(srv.path, "GET", "/health")


def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(DaemonNotRunning, match="refuses"):
        request(path, "GET", "/health")

    srv = create_health_server(path, 0o660, None, lambda: {})
    srv.start()
    try:
        assert request(path, "GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_live_socket_is_a_clear_error(server: ControlServer) -> None:
    second = ControlServer(server.path)
    with pytest.raises(AlreadyRunningError, match=r"another captiond is already running on"):
        second.start()
    # the first one is untouched
    assert request(server.path, "GET", "/health")[0] == 200


def test_live_foreign_socket_is_a_clear_error(sock_dir: Path) -> None:
    """Something else (no captiond lock) listens on the path: probe says it is alive."""
    path = sock_dir / "foreign.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(1)
        with pytest.raises(AlreadyRunningError, match=str(path)):
            ControlServer(path).start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_regular_file_is_refused_and_untouched(sock_dir: Path) -> None:
    path = sock_dir / "important.txt"
    path.write_text("do not delete me")
    with pytest.raises(SocketPathError, match="is not a socket"):
        ControlServer(path).start()
    assert path.read_text() == "do not delete me"


def test_too_long_path_is_a_clear_error(sock_dir: Path) -> None:
    with pytest.raises(SocketPathError, match="limit is 107"):
        ControlServer(sock_dir / ("x" * 120)).start()


def test_peer_credentials_in_request(server: ControlServer) -> None:
    status, body = request(server.path, "GET", "/peer")
    assert status == 200
    assert body == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


def test_peer_credentials_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_client_missing_socket(sock_dir: Path) -> None:
    path = sock_dir / "absent.sock"
    with pytest.raises(DaemonNotRunning) as info:
        request(path, "GET", "/status")
    assert isinstance(info.value, ConnectionError)
    assert info.value.path == path
    assert str(path) in str(info.value)


def test_router_matching() -> None:
    router = Router()
    router.add("GET", "/a/{x}", lambda r: None)
    router.add("GET", "/files/{rel:path}", lambda r: None)
    assert router.match("GET", "/a/1")[1] == {"x": "1"}
    assert router.match("GET", "/files/d/e.jpg")[1] == {"rel": "d/e.jpg"}
    with pytest.raises(HTTPError) as e404:
        router.match("GET", "/a/1/2")
    assert e404.value.status == 404
    with pytest.raises(HTTPError) as e405:
        router.match("PUT", "/a/1")
    assert e405.value.status == 405
    with pytest.raises(ValueError, match="already registered"):
        router.add("GET", "/a/{x}", lambda r: None)


def test_degraded_health_is_503(sock_dir: Path) -> None:
    srv = create_health_server(
        sock_dir / "h.sock", 0o660, None, lambda: {}, lambda: {"status": "degraded", "db": "locked"}
    )
    with srv:
        status, body = request(srv.path, "GET", "/health")
    assert status == 503
    assert body["status"] == "degraded"
    assert body["db"] == "locked"
    assert "uptime_seconds" in body


def test_huge_body_gets_413_not_a_broken_pipe(sock_dir: Path) -> None:
    """Beyond the drain limit the server closes early; the client still reads the 413."""
    srv = ControlServer(sock_dir / "big.sock", max_body=1024)
    srv.add_route("POST", "/x", lambda r: {"n": len(r.body)})
    with srv:
        assert request(srv.path, "POST", "/x", body=b"y" * 1024) == (200, {"n": 1024})
        status, body = request(srv.path, "POST", "/x", body=b"y" * (9 * 1024 * 1024))
        assert status == 413
        assert body["error_type"] == "payload_too_large"
        assert request(srv.path, "GET", "/x")[0] == 405


def test_an_early_refusal_is_read_not_a_broken_pipe(sock_dir: Path, monkeypatch) -> None:
    """A guard refuses before the body is read; a client that sends its body after the
    headers (as http.client does) still gets the 403, not EPIPE on the body's send, and
    is told that the connection ends."""
    monkeypatch.setattr(listeners, "LINGER_SECONDS", 10.0)  # a loaded machine is slow
    srv = ControlServer(sock_dir / "g.sock")

    def refuse(req: Request) -> None:
        raise HTTPError(403, "not you")

    srv.router.add("PUT", "/x", lambda r: {"n": len(r.body)}, guard=refuse)
    with srv:
        body = b"z" * 5000
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(srv.path))
            s.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
            assert select.select([s], [], [], 10)[0], "no answer"  # the 403 is on its way
            time.sleep(0.2)  # without the linger the server has closed by now
            s.sendall(body)
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 403"), answer
        assert b"\r\nConnection: close\r\n" in answer


def test_bind_early_then_start(sock_dir: Path) -> None:
    """bind() claims the path (a second daemon fails fast) before serving starts."""
    srv = create_health_server(sock_dir / "early.sock", 0o660, None, lambda: {"n": 1})
    srv.bind()
    try:
        assert stat.S_ISSOCK(os.lstat(srv.path).st_mode)
        assert not srv.running
        with pytest.raises(AlreadyRunningError):
            ControlServer(srv.path).bind()
        srv.start()
        assert request(srv.path, "GET", "/status") == (200, {"n": 1})
    finally:
        srv.stop()
    assert not srv.path.exists()


def test_stop_after_bind_without_start(sock_dir: Path) -> None:
    srv = ControlServer(sock_dir / "b.sock")
    srv.bind()
    srv.stop()  # must not hang waiting for a serve loop that never ran
    assert not srv.path.exists()
    srv.start()  # the path is free again
    srv.stop()
