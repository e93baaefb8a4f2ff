"""A small OpenAI-compatible server for tests and the benchmark (127.0.0.1 only).

``GET /v1/models`` lists ``models``; ``POST /v1/chat/completions`` answers with a
sentence naming the size and colour of the image it was sent, so tests can check
that each caption belongs to its image. It records every request body and header,
counts requests in flight (``max_in_flight``), checks a bearer key when given one,
and misbehaves on request: ``mode`` (or ``plan(body) -> mode`` per request) is one of

``ok``, ``429`` (with ``Retry-After``), ``500``, ``400`` (an error message that quotes
the Authorization header, as careless servers do), ``drop`` (close the connection
without an answer), ``garbage`` (200 with HTML), ``empty``, ``cut`` (finish_reason
``length``), ``hang`` (answer after ``hang_seconds``).

``stop()`` makes it go away (listening socket and open connections closed);
``start()`` brings it back on the same port.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

COLOURS = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (255, 255, 255): "white",
    (0, 0, 0): "black",
}


def describe_data_url(url: str) -> tuple[str, tuple[int, int], str]:
    """(format, size, colour name of the centre pixel) of a ``data:`` image URL."""
    head, _, data = url.partition(",")
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    rgb = img.convert("RGB").getpixel((img.width // 2, img.height // 2))
    near = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, rgb, strict=True)))
    return head, img.size, COLOURS[near]


def answer_for(body: dict[str, Any]) -> str:
    parts = body["messages"][-1]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    _, (w, h), colour = describe_data_url(url)
    return f"A {colour} picture of {w}x{h} pixels."


class FakeOpenAI:
    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("test-vlm",),
        api_key: str | None = None,
        delay: float = 0.0,
        port: int = 0,
    ):
        self.models = list(models)
        self.api_key = api_key
        self.delay = delay
        self.mode = "ok"
        self.plan: Callable[[dict[str, Any]], str] | None = None
        self.retry_after = "7"
        self.hang_seconds = 5.0
        self.answer: Callable[[dict[str, Any]], str] = answer_for
        self.requests: list[dict[str, Any]] = []  # chat bodies, in arrival order
        self.headers: list[dict[str, str]] = []
        self.model_lists = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- life cycle ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> FakeOpenAI:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server = _Server(("127.0.0.1", self._port), Handler)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._conns = set(self._conns), set()
        for conn in conns:  # keep-alive connections go too: the server is gone
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.headers.clear()
            self.max_in_flight = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen() backlog: many connections open at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up (timeouts, a stopped server) are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms ACK wait
    server_owner: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server_owner._lock:
            self.server_owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.server_owner._lock:
            self.server_owner._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        ctype = "application/json" if not isinstance(body, bytes) else "text/html"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _authorised(self) -> bool:
        key = self.server_owner.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, {"error": {"message": "invalid API key", "type": "auth"}})
        return False

    def do_GET(self) -> None:
        owner = self.server_owner
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        if not self._authorised():
            return
        with owner._lock:
            owner.model_lists += 1
        data = [{"id": m, "object": "model", "owned_by": "test"} for m in owner.models]
        self._send(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        owner = self.server_owner
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        if not self._authorised():
            return
        body = json.loads(raw)
        with owner._lock:
            owner.requests.append(body)
            owner.headers.append(dict(self.headers.items()))
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            mode = owner.plan(body) if owner.plan is not None else owner.mode
            if owner.delay:
                time.sleep(owner.delay)
            self._answer(mode, body)
        finally:
            with owner._lock:
                owner.in_flight -= 1

    def _answer(self, mode: str, body: dict[str, Any]) -> None:
        owner = self.server_owner
        if mode == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "429":
            msg = {"error": {"message": "slow down", "type": "rate_limit"}}
            self._send(429, msg, {"Retry-After": owner.retry_after})
            return
        if mode == "500":
            self._send(500, {"error": {"message": "engine crashed", "type": "server"}})
            return
        if mode == "400":
            auth = self.headers.get("Authorization", "")
            self._send(400, {"error": {"message": f"image too large (request had {auth})"}})
            return
        if mode == "garbage":
            self._send(200, b"<html><body>502 Bad Gateway</body></html>")
            return
        if mode == "hang":
            time.sleep(owner.hang_seconds)
        text = {"empty": "  ", "cut": "A red picture of"}.get(mode) or owner.answer(body)
        finish = "length" if mode == "cut" else "stop"
        self._send(
            200,
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
            },
        )


def main() -> None:
    """``python -m tests.openai_server --delay 0.2``: serve until killed (benchmarks run
    the server in its own process). Prints the port on the first line."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="OpenAI-compatible test server on 127.0.0.1")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="test-vlm")
    ap.add_argument("--decode", action="store_true", help="decode each image for the answer")
    args = ap.parse_args()
    server = FakeOpenAI(models=(args.model,), delay=args.delay, port=args.port)
    if not args.decode:
        server.answer = lambda body: "A picture of something, described at length."
    server.start()
    print(server.port, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
