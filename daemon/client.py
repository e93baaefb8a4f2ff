"""The CLI's side of the control socket: find the daemon, call it, stream from it.

Errors come back as ``ClientError`` with a message for a person; the CLI prints it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.config import Settings


class DaemonNotRunning(ConnectionError):
    """No daemon listens on the socket: the file is absent or refuses connections."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"captiond is not running: {reason} ({path})")
        self.path = path


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: the host name is only used for the Host header."""

    def __init__(self, socket_path: Path | str, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(
    path: Path,
    method: str,
    url: str,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, Any]]:
    """One request to the daemon's socket; returns (status, JSON object).

    A non-object JSON answer is wrapped as ``{"data": ...}``; an empty one is ``{}``.
    Raises DaemonNotRunning if the socket is absent or refuses, PermissionError with
    a hint if the socket may not be opened, TimeoutError on ``timeout``.
    """
    path = Path(path)
    conn = UnixHTTPConnection(path, timeout=timeout)
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        try:
            conn.connect()
        except FileNotFoundError:
            raise DaemonNotRunning(path, "no socket file") from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(path, "the socket refuses connections (stale?)") from None
        except PermissionError:
            raise PermissionError(
                f"permission denied on {path}: run as the daemon's user or join its group"
            ) from None
        # If the server answers early (e.g. 413) and closes, sending fails with EPIPE but
        # its answer is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request(method.upper(), url, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        status = resp.status
    finally:
        conn.close()
    if not raw:
        return status, {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return status, {"error": "non-JSON response", "raw": raw.decode(errors="replace")}
    return status, data if isinstance(data, dict) else {"data": data}


class ClientTimeout(Exception):
    """The caller's deadline passed while waiting for the daemon's answer."""


class ClientError(Exception):
    def __init__(self, message: str, status: int = 0, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


class Client:
    def __init__(self, settings: Settings, timeout: float = 60.0):
        self.settings = settings
        self.timeout = timeout
        self._socket: Path | None = None

    @property
    def socket(self) -> Path:
        """The first configured/conventional socket that answers."""
        if self._socket is None:
            tried = self.settings.client_socket_paths()
            for path in tried:
                try:
                    request(path, "GET", "/health", timeout=5)
                except DaemonNotRunning:
                    continue
                except OSError as exc:
                    raise ClientError(f"{path}: {exc}") from None
                self._socket = path
                break
            else:
                where = ", ".join(str(p) for p in tried)
                raise ClientError(
                    f"captiond is not running (no answer on {where}); start it with "
                    "`captiond run`, or use `captiond caption DIR --once` without a daemon"
                )
        return self._socket

    def call(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        """One request; a 4xx/5xx answer raises ClientError with the daemon's message."""
        data = None if body is None else json.dumps(body).encode()
        try:
            status, answer = request(self.socket, method, url, data, timeout=self.timeout)
        except (DaemonNotRunning, OSError) as exc:
            raise ClientError(f"{self.socket}: {exc}") from None
        if status >= 400:
            raise ClientError(describe_error(answer), status, answer)
        return answer

    def stream(
        self, url: str, body: Any, deadline: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST and yield the ``data: {json}`` events of a streaming answer; past the
        ``deadline`` (monotonic), ClientTimeout. Closing the stream hangs up (the daemon
        then cancels what has not started)."""
        conn = UnixHTTPConnection(self.socket, timeout=None)  # images may take long
        try:
            conn.request(
                "POST",
                url,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            resp = conn.getresponse()
            if resp.status >= 400:
                answer = json.loads(resp.read() or b"{}")
                raise ClientError(describe_error(answer), resp.status, answer)
            while True:
                if deadline is not None and conn.sock is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ClientTimeout()
                    conn.sock.settimeout(left)
                try:
                    line = resp.readline()
                except TimeoutError:
                    raise ClientTimeout() from None
                if not line:
                    break
                line = line.strip()
                if line.startswith(b"data:"):
                    yield json.loads(line[5:])
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise ClientError(f"the daemon's answer broke off: {exc!r}") from None
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def describe_error(answer: dict[str, Any]) -> str:
    """The daemon's error answer for a person, with field errors one per line."""
    text = f"{answer.get('error_type', 'error')}: {answer.get('error', answer)}"
    for d in answer.get("details") or []:
        if isinstance(d, dict):
            loc = ".".join(str(p) for p in d.get("loc", []))
            text += f"\n  {loc}: {d.get('msg')}"
    return text


def api_path(roots: list[dict[str, Any]], path: Path) -> str:
    """A local file or folder as the API names it (``ROOTNAME/sub/file.png``), from the
    roots as the daemon resolved them: either spelling of a path (through a symlink,
    with ``..``) names the same file."""
    real = os.path.realpath(path.expanduser())
    for root in sorted(roots, key=lambda r: len(r["path"]), reverse=True):
        base = root["path"].rstrip("/")
        if real == base:
            return root["name"]
        if real.startswith(base + "/"):
            return f"{root['name']}/{real[len(base) + 1 :]}"  # as is in JSON; quote() for a URL
    where = ", ".join(r["path"] for r in roots) or "none"
    raise ClientError(f"{path} is not in a folder the daemon watches (it watches: {where})")
