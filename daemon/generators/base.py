"""The generator contract.

A generator is pure: decoded images and its settings in, one caption per image out.
It never imports the queue, the watcher, the server or the CLI, so the same class
serves the daemon, a one-shot run over a folder, and a cluster worker.

Life cycle: ``is_available()`` (cheap, never raises) -> ``load()`` -> many
``prepare()`` (thread-safe, CPU work such as resizing; runs in the decode pool)
and ``generate()`` calls -> ``unload()``. Heavy imports (onnxruntime, torch) belong
inside ``load()`` so that a missing optional dependency disables only this generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict

from daemon.errors import ModelUnavailableError


class WeightClass(StrEnum):
    LIGHT = "light"  # loaded at start and kept warm
    HEAVY = "heavy"  # loaded on demand, unloaded when idle


class GeneratorConfig(BaseModel):
    """Base of every generator's settings table; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Availability:
    ok: bool
    reason: str = ""


@dataclass(slots=True)
class ImageInput:
    """One decoded image (EXIF orientation applied) and its context.

    ``context`` carries prompt variables such as ``name`` and ``folder``.
    """

    path: Path
    image: Image.Image
    context: Mapping[str, str] = field(default_factory=dict)


class Generator(ABC):
    name: ClassVar[str]
    caption_type: ClassVar[str]
    description: ClassVar[str]
    version: ClassVar[str]
    weight: ClassVar[WeightClass] = WeightClass.LIGHT
    config_model: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    # The model runs on a server, not in this process: the generator is run in-process
    # (no child) and counts against neither max_resident_heavy nor the memory budget.
    remote: ClassVar[bool] = False

    def __init__(self, config: GeneratorConfig | None = None, *, cache_dir: Path | None = None):
        self.config = config if config is not None else self.config_model()
        self.cache_dir = cache_dir

    @classmethod
    def is_available(cls) -> Availability:
        """Whether this generator can run here. Must never raise."""
        return Availability(True)

    @property
    def draft_size(self) -> int | None:
        """The size ``prepare()`` resamples the image to (its shorter side, or with
        :attr:`draft_longer_side` its longer side), so the decoder may use JPEG draft
        mode; it keeps at least twice this (``decode_image``'s ``draft_gap``)."""
        return None

    @property
    def draft_longer_side(self) -> bool:
        """True when ``draft_size`` is the longer side's target (the model pads the
        image to a square, or shrinks it by its longer side)."""
        return False

    def fetch(self) -> str:
        """Download the model into the cache without loading it (``captiond models
        pull``, for machines that are offline later); returns where it is. Raises
        ModelDownloadError / ModelUnavailableError like load()."""
        raise ModelUnavailableError(f"{self.name} has nothing to download ahead of time")

    @property
    def preferred_batch_size(self) -> int | None:
        """At least this many images per generate() call make sense (a remote
        generator's requests in flight); None = the worker's batch size."""
        return None

    @property
    def server(self) -> str | None:
        """The remote server the work goes to (``scheme://host:port/path``, no
        credentials), None for local models. Generators with the same server share one
        circuit breaker."""
        return None

    def warnings(self) -> list[str]:
        """Problems with the settings worth a warning at start (shown in status)."""
        return []

    def status_details(self) -> dict[str, Any]:
        """A few facts for the model's status (e.g. whether the server answers);
        read without a lock, so only plain values."""
        return {}

    @property
    def context_keys(self) -> frozenset[str]:
        """Context variables this generator needs besides ``name`` and ``folder``:
        ``tags`` asks the worker for a light tagger's tags of the same image."""
        return frozenset()

    @property
    @abstractmethod
    def loaded(self) -> bool: ...

    @abstractmethod
    def load(self) -> None:
        """Load weights. Raise ModelDownloadError / ModelLoadingError / ModelUnavailableError."""

    @abstractmethod
    def unload(self) -> None: ...

    def prepare(self, item: ImageInput) -> Any:
        """CPU preprocessing of one image, called from worker threads after load()."""
        return item

    @abstractmethod
    def generate(self, batch: Sequence[Any]) -> list[str]:
        """Caption a batch of prepared items: exactly one caption per item, in order."""
