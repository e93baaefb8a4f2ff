"""Why the control facade refuses a request, without HTTP: a kind, a message, an
``error_type`` for clients and whether trying again may help. The routes turn each kind
into a status code (:data:`STATUS`); the facade and the path checks never see HTTP."""

from __future__ import annotations

from typing import Any, Literal

Kind = Literal[
    "bad_request",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "invalid",
    "unavailable",
    "unexpected",
]

STATUS: dict[str, int] = {
    "bad_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "invalid": 422,
    "unavailable": 503,
    "unexpected": 500,
}


class Problem(Exception):
    """A refused request. ``details``: field errors; ``extra``: more fields for the body."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        error_type: str | None = None,
        *,
        retryable: bool = False,
        details: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error_type = error_type or kind
        self.retryable = retryable
        self.details = details
        self.extra = extra or {}

    @property
    def status(self) -> int:
        return STATUS[self.kind]
