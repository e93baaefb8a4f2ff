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
  burning attempts; a half-open probe closes it on success. Generators whose work goes
  to the same remote server (``Generator.server``) share one breaker.
- Remote generators (``Generator.remote``: the model runs on a server) are heavy in
  scheduling (loaded on demand in the background, unloaded when idle) but run in this
  process and take no room: they count against neither ``max_resident_heavy`` nor
  the memory budget. A job whose request failed for the network (server down, 429,
  5xx) goes back to the queue without using an attempt, after ``Retry-After`` or the
  breaker's cool-down (at most ``NETWORK_WAITS_PER_JOB`` times per job, so that one
  image a server always fails on still ends).

For the API: ``preload(name)``, ``unload(name)``, ``list()``, ``status()``,
``summary()``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import structlog

from daemon.config import ModelPolicy, ResidencyConfig, Settings
from daemon.errors import ErrorType, NetworkError, WorkerCrashError
from daemon.generators.base import Generator, WeightClass
from daemon.generators.registry import Discovered
from daemon.residency.breaker import CircuitBreaker
from daemon.residency.child import ChildGenerator
from daemon.residency.memory import cuda_present
from daemon.residency.slot import ModelSlot, ModelState, ModelWaitError, Policy

log = structlog.get_logger(__name__)

EVICT_GRACE_SECONDS = 2.0  # a model used this recently probably has its next batch coming
WAITER_FRESH_SECONDS = 5.0  # a waiting model counts as waiting while it keeps asking
# Network failures a job may wait out without using an attempt; then they count.
NETWORK_WAITS_PER_JOB = 10


def _kind(gen: Any, config: Any) -> tuple[str, WeightClass]:
    """(caption type, weight class) the generator would have with ``config``."""
    cls = getattr(gen, "cls", None) or type(gen)
    probe = cls(config)  # constructors only keep the config: nothing is loaded
    return probe.caption_type, WeightClass(probe.weight)


class ReconfigureError(Exception):
    """New settings cannot be applied to a running generator (a message for a person)."""


class CrashCounter(Protocol):
    """What residency asks of the queue when a job's image crashes the model process."""

    def release(self, job_ids: Sequence[int], delay: float = 0.0) -> None: ...
    def record_crash(self, job_id: int) -> int: ...
    def bury(self, job_id: int, error_type: str, message: str) -> bool: ...


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
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.RLock()
        self._monotonic = monotonic  # time slices, keep_alive, eviction (tests inject one)
        self.slots = {s.name: s for s in slots}
        for s in self.slots.values():
            s._manager = self
            s._guard = self._lock
            s._monotonic = monotonic
        self.max_resident_heavy = max_resident_heavy
        self.memory_budget_mb = memory_budget_mb
        self.min_resident_seconds = min_resident_seconds
        self.crash_attempts = crash_attempts
        self.memory_kind = memory_kind or ("gpu" if cuda_present() else "ram")
        self._device_locks: dict[str, threading.Lock] = {}
        self._busy_names: frozenset[str] = frozenset()
        self._make_slot: Callable[[str, Any], ModelSlot] | None = None
        self._network_waits: OrderedDict[int, int] = OrderedDict()

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
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> ModelManager:
        """``generate_timeout``: a child process whose generate() takes longer is killed
        and restarted (its batch is retried image by image); None = no limit.
        ``clock`` (load retries) and ``monotonic`` (residency, breaker) are injectable."""
        res = residency or ResidencyConfig()
        breakers: dict[str, CircuitBreaker] = {}  # one per remote server

        def make_slot(name: str, config: Any = None) -> ModelSlot:
            found = discovered.get(name)
            if found is None or found.cls is None:
                return ModelSlot(name, None, reason=found.error if found else "unknown generator")
            avail = found.availability()
            if not avail.ok:
                return ModelSlot(name, None, reason=avail.reason)
            spec = res.models.get(name) or ModelPolicy()
            if config is None:
                config = make_config(name, found.cls)
            # Weight from an instance: settings may make a generator heavy (multi_person).
            local = found.cls(config, cache_dir=cache_dir)
            heavy = local.weight is WeightClass.HEAVY
            isolate = (
                spec.isolate
                if spec.isolate is not None
                else heavy and res.isolate_heavy and not local.remote
            )
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
            breaker = CircuitBreaker(
                res.breaker_threshold, res.breaker_cooldown_seconds, clock=monotonic
            )
            if (server := local.server) is not None:
                breaker = breakers.setdefault(server, breaker)
            return ModelSlot(
                name,
                gen,
                retry_seconds=retry_seconds,
                clock=clock,
                policy=Policy(keep, spec.memory_mb, isolate),
                breaker=breaker,
            )

        manager = cls(
            [make_slot(name) for name in dict.fromkeys(names)],
            max_resident_heavy=res.max_resident_heavy,
            memory_budget_mb=res.memory_budget_mb,
            min_resident_seconds=res.min_resident_seconds,
            crash_attempts=res.crash_attempts,
            monotonic=monotonic,
        )
        manager._make_slot = make_slot
        return manager

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
        if slot.remote:
            return True, ""  # holds no model here
        need = slot.expected_mb()
        for _ in range(len(self.slots) + 1):
            now = self._monotonic()
            others = [
                s for s in self.slots.values() if s is not slot and s.resident and not s.remote
            ]
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
                resident = [s for s in self.slots.values() if s.resident and not s.remote]
                used = sum(s.expected_mb() or 0.0 for s in resident)
                if used <= budget:
                    return
                now = self._monotonic()
                pool = [s for s in resident if s is not slot and self._evictable(s, now)]
                victim = min(pool, key=lambda s: s.last_used or 0.0, default=None)
                if victim is None or not victim._try_evict(f"over budget after {slot.name}"):
                    log.warning("memory_budget_exceeded", used_mb=round(used), budget_mb=budget)
                    return

    def _should_yield(self, slot: ModelSlot) -> bool:
        """A resident model past its time slice stops taking new batches while another
        model waits for its room, so that it goes idle and can be evicted."""
        if slot.keep_alive < 0 or slot.loaded_at is None or slot.remote:
            return False
        now = self._monotonic()
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
        now = self._monotonic()
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

    def job_failed(
        self, queue: CrashCounter, job_id: int, exc: BaseException, generator: str | None = None
    ) -> bool:
        """Residency's part in failing a job. True: handled, the job went back to the
        queue without using an attempt (the model cannot run now, or its server cannot
        be reached). A crash of the model's process is counted with the job (across
        restarts of the daemon); at
        ``crash_attempts`` the job goes dead as ``worker_crash`` (the worker's own
        fail() then finds it dead)."""
        if isinstance(exc, ModelWaitError):
            queue.release([job_id], delay=exc.delay)
            return True
        if isinstance(exc, NetworkError) and self._network_wait(job_id):
            slot = self.slots.get(generator) if generator else None
            delay = exc.retry_after
            if delay is None:
                delay = slot.breaker.cooldown if slot is not None else 0.0
            queue.release([job_id], delay=delay)
            log.info(
                "job_waiting_for_server",
                job_id=job_id,
                generator=generator,
                error=str(exc),
                retry_in=round(delay, 1),
            )
            return True
        if isinstance(exc, WorkerCrashError):
            n = queue.record_crash(job_id)
            if n >= self.crash_attempts:
                msg = f"crashed the model process {n} times; last: {exc}"
                queue.bury(job_id, ErrorType.WORKER_CRASH.value, msg)
        return False

    def reconfigure(self, name: str, config: Any) -> bool:
        """Give generator ``name`` new settings, unloaded: it loads again on its next
        job. Settings that change its caption type or weight class (multi_person's
        ``mode``) rebuild its slot. Call between batches (the worker's ``call_soon``).
        True when the generator object changed (the caller rebuilds its pipeline)."""
        slot = self._slot(name)
        raw = slot.raw
        if raw is None:
            raise ReconfigureError(f"generator {name} is unavailable: {slot.reason}")
        fresh = _kind(raw, config)
        if fresh == (raw.caption_type, WeightClass(raw.weight)):
            slot.reconfigure(config)
            return False
        if self._make_slot is None:
            raise ReconfigureError(f"{name}: a change of caption type or weight needs a restart")
        new = self._make_slot(name, config)
        with self._lock:
            slot.unload("reconfigured")
            new._manager = self
            new._guard = self._lock
            self.slots[name] = new
        log.info(
            "generator_rebuilt",
            generator=name,
            caption_type=new.generator.caption_type if new.generator else None,
            weight=new.weight.value,
        )
        return True

    def _network_wait(self, job_id: int) -> bool:
        """Count one network failure of ``job_id``; True while it may still wait."""
        with self._lock:
            n = self._network_waits.pop(job_id, 0) + 1
            self._network_waits[job_id] = n
            while len(self._network_waits) > 10_000:
                self._network_waits.popitem(last=False)
        return n <= NETWORK_WAITS_PER_JOB

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
            slot.breaker.half_open()
            if slot.state is ModelState.LOADED:
                slot.last_used = self._monotonic()
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
            "resident_heavy": sum(1 for s in resident if s.heavy and not s.remote),
        }

    def wait_for_loads(self, timeout: float | None = None) -> bool:
        """Wait for the in-process loads under way to end (a process must not exit in
        the middle of one); False if one still runs after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in self.slots.values():
            if slot.isolated:  # a child process: it dies with us, harmlessly
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not slot.wait_for_load(left):
                return False
        return True

    def unload_all(self) -> None:
        for slot in self.slots.values():
            with self._lock:
                slot.unload_after_load = slot.state is ModelState.LOADING
                slot._unload_locked("shutdown")

    def status(self) -> dict[str, Any]:
        return {name: slot.status() for name, slot in self.slots.items()}
