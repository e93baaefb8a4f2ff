"""Model residency: which generators are in memory, when they load and unload.

One ``ModelSlot`` per generator in use, owned by the ``ModelManager``.

- Light generators (taggers) load at start (``worker.preload``) and stay warm
  (keep_alive -1 unless configured). Loading a light model is synchronous.
- Heavy generators load on the first job that needs them, in a background thread:
  the worker goes on with other generators and the heavy model's jobs wait in the
  queue (state ``loading``, with hub download progress in ``status``). One lock for
  all residency decisions: concurrent demand never loads one model twice.
- Idle lifetime per model (``keep_alive``, like Ollama's): seconds after the last
  batch; 0 = unload as soon as no batch of it is in the worker; -1 = never. The
  worker calls ``tick()`` each loop turn.
- ``residency.max_resident_heavy`` caps resident heavy models and
  ``residency.memory_budget_mb`` caps the sum of resident footprints (GPU memory
  where an NVIDIA driver is loaded, else RAM; learned from the first load, or the
  per-model ``memory_mb`` estimate). A model that does not fit evicts idle models,
  least recently used first; if none can go it waits (``waiting``) and its jobs
  stay queued. A busy model yields to a waiting one after ``min_resident_seconds``
  so that two heavy models with work take turns instead of starving or thrashing.
- Heavy models run in a child process (``daemon.residency.child``) that exits on
  unload: in-process unloading does not give the runtime's memory back
  (bench/README.md, "Memory after unload"). A crashed child is restarted on the next demand; an
  image that crashes it ``crash_attempts`` times ends ``dead`` as ``worker_crash``.
- At most one ``generate()`` at a time per model and per device.
- A circuit breaker per generator (``daemon.residency.breaker``): after N
  consecutive load or generation failures its jobs wait for a cool-down instead of
  burning attempts; a half-open probe closes it on success.

For the API: ``preload(name)``, ``unload(name)``, ``list()``, ``status()``,
``summary()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from daemon.config import ModelPolicy, ResidencyConfig, Settings
from daemon.errors import (
    CaptionError,
    Classified,
    ErrorType,
    WorkerCrashError,
    classify,
    is_out_of_memory,
)
from daemon.generators.base import Generator, WeightClass
from daemon.generators.registry import Discovered
from daemon.residency import progress
from daemon.residency.breaker import BreakerState, CircuitBreaker
from daemon.residency.child import ChildGenerator
from daemon.residency.memory import cuda_present, gpu_footprint_mb, rss_mb

log = structlog.get_logger(__name__)

MAX_LOAD_RETRY_SECONDS = 3600.0
EVICT_GRACE_SECONDS = 2.0  # a model used this recently probably has its next batch coming
WAITER_FRESH_SECONDS = 5.0  # a waiting model counts as waiting while it keeps asking


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
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    ):
        self.name = name
        self.raw = generator
        self.generator = ManagedGenerator(self, generator) if generator is not None else None
        self.weight = generator.weight if generator is not None else WeightClass.LIGHT
        isolated = bool(getattr(generator, "isolated", False))
        if policy is None:
            heavy = self.weight is WeightClass.HEAVY
            policy = Policy(keep_alive=300.0 if heavy else -1.0, isolate=isolated)
        self.policy = policy
        self.breaker = breaker or CircuitBreaker()
        self._manager: ModelManager | None = None
        self._guard: threading.RLock = threading.RLock()  # the manager's, once attached
        self._run_lock = threading.Lock()  # one generate() at a time
        self._loading: threading.Event | None = None
        self._clock = clock
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
        if self.breaker.state is BreakerState.OPEN:
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
                if not self.breaker.allows():
                    return False
                if self.state is ModelState.FAILED and self._clock() < self.next_retry_at:
                    return False
                room, why = (True, "") if self._manager is None else self._manager._make_room(self)
                if not room:
                    if self.state is not ModelState.WAITING:
                        log.info("model_waiting_for_room", generator=self.name, why=why)
                    self.state = ModelState.WAITING
                    self.waiting_for = why
                    self.waiting_asked = time.monotonic()
                    return False
                self.state = ModelState.LOADING
                self.waiting_for = ""
                self.progress = None
                self.loading_since = time.monotonic()
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

    def _on_progress(self, p: dict[str, Any]) -> None:
        self.progress = p

    def _load(self, event: threading.Event) -> None:
        raw = self.raw
        assert raw is not None
        started = time.monotonic()
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
        finally:
            event.set()
        now = time.monotonic()
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
                if not self.breaker.allows():
                    raise ModelWaitError(f"{self.name}: circuit open ({self.why_not()})")
                present = self.state is ModelState.LOADED and raw.loaded
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
                    self.last_used = time.monotonic()
                    self.batches += 1

    def _generation_failed(self, exc: BaseException, size: int) -> None:
        c = classify(exc)
        with self._guard:
            if isinstance(exc, WorkerCrashError):
                self.crashes += 1
                self._gone(c.message)
            if is_out_of_memory(exc) and size > 1:
                return  # the worker halves the batch: not a failure of the model yet
            if c.error_type in _PER_IMAGE or (
                c.error_type is ErrorType.GENERATION and not c.retryable
            ):
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
        idle = None if self.last_used is None else round(time.monotonic() - self.last_used, 1)
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
        now = time.monotonic()
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


# A job that crashed the model's process crash_attempts times goes dead at once.
# (The queue's own fail() only goes dead after max_attempts; this belongs in JobQueue.)
_BURY = """
UPDATE jobs SET state = 'dead', lease_until = NULL, error_type = ?1, error_message = ?2,
    updated_at = ?3
WHERE id = ?4 AND state = 'leased' AND NOT rerun
"""


class ModelManager:
    """Owns one slot per generator in use and every residency decision."""

    def __init__(
        self,
        slots: Iterable[ModelSlot],
        *,
        max_resident_heavy: int = 1,
        memory_budget_mb: float = 0.0,
        min_resident_seconds: float = 300.0,
        crash_attempts: int = 3,
        memory_kind: str | None = None,
    ):
        self._lock = threading.RLock()
        self.slots = {s.name: s for s in slots}
        for s in self.slots.values():
            s._manager = self
            s._guard = self._lock
        self.max_resident_heavy = max_resident_heavy
        self.memory_budget_mb = memory_budget_mb
        self.min_resident_seconds = min_resident_seconds
        self.crash_attempts = crash_attempts
        self.memory_kind = memory_kind or ("gpu" if cuda_present() else "ram")
        self._device_locks: dict[str, threading.Lock] = {}
        self._busy_names: frozenset[str] = frozenset()
        self._crashes: OrderedDict[int, int] = OrderedDict()

    @classmethod
    def build(
        cls,
        names: Iterable[str],
        discovered: dict[str, Discovered],
        make_config: Callable[[str, type[Generator]], Any],
        *,
        cache_dir: Any = None,
        retry_seconds: float = 60.0,
        residency: ResidencyConfig | None = None,
        log_args: tuple[str, str] | None = None,
        generate_timeout: float | None = None,
    ) -> ModelManager:
        """``generate_timeout``: a child process whose generate() takes longer is killed
        and restarted (its batch is retried image by image); None = no limit."""
        res = residency or ResidencyConfig()
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
            spec = res.models.get(name) or ModelPolicy()
            config = make_config(name, found.cls)
            # Weight from an instance: settings may make a generator heavy (multi_person).
            local = found.cls(config, cache_dir=cache_dir)
            heavy = local.weight is WeightClass.HEAVY
            isolate = spec.isolate if spec.isolate is not None else heavy and res.isolate_heavy
            keep = (
                spec.keep_alive
                if spec.keep_alive is not None
                else (res.keep_alive if heavy else -1.0)
            )
            gen: Generator | ChildGenerator
            if isolate:
                gen = ChildGenerator(
                    found.cls,
                    config,
                    cache_dir=cache_dir,
                    log_args=log_args,
                    generate_timeout=generate_timeout,
                )
            else:
                gen = local
            slots.append(
                ModelSlot(
                    name,
                    gen,
                    retry_seconds=retry_seconds,
                    policy=Policy(keep, spec.memory_mb, isolate),
                    breaker=CircuitBreaker(res.breaker_threshold, res.breaker_cooldown_seconds),
                )
            )
        return cls(
            slots,
            max_resident_heavy=res.max_resident_heavy,
            memory_budget_mb=res.memory_budget_mb,
            min_resident_seconds=res.min_resident_seconds,
            crash_attempts=res.crash_attempts,
        )

    @classmethod
    def for_settings(cls, settings: Settings, names: Iterable[str]) -> ModelManager:
        """The slots for ``names`` as the configuration describes them (daemon and
        ``caption --once`` alike)."""
        from daemon.config import discover_generators, generator_config  # config -> registry

        return cls.build(
            names,
            discover_generators(settings),
            lambda name, gen_cls: generator_config(settings, name, gen_cls),
            cache_dir=settings.cache_dir,
            retry_seconds=settings.worker.load_retry_seconds,
            residency=settings.residency,
            log_args=(settings.log_level, settings.log_format),
            generate_timeout=settings.worker.stall_seconds,
        )

    def get(self, name: str) -> ModelSlot | None:
        return self.slots.get(name)

    def device_lock(self, device: str) -> threading.Lock:
        with self._lock:
            return self._device_locks.setdefault(device, threading.Lock())

    # -- residency decisions (under self._lock) --------------------------------------
    def _evictable(self, s: ModelSlot, now: float) -> bool:
        if s.state is not ModelState.LOADED or s.busy or s._run_lock.locked():
            return False
        if s.keep_alive < 0 or s.name in self._busy_names:
            return False  # pinned, or a batch of it is claimed
        idle = now - (s.last_used or 0.0)
        resident_for = now - (s.loaded_at or 0.0)
        return idle >= EVICT_GRACE_SECONDS or resident_for >= self.min_resident_seconds

    def _make_room(self, slot: ModelSlot) -> tuple[bool, str]:
        need = slot.expected_mb()
        for _ in range(len(self.slots) + 1):
            now = time.monotonic()
            others = [s for s in self.slots.values() if s is not slot and s.resident]
            heavy = [s for s in others if s.heavy]
            over_cap = slot.heavy and len(heavy) >= self.max_resident_heavy
            used = sum(s.expected_mb() or 0.0 for s in others)
            budget = self.memory_budget_mb
            over_budget = bool(budget) and bool(others) and used + (need or 0.0) > budget
            if not over_cap and not over_budget:
                return True, ""
            pool = heavy if over_cap else others
            candidates = [s for s in pool if self._evictable(s, now)]
            victim = min(candidates, key=lambda s: s.last_used or 0.0, default=None)
            if victim is None or not victim._try_evict(f"evicted for {slot.name}"):
                if over_cap:
                    names = ", ".join(s.name for s in heavy)
                    return False, (
                        f"{len(heavy)} of {self.max_resident_heavy} heavy models resident "
                        f"and busy ({names})"
                    )
                return False, (
                    f"needs {need or 0:.0f} MB; {max(0.0, budget - used):.0f} of the "
                    f"{budget:.0f} MB budget free and no idle model to evict"
                )
            log.info("model_evicted", generator=victim.name, for_generator=slot.name)
        return False, "no room"

    def _after_load(self, slot: ModelSlot) -> None:
        """A load measured more than estimated: evict idle models until within budget."""
        budget = self.memory_budget_mb
        if not budget:
            return
        with self._lock:
            while True:
                resident = [s for s in self.slots.values() if s.resident]
                used = sum(s.expected_mb() or 0.0 for s in resident)
                if used <= budget:
                    return
                now = time.monotonic()
                pool = [s for s in resident if s is not slot and self._evictable(s, now)]
                victim = min(pool, key=lambda s: s.last_used or 0.0, default=None)
                if victim is None or not victim._try_evict(f"over budget after {slot.name}"):
                    log.warning("memory_budget_exceeded", used_mb=round(used), budget_mb=budget)
                    return

    def _should_yield(self, slot: ModelSlot) -> bool:
        """A resident model past its time slice stops taking new batches while another
        model waits for its room, so that it goes idle and can be evicted."""
        if slot.keep_alive < 0 or slot.loaded_at is None:
            return False
        now = time.monotonic()
        if now - slot.loaded_at < self.min_resident_seconds:
            return False
        for s in self.slots.values():
            if (
                s is not slot
                and s.state is ModelState.WAITING
                and s.waiting_asked is not None
                and now - s.waiting_asked < WAITER_FRESH_SECONDS
                and ((s.heavy and slot.heavy) or self.memory_budget_mb)
            ):
                return True
        return False

    # -- called by the worker --------------------------------------------------------
    def tick(self, busy: Iterable[str] = ()) -> None:
        """Each worker loop turn: unload models idle past their keep_alive, notice
        model processes that died while idle. ``busy``: generators with a batch
        claimed in the worker (not unloaded under it)."""
        now = time.monotonic()
        with self._lock:
            self._busy_names = frozenset(busy)
            for s in self.slots.values():
                if s.state is not ModelState.LOADED or s.raw is None:
                    continue
                if isinstance(s.raw, ChildGenerator) and (why := s.raw.exited()):
                    s.crashes += 1
                    s._gone(f"model process {why}")
                    continue
                if s.busy or s.name in self._busy_names or s._run_lock.locked():
                    continue
                ka = s.keep_alive
                if ka >= 0 and now - (s.last_used or now) >= ka:
                    s._try_evict("idle" if ka else "keep_alive 0")

    def job_failed(self, queue: Any, job_id: int, exc: BaseException) -> bool:
        """Residency's part in failing a job. True: handled, the job went back to the
        queue without using an attempt (the model cannot run now). A crash of the
        model's process is counted per job; at ``crash_attempts`` the job goes dead as
        ``worker_crash`` (the worker's own fail() then finds it dead)."""
        if isinstance(exc, ModelWaitError):
            queue.release([job_id], delay=exc.delay)
            return True
        if isinstance(exc, WorkerCrashError):
            with self._lock:
                n = self._crashes.pop(job_id, 0) + 1
                if n < self.crash_attempts:
                    self._crashes[job_id] = n
                    while len(self._crashes) > 10_000:
                        self._crashes.popitem(last=False)
            if n >= self.crash_attempts:
                msg = f"crashed the model process {n} times; last: {exc}"
                queue.db.conn.execute(
                    _BURY, (ErrorType.WORKER_CRASH.value, msg, queue.clock(), job_id)
                )
        return False

    # -- for the API -----------------------------------------------------------------
    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise KeyError(f"unknown generator {name!r} (in use: {sorted(self.slots)})")
        return slot

    def preload(
        self, name: str, *, wait: bool = False, keep_alive: float | None = None
    ) -> dict[str, Any]:
        """Load ``name`` now (an explicit request skips the load retry back-off and the
        breaker's cool-down). ``keep_alive`` overrides the model's idle lifetime until
        it is unloaded (-1: keep it). ``wait``: return once loaded or failed.
        Returns the model's status; KeyError for a generator not in use."""
        slot = self._slot(name)
        with self._lock:
            if keep_alive is not None:
                slot.keep_alive_override = -1.0 if keep_alive < 0 else float(keep_alive)
            slot.next_retry_at = 0.0
            if slot.breaker.state is BreakerState.OPEN:
                slot.breaker.state = BreakerState.HALF_OPEN
            if slot.state is ModelState.LOADED:
                slot.last_used = time.monotonic()
        slot.ensure_loaded(wait=wait)
        return self._entry(slot)

    def unload(self, name: str) -> dict[str, Any]:
        """Unload ``name`` now, after its running batch (if any). A model still loading
        is unloaded when the load ends. Its jobs reload it when they come up (use
        keep_alive or pause the queue to keep it out). Returns its status."""
        slot = self._slot(name)
        slot.unload("requested")
        return self._entry(slot)

    def list(self) -> list[dict[str, Any]]:
        """The models in memory or loading, most recently used first. Like
        :meth:`summary`, read without the manager's lock."""
        resident = [s for s in self.slots.values() if s.resident]
        resident.sort(key=lambda s: -(s.last_used or 0.0))
        return [self._entry(s) for s in resident]

    def _entry(self, slot: ModelSlot) -> dict[str, Any]:
        return {"name": slot.name, **slot.status()}

    def summary(self) -> dict[str, Any]:
        """Residency for /status. Read without the manager's lock, which is held while
        a model is evicted: stopping a model process may take ``stop_timeout`` plus
        6 s, and status must answer meanwhile (a snapshot of plain attributes; at worst
        it shows a model mid-transition)."""
        resident = [s for s in self.slots.values() if s.resident]
        return {
            "memory_kind": self.memory_kind,
            "memory_budget_mb": self.memory_budget_mb or None,
            "memory_used_mb": round(sum(s.expected_mb() or 0.0 for s in resident), 1),
            "max_resident_heavy": self.max_resident_heavy,
            "resident": [s.name for s in resident],
            "resident_heavy": sum(1 for s in resident if s.heavy),
        }

    def unload_all(self) -> None:
        for slot in self.slots.values():
            with self._lock:
                slot.unload_after_load = slot.state is ModelState.LOADING
                slot._unload_locked("shutdown")

    def status(self) -> dict[str, Any]:
        return {name: slot.status() for name, slot in self.slots.items()}
