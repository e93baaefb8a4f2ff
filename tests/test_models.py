"""ModelManager residency, in-process (no child processes): loading once under
concurrent demand, keep_alive, the heavy cap and the memory budget, the breaker,
download progress."""

from __future__ import annotations

import threading

import pytest

from daemon.config import ResidencyConfig
from daemon.generators.registry import Discovered
from daemon.residency.breaker import BreakerState
from daemon.residency.manager import ModelManager
from daemon.residency.slot import ModelState, ModelWaitError
from tests.daemonproc import wait_for
from tests.fakegen import EchoConfig, EchoGenerator
from tests.residency_gens import HeavyEcho, ProgressGenerator


def heavy(name: str, **attrs) -> type[HeavyEcho]:
    return type(f"Heavy_{name}", (HeavyEcho,), {"name": name, "loads": 0, **attrs})


class FakeClock:
    """Both of the manager's clocks in tests: time moves only when a test says so."""

    def __init__(self, now: float = 1024.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def manager(classes, *, retry_seconds=60.0, clock=None, **residency) -> ModelManager:
    res = ResidencyConfig(**{"isolate_heavy": False, "min_resident_seconds": 0, **residency})
    return _build(classes, res, retry_seconds, clock)


def _build(classes, res, retry_seconds, clock=None):
    clocks = {} if clock is None else {"clock": clock, "monotonic": clock}
    m = ModelManager.build(
        [c.name for c in classes],
        {c.name: Discovered(c.name, c) for c in classes},
        lambda name, cls: EchoConfig(),
        retry_seconds=retry_seconds,
        residency=res,
        **clocks,
    )
    m.memory_kind = "ram"
    return m


def use(m: ModelManager, name: str) -> list[str]:
    slot = m.get(name)
    assert slot is not None and slot.generator is not None
    return slot.generator.generate([("a.png", (1, 1))])


def gated(name: str) -> tuple[type[HeavyEcho], threading.Event]:
    """A heavy model whose load() blocks until the returned event is set."""
    gate = threading.Event()

    def load(self) -> None:
        with self._count_lock:
            type(self).loads += 1
        gate.wait(10)
        EchoGenerator.load(self)

    return heavy(name, load=load), gate


def test_two_concurrent_demands_load_a_model_once():
    cls, gate = gated("vlm")
    m = manager([cls])
    slot = m.get("vlm")
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(slot.ensure_loaded(wait=True)))
        for _ in range(2)
    ]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: cls.loads == 1)  # one of them is loading (held at the gate)
        # the worker's own non-blocking demand meanwhile: it sees "loading", no second load
        assert slot.ensure_loaded() is False
        assert m.status()["vlm"]["state"] == "loading"
    finally:
        gate.set()
    for t in threads:
        t.join()
    assert results == [True, True]
    assert cls.loads == 1
    assert m.list()[0]["name"] == "vlm" and m.list()[0]["state"] == "loaded"


def test_heavy_model_loads_in_the_background():
    cls = heavy("vlm", load_delay=0.3)
    m = manager([cls])
    slot = m.get("vlm")
    assert slot.ensure_loaded() is False  # the worker goes on; the jobs wait
    assert slot.state is ModelState.LOADING
    wait_for(lambda: slot.ready)
    assert cls.loads == 1 and use(m, "vlm") == ["echo a.png 1x1"]


def test_idle_keep_alive_unloads_and_status_shows_it():
    clock = FakeClock()
    m = manager([heavy("vlm")], keep_alive=2.0, clock=clock)
    slot = m.get("vlm")
    assert slot.ensure_loaded(wait=True)
    use(m, "vlm")
    m.tick()
    st = m.status()["vlm"]
    assert st["state"] == "loaded" and st["unload_in_seconds"] == 2.0
    clock.now += 1.5
    m.tick()
    assert slot.state is ModelState.LOADED and m.status()["vlm"]["unload_in_seconds"] == 0.5
    clock.now += 0.5  # idle for exactly keep_alive
    m.tick(busy={"vlm"})  # a batch of it is claimed: it stays
    assert slot.state is ModelState.LOADED
    m.tick()
    st = m.status()["vlm"]
    assert st["state"] == "unloaded" and st["last_unload"] == "idle" and st["unloads"] == 1
    assert not slot.raw.loaded and m.list() == []


def test_keep_alive_zero_unloads_after_the_batch_and_minus_one_never():
    m = manager([heavy("zero"), heavy("never")], keep_alive=0, max_resident_heavy=2)
    m.get("never").policy = type(m.get("never").policy)(keep_alive=-1.0)
    for name in ("zero", "never"):
        assert m.get(name).ensure_loaded(wait=True)
        use(m, name)
    m.tick()
    assert m.get("zero").state is ModelState.UNLOADED
    assert m.get("never").state is ModelState.LOADED
    assert m.status()["never"]["keep_alive"] == -1.0


def test_a_model_reloads_when_a_claimed_batch_finds_it_unloaded():
    cls = heavy("vlm")
    m = manager([cls])
    assert m.get("vlm").ensure_loaded(wait=True)
    m.unload("vlm")
    assert use(m, "vlm") == ["echo a.png 1x1"]  # generate() loads it again
    assert cls.loads == 2


def test_the_cap_evicts_the_least_recently_used_idle_model():
    a, b, c = heavy("a"), heavy("b"), heavy("c")
    m = manager([a, b, c], max_resident_heavy=2)
    assert m.get("a").ensure_loaded(wait=True)
    assert m.get("b").ensure_loaded(wait=True)
    use(m, "b")
    use(m, "a")  # b is now the least recently used
    assert m.get("c").ensure_loaded(wait=True)
    states = {n: s["state"] for n, s in m.status().items()}
    assert states == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert m.status()["b"]["last_unload"] == "evicted for c"
    assert m.summary()["resident_heavy"] == 2


def test_a_busy_model_is_not_evicted_and_the_newcomer_waits():
    a, b = heavy("a"), heavy("b")
    m = manager([a, b], max_resident_heavy=1)
    assert m.get("a").ensure_loaded(wait=True)
    m.tick(busy={"a"})  # a batch of a is claimed in the worker
    assert m.get("b").ensure_loaded(wait=True) is False
    st = m.status()["b"]
    assert st["state"] == "waiting" and "heavy models resident" in st["waiting_for"]
    assert b.loads == 0
    m.tick()  # a's batches are done
    assert m.get("b").ensure_loaded(wait=True)
    assert m.get("a").state is ModelState.UNLOADED


def test_a_busy_model_yields_after_its_time_slice():
    clock = FakeClock()
    a, b = heavy("a"), heavy("b")
    m = manager([a, b], max_resident_heavy=1, min_resident_seconds=0.5, clock=clock)
    assert m.get("a").ensure_loaded(wait=True)
    m.tick(busy={"a"})
    assert not m.get("b").ensure_loaded(wait=True)  # waits
    clock.now += 0.25
    assert m.get("a").ready  # within its slice: a keeps taking batches
    clock.now += 0.25
    assert m.get("a").ready is False  # past its slice with b waiting: no new batches
    m.tick()
    use(m, "a")  # its claimed batch still runs
    m.tick()
    assert m.get("b").ensure_loaded(wait=True)
    assert m.get("a").state is ModelState.UNLOADED
    assert m.status()["a"]["last_unload"] == "evicted for b"


def test_a_waiter_that_stopped_asking_does_not_make_a_model_yield():
    """Only a model that keeps asking counts as waiting (WAITER_FRESH_SECONDS)."""
    from daemon.residency.manager import WAITER_FRESH_SECONDS

    clock = FakeClock()
    a, b = heavy("a"), heavy("b")
    m = manager([a, b], max_resident_heavy=1, min_resident_seconds=0.5, clock=clock)
    assert m.get("a").ensure_loaded(wait=True)
    m.tick(busy={"a"})
    assert not m.get("b").ensure_loaded(wait=True)
    clock.now += WAITER_FRESH_SECONDS
    assert m.get("a").ready  # b asked 5 s ago and not since
    assert not m.get("b").ensure_loaded(wait=True)  # b asks again (a is busy)
    assert m.get("a").ready is False


def test_the_memory_budget_evicts_the_least_recently_used_idle_model():
    a, b, c = heavy("a"), heavy("b"), heavy("c")
    m = manager(
        [a, b, c],
        max_resident_heavy=3,
        memory_budget_mb=100,
        models={"a": {"memory_mb": 40}, "b": {"memory_mb": 40}, "c": {"memory_mb": 50}},
    )
    for n in ("a", "b"):
        assert m.get(n).ensure_loaded(wait=True)
        m.get(n).footprint_mb = None  # keep the estimates (in-process RSS is noisy)
    use(m, "a")
    assert m.get("c").ensure_loaded(wait=True)  # 40 + 40 + 50 > 100: b goes (LRU)
    m.get("c").footprint_mb = None
    assert {n: s["state"] for n, s in m.status().items()} == {
        "a": "loaded",
        "b": "unloaded",
        "c": "loaded",
    }
    assert m.summary()["memory_used_mb"] == 90


def test_a_model_that_does_not_fit_waits_while_the_others_are_pinned():
    a, b = heavy("a"), heavy("b")
    m = manager(
        [a, b],
        max_resident_heavy=2,
        memory_budget_mb=100,
        models={"a": {"memory_mb": 80, "keep_alive": -1}, "b": {"memory_mb": 50}},
    )
    assert m.get("a").ensure_loaded(wait=True)
    m.get("a").footprint_mb = None
    assert m.get("b").ensure_loaded(wait=True) is False
    st = m.status()["b"]
    assert st["state"] == "waiting" and "budget" in st["waiting_for"]


def test_failed_loads_open_the_breaker_then_a_probe_closes_it():
    clock = FakeClock()  # values below are exact in binary: no rounding at the edges
    cls = heavy("vlm", fail_loads=True)
    m = manager(
        [cls], retry_seconds=0.25, breaker_threshold=2, breaker_cooldown_seconds=2.0, clock=clock
    )
    slot = m.get("vlm")
    assert slot.ensure_loaded(wait=True) is False
    assert slot.ensure_loaded(wait=True) is False and cls.loads == 1  # the retry is not due
    clock.now += 0.25
    assert slot.ensure_loaded(wait=True) is False and cls.loads == 2
    assert slot.breaker.state is BreakerState.OPEN
    br = m.status()["vlm"]["breaker"]
    assert (
        br["state"] == "open" and br["last_error"]["message"] == "RuntimeError: weights are corrupt"
    )
    clock.now += 1.75  # the retry is due (0.5 s after the doubling) but the circuit is open
    assert slot.ensure_loaded(wait=True) is False and cls.loads == 2  # no attempt while open
    with pytest.raises(ModelWaitError):
        slot.generator.generate([("a.png", (1, 1))])
    cls.fail_loads = False
    clock.now += 0.25  # the cool-down is over
    assert slot.ensure_loaded(wait=True)  # the half-open probe
    assert slot.breaker.state is BreakerState.CLOSED and cls.loads == 3


def test_the_half_open_probe_is_not_lost_when_no_attempt_is_made():
    """A probe taken and then not used (a load retry not yet due, a batch failing for
    the image's own fault, a model that was unloaded when the circuit opened) must
    not block the breaker: the server came back, and the next attempt probes."""
    from daemon.errors import BadImageError

    clock = FakeClock()
    cls = heavy("vlm")
    m = manager(
        [cls], retry_seconds=30.0, breaker_threshold=1, breaker_cooldown_seconds=2.0, clock=clock
    )
    slot = m.get("vlm")
    assert slot.ensure_loaded(wait=True)
    # the model's failure opens the circuit and unloads it
    cls.generate = lambda self, batch: (_ for _ in ()).throw(RuntimeError("CUDA error"))
    with pytest.raises(RuntimeError):
        use(m, "vlm")
    assert slot.breaker.state is BreakerState.OPEN and slot.state is ModelState.UNLOADED
    del cls.generate
    clock.now += 2.0  # cool-down over: half-open
    # a batch claimed before the circuit opened: the run loads (the probe) and succeeds
    assert use(m, "vlm") and slot.breaker.state is BreakerState.CLOSED

    # half-open with a loaded model: the image's own failure gives the probe back
    slot.breaker.state = BreakerState.HALF_OPEN  # a probe is due
    cls.generate = lambda self, batch: (_ for _ in ()).throw(BadImageError("truncated"))
    with pytest.raises(BadImageError):
        use(m, "vlm")
    assert slot.breaker.may_try()  # not held for the hour of the probe timeout
    del cls.generate
    assert use(m, "vlm") and slot.breaker.state is BreakerState.CLOSED

    # a failed load whose retry is not due yet does not take the probe
    cls.fail_loads = True
    slot.unload("test")
    slot.breaker.state = BreakerState.HALF_OPEN
    assert slot.ensure_loaded(wait=True) is False  # the load fails: open again
    assert slot.breaker.state is BreakerState.OPEN
    clock.now += slot.breaker.cooldown  # half-open, but the load retry is not due
    cls.fail_loads = False
    assert slot.ensure_loaded(wait=True) is False and slot.breaker.may_try()
    clock.now += 60.0
    assert slot.ensure_loaded(wait=True) and slot.breaker.state is BreakerState.CLOSED


def test_explicit_preload_and_unload():
    cls = heavy("vlm")
    m = manager([cls], keep_alive=0)
    st = m.preload("vlm", wait=True, keep_alive=-1)
    assert st["state"] == "loaded" and st["keep_alive"] == -1.0
    m.tick()
    assert m.get("vlm").state is ModelState.LOADED  # pinned by the preload
    assert m.unload("vlm")["state"] == "unloaded"
    assert m.status()["vlm"]["keep_alive"] == 0.0  # the override ends with the unload
    with pytest.raises(KeyError):
        m.preload("nope")


def test_download_progress_shows_while_loading():
    m = _build([ProgressGenerator], ResidencyConfig(isolate_heavy=False), 60.0)
    ProgressGenerator.release.clear()
    slot = m.get("downloading")
    assert slot.ensure_loaded() is False
    try:
        wait_for(lambda: (m.status()["downloading"].get("progress") or {}).get("percent") == 40.0)
        st = m.status()["downloading"]
        assert st["state"] == "loading" and st["progress"]["total_mb"] == 10.0
        assert st["progress"]["file"] == "model.safetensors"
    finally:
        ProgressGenerator.release.set()
    wait_for(lambda: slot.ready)
    assert "progress" not in m.status()["downloading"]


def test_per_image_failures_do_not_open_the_breaker():
    from daemon.errors import BadImageError, GenerationError

    cls = heavy("vlm")
    m = manager([cls], breaker_threshold=2)
    slot = m.get("vlm")
    assert slot.ensure_loaded(wait=True)
    for exc in (BadImageError("truncated"), GenerationError("bad prompt"), BadImageError("x")):
        if isinstance(exc, GenerationError):
            exc.retryable = False  # a per-image prompt problem
        cls.generate = lambda self, batch, exc=exc: (_ for _ in ()).throw(exc)
        with pytest.raises(type(exc)):
            use(m, "vlm")
    assert slot.breaker.state is BreakerState.CLOSED
    cls.generate = lambda self, batch: (_ for _ in ()).throw(RuntimeError("CUDA error"))
    for _ in range(2):
        with pytest.raises(RuntimeError):
            use(m, "vlm")
    assert slot.breaker.state is BreakerState.OPEN  # the model's own failures do


def test_status_answers_while_a_model_is_slow_to_unload():
    """Stopping a model process can take seconds (up to stop_timeout + 6 s); the
    manager's lock is held meanwhile, and status must not wait for it."""
    unloading, release = threading.Event(), threading.Event()

    def slow_unload(self) -> None:
        unloading.set()
        release.wait(10)
        HeavyEcho.unload(self)

    m = manager([heavy("slow", unload=slow_unload)], keep_alive=0)
    slot = m.get("slow")
    assert slot.ensure_loaded(wait=True)
    use(m, "slow")
    ticker = threading.Thread(target=m.tick)  # keep_alive 0: unloads under the lock
    ticker.start()
    answers: list = []
    try:
        assert unloading.wait(5)
        reader = threading.Thread(
            target=lambda: answers.append((m.summary(), m.list(), m.status()))
        )
        reader.start()
        reader.join(5)
        # answered while the unload still holds the manager's lock
        assert not reader.is_alive() and ticker.is_alive() and not release.is_set()
        summary, listed, status = answers[0]
        assert summary["resident"] == ["slow"] and listed[0]["name"] == "slow"
        assert status["slow"]["state"] == "loaded"
    finally:
        release.set()
        ticker.join(10)
    assert m.status()["slow"]["state"] == "unloaded" and m.list() == []
