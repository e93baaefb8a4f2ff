"""One generator's place in memory: ``ModelSlot`` loads it under a lock, runs its
batches one at a time, feeds its circuit breaker and unloads it; ``ManagedGenerator``
is what the worker holds. Residency decisions across slots (room, eviction, time
slices) belong to the manager (:mod:`daemon.residency.manager`), reached through the
small :class:`Residency` interface."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import structlog

from daemon import faults
from daemon.errors import (
    CaptionError,
    Classified,
    ErrorType,
    WorkerCrashError,
    classify,
    is_out_of_memory,
)
from daemon.generators.base import Generator, WeightClass
from daemon.residency import progress
from daemon.residency.breaker import BreakerState, CircuitBreaker
from daemon.residency.child import ChildGenerator
from daemon.residency.memory import gpu_footprint_mb, rss_mb, trim_heap

log = structlog.get_logger(__name__)

MAX_LOAD_RETRY_SECONDS = 3600.0


class Residency(Protocol):
    """What a slot asks of the manager that owns it."""

    memory_kind: str

    def device_lock(self, device: str) -> threading.Lock: ...
    def _make_room(self, slot: ModelSlot) -> tuple[bool, str]: ...
    def _after_load(self, slot: ModelSlot) -> None: ...
    def _should_yield(self, slot: ModelSlot) -> bool: ...


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    WAITING = "waiting"  # wants to load; no room (cap or memory budget) yet
    FAILED = "failed"  # will retry at next_retry_at
    UNAVAILABLE = "unavailable"  # is_available() said no, or the module did not import


class ModelWaitError(CaptionError):
    """The model cannot run this job now (circuit open, not loaded and no room): the
    job goes back to the queue without counting an attempt."""

    error_type = ErrorType.MODEL_LOADING
    retryable = True

    def __init__(self, message: str, delay: float = 0.0):
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True, slots=True)
class Policy:
    keep_alive: float = -1.0  # seconds idle before unloading; 0 = after the batch; <0 never
    memory_mb: float | None = None  # footprint estimate until one load measured it
    isolate: bool = False  # runs in a child process


def _release_memory() -> None:
    """After an in-process unload: collect, and hand glibc's free heap back."""
    gc.collect()
    trim_heap()


# Failures that say nothing about the model's health: they do not feed the breaker.
_PER_IMAGE = frozenset(
    {ErrorType.BAD_IMAGE, ErrorType.IO, ErrorType.CAPTION_EXISTS, ErrorType.CAPTION_EDITED}
)


class ManagedGenerator:
    """What the worker holds as ``slot.generator``: the generator (or its child-process
    proxy) with the slot's bookkeeping around ``prepare()`` and ``generate()``.
    Everything else (``name``, ``caption_type``, ``config``, ``draft_size``...) is
    the generator's own."""

    def __init__(self, slot: ModelSlot, inner: Any):
        self._slot = slot
        self._inner = inner

    @property
    def name(self) -> str:
        """The slot's name: a named instance (``use = ...``) is not its class's name."""
        return self._slot.name

    @property
    def inner(self) -> Any:
        return self._inner

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    def prepare(self, item: Any) -> Any:
        inner = self._inner
        # unloaded (idle, evicted, API) between the claim and this image?
        if (
            not getattr(inner, "isolated", False)
            and not inner.loaded
            and not self._slot.ensure_loaded(wait=True)
        ):
            raise ModelWaitError(f"{self._slot.name} is not loaded: {self._slot.why_not()}")
        return inner.prepare(item)

    def generate(self, batch: Sequence[Any]) -> list[str]:
        return self._slot.run(batch)


class ModelSlot:
    def __init__(
        self,
        name: str,
        generator: Generator | ChildGenerator | None,
        *,
        reason: str = "",
        retry_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        policy: Policy | None = None,
        breaker: CircuitBreaker | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.raw = generator
        self.generator = ManagedGenerator(self, generator) if generator is not None else None
        self.weight = generator.weight if generator is not None else WeightClass.LIGHT
        self.remote = bool(getattr(generator, "remote", False))  # the model runs on a server
        isolated = bool(getattr(generator, "isolated", False))
        if policy is None:
            heavy = self.weight is WeightClass.HEAVY
            policy = Policy(keep_alive=300.0 if heavy else -1.0, isolate=isolated)
        self.policy = policy
        self.breaker = breaker or CircuitBreaker()
        self._manager: Residency | None = None
        self._guard: threading.RLock = threading.RLock()  # the manager's, once attached
        self._run_lock = threading.Lock()  # one generate() at a time
        self._loading: threading.Event | None = None
        self._clock = clock  # wall clock: load retries
        self._monotonic = monotonic  # residency times (the manager's, once attached)
        self._base_retry = retry_seconds
        self._retry = retry_seconds
        self.state = ModelState.UNAVAILABLE if generator is None else ModelState.UNLOADED
        self.reason = reason
        self.last_error: Classified | None = None
        self.next_retry_at = 0.0
        self.load_seconds: float | None = None
        self.failures = 0  # failed loads
        # residency
        self.busy = False
        self.loaded_at: float | None = None
        self.last_used: float | None = None
        self.loading_since: float | None = None
        self.waiting_for = ""
        self.waiting_asked: float | None = None
        self.progress: dict[str, Any] | None = None
        self.footprint_mb: float | None = None
        self.keep_alive_override: float | None = None
        self.unload_after_load = False
        self.last_unload = ""
        self.loads = self.unloads = self.crashes = self.batches = 0

    # -- properties ----------------------------------------------------------------
    @property
    def heavy(self) -> bool:
        return self.weight is WeightClass.HEAVY

    @property
    def isolated(self) -> bool:
        return isinstance(self.raw, ChildGenerator)

    @property
    def probing(self) -> bool:
        """The circuit breaker is half-open: the next batch is a probe of one image."""
        return self.breaker.state is BreakerState.HALF_OPEN

    @property
    def keep_alive(self) -> float:
        ka = self.keep_alive_override
        return self.policy.keep_alive if ka is None else ka

    @property
    def resident(self) -> bool:
        return self.state in (ModelState.LOADED, ModelState.LOADING)

    @property
    def device(self) -> str:
        cfg = getattr(self.raw, "config", None)
        dev = getattr(cfg, "device", None)
        return str(dev) if dev else "default"

    @property
    def ready(self) -> bool:
        with self._guard:
            return self._ready_now()

    def expected_mb(self) -> float | None:
        return self.footprint_mb if self.footprint_mb is not None else self.policy.memory_mb

    def why_not(self) -> str:
        if self.breaker.state is BreakerState.OPEN:
            return "circuit open"
        if self.state is ModelState.WAITING:
            return self.waiting_for
        if self.last_error is not None and self.state is ModelState.FAILED:
            return self.last_error.message
        return self.reason or self.state.value

    # -- loading -------------------------------------------------------------------
    def _ready_now(self) -> bool:
        if self.state is not ModelState.LOADED or self.raw is None:
            return False
        if not self.raw.loaded:  # e.g. the child process died while idle
            self._gone("the model process exited")
            return False
        if self.breaker.blocked():  # open; past its cool-down it turns half-open here
            return False
        return not (self._manager is not None and self._manager._should_yield(self))

    def ensure_loaded(self, *, wait: bool | None = None) -> bool:
        """Load if needed and allowed now; True when the generator is ready.

        ``wait``: load in this thread (or wait for the load under way). Default: light
        models load synchronously, heavy ones in the background (False until done).
        """
        if self.raw is None:
            return False
        blocking = (not self.heavy) if wait is None else wait
        mine = False
        with self._guard:
            if self._ready_now():
                return True
            if self.state is ModelState.LOADED:
                return False  # yielding to a waiting model, or circuit open
            if self.state is ModelState.LOADING:
                event = self._loading
            else:
                # every reason not to load first; the half-open probe is taken last
                if not self.breaker.may_try():
                    return False
                if self.state is ModelState.FAILED and self._clock() < self.next_retry_at:
                    return False
                room, why = (True, "") if self._manager is None else self._manager._make_room(self)
                if not room:
                    if self.state is not ModelState.WAITING:
                        log.info("model_waiting_for_room", generator=self.name, why=why)
                    self.state = ModelState.WAITING
                    self.waiting_for = why
                    self.waiting_asked = self._monotonic()
                    return False
                if not self.breaker.allows():
                    return False
                self.state = ModelState.LOADING
                self.waiting_for = ""
                self.progress = None
                self.loading_since = self._monotonic()
                event = self._loading = threading.Event()
                if blocking:
                    mine = True
                else:
                    threading.Thread(
                        target=self._load,
                        args=(event,),
                        name=f"captiond-load-{self.name}",
                        daemon=True,
                    ).start()
        if not blocking:
            return False
        if mine:
            self._load(event)
        elif event is not None:
            event.wait()
        with self._guard:
            return self._ready_now()

    def wait_for_load(self, timeout: float | None = None) -> bool:
        """Wait for a load under way to end, loaded or failed; False on the timeout.
        A process must not exit while a load runs in one of its threads: a native
        library (onnxruntime) aborts the interpreter's exit."""
        with self._guard:
            event = self._loading if self.state is ModelState.LOADING else None
        return event is None or event.wait(timeout)

    def _on_progress(self, p: dict[str, Any]) -> None:
        self.progress = p

    def _load(self, event: threading.Event) -> None:
        try:
            self._load_and_settle()
        finally:  # waiters wake to the load's end state (and its unload if one was asked)
            event.set()

    def _load_and_settle(self) -> None:
        raw = self.raw
        assert raw is not None
        started = self._monotonic()
        log.info("model_loading", generator=self.name, isolated=self.isolated)
        before = rss_mb() if not self.isolated else None
        gpu_before = gpu_footprint_mb() if not self.isolated else None
        try:
            if isinstance(raw, ChildGenerator):
                raw.on_progress = self._on_progress
                raw.load()
            else:
                with progress.reporting(self._on_progress):
                    raw.load()
            faults.point("model_load")  # in memory, not yet marked loaded (tests only)
        except BaseException as exc:
            c = classify(exc)
            with self._guard:
                self.last_error = c
                self.failures += 1
                self.state = ModelState.FAILED
                self.loading_since = None
                self.next_retry_at = self._clock() + self._retry
                opened = self.breaker.failure("load", c)
                self.unload_after_load = False
            log.warning(
                "model_load_failed",
                generator=self.name,
                error_type=c.error_type.value,
                error=c.message,
                retry_in=self._retry,
                breaker=self.breaker.state.value,
            )
            if opened:
                log.warning("circuit_opened", generator=self.name, kind="load", error=c.message)
            self._retry = min(self._retry * 2, MAX_LOAD_RETRY_SECONDS)
            return
        now = self._monotonic()
        with self._guard:
            self.load_seconds = now - started
            self.state = ModelState.LOADED
            self.loading_since = None
            self.loaded_at = self.last_used = now
            self.loads += 1
            self._retry = self._base_retry
            self.last_error = None
            self.progress = None
            self.footprint_mb = self._measure(before, gpu_before)
            self.breaker.success()
            unload_now = self.unload_after_load
            self.unload_after_load = False
        log.info(
            "model_loaded",
            generator=self.name,
            seconds=round(self.load_seconds, 3),
            memory_mb=None if self.footprint_mb is None else round(self.footprint_mb),
            pid=getattr(raw, "pid", None),
        )
        if unload_now:
            self.unload("requested while loading")
        elif self._manager is not None:
            self._manager._after_load(self)

    def _measure(self, rss_before: float | None, gpu_before: float | None) -> float | None:
        gpu = self._manager is not None and self._manager.memory_kind == "gpu"
        if isinstance(self.raw, ChildGenerator):
            fp = self.raw.footprint
            value = fp.get("gpu_mb") if gpu else fp.get("rss_mb")
            return value if value else self.footprint_mb
        if gpu:
            after = gpu_footprint_mb()
            if after is not None:
                return max(0.0, after - (gpu_before or 0.0))
            return self.footprint_mb
        after = rss_mb()
        if after is None or rss_before is None:
            return self.footprint_mb
        return max(0.0, after - rss_before)

    # -- running -------------------------------------------------------------------
    def run(self, batch: Sequence[Any]) -> list[str]:
        """generate() under the slot's bookkeeping: one at a time per model and device,
        reloading if the model went away since the batch was claimed, feeding the
        circuit breaker, marking the model used."""
        raw = self.raw
        assert raw is not None
        device_lock = (
            self._manager.device_lock(self.device)
            if self._manager is not None
            else contextlib.nullcontext()
        )
        with device_lock, self._run_lock:
            with self._guard:
                present = self.state is ModelState.LOADED and raw.loaded
                # a load (below) takes the breaker's probe itself; a loaded model takes it here
                if present and not self.breaker.allows():
                    raise ModelWaitError(f"{self.name}: circuit open ({self.why_not()})")
            if not present and not self.ensure_loaded(wait=True):
                raise ModelWaitError(f"{self.name} is not loaded: {self.why_not()}")
            with self._guard:
                self.busy = True
            try:
                out = raw.generate(batch)
            except BaseException as exc:
                self._generation_failed(exc, len(batch))
                raise
            else:
                with self._guard:
                    self.breaker.success()
                return out
            finally:
                with self._guard:
                    self.busy = False
                    self.last_used = self._monotonic()
                    self.batches += 1

    def _generation_failed(self, exc: BaseException, size: int) -> None:
        c = classify(exc)
        with self._guard:
            if isinstance(exc, WorkerCrashError):
                self.crashes += 1
                self._gone(c.message)
            if is_out_of_memory(exc) and size > 1:
                self.breaker.release()
                return  # the worker halves the batch: not a failure of the model yet
            if c.error_type in _PER_IMAGE or (
                c.error_type is ErrorType.GENERATION and not c.retryable
            ):
                self.breaker.release()
                return  # the image's fault (or its prompt's), not the model's
            opened = self.breaker.failure("generate", c)
            self.last_error = c
        if opened:
            log.warning("circuit_opened", generator=self.name, kind="generate", error=c.message)
            with self._guard:
                if self.state is ModelState.LOADED:
                    self._unload_locked("circuit opened")

    # -- unloading -----------------------------------------------------------------
    def _gone(self, why: str) -> None:
        """The model is no longer in memory without us unloading it (process died)."""
        if self.state is ModelState.LOADED:
            log.warning("model_process_lost", generator=self.name, why=why)
            with contextlib.suppress(Exception):
                self.raw.unload()  # type: ignore[union-attr]  # reaps what is left
            self.state = ModelState.UNLOADED
            self.loaded_at = None
            self.unloads += 1
            self.last_unload = why

    def _unload_locked(self, why: str) -> None:
        """Unload now; the caller holds the guard and knows no generate() runs."""
        if self.raw is None or self.state is not ModelState.LOADED:
            return
        try:
            self.raw.unload()
        except Exception:
            log.exception("model_unload_failed", generator=self.name)
        if not self.isolated:
            _release_memory()
        idle = None if self.last_used is None else round(self._monotonic() - self.last_used, 1)
        self.state = ModelState.UNLOADED
        self.loaded_at = None
        self.unloads += 1
        self.last_unload = why
        self.keep_alive_override = None
        log.info("model_unloaded", generator=self.name, reason=why, idle_seconds=idle)

    def unload(self, why: str = "requested") -> None:
        """Unload, after the running generate() (if any) finished."""
        with self._run_lock, self._guard:
            if self.state is ModelState.LOADING:
                self.unload_after_load = True
                return
            if self.state is ModelState.WAITING:
                self.state = ModelState.UNLOADED
            self._unload_locked(why)

    @property
    def config(self) -> Any:
        """The generator's settings (None when unavailable)."""
        return getattr(self.raw, "config", None)

    def reconfigure(self, config: Any) -> None:
        """New settings of the same kind (caption type, weight): unloaded after the
        running generate() (if any), so the next load reads them; a failed load is
        retried at once (the new settings may be the fix)."""
        raw = self.raw
        if raw is None:
            return
        self.unload("reconfigured")
        if isinstance(raw, ChildGenerator):
            raw.reconfigure(config)
        else:
            raw.config = config
        with self._guard:
            if self.state is ModelState.FAILED:
                self.next_retry_at = 0.0
            self._retry = self._base_retry

    def _try_evict(self, why: str) -> bool:
        """Unload if idle right now (guard held); False if a batch runs."""
        if not self._run_lock.acquire(blocking=False):
            return False
        try:
            if self.busy:
                return False
            self._unload_locked(why)
            return True
        finally:
            self._run_lock.release()

    # -- status --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Read without a lock (status must answer during a slow load or unload): each
        attribute is read once into a local, so a change mid-way shows a model in
        transition, never a None where a number was checked for."""
        gen = self.raw
        now = self._monotonic()
        state = self.state
        out: dict[str, Any] = {
            "state": state.value,
            "loaded": state is ModelState.LOADED,
            "available": state is not ModelState.UNAVAILABLE,
            "reason": self.reason,
        }
        if gen is not None:
            out |= {
                "caption_type": gen.caption_type,
                "weight": gen.weight.value,
                "version": gen.version,
                "description": gen.description,
                "isolated": self.isolated,
                "keep_alive": self.keep_alive,
                "breaker": self.breaker.status(),
                "loads": self.loads,
                "unloads": self.unloads,
                "crashes": self.crashes,
                "batches": self.batches,
            }
            if self.isolated:
                out["pid"] = gen.pid if state is ModelState.LOADED else None  # type: ignore[union-attr]
            if self.remote:
                out["remote"] = True
            with contextlib.suppress(Exception):  # status must answer
                if extra := gen.status_details():  # type: ignore[union-attr]
                    out["details"] = extra
        if (load_seconds := self.load_seconds) is not None:
            out["load_seconds"] = round(load_seconds, 3)
        if (footprint := self.footprint_mb) is not None:
            out["memory_mb"] = round(footprint, 1)
        elif self.policy.memory_mb is not None:
            out["memory_mb_estimate"] = self.policy.memory_mb
        if state is ModelState.LOADED and (last_used := self.last_used) is not None:
            idle = now - last_used
            busy, keep_alive = self.busy, self.keep_alive
            out["idle_seconds"] = round(idle, 1)
            if keep_alive >= 0 and not busy:
                out["unload_in_seconds"] = round(max(0.0, keep_alive - idle), 1)
            out["busy"] = busy
        if state is ModelState.LOADING:
            if (since := self.loading_since) is not None:
                out["loading_seconds"] = round(now - since, 1)
            if progress := self.progress:
                out["progress"] = dict(progress)
        if state is ModelState.WAITING:
            out["waiting_for"] = self.waiting_for
        if self.last_unload:
            out["last_unload"] = self.last_unload
        if (error := self.last_error) is not None:
            out["last_error"] = {
                "error_type": error.error_type.value,
                "message": error.message,
                "retryable": error.retryable,
            }
        if state is ModelState.FAILED:
            out["next_retry_in_seconds"] = max(0.0, round(self.next_retry_at - self._clock(), 1))
        return out
