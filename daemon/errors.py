"""Typed errors. Every failure is classified by exception *type* into an ErrorType
with a retryable flag; message text is never inspected."""

from __future__ import annotations

import socket
import sqlite3
import sys
from dataclasses import dataclass
from enum import StrEnum


class ErrorType(StrEnum):
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_DOWNLOAD = "model_download"
    MODEL_LOADING = "model_loading"
    GENERATION = "generation"
    TIMEOUT = "timeout"
    NETWORK = "network"
    CAPTION_EXISTS = "caption_exists"
    CAPTION_EDITED = "caption_edited"
    BAD_IMAGE = "bad_image"
    IO = "io"
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_CRASH = "worker_crash"
    UNEXPECTED = "unexpected"


class CaptionError(Exception):
    """Base of captiond's own errors. Subclasses fix the type and retryability."""

    error_type: ErrorType = ErrorType.UNEXPECTED
    retryable: bool = False


class ModelUnavailableError(CaptionError):
    """A generator cannot run here (missing dependency, bad model folder)."""

    error_type = ErrorType.MODEL_UNAVAILABLE
    retryable = False


class ModelDownloadError(CaptionError):
    """Fetching weights failed (offline, hub down). Jobs wait and retry."""

    error_type = ErrorType.MODEL_DOWNLOAD
    retryable = True


class ModelLoadingError(CaptionError):
    """The weights are there but could not be loaded."""

    error_type = ErrorType.MODEL_LOADING
    retryable = True


class GenerationError(CaptionError):
    error_type = ErrorType.GENERATION
    retryable = True


class GenerationTimeoutError(CaptionError):
    error_type = ErrorType.TIMEOUT
    retryable = True


class NetworkError(CaptionError):
    """A connection to a remote (the model hub, a remote model server) failed: refused,
    reset, a name that does not resolve, or a server that asks to come back later.
    ``retry_after``: seconds the server asked us to wait (HTTP ``Retry-After``), if any."""

    error_type = ErrorType.NETWORK
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class CaptionExistsError(CaptionError):
    error_type = ErrorType.CAPTION_EXISTS
    retryable = False


class CaptionEditedError(CaptionError):
    error_type = ErrorType.CAPTION_EDITED
    retryable = False


class BadImageError(CaptionError):
    """Truncated, empty, not an image, or a decompression bomb."""

    error_type = ErrorType.BAD_IMAGE
    retryable = False


class FileChangingError(CaptionError):
    """The file is still being written; try again after it settles."""

    error_type = ErrorType.IO
    retryable = True


class ReadStalledError(CaptionError):
    """Reading and decoding one image took far too long (a hung network mount): the
    job is retried later while the rest of the queue goes on."""

    error_type = ErrorType.IO
    retryable = True


class DependencyPendingError(CaptionError):
    """The job needs another job's result first (a VLM prompt's ``{tags}``): it goes
    back to the queue without using an attempt."""

    error_type = ErrorType.GENERATION
    retryable = True


class UnsafeSidecarError(CaptionError):
    """The sidecar path is a symlink, a FIFO, a device or too large: never read or
    replaced (it could leak another file into a dataset or stall the daemon)."""

    error_type = ErrorType.IO
    retryable = False


class OutOfMemoryError(CaptionError):
    error_type = ErrorType.OUT_OF_MEMORY
    retryable = True


class WorkerCrashError(CaptionError):
    """The process running the model died (segfault, abort, killed for memory).

    Retryable: the worker process is restarted and the image retried on its own; an
    image that crashes it ``residency.crash_attempts`` times ends ``dead``.
    """

    error_type = ErrorType.WORKER_CRASH
    retryable = True


@dataclass(frozen=True, slots=True)
class Classified:
    error_type: ErrorType
    retryable: bool
    message: str


def _is_torch_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    return oom is not None and isinstance(exc, oom)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, OutOfMemoryError)) or _is_torch_oom(exc)


def classify(exc: BaseException) -> Classified:
    """Map any exception to (error_type, retryable) by its type alone."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, CaptionError):
        return Classified(exc.error_type, exc.retryable, str(exc) or type(exc).__name__)
    if is_out_of_memory(exc):
        return Classified(ErrorType.OUT_OF_MEMORY, True, message)
    if isinstance(exc, TimeoutError):
        return Classified(ErrorType.TIMEOUT, True, message)
    if isinstance(exc, (ConnectionError, socket.gaierror, socket.herror)):
        return Classified(ErrorType.NETWORK, True, message)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        # The image vanished or was replaced: nothing to retry.
        return Classified(ErrorType.IO, False, message)
    if isinstance(exc, (OSError, sqlite3.OperationalError)):  # incl. "database is locked"
        return Classified(ErrorType.IO, True, message)
    return Classified(ErrorType.UNEXPECTED, False, message)
