"""Request and response bodies of the control API (pydantic; also the OpenAPI schemas).

Request bodies are strict: ``"true"`` is not a boolean, unknown keys are errors, so a
wrong type is a 422 with the field named, never a guess.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.api.http import Request
from daemon.api.problems import Problem
from daemon.config import parse_keep_alive

MAX_CAPTION_CHARS = 256 * 1024


def validation_details(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


M = TypeVar("M", bound=BaseModel)


def parse_body(request: Request, model: type[M], *, required: bool = True) -> M:
    data = request.json()
    if data is None:
        if required:
            raise Problem("invalid", "a JSON request body is required")
        data = {}
    if not isinstance(data, dict):
        raise Problem("invalid", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Problem(
            "invalid",
            f"invalid request body: {exc.error_count()} problem(s)",
            details=validation_details(exc),
        ) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------ requests


class BatchItem(_Body):
    """A file as ``{path: folder, name: file}``; ``path`` "" means the single root."""

    path: str = Field("", max_length=4096)
    name: str = Field(..., min_length=1, max_length=1024)


class BatchConfig(_Body):
    force: bool = False  # replace any caption, a person's too
    redo: bool = False  # make captiond's own (unedited) captions again; a person's stay
    post_process: bool = True


class BatchRequest(_Body):
    items: list[str | BatchItem] = Field(default_factory=list, max_length=100_000)
    # Folders (ROOT or ROOT/sub) whose images the daemon lists itself, by the folder's
    # own rules (recursive, include/exclude...), confined to its root.
    folders: list[str] = Field(default_factory=list, max_length=1000)
    generator: str | None = Field(None, max_length=200)
    config: BatchConfig = Field(default_factory=BatchConfig)


class CaptionWrite(_Body):
    type: str = Field(..., min_length=1, max_length=64)
    caption: str = Field(..., max_length=MAX_CAPTION_CHARS)


class CaptionTypesUpdate(_Body):
    types: list[str] = Field(..., max_length=256)


class PostProcessUpdate(_Body):
    steps: list[str] | None = Field(None, max_length=64)
    case: Literal["keep", "lower", "sentence"] | None = None
    max_words: int | None = Field(None, ge=0, le=100_000)
    overrides: dict[str, list[str]] | None = None


class ReynardPostProcessing(_Body):
    """The post-processing document of Reynard's caption service (seeds/001): rules
    switched on and off, the order they run in, per-generator rule overrides.
    ``daemon.text.postprocess.from_reynard`` checks it in full."""

    enabled: bool = True
    rules: dict[str, bool | str] = Field(default_factory=dict)
    pipeline: list[str] | None = None
    overrides: dict[str, dict[str, bool | str | list[str]]] | None = None
    max_words: int | None = None


class ModelLoadRequest(_Body):
    wait: bool = False  # answer when the load finished
    keep_alive: float | None = None  # seconds this load stays; -1 = until unloaded

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        return parse_keep_alive(v)  # the same rule as [residency] in config.toml


class QueueTarget(_Body):
    root: str | None = Field(None, max_length=1024)
    generator: str | None = Field(None, max_length=200)


class PauseRequest(_Body):
    root: str | None = Field(None, max_length=1024)


class RescanRequest(_Body):
    root: str | None = Field(None, max_length=1024)
    recaption: bool = False  # also re-caption images whose sidecar captiond wrote, unedited


class RetryRequest(QueueTarget):
    states: list[Literal["failed", "dead"]] = Field(default_factory=lambda: ["failed", "dead"])


class PurgeRequest(QueueTarget):
    # Required: an empty request must never delete every job.
    states: list[Literal["pending", "done", "failed", "dead"]] = Field(..., min_length=1)


class ReportRefresh(_Body):
    """Read back the sidecars of these scopes (``ROOT`` or ``ROOT/sub``; all when empty)."""

    scopes: list[str] = Field(default_factory=list, max_length=100)


class FlagDismiss(_Body):
    """Dismiss an image's open flags (of one generator, of one check)."""

    path: str = Field(..., min_length=1, max_length=4096)
    generator: str | None = Field(None, max_length=200)
    check: str | None = Field(None, max_length=100)


# ----------------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class Error(_Out):
    error: str
    error_type: str
    retryable: bool
    details: list[dict[str, Any]] | None = None


class CaptionResult(_Out):
    success: bool
    caption: str | None = None
    generator: str
    caption_type: str | None = None
    processing_time: float
    path: str
    sidecar: str | None = None
    outcome: str | None = None
    request_id: str | None = None


class Queued(_Out):
    success: bool = False
    queued: bool = True
    request_id: str
    message: str
    error_type: str | None = None
    retryable: bool = True


class RequestStatus(_Out):
    request_id: str
    state: Literal["queued", "processing", "completed", "failed", "cancelled"]
    path: str
    generator: str
    created_at: float
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None


class RequestQueueStatus(_Out):
    requests: list[RequestStatus]
    counts: dict[str, int]
    queue: dict[str, int]
    paused: bool
    paused_roots: list[str]


class GeneratorInfo(_Out):
    name: str
    caption_type: str | None
    description: str | None
    version: str | None
    available: bool
    reason: str
    loaded: bool
    state: str
    weight: str | None
    in_use: bool
    config_schema: dict[str, Any] | None
    config: dict[str, Any] | None


class GeneratorList(_Out):
    generators: list[GeneratorInfo]


class CaptionWritten(_Out):
    success: bool
    path: str
    sidecar: str
    type: str
    caption: str | None = None


class CaptionTypes(_Out):
    types: list[str]
    user: list[str]
    required: list[str]


class CaptionerConfig(_Out):
    generator: str
    config: dict[str, Any]
    applied: bool


class PostProcessSettings(_Out):
    """captiond's shape; with ``?shape=reynard`` (or after a PUT in that shape) the
    answer is a :class:`ReynardPostProcessing` document instead."""

    steps: list[str]
    case: str
    max_words: int
    overrides: dict[str, list[str]]
    available_steps: list[str]


class QueueState(_Out):
    paused: bool
    paused_roots: list[str]
    totals: dict[str, int]
    by_root: dict[str, dict[str, int]]


class CountResult(_Out):
    count: int


class StreamEvent(_Out):
    """One ``data: {json}`` line of the batch stream."""

    type: Literal["start", "item_complete", "complete", "error"]
    total: int | None = None
    item_result: dict[str, Any] | None = None
    processed: int | None = None
    successful: int | None = None
    failed: int | None = None
    skipped: int | None = None
