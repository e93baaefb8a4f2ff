"""Model slots: one generator instance each, loaded under a lock, with its state.

Light generators are loaded at start (``worker.preload``); any other generator is
loaded the first time it has work. A failed load does not fail jobs: they stay
queued while the slot waits ``load_retry_seconds`` (doubling, capped at an hour)
before the next attempt. The residency issue grows this into idle unloading,
memory budgets and child processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

import structlog

from daemon.errors import Classified, classify
from daemon.generators.base import Generator
from daemon.generators.registry import Discovered

log = structlog.get_logger(__name__)

MAX_LOAD_RETRY_SECONDS = 3600.0


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"  # will retry at next_retry_at
    UNAVAILABLE = "unavailable"  # is_available() said no, or the module did not import


class ModelSlot:
    def __init__(
        self,
        name: str,
        generator: Generator | None,
        *,
        reason: str = "",
        retry_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self.generator = generator
        self._lock = threading.Lock()
        self._clock = clock
        self._base_retry = retry_seconds
        self._retry = retry_seconds
        self.state = ModelState.UNAVAILABLE if generator is None else ModelState.UNLOADED
        self.reason = reason
        self.last_error: Classified | None = None
        self.next_retry_at = 0.0
        self.load_seconds: float | None = None
        self.failures = 0

    @property
    def ready(self) -> bool:
        return self.state is ModelState.LOADED

    def ensure_loaded(self) -> bool:
        """Load if needed and allowed now; True when the generator is ready."""
        if self.state is ModelState.LOADED:
            return True
        if self.generator is None:
            return False
        with self._lock:  # concurrent demand never loads twice
            if self.state is ModelState.LOADED:
                return True
            if self.state is ModelState.FAILED and self._clock() < self.next_retry_at:
                return False
            self.state = ModelState.LOADING
            started = time.monotonic()
            log.info("model_loading", generator=self.name)
            try:
                self.generator.load()
            except Exception as exc:
                self.last_error = classify(exc)
                self.failures += 1
                self.state = ModelState.FAILED
                self.next_retry_at = self._clock() + self._retry
                log.warning(
                    "model_load_failed",
                    generator=self.name,
                    error_type=self.last_error.error_type,
                    error=self.last_error.message,
                    retry_in=self._retry,
                )
                self._retry = min(self._retry * 2, MAX_LOAD_RETRY_SECONDS)
                return False
            self.load_seconds = time.monotonic() - started
            self.state = ModelState.LOADED
            self._retry = self._base_retry
            self.last_error = None
            log.info("model_loaded", generator=self.name, seconds=round(self.load_seconds, 3))
            return True

    def unload(self) -> None:
        with self._lock:
            if self.generator is not None and self.state is ModelState.LOADED:
                self.generator.unload()
                self.state = ModelState.UNLOADED

    def status(self) -> dict[str, Any]:
        gen = self.generator
        out: dict[str, Any] = {
            "state": self.state.value,
            "loaded": self.state is ModelState.LOADED,
            "available": self.state is not ModelState.UNAVAILABLE,
            "reason": self.reason,
        }
        if gen is not None:
            out |= {
                "caption_type": gen.caption_type,
                "weight": gen.weight.value,
                "version": gen.version,
                "description": gen.description,
            }
        if self.load_seconds is not None:
            out["load_seconds"] = round(self.load_seconds, 3)
        if self.last_error is not None:
            out["last_error"] = {
                "error_type": self.last_error.error_type.value,
                "message": self.last_error.message,
                "retryable": self.last_error.retryable,
            }
        if self.state is ModelState.FAILED:
            out["next_retry_in_seconds"] = max(0.0, round(self.next_retry_at - self._clock(), 1))
        return out


class ModelManager:
    """Owns one slot per generator in use."""

    def __init__(self, slots: Iterable[ModelSlot]):
        self.slots = {s.name: s for s in slots}

    @classmethod
    def build(
        cls,
        names: Iterable[str],
        discovered: dict[str, Discovered],
        make_config: Callable[[str, type[Generator]], Any],
        *,
        cache_dir: Any = None,
        retry_seconds: float = 60.0,
    ) -> ModelManager:
        slots = []
        for name in dict.fromkeys(names):
            found = discovered.get(name)
            if found is None or found.cls is None:
                slots.append(
                    ModelSlot(name, None, reason=found.error if found else "unknown generator")
                )
                continue
            avail = found.availability()
            if not avail.ok:
                slots.append(ModelSlot(name, None, reason=avail.reason))
                continue
            gen = found.cls(make_config(name, found.cls), cache_dir=cache_dir)
            slots.append(ModelSlot(name, gen, retry_seconds=retry_seconds))
        return cls(slots)

    def get(self, name: str) -> ModelSlot | None:
        return self.slots.get(name)

    def preload(self, names: Iterable[str]) -> None:
        for name in names:
            if slot := self.slots.get(name):
                slot.ensure_loaded()

    def unload_all(self) -> None:
        for slot in self.slots.values():
            slot.unload()

    def status(self) -> dict[str, Any]:
        return {name: slot.status() for name, slot in self.slots.items()}
