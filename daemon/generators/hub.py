"""Shared by generators that fetch models from the Hugging Face hub: which exception
types mean "offline", "no such repository" or "try again", decided by type alone."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from daemon.errors import ModelUnavailableError

Errors = tuple[type[BaseException], ...]


def looks_like_path(model: str) -> bool:
    """A local path rather than a repo id (``owner/name``)."""
    return model.startswith(("/", "./", "../", "~", "\\")) or model.count("/") > 1 or "\\" in model


def network_errors() -> Errors:
    """HTTP client error types of the clients huggingface_hub has imported."""
    found: list[type[BaseException]] = []
    for module, attr in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class HubErrors:
    offline: Errors  # not cached, and the hub unreachable or disabled
    gated: Errors  # a licence to accept
    missing: Errors  # no such repository, revision or file
    transient: Errors  # network or server trouble: retry later


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
    )
