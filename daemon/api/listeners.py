"""The control API's listeners: HTTP/1.1 over a Unix socket (and an optional TCP
listener), standard library only.

``ControlServer`` owns the socket file (stale-socket probing, mode/group, unlink on
stop) and serves a :class:`~daemon.api.http.Router`. Each connection's peer
credentials (SO_PEERCRED) are on ``Request.peer`` so that handlers can authorise on
them. ``enable_tcp()`` adds an optional TCP listener serving the same routes; every
request on it must carry ``Authorization: Bearer <token>`` (``Request.auth == "token"``).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hmac
import io
import json
import os
import select
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from daemon import __version__
from daemon.api.browsers import check_browser_request
from daemon.api.http import (
    Handler,
    HTTPError,
    PeerCredentials,
    Request,
    Response,
    Route,
    Router,
    error_body,
    to_response,
)

log = structlog.get_logger("captiond.server")

MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64  # connections served at once (a thread each); more get a 503
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024  # an oversized body up to this is read and dropped
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
HEADER_SECONDS = 10.0  # an idle keep-alive wait plus a request line and headers
BODY_MIN_BYTES_PER_SECOND = 64 * 1024  # a body must arrive at least this fast ...
BODY_GRACE_SECONDS = 10.0  # ... after this grace
LINGER_SECONDS = 2.0  # a body left unread by an early answer (401, 403) is dropped this long
MAX_PER_PEER = 16  # socket connections one user (uid) may hold at once
ADMIN_RESERVE = 8  # more for root, the daemon's user and admins, beyond the limit
MAX_TCP_CONNECTIONS = 32  # the TCP listener's own pool: a flood there leaves the socket alone
_PROTOCOL_ERRORS = {  # never echo what the client sent
    400: "malformed request line or headers",
    414: "request line too long",
    431: "request headers too large",
    501: "unsupported method",
    505: "unsupported HTTP version",
}


def _body_seconds(length: int) -> float:
    return BODY_GRACE_SECONDS + length / BODY_MIN_BYTES_PER_SECOND


def _log_connection_error() -> None:
    """A connection's failure: quiet for clients that go away, loud for our bugs."""
    exc = sys.exc_info()[1]
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, TimeoutError)):
        log.debug("control_connection_closed", reason=type(exc).__name__)
    else:
        log.error("control_connection_failed", error=f"{type(exc).__name__}", exc_info=True)


# --------------------------------------------------------------------------- errors


class SocketPathError(RuntimeError):
    """The socket path cannot be used (not a socket, unprobeable, too long...)."""


class AlreadyRunningError(SocketPathError):
    """A live server already answers on the socket path."""


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's (pid, uid, gid), as of connect(), via SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


# -------------------------------------------------------------------------- server


class _DeadlineIO(io.RawIOBase):
    """A socket's reads under one deadline for a whole phase of a request (its request
    line and headers; then its body), not a timeout per read: a client that sends one
    byte every few seconds cannot hold a connection for ever."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request took too long to arrive")
            self.sock.settimeout(left)
        return self.sock.recv_into(b)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"captiond/{__version__}"
    server: _UnixHTTPServer
    peer: PeerCredentials | None = None

    def setup(self) -> None:
        super().setup()
        self._io = _DeadlineIO(self.connection)
        self.rfile = io.BufferedReader(self._io, 65536)
        if self.connection.family != socket.AF_UNIX:
            self.peer = None  # TCP: authorised by the bearer token instead
            return
        try:
            self.peer = peer_credentials(self.connection)
        except OSError:
            self.peer = None

    def handle_one_request(self) -> None:
        # An idle keep-alive connection and a slow request line and headers share one
        # deadline; then the connection is closed.
        self._io.deadline = time.monotonic() + HEADER_SECONDS
        super().handle_one_request()

    def version_string(self) -> str:
        return self.server_version

    # client_address is "" (or b"") on AF_UNIX, so the default ``[0]`` would fail.
    def address_string(self) -> str:
        return f"pid={self.peer.pid},uid={self.peer.uid}" if self.peer else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        # Never the raw request line or any other client bytes: they may be a body's.
        log.info("control_http", message=format.split("%")[0].strip())

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("control_connection_error", kind=format.split(":")[0])

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs each request with its duration instead

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, unknown method...) as JSON too, with a
        status line (a malformed line is not HTTP/0.9) and without echoing the input."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        text = _PROTOCOL_ERRORS.get(code) or self.responses.get(code, ("error",))[0]
        log.info("control_protocol_error", status=code, peer=self.address_string())
        resp = HTTPError(code, text).to_response()
        resp.headers["Connection"] = "close"
        with contextlib.suppress(OSError):  # the client may be gone
            self._send(resp, head=self.command == "HEAD")

    def handle_expect_100(self) -> bool:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.server.control.max_body:
            self.send_error(413, f"request body exceeds {self.server.control.max_body} bytes")
            return False
        return super().handle_expect_100()

    def _body_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not raw.isdigit() or len(raw) > 18:
            self.close_connection = True
            raise HTTPError(400, "invalid Content-Length")
        return int(raw)

    def _read_body(self, length: int) -> bytes:
        limit = self.server.control.max_body
        if length > limit:
            # Read and drop a moderately large body so the client is not cut off mid-send
            # (it would see EPIPE instead of our 413); beyond that, close the connection.
            if length <= DRAIN_LIMIT_BYTES:
                self._io.deadline = time.monotonic() + _body_seconds(length)
                try:
                    self._discard(length)
                except (TimeoutError, OSError):
                    self.close_connection = True
            else:
                self.close_connection = True
            raise HTTPError(413, f"request body of {length} bytes exceeds {limit} bytes")
        self._io.deadline = time.monotonic() + _body_seconds(length)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise HTTPError(408, "the request body did not arrive in time") from None
        if len(body) != length:
            self.close_connection = True
            raise HTTPError(400, "request body shorter than Content-Length")
        return body

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _check_token(self, path: str) -> str:
        """How the request is authenticated: ``peer`` (Unix socket), ``token`` (TCP,
        bearer), or what the server's ``tcp_gate`` lets through without the bearer
        header (the web UI's session cookie); else 401."""
        token: bytes | None = getattr(self.server, "token", None)
        if token is None:
            return "peer"
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
            return "token"
        gate = self.server.control.tcp_gate
        if not header and gate is not None and (auth := gate(path, self.headers)) is not None:
            return auth
        self.close_connection = True  # the body (if any) is not read
        raise HTTPError(
            401,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="captiond"'},
        )

    def _dispatch(self) -> None:
        started = time.perf_counter()
        split = urlsplit(self.path)
        path = split.path or "/"
        route: Route | None = None
        read = touched = False
        length = 0
        try:
            length = self._body_length()
            auth = self._check_token(path)
            check_browser_request(
                self.command,
                path,
                self.headers,
                on_socket=self.peer is not None,
                allowed_hosts=self.server.control.allowed_hosts,
                has_body=length > 0,
            )
            route, params = self.server.control.router.match(self.command, path)
            req = Request(
                method=self.command,
                path=path,
                query=parse_qs(split.query, keep_blank_values=True),
                headers=self.headers,
                body=b"",
                peer=self.peer,
                params=params,
                auth=auth,
            )
            if route.guard is not None:
                route.guard(req)  # before the body: who may not use it sends none
            touched = True
            req.body = self._read_body(length)
            read = True
            resp = to_response(route.handler(req))
            payload = resp.encode()  # serialisation errors are handler errors too
        except HTTPError as exc:
            resp = exc.to_response()
            payload = resp.encode()
        except Exception as exc:
            log.error(
                "control_handler_failed",
                method=self.command,
                path=path,
                route=route.pattern if route else None,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=True,
            )
            resp = HTTPError(500, f"internal error: {type(exc).__name__}: {exc}").to_response()
            payload = resp.encode()
        if not read and self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # a body left unread would be taken for a request
        if self.close_connection:  # a keep-alive client must not send another request
            resp.headers.setdefault("Connection", "close")
        try:
            if resp.stream is not None:
                self._send_stream(resp, head=self.command == "HEAD")
            else:
                self._send(resp, head=self.command == "HEAD", payload=payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client hung up: nothing to tell anyone
            return
        log.debug(
            "control_request",
            method=self.command,
            path=path,
            status=resp.status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            peer_pid=self.peer.pid if self.peer else None,
            peer_uid=self.peer.uid if self.peer else None,
        )
        if not touched and length > 0:
            self._linger(length)

    def _linger(self, length: int) -> None:
        """After an answer sent before the body was read (401, 403): read and drop the
        body for up to LINGER_SECONDS before closing. A client still sending it then
        reads the answer instead of a broken pipe (on TCP: a reset that may swallow
        the answer). The wait is short and the connection limits still apply."""
        if length > DRAIN_LIMIT_BYTES:
            return
        with contextlib.suppress(OSError):  # TimeoutError included: then we close
            self.wfile.flush()
            self._io.deadline = time.monotonic() + LINGER_SECONDS
            self._discard(length)

    def _send(self, resp: Response, *, head: bool, payload: bytes | None = None) -> None:
        if payload is None:
            payload = resp.encode()
        self.send_response(resp.status)
        if payload or resp.status not in (204, 304):
            self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if payload and not head:
            self.wfile.write(payload)

    def _client_gone(self) -> bool:
        """The client closed its end (EOF or reset) while we stream to it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _send_stream(self, resp: Response, *, head: bool) -> None:
        stream = resp.stream
        assert stream is not None
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")
        if not head:
            self.send_header("Transfer-Encoding", "chunked")
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        gone = head
        try:
            while not gone:
                try:
                    chunk = next(stream)
                except StopIteration:
                    break
                if chunk is None:
                    gone = self._client_gone()
                    continue
                if not chunk:
                    continue
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                except OSError:
                    gone = True
            if not gone:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except OSError:
            gone = True
        except Exception:
            log.exception("control_stream_failed", path=self.path)
            gone = True  # the chunked body is broken: the client must not reuse it
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # GeneratorExit in the handler's generator: it cancels its work
        if gone:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s"
)


class ConnectionLimiter:
    """Connections served at once by one listener (a thread each): at most ``total``,
    at most ``per_peer`` from one peer (a user id on the socket), and ``reserve`` more
    that only privileged peers (root, the daemon's user, admins) may take, so that one
    user's flood never locks them out. Thread-safe."""

    def __init__(self, total: int, per_peer: int | None = None, reserve: int = 0) -> None:
        self.total = total
        self.per_peer = per_peer
        self.reserve = reserve
        self._lock = threading.Lock()
        self._open: dict[Any, int] = {}
        self.in_use = 0

    def acquire(self, key: Any, privileged: bool = False) -> bool:
        with self._lock:
            if privileged:
                if self.in_use >= self.total + self.reserve:
                    return False
            elif self.in_use >= self.total or (
                self.per_peer is not None and self._open.get(key, 0) >= self.per_peer
            ):
                return False
            self.in_use += 1
            self._open[key] = self._open.get(key, 0) + 1
            return True

    def release(self, key: Any) -> None:
        with self._lock:
            self.in_use -= 1
            n = self._open.get(key, 0) - 1
            if n > 0:
                self._open[key] = n
            else:
                self._open.pop(key, None)


class _ConnectionLimit:
    """Connections beyond the listener's :class:`ConnectionLimiter` get a 503 JSON answer
    and are closed at once."""

    control: ControlServer
    limiter: ConnectionLimiter
    _keys: dict[Any, Any]
    _keys_lock: threading.Lock

    def _key(self, request: Any) -> tuple[Any, bool]:
        if request.family != socket.AF_UNIX:
            return "tcp", False
        try:
            peer = peer_credentials(request)
        except OSError:
            return None, False
        if peer is None:
            return None, False
        return peer.uid, self.control.privileged(peer)

    def process_request(self, request: Any, client_address: Any) -> None:
        key, privileged = self._key(request)
        if not self.limiter.acquire(key, privileged):
            self._refuse(request, key)
            return
        with self._keys_lock:
            self._keys[request] = key
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            with self._keys_lock:
                self._keys.pop(request, None)
            self.limiter.release(key)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._keys_lock:
            key = self._keys.pop(request, None)
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.limiter.release(key)

    def _refuse(self, request: Any, key: Any) -> None:
        limit = self.limiter.total
        body = json.dumps(
            error_body(
                f"too many connections (limit {limit}, {self.limiter.per_peer} per user); "
                "try again shortly",
                "unavailable",
                retryable=True,
            )
        ).encode()
        now = time.monotonic()
        if now - getattr(self, "_last_refusal_log", 0.0) > 5.0:  # a flood logs once in 5 s
            self._last_refusal_log = now
            log.warning("control_connection_refused", limit=limit, peer=str(key))
        try:
            request.settimeout(0.5)  # the accepting thread must not be held up
            request.sendall(_BUSY % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)  # type: ignore[attr-defined]


class _UnixHTTPServer(_ConnectionLimit, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive clients
    request_queue_size = 64

    def __init__(self, control: ControlServer) -> None:
        self.control = control
        self.limiter = ConnectionLimiter(control.max_connections, MAX_PER_PEER, ADMIN_RESERVE)
        self._keys, self._keys_lock = {}, threading.Lock()
        super().__init__(str(control.path), _RequestHandler, bind_and_activate=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log_connection_error()


class _TCPHTTPServer(_ConnectionLimit, socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, control: ControlServer, address: tuple[str, int], token: bytes) -> None:
        self.control = control
        self.token = token
        # Its own pool: a flood of (unauthenticated) TCP connections never takes a
        # socket connection's place; each must send its headers within HEADER_SECONDS.
        self.limiter = ConnectionLimiter(MAX_TCP_CONNECTIONS)
        self._keys, self._keys_lock = {}, threading.Lock()
        super().__init__(address, _RequestHandler, bind_and_activate=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log_connection_error()


class ControlServer:
    """HTTP over a Unix socket at ``path``, served from a background thread.

    ``start()`` refuses a path that is not a socket, refuses (``AlreadyRunningError``)
    a socket something answers on, and replaces a stale one. The socket gets ``mode``
    (and ``group``) before it starts listening, so nobody connects in between.
    A ``<path>.lock`` file is flock'ed for the server's lifetime so that two daemons
    starting at once cannot both take the path; it is left in place on stop.
    """

    def __init__(
        self,
        path: Path,
        *,
        mode: int = 0o660,
        group: str | None = None,
        max_body: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        privileged: Callable[[PeerCredentials], bool] = lambda peer: False,
    ) -> None:
        """``max_connections``: socket connections served at once (a thread each), at
        most MAX_PER_PEER of them per user; ``privileged(peer)`` (root, the daemon's
        user, admins) may use ADMIN_RESERVE more. The TCP listener has its own pool."""
        self.path = Path(path).absolute()
        self.max_connections = max_connections
        self.privileged = privileged
        self.mode = mode
        self.group = group
        self.max_body = max_body
        self.router = Router()
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._tcp_config: tuple[str, int, bytes] | None = None
        self._tcp: _TCPHTTPServer | None = None
        self._tcp_thread: threading.Thread | None = None
        # TCP requests without the bearer header: (path, headers) -> an auth label to
        # serve them with, or None to refuse (401). Set by the web UI (its cookie).
        self.tcp_gate: Callable[[str, Any], str | None] | None = None
        # host names a browser may use to reach the socket besides loopback ones
        self.allowed_hosts: frozenset[str] = frozenset()

    def enable_tcp(self, host: str, port: int, token: bytes) -> None:
        """Also serve on TCP ``host:port`` from ``start()``; requests need the token."""
        if not token:
            raise ValueError("a TCP listener needs a non-empty token")
        self._tcp_config = (host, port, token)

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return None if self._tcp is None else self._tcp.server_address[:2]

    # routing
    def add_route(self, method: str, path: str, handler: Handler) -> Route:
        return self.router.add(method, path, handler)

    def connections(self) -> dict[str, int]:
        """Connections being served now, per listener."""
        out = {"socket": self._server.limiter.in_use if self._server else 0}
        if self._tcp is not None:
            out["tcp"] = self._tcp.limiter.in_use
        return out

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        return self.router.route(method, path)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # lifecycle
    def bind(self) -> None:
        """Take the socket path and listen, without serving yet.

        Call it early to fail fast when another captiond runs; connections made before
        ``start()`` wait in the listen backlog. ``start()`` binds if this was not called.
        """
        if self._server is not None:
            raise RuntimeError("control server already bound")
        encoded = os.fsencode(self.path)
        if len(encoded) > MAX_SOCKET_PATH_BYTES:
            raise SocketPathError(
                f"socket path is {len(encoded)} bytes, the limit is {MAX_SOCKET_PATH_BYTES}: "
                f"{self.path}"
            )
        gid = _resolve_group(self.group) if self.group is not None else None
        self._make_parent(gid)
        self._acquire_lock()
        server = None
        try:
            self._clear_stale_socket()
            server = _UnixHTTPServer(self)
            server.socket.bind(str(self.path))
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(self.path, self.mode)  # bind() applied the umask; set the real mode
            if gid is not None:
                os.chown(self.path, -1, gid)
            server.server_activate()  # listen(): connectable only now
        except BaseException:
            if server is not None:
                server.server_close()
                self._unlink_own_socket()
            self._release_lock()
            raise
        self._server = server

    def start(self) -> None:
        """Bind (unless ``bind()`` was called) and serve from a background thread."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        if self._server is None:
            self.bind()
        assert self._server is not None
        if self._tcp_config is not None:
            # Listening before anything is served: a client that saw /health answer on
            # the socket can connect over TCP at once.
            host, port, token = self._tcp_config
            self._tcp = _TCPHTTPServer(self, (host, port), token)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="control-server",
            daemon=True,
        )
        self._thread.start()
        log.info("control_socket_listening", path=str(self.path), mode=oct(self.mode))
        if self._tcp is not None:
            self._tcp_thread = threading.Thread(
                target=self._tcp.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="control-tcp",
                daemon=True,
            )
            self._tcp_thread.start()
            host, port = self._tcp.server_address[:2]
            log.info("control_tcp_listening", address=f"{host}:{port}")

    def stop(self) -> None:
        """Stop serving, close the socket and remove the file (if it is still ours)."""
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.shutdown()
            if self._tcp_thread is not None:
                self._tcp_thread.join(timeout=5)
                self._tcp_thread = None
            tcp.server_close()
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None:  # shutdown() would wait forever for an unserved server
            server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        server.server_close()
        self._unlink_own_socket()
        self._release_lock()
        log.info("control_socket_closed", path=str(self.path))

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers
    def _make_parent(self, gid: int | None) -> None:
        parent = self.path.parent
        if parent.is_dir():
            return
        parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(parent, 0o750)  # mkdir() applied the umask
        if gid is not None:
            os.chown(parent, -1, gid)

    def _acquire_lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunningError(
                f"another captiond is already running on {self.path} (it holds {self.path}.lock)"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _clear_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathError(
                f"{self.path} exists and is not a socket; refusing to replace it "
                "(move it away or choose another socket_path)"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            log.info("control_socket_stale_removed", path=str(self.path))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            raise AlreadyRunningError(
                f"another captiond is already running on {self.path} (it accepts no connections)"
            ) from None
        except OSError as exc:
            raise SocketPathError(
                f"cannot probe the existing socket {self.path}: {exc.strerror}; remove it if no "
                "captiond is running"
            ) from None
        finally:
            probe.close()
        raise AlreadyRunningError(f"another captiond is already running on {self.path}")

    def _unlink_own_socket(self) -> None:
        """Unlink the socket only if it is still the inode we bound."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            os.unlink(self.path)
        self._inode = None


def _resolve_group(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise SocketPathError(f"socket group {group!r} does not exist") from None
