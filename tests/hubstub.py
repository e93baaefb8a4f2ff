"""A stand-in for the Hugging Face hub on 127.0.0.1, so that tests see real connection
failures and real HTTP answers from huggingface_hub without the network.

``unreachable_hub(monkeypatch)`` points huggingface_hub at a closed local port
(connection refused); ``busy_hub(monkeypatch, status, retry_after)`` at a local server
that answers every request with that status. Offline mode is turned off and
huggingface_hub's own retry pauses are skipped, for the duration of the test.
"""

from __future__ import annotations

import http.server
import socket
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    # huggingface_hub retries with pauses of 1-8 s (or Retry-After): keep the retries,
    # skip the waiting.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point huggingface_hub at a local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    _point_hub_at(monkeypatch, endpoint)
    return endpoint


@contextmanager
def busy_hub(
    monkeypatch: pytest.MonkeyPatch, status: int = 503, retry_after: str | None = "7"
) -> Iterator[str]:
    """A local server that answers every request with ``status``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        _point_hub_at(monkeypatch, endpoint)
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
