"""Error classification: by exception type alone."""

from __future__ import annotations

import socket

import pytest

from daemon.errors import ErrorType, NetworkError, classify


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        socket.gaierror(-2, "Name or service not known"),
        NetworkError("503 from the server", retry_after=3.0),
    ],
)
def test_connection_failures_are_network_and_retryable(exc: BaseException) -> None:
    c = classify(exc)
    assert c.error_type is ErrorType.NETWORK
    assert c.retryable


def test_timeouts_and_plain_io_keep_their_types() -> None:
    assert classify(TimeoutError("slow")).error_type is ErrorType.TIMEOUT
    assert classify(OSError(5, "Input/output error")).error_type is ErrorType.IO
    assert classify(FileNotFoundError(2, "gone")).retryable is False


def test_retry_after_travels_with_the_error() -> None:
    assert NetworkError("busy", retry_after=2.5).retry_after == 2.5
    assert NetworkError("refused").retry_after is None
