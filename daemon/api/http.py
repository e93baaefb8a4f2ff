"""HTTP plumbing shared by the listeners and the routes: requests, responses, one error
type, and a small router. Nothing here knows sockets, peers or the daemon.

A handler takes a ``Request`` and returns a ``Response``, a ``(status, body)`` tuple,
a JSON-able body (200) or ``None`` (204); it may raise ``HTTPError``. Every error is
JSON: ``{"error": ..., "error_type": ..., "retryable": ...}``. A ``Response`` with
``stream`` (an iterator of byte chunks) is sent with chunked transfer encoding as the
chunks come; a ``None`` chunk only checks whether the client is still there. When it
is gone the iterator is closed (``GeneratorExit`` inside a generator), so a handler
can cancel work nobody waits for.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "bad_request",
    415: "unsupported_media_type",
    422: "invalid",
    431: "bad_request",
    500: "unexpected",
    501: "not_implemented",
    503: "unavailable",
}


class HTTPError(Exception):
    """Raise from a handler to answer with a JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        *,
        retryable: bool = False,
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _ERROR_TYPES.get(status, "error")
        self.retryable = retryable
        self.headers = dict(headers or {})
        self.details = details  # field errors of a request body
        self.extra = dict(extra or {})  # more fields for the body

    def to_response(self) -> Response:
        body = error_body(self.message, self.error_type, self.retryable) | self.extra
        if self.details is not None:
            body["details"] = self.details
        return Response(self.status, body, self.headers)


def error_body(message: str, error_type: str, retryable: bool = False) -> dict[str, Any]:
    return {"error": message, "error_type": error_type, "retryable": retryable}


class PeerCredentials(NamedTuple):
    pid: int
    uid: int
    gid: int


# --------------------------------------------------------------- request / response


@dataclasses.dataclass(slots=True)
class Request:
    method: str
    path: str  # raw (still percent-encoded) path, without the query
    query: dict[str, list[str]]
    headers: Mapping[str, str]  # case-insensitive (an http.client.HTTPMessage)
    body: bytes
    peer: PeerCredentials | None
    params: dict[str, str] = dataclasses.field(default_factory=dict)  # from {name} patterns
    auth: str | None = None  # "peer" (Unix socket, see ``peer``) or "token" (TCP, bearer)

    def json(self) -> Any:
        """The body parsed as JSON; an empty body is ``None``; invalid JSON -> 400.

        Absurd JSON (nesting deeper than Python recurses, integers of thousands of
        digits) is invalid too: a 400, never a 500. The error names the position only,
        never the body's content (it may hold a person's caption)."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            where = f" at position {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise HTTPError(400, f"request body is not valid JSON: {why}{where}") from None
        except RecursionError:
            raise HTTPError(400, "request body is nested too deeply") from None
        except ValueError:  # int() beyond sys.get_int_max_str_digits()
            raise HTTPError(400, "request body holds a number too long to read") from None

    def query_one(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default


@dataclasses.dataclass(slots=True)
class Response:
    """``body`` is serialised as JSON unless it is ``bytes``/``str`` (sent as is)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = "application/json"
    # Sent chunk by chunk (chunked encoding) instead of ``body``; None = "client there?"
    stream: Iterator[bytes | None] | None = None

    def encode(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body, default=_json_default, ensure_ascii=False).encode()


HandlerResult = Response | tuple[int, Any] | dict[str, Any] | list[Any] | None
Handler = Callable[[Request], HandlerResult]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_response(result: HandlerResult) -> Response:
    if isinstance(result, Response):
        return result
    if result is None:
        return Response(204)
    if isinstance(result, tuple):
        status, body = result
        return Response(status, body)
    return Response(200, result)


# ------------------------------------------------------------------------- routing

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str
    handler: Handler
    regex: re.Pattern[str]
    # Runs before the request body is read (authorisation): a client that may not use
    # the route never gets to send, or stall, a body.
    guard: Callable[[Request], None] | None = None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``/jobs/{id}`` matches one segment; ``/files/{rel:path}`` matches the rest."""
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern must start with '/': {pattern!r}")
    out, pos = [], 0
    for m in _PARAM.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^/]+'})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


class Router:
    """An ordered table of routes; the first matching pattern for a method wins."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        guard: Callable[[Request], None] | None = None,
    ) -> Route:
        method = method.upper()
        if method not in HTTP_METHODS:
            raise ValueError(f"unsupported HTTP method {method!r}")
        if any(r.method == method and r.pattern == pattern for r in self.routes):
            raise ValueError(f"route already registered: {method} {pattern}")
        route = Route(method, pattern, handler, compile_pattern(pattern), guard)
        self.routes.append(route)
        return route

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def decorator(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return decorator

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """Raise HTTPError 404 (no pattern matches) or 405 (no route for the method)."""
        allowed: list[str] = []
        fallback: tuple[Route, dict[str, str]] | None = None
        for route in self.routes:
            m = route.regex.match(path)
            if m is None:
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            if route.method == method:
                return route, params
            if method == "HEAD" and route.method == "GET" and fallback is None:
                fallback = (route, params)
            allowed.append(route.method)
        if fallback is not None:
            return fallback
        if not allowed:
            raise HTTPError(404, f"no such endpoint: {path}")
        if "GET" in allowed:
            allowed.append("HEAD")
        allow = ", ".join(sorted(set(allowed)))
        message = f"method {method} not allowed on {path} (allowed: {allow})"
        raise HTTPError(405, message, headers={"Allow": allow})
