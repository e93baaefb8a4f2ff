"""Shared by generators that fetch models from the Hugging Face hub: which exception
types mean "offline", "no such repository", "the network failed" or "try again",
decided by type (and an HTTP status) alone, never by message text.

- ``offline``: not in the cache and the hub was not asked (``HF_HUB_OFFLINE``,
  ``local_files_only``) -> :class:`~daemon.errors.ModelDownloadError`;
- ``network``: the hub could not be reached or the connection broke (refused, reset,
  DNS, timeout, proxy), or it answered 429/5xx ("come back later") ->
  :class:`~daemon.errors.NetworkError`, with the server's ``Retry-After``;
- ``gated`` / ``missing``: a licence to accept, or no such repository, revision or
  file -> :class:`~daemon.errors.ModelUnavailableError`;
- ``transient``: other hub or disk trouble while downloading ->
  :class:`~daemon.errors.ModelDownloadError`.

huggingface_hub wraps a connection failure in ``LocalEntryNotFoundError`` when the file
is not cached ("raise ... from" the connection error), so the cause chain is read.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from daemon.errors import (
    CaptionError,
    ModelDownloadError,
    ModelUnavailableError,
    NetworkError,
)

Errors = tuple[type[BaseException], ...]
Kind = Literal["offline", "network", "gated", "missing", "transient"]

# HTTP answers that mean "the server is there but cannot serve you now".
RETRY_LATER_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def looks_like_path(model: str) -> bool:
    """A local path rather than a repo id (``owner/name``)."""
    return model.startswith(("/", "./", "../", "~", "\\")) or model.count("/") > 1 or "\\" in model


def _found(pairs: tuple[tuple[str, str], ...]) -> Errors:
    out: list[type[BaseException]] = []
    for module, attr in pairs:
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            out.append(cls)
    return tuple(out)


def network_errors() -> Errors:
    """HTTP client error types of the clients huggingface_hub has imported."""
    return _found(
        (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException"))
    )


def connection_errors() -> Errors:
    """Types that mean the remote was not reached or the connection broke: the socket
    layer's and those of the HTTP clients huggingface_hub has imported."""
    httpx = ("NetworkError", "TimeoutException", "ProxyError", "RemoteProtocolError")
    clients = _found(
        (
            *((module, attr) for module in ("httpx2", "httpx") for attr in httpx),
            ("requests", "ConnectionError"),
            ("requests", "Timeout"),
        )
    )
    return (ConnectionError, TimeoutError, socket.gaierror, socket.herror, *clients)


@dataclass(frozen=True, slots=True)
class HubErrors:
    offline: Errors  # not cached, and the hub unreachable or disabled
    gated: Errors  # a licence to accept
    missing: Errors  # no such repository, revision or file
    transient: Errors  # network or server trouble: retry later
    disabled: Errors = ()  # offline mode: no request was made
    network: Errors = ()  # the connection failed (see connection_errors)
    http: Errors = ()  # an HTTP answer with a status (HfHubHTTPError)


def hub_errors(what: str) -> HubErrors:
    """huggingface_hub's exception types by meaning (imported lazily)."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:
        raise ModelUnavailableError(
            f"huggingface_hub is not installed; cannot fetch {what}"
        ) from exc

    def opt(name: str) -> Errors:
        cls = getattr(hf_errors, name, None)
        return (cls,) if isinstance(cls, type) else ()

    return HubErrors(
        offline=opt("LocalEntryNotFoundError") + opt("OfflineModeIsEnabled"),
        gated=opt("GatedRepoError"),
        missing=opt("RepositoryNotFoundError")
        + opt("RevisionNotFoundError")
        + opt("EntryNotFoundError")
        + opt("HFValidationError"),
        transient=opt("HfHubHTTPError") + opt("XetDownloadError") + network_errors() + (OSError,),
        disabled=opt("OfflineModeIsEnabled"),
        network=connection_errors(),
        http=opt("HfHubHTTPError"),
    )


@dataclass(frozen=True, slots=True)
class HubFailure:
    """What a failed hub call means; :meth:`error` turns it into captiond's error."""

    kind: Kind
    cause: BaseException  # the exception that decided it (for its type name)
    retry_after: float | None = None

    def error(self, what: str, *, offline_hint: str = "") -> CaptionError:
        name = type(self.cause).__name__
        if self.kind == "network":
            return NetworkError(
                f"cannot reach the model hub for {what} ({name}); retrying later",
                retry_after=self.retry_after,
            )
        if self.kind == "offline":
            return ModelDownloadError(
                f"cannot fetch {what}: not in the cache and the hub is disabled or was "
                f"not reached ({name}){offline_hint}"
            )
        if self.kind == "gated":
            return ModelUnavailableError(
                f"{what} is gated: accept its licence on the hub and provide a token "
                f"(HF_TOKEN) ({name})"
            )
        if self.kind == "missing":
            return ModelUnavailableError(f"{what} does not exist or is not accessible ({name})")
        return ModelDownloadError(f"downloading {what} failed ({name})")


def _chain(exc: BaseException, limit: int = 8) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < limit:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    try:
        seconds = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: the caller's own backoff applies
    return seconds if seconds is not None and seconds >= 0 else None


def _network_cause(exc: BaseException, errs: HubErrors) -> HubFailure | None:
    for link in _chain(exc):
        if errs.disabled and isinstance(link, errs.disabled):
            return None  # offline mode (a ConnectionError subclass): nothing was tried
        if isinstance(link, errs.network):
            return HubFailure("network", link)
        if errs.http and isinstance(link, errs.http) and _status(link) in RETRY_LATER_STATUS:
            return HubFailure("network", link, _retry_after(link))
    return None


def hub_failure(exc: BaseException, errs: HubErrors) -> HubFailure | None:
    """Classify an exception from a hub download; None when it is not one of the
    hub's or the network's (let it propagate)."""
    if isinstance(exc, errs.offline):  # not cached: was the hub disabled or unreachable?
        return _network_cause(exc, errs) or HubFailure("offline", exc)
    if isinstance(exc, errs.gated):
        return HubFailure("gated", exc)
    if isinstance(exc, errs.missing):
        return HubFailure("missing", exc)
    found = _network_cause(exc, errs)
    if found is not None:
        return found
    if isinstance(exc, errs.transient):
        return HubFailure("transient", exc)
    return None
