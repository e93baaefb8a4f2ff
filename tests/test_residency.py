"""Heavy models in a child process: the proxy, memory given back, crashes of the
model process (the worker survives, the poisonous job ends dead as worker_crash),
and jobs waiting on an open circuit breaker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from daemon.config import ResidencyConfig, Settings
from daemon.errors import OutOfMemoryError, WorkerCrashError, classify
from daemon.generators.base import ImageInput
from daemon.generators.registry import Discovered
from daemon.queue import Database, FileIndex, JobQueue
from daemon.residency.child import ChildGenerator
from daemon.residency.manager import ModelManager
from daemon.residency.memory import rss_mb
from daemon.residency.slot import ModelState
from daemon.worker import Worker
from tests.daemonproc import make_image, wait_for
from tests.fakegen import EchoConfig
from tests.residency_gens import BigGenerator, CrashingGenerator, HeavyEcho


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def _item(name: str) -> ImageInput:
    return ImageInput(Path(f"/x/{name}"), Image.new("RGB", (8, 6)))


def test_child_generator_runs_the_model_in_another_process_and_exits_on_unload():
    gen = ChildGenerator(CrashingGenerator, EchoConfig(word="hi"))
    assert gen.name == "crashy" and gen.caption_type == "caption" and not gen.loaded
    gen.load()
    try:
        pid = gen.pid
        assert pid and pid != os.getpid() and gen.loaded
        out = gen.generate([gen.prepare(_item("a.png")), gen.prepare(_item("b.png"))])
        assert out == [f"hi a.png pid{pid}", f"hi b.png pid{pid}"]
    finally:
        gen.unload()
    assert not gen.loaded and not _alive(pid)


def test_errors_cross_the_pipe_classified():
    gen = ChildGenerator(HeavyEcho, EchoConfig(oom_above=1, fail_on="bad"))
    gen.load()
    try:
        with pytest.raises(OutOfMemoryError):  # the worker halves the batch on this
            gen.generate([_item("a.png"), _item("b.png")])
        with pytest.raises(Exception) as info:
            gen.generate([gen.prepare(_item("bad.png"))])
        c = classify(info.value)
        assert c.error_type.value == "unexpected" and "poisoned batch" in c.message
        assert gen.loaded  # an exception is not a crash
    finally:
        gen.unload()


def test_a_crash_is_a_worker_crash_error_and_the_proxy_restarts():
    gen = ChildGenerator(CrashingGenerator, EchoConfig())
    gen.load()
    try:
        first = gen.pid
        with pytest.raises(WorkerCrashError, match="SIGABRT"):
            gen.generate([gen.prepare(_item("CRASH.png"))])
        assert not gen.loaded and not _alive(first)
        gen.load()
        assert gen.generate([gen.prepare(_item("ok.png"))]) == [f"echo ok.png pid{gen.pid}"]
        assert gen.starts == 2
    finally:
        gen.unload()


def test_isolated_unload_gives_the_memory_back():
    m = ModelManager.build(
        ["big"],
        {"big": Discovered("big", BigGenerator)},
        lambda name, cls: EchoConfig(),
        residency=ResidencyConfig(isolate_heavy=True),
    )
    m.memory_kind = "ram"
    slot = m.get("big")
    before = rss_mb()
    assert slot.ensure_loaded(wait=True)
    pid = slot.raw.pid
    assert slot.footprint_mb is not None and slot.footprint_mb > 64  # the child's RSS
    assert rss_mb() - before < 32  # the parent did not grow by the model
    m.unload("big")
    assert not _alive(pid) and m.status()["big"]["state"] == "unloaded"


def test_a_model_process_killed_while_idle_is_noticed_and_restarted():
    m = ModelManager.build(
        ["crashy"],
        {"crashy": Discovered("crashy", CrashingGenerator)},
        lambda name, cls: EchoConfig(),
        residency=ResidencyConfig(isolate_heavy=True, keep_alive=-1),
    )
    slot = m.get("crashy")
    assert slot.ensure_loaded(wait=True)
    pid = slot.raw.pid
    os.kill(pid, signal.SIGKILL)
    # a killed process shows as a zombie (in /proc) before its threads are all gone and
    # waitpid() reports it: tick until the manager has noticed, as the worker would
    wait_for(lambda: m.tick() or m.status()["crashy"]["state"] != "loaded")
    assert not _alive(pid)
    st = m.status()["crashy"]
    assert st["state"] == "unloaded" and st["crashes"] == 1 and "SIGKILL" in st["last_unload"]
    out = slot.generator.generate([_item("a.png")])  # the next demand restarts it
    assert out == [f"echo a.png pid{slot.raw.pid}"] and slot.raw.pid != pid
    m.unload_all()


class Rig:
    def __init__(self, tmp_path: Path, gen_cls, *, max_attempts=5, **residency):
        self.root = tmp_path / "data"
        self.root.mkdir()
        self.name = gen_cls.name
        self.settings = Settings(
            state_dir=tmp_path / "state",
            watch=[{"path": self.root, "generators": [self.name], "sidecar_extension": "txt"}],
            worker={"preload": [], "batch_size": 8},
        )
        self.db = Database(tmp_path / "state" / "q.db")
        self.queue = JobQueue(
            self.db, backoff_base=0.05, backoff_max=0.1, max_attempts=max_attempts
        )
        self.index = FileIndex(self.db)
        self.models = ModelManager.build(
            [self.name],
            {self.name: Discovered(self.name, gen_cls)},
            lambda name, cls: EchoConfig(),
            retry_seconds=0.05,
            residency=ResidencyConfig(**residency),
        )
        self.worker = Worker(
            settings=self.settings, queue=self.queue, index=self.index, models=self.models
        )

    def add(self, name: str) -> Path:
        p = make_image(self.root / name)
        self.queue.enqueue(str(p), self.name, 100)
        return p

    def count(self, state: str) -> int:
        return self.queue.counts().get(self.name, {}).get(state, 0)


def test_a_poisonous_image_crashes_the_model_process_alone_and_ends_dead(tmp_path):
    rig = Rig(tmp_path, CrashingGenerator, crash_attempts=2, isolate_heavy=True)
    oks = [rig.add(f"ok{i}.png") for i in range(5)]
    bad = rig.add("CRASH.png")
    rig.worker.start()
    try:
        wait_for(lambda: rig.count("done") == 5 and rig.count("dead") == 1, timeout=60)
        assert rig.worker.alive
        for p in oks:
            assert p.with_suffix(".txt").read_text().startswith(f"echo {p.name} pid")
        assert not bad.with_suffix(".txt").exists()
        job = rig.queue.get(str(bad), "crashy")
        assert job.state == "dead" and job.error_type == "worker_crash"
        assert job.attempts == 2  # dead at crash_attempts, before max_attempts (5)
        st = rig.models.status()["crashy"]
        assert st["crashes"] >= 2 and rig.models.get("crashy").raw.starts >= 3
        # and the model still works for new images
        later = rig.add("later.png")
        rig.worker.wake()
        wait_for(lambda: later.with_suffix(".txt").exists(), timeout=30)
    finally:
        rig.worker.stop()
        rig.models.unload_all()


def test_jobs_wait_on_an_open_breaker_and_run_once_the_model_loads(tmp_path):
    cls = type("Flaky", (HeavyEcho,), {"name": "flaky", "loads": 0, "fail_loads": True})
    rig = Rig(
        tmp_path,
        cls,
        isolate_heavy=False,
        breaker_threshold=2,
        breaker_cooldown_seconds=0.5,
    )
    paths = [rig.add(f"a{i}.png") for i in range(3)]
    rig.worker.start()
    try:
        slot = rig.models.get("flaky")
        wait_for(lambda: slot.status()["breaker"]["state"] == "open")
        assert rig.count("pending") == 3
        assert all(j.attempts == 0 for j in rig.queue.jobs())  # no attempt burned
        cls.fail_loads = False
        wait_for(lambda: rig.count("done") == 3)
        assert slot.status()["breaker"]["state"] == "closed"
        assert all(p.with_suffix(".txt").exists() for p in paths)
    finally:
        rig.worker.stop()


def test_generation_failures_open_the_breaker_and_the_rest_wait(tmp_path):
    cls = type("Broken", (HeavyEcho,), {"name": "broken", "loads": 0})
    rig = Rig(tmp_path, cls, isolate_heavy=False, breaker_threshold=2, breaker_cooldown_seconds=30)
    rig.models.get("broken").raw.config = EchoConfig(fail_on="p")
    for i in range(4):
        rig.add(f"p{i}.png")
    rig.worker.start()
    try:
        slot = rig.models.get("broken")
        wait_for(lambda: slot.status()["breaker"]["state"] == "open")
        wait_for(lambda: rig.count("leased") == 0)
        # batch failed (1), first image alone failed (2): open; the others went back
        assert rig.count("failed") == 1 and rig.count("pending") == 3
        assert slot.state is ModelState.UNLOADED  # unloaded while the circuit is open
    finally:
        rig.worker.stop()
