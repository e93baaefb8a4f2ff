"""The worker in-process with model-free test generators and a real SQLite queue."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.errors import ModelDownloadError
from daemon.generators.registry import Discovered
from daemon.pipeline.caption import CaptionPipeline
from daemon.queue import Database, FileIndex, JobQueue
from daemon.residency.manager import ModelManager
from daemon.worker import Worker
from tests.daemonproc import make_image, wait_for
from tests.fakegen import EchoConfig, EchoGenerator


class Rig:
    def __init__(self, tmp_path: Path, echo: dict | None = None, **worker):
        self.root = tmp_path / "data"
        self.root.mkdir()
        self.settings = Settings(
            state_dir=tmp_path / "state",
            watch=[{"path": self.root, "generators": ["echo"], "sidecar_extension": "txt"}],
            worker={"preload": [], "batch_size": 8, **worker},
            queue={"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.1, "max_attempts": 3},
        )
        self.db = Database(tmp_path / "state" / "q.db")
        self.queue = JobQueue(self.db, backoff_base=0.05, backoff_max=0.1, max_attempts=3)
        self.index = FileIndex(self.db)
        cfg = EchoConfig(**(echo or {}))
        self.models = ModelManager.build(
            ["echo"],
            {"echo": Discovered("echo", EchoGenerator)},
            lambda name, cls: cfg,
            retry_seconds=0.05,
        )
        self.worker = Worker(
            settings=self.settings, queue=self.queue, index=self.index, models=self.models
        )
        EchoGenerator.batches.clear()

    def add(self, name: str, color: str = "red") -> Path:
        p = make_image(self.root / name, color)
        self.queue.enqueue(str(p), "echo", 100)
        return p

    def settled(self) -> bool:
        totals = self.queue.counts().get("echo", {})
        return totals.get("pending", 0) == 0 and totals.get("leased", 0) == 0

    def restart(self) -> Rig:
        """A fresh worker on the same queue, index and models (a daemon restart)."""
        self.worker = Worker(
            settings=self.settings, queue=self.queue, index=self.index, models=self.models
        )
        return self

    def __enter__(self) -> Rig:
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.worker.stop()


def test_the_index_records_an_images_own_size_not_the_drafted_one(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(EchoGenerator, "draft_size", property(lambda self: 100))
    rig = Rig(tmp_path)
    p = rig.root / "photo.jpg"
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(p, quality=80)
    rig.queue.enqueue(str(p), "echo", 100)
    with rig:
        wait_for(rig.settled)
    assert p.with_suffix(".txt").read_text() == "echo photo.jpg 500x250.\n"  # decoded at 1/4
    rec = rig.index.get_caption(str(p), "echo")
    assert rec is not None and rig.index.image_size(rec.content_hash) == (2000, 1000)


def test_a_name_at_the_filesystems_limit_is_captioned_and_one_beyond_fails_once(tmp_path):
    """A 252-byte image name: its stem-form sidecar fits and is written (the temporary
    name stays short); with name-form naming the sidecar would be 256 bytes: one
    non-retryable failure that names the limit, no retries, no stray files."""
    rig = Rig(tmp_path)
    long_name = "a" * 248 + ".png"
    p = rig.add(long_name)
    with rig:
        wait_for(rig.settled)
    assert (rig.root / ("a" * 248 + ".txt")).read_text() == f"echo {long_name} 64x48.\n"

    (tmp_path / "name_form").mkdir()
    rig2 = Rig(tmp_path / "name_form")
    rig2.settings.watch[0].sidecar_naming = "name"
    q = rig2.add(long_name)
    with rig2:
        wait_for(rig2.settled)
    job = rig2.queue.get(str(q), "echo")
    assert job is not None and job.state == "failed" and job.attempts == 1
    assert "255 bytes" in (job.error_message or "") and "256 bytes" in job.error_message
    assert sorted(x.name for x in rig2.root.iterdir()) == [long_name]
    assert p.exists()


def test_stem_siblings_come_from_the_index_or_from_the_folder(tmp_path, monkeypatch):
    """One index query per folder and batch tells a.png that a.jpg shares its stem; an
    image the index does not know yet is probed on disk instead, and so is a new image
    (no sidecar of ours) whose sibling arrived too recently to be indexed: c.png."""
    from daemon.confined import Folder

    rig = Rig(tmp_path)
    for name in ("a.png", "a.jpg", "b.png", "b.jpg", "c.png", "c.jpg"):
        make_image(rig.root / name, "red")
    rig.index.upsert_files(str(rig.root), [("", n, 1, 1) for n in ("a.png", "a.jpg", "c.png")])
    probed: list[str] = []
    real = Folder.stem_siblings

    def spy(self, name, exts):
        probed.append(name)
        return real(self, name, exts)

    monkeypatch.setattr(Folder, "stem_siblings", spy)
    for name in ("a.png", "b.png", "c.png"):
        rig.queue.enqueue(str(rig.root / name), "echo", 100)
    with rig:
        wait_for(rig.settled)
    # a.jpg is first in sort order: the stem's sidecar is its to take
    assert sorted(p.name for p in rig.root.glob("*.txt")) == [
        "a.png.txt",
        "b.png.txt",
        "c.png.txt",
    ]
    assert sorted(probed) == ["b.png", "c.png"]  # a.png's siblings came from the index


def test_captions_written_and_recorded(tmp_path):
    rig = Rig(tmp_path)
    paths = [rig.add(f"i{i}.png") for i in range(5)]
    with rig:
        wait_for(rig.settled)
    for p in paths:
        assert p.with_suffix(".txt").read_text() == f"echo {p.name} 64x48.\n"
        rec = rig.index.get_caption(str(p), "echo")
        assert rec is not None and rec.sidecar_path == str(p.with_suffix(".txt"))
    assert rig.queue.outcome_counts()["echo"] == {"written": 5}


def test_a_batchs_sidecars_are_fsynced_at_once_and_a_failed_fsync_fails_only_its_image(
    tmp_path, monkeypatch
):
    """The worker fsyncs a batch's temp files from its fsync threads (concurrently) and
    only then renames them; an image whose fsync fails gets an error and no sidecar,
    and no temp file is left; the rest of the batch is written."""
    from daemon.confined import Staged

    rig = Rig(tmp_path)
    synced: list[tuple[str, str, bool]] = []
    real = Staged.sync

    def spy(self):
        if self.fd >= 0:
            renamed = self.folder.lstat(self.name) is not None
            synced.append((self.name, threading.current_thread().name, renamed))
            if self.name == "i2.txt":
                real(self)
                raise OSError(5, "Input/output error")
        real(self)

    monkeypatch.setattr(Staged, "sync", spy)
    paths = [rig.add(f"i{i}.png") for i in range(5)]
    with rig:
        wait_for(rig.settled)
    assert sorted({n for n, _, _ in synced}) == [f"i{i}.txt" for i in range(5)]  # i2 retried
    # the first batch of five from the fsync threads (a retry of one alone needs none)
    assert all(t.startswith("captiond-fsync") for _, t, _ in synced[:5])
    assert not any(renamed for _, _, renamed in synced)  # data on disk before the rename
    assert sorted(p.name for p in rig.root.iterdir()) == sorted(
        [p.name for p in paths] + [f"i{i}.txt" for i in (0, 1, 3, 4)]
    )
    job = rig.queue.get(str(paths[2]), "echo")
    assert job is not None and job.state == "dead"  # retried, then given up
    assert "Input/output error" in (job.error_message or "")
    assert rig.index.get_caption(str(paths[2]), "echo") is None


def test_out_of_memory_halves_the_batch(tmp_path):
    rig = Rig(tmp_path, echo={"oom_above": 2})
    for i in range(8):
        rig.add(f"i{i}.png")
    with rig:
        wait_for(rig.settled)
    assert rig.queue.outcome_counts()["echo"] == {"written": 8}
    assert EchoGenerator.batches[:3] == [8, 4, 2]  # halved until it fits
    assert max(EchoGenerator.batches[3:]) <= 2  # and remembered for later batches


def test_out_of_memory_at_batch_one_is_a_retryable_failure(tmp_path):
    rig = Rig(tmp_path, echo={"oom_above": -1})  # never fits
    rig.add("a.png")
    with rig:
        wait_for(lambda: rig.queue.counts()["echo"].get("dead") == 1)
    job = rig.queue.recent_errors(1)[0]
    assert job.error_type == "out_of_memory" and job.attempts == 3


def test_one_poisonous_image_fails_alone(tmp_path):
    rig = Rig(tmp_path, echo={"fail_on": "poison"})
    for i in range(3):
        rig.add(f"ok{i}.png")
    rig.add("poison.png")
    with rig:
        wait_for(lambda: rig.queue.outcome_counts().get("echo", {}).get("written") == 3)
        wait_for(lambda: rig.queue.counts()["echo"].get("failed") == 1)
    assert not (rig.root / "poison.txt").exists()
    bad = rig.queue.recent_errors(1)[0]
    assert Path(bad.path).name == "poison.png" and bad.error_type == "unexpected"


def test_vanished_and_unwatched_files_fail_without_sidecar(tmp_path):
    rig = Rig(tmp_path)
    p = rig.add("gone.png")
    p.unlink()
    rig.queue.enqueue(str(tmp_path / "elsewhere.png"), "echo", 100)
    with rig:
        wait_for(lambda: rig.queue.counts()["echo"].get("failed") == 2)
    assert {j.error_type for j in rig.queue.recent_errors()} == {"io"}


def test_jobs_wait_while_the_model_cannot_load(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    allowed = threading.Event()
    real_load = EchoGenerator.load

    def flaky_load(self):
        if not allowed.is_set():
            raise ModelDownloadError("hub unreachable")
        real_load(self)

    monkeypatch.setattr(EchoGenerator, "load", flaky_load)
    rig.add("a.png")
    with rig:
        slot = rig.models.get("echo")
        wait_for(lambda: slot.failures >= 2)
        assert rig.queue.counts()["echo"]["pending"] == 1
        assert slot.status()["last_error"]["error_type"] == "model_download"
        allowed.set()
        wait_for(rig.settled)
    assert (rig.root / "a.txt").exists()


@pytest.mark.parametrize("policy", ["skip", "overwrite"])
def test_existing_caption_policy(tmp_path, policy):
    rig = Rig(tmp_path)
    rig.settings.watch[0].existing_caption = policy
    p = rig.add("a.png")
    p.with_suffix(".txt").write_text("human\n")
    with rig:
        wait_for(rig.settled)
    text = p.with_suffix(".txt").read_text()
    assert text == ("human\n" if policy == "skip" else "echo a.png 64x48.\n")


def test_existing_caption_skips_the_model_entirely(tmp_path):
    rig = Rig(tmp_path)
    p = rig.add("a.png")
    p.with_suffix(".txt").write_text("human\n")
    with rig:
        wait_for(rig.settled)
    assert EchoGenerator.batches == []  # decided before decoding and generating
    assert rig.queue.outcome_counts()["echo"] == {"caption_exists": 1}


def test_append_keeps_the_persons_words_when_the_image_changes(tmp_path):
    rig = Rig(tmp_path)
    rig.settings.watch[0].existing_caption = "append"
    p = rig.add("a.png")
    p.with_suffix(".txt").write_text("my own words\n")
    with rig:
        wait_for(rig.settled)
        assert p.with_suffix(".txt").read_text() == "my own words echo a.png 64x48.\n"
        make_image(p, "blue", size=(80, 60))
        rig.queue.enqueue(str(p), "echo", 100)
        rig.worker.wake()
        wait_for(lambda: "80x60" in p.with_suffix(".txt").read_text())
    assert p.with_suffix(".txt").read_text() == "my own words echo a.png 80x60.\n"


def test_crash_after_recording_before_rename_is_recovered(tmp_path, monkeypatch):
    from daemon import confined

    rig = Rig(tmp_path)
    p = rig.add("a.png")
    with rig:
        wait_for(rig.settled)
    first = p.with_suffix(".txt").read_text()

    def job():
        return rig.queue.get(str(p), "echo")

    # The image changes; the rename fails right after the new hash was recorded.
    make_image(p, "blue", size=(80, 60))
    rig.queue.enqueue(str(p), "echo", 100)
    with monkeypatch.context() as m:
        m.setattr(confined.Staged, "commit", lambda self: (_ for _ in ()).throw(OSError(5, "EIO")))
        with rig.restart():
            wait_for(lambda: job().state == "pending" and job().error_type == "io")
    assert p.with_suffix(".txt").read_text() == first  # old content; the record moved on
    with rig.restart():  # the retry still recognises the old content as captiond's
        wait_for(lambda: job().state == "done")
    assert job().outcome == "written"
    assert "80x60" in p.with_suffix(".txt").read_text()
    assert [x.name for x in rig.root.iterdir() if x.name.startswith(".")] == []


def test_tags_prompt_reuses_the_taggers_caption(tmp_path, wd_model_dir):
    from daemon.generators.wd_tagger import WDTagger
    from tests.fakegen import TagEchoGenerator

    root = tmp_path / "data"
    settings = Settings(
        state_dir=tmp_path / "state",
        watch=[
            {
                "path": root,
                "generators": ["tagecho", "wd_tagger"],  # order does not matter
                "sidecar_extension": {"wd_tagger": "txt", "tagecho": "caption"},
            }
        ],
        worker={"preload": [], "batch_size": 4},
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
    )
    db = Database(tmp_path / "state" / "q.db")
    queue, index = JobQueue(db), FileIndex(db)
    models = ModelManager.build(
        ["tagecho", "wd_tagger"],
        {
            "tagecho": Discovered("tagecho", TagEchoGenerator),
            "wd_tagger": Discovered("wd_tagger", WDTagger),
        },
        lambda name, cls: cls.config_model(**settings.generators.get(name, {})),
    )
    img = make_image(root / "a.png", "red")
    queue.enqueue(str(img), "tagecho", 100)  # the VLM-like job first; no tagger job yet
    worker = Worker(settings=settings, queue=queue, index=index, models=models)
    worker.start()
    try:
        wait_for(lambda: (root / "a.caption").exists(), timeout=30)
    finally:
        worker.stop()
    tags = (root / "a.txt").read_text().strip()
    assert "red background" in tags
    assert (root / "a.caption").read_text() == f"an image with {tags}.\n"
    job = queue.get(str(img), "tagecho")
    assert job.state == "done" and job.attempts == 1  # waiting used no attempts


def test_symlinked_or_fifo_sidecars_are_never_read_or_replaced(tmp_path):
    rig = Rig(tmp_path)
    rig.settings.watch[0].existing_caption = "append"
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET\n")
    a = rig.add("a.png")
    a.with_suffix(".txt").symlink_to(secret)
    b = rig.add("b.png")
    os.mkfifo(b.with_suffix(".txt"))
    c = rig.add("c.png")  # the queue goes on
    with rig:
        wait_for(lambda: rig.queue.counts()["echo"].get("failed") == 2)
        wait_for(lambda: c.with_suffix(".txt").exists())
    assert a.with_suffix(".txt").is_symlink() and secret.read_text() == "TOP-SECRET\n"
    regular = [p for p in rig.root.glob("*.txt") if p.is_file() and not p.is_symlink()]
    assert regular and all("TOP-SECRET" not in p.read_text() for p in regular)
    errors = {Path(j.path).name: j for j in rig.queue.recent_errors()}
    assert errors["a.png"].error_type == "io" and "symbolic link" in errors["a.png"].error_message
    assert "not a regular file" in errors["b.png"].error_message


def test_once_with_a_tags_prompt_keeps_the_tagger(tmp_path, wd_model_dir, monkeypatch):
    from daemon.generators import registry
    from daemon.oneshot import run_once

    monkeypatch.setitem(registry.BUILTINS, "tagecho", "tests.fakegen:TagEchoGenerator")
    folder = tmp_path / "set"
    make_image(folder / "a.png", "red")
    settings = Settings(
        state_dir=tmp_path / "state",
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        worker={"preload": []},
    )
    result = run_once(settings, folder, generator="tagecho")
    assert result.errors == [] and result.outcomes == {"written": 2}
    assert (folder / "a.caption").read_text().startswith("an image with simple background")


def test_once_loads_a_light_model_while_it_scans_and_a_heavy_one_only_for_work(
    tmp_path, wd_model_dir, monkeypatch
):
    """--once starts loading its light models before the folder's walk (the load and the
    scan overlap); a heavy model is not loaded for a folder with nothing to do."""
    from daemon.generators import registry
    from daemon.oneshot import run_once
    from daemon.residency.slot import ModelSlot
    from daemon.scanning.reconcile import Scanner

    monkeypatch.setitem(registry.BUILTINS, "tagecho", "tests.fakegen:HeavyTagEchoGenerator")
    seen: list[dict[str, str]] = []
    slots: list[ModelSlot] = []
    real_init, real_reconcile = ModelSlot.__init__, Scanner.reconcile

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        slots.append(self)

    def reconcile(self, *a, **kw):
        seen.append({s.name: s.state.value for s in slots})
        return real_reconcile(self, *a, **kw)

    monkeypatch.setattr(ModelSlot, "__init__", init)
    monkeypatch.setattr(Scanner, "reconcile", reconcile)
    settings = Settings(
        state_dir=tmp_path / "state",
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        worker={"preload": []},
    )
    folder = tmp_path / "set"
    make_image(folder / "a.png", "red")
    result = run_once(settings, folder, generator="tagecho", fresh=True)
    assert result.errors == [] and result.outcomes == {"written": 2}
    assert seen[0]["wd_tagger"] in ("loading", "loaded")  # under way before the walk
    assert seen[0]["tagecho"] not in ("loading", "loaded")  # heavy: loaded for work only

    slots.clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here\n")
    loads: list[str] = []
    real_load = ModelSlot._load

    def spy_load(self, event):
        loads.append(self.name)
        return real_load(self, event)

    monkeypatch.setattr(ModelSlot, "_load", spy_load)
    run_once(settings, empty, generator="tagecho", fresh=True)
    assert "tagecho" not in loads


def test_once_over_nothing_to_do_waits_for_the_light_models_load_before_it_returns(
    tmp_path, wd_model_dir, monkeypatch
):
    """--once on a folder with nothing to do ends while the light model it started
    loading before the walk may still be loading: it waits for the load (an exit in the
    middle of an onnxruntime session build aborts the process: exit 134, seen with
    bench_overhead's realistic model). The daemon's stop waits the same way, bounded."""
    from daemon.generators.wd_tagger import WDTagger
    from daemon.oneshot import run_once
    from daemon.residency.manager import ModelManager
    from daemon.residency.slot import ModelState

    real_load = WDTagger.load
    ended: list[str] = []

    def slow_load(self):
        time.sleep(0.5)
        real_load(self)
        ended.append("load")

    monkeypatch.setattr(WDTagger, "load", slow_load)
    managers: list[ModelManager] = []
    real_for_settings = ModelManager.for_settings.__func__

    def for_settings(cls, *a, **kw):
        managers.append(real_for_settings(cls, *a, **kw))
        return managers[-1]

    monkeypatch.setattr(ModelManager, "for_settings", classmethod(for_settings))
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        worker={"preload": []},
    )
    result = run_once(settings, empty, generator="wd_tagger", fresh=True)
    assert result.total == 0 and result.errors == []
    assert ended == ["load"]  # the load ended before run_once returned
    slot = managers[0].slots["wd_tagger"]
    assert slot.state is not ModelState.LOADING and not slot.ready  # and unloaded

    # bounded: a load that outlasts the wait is reported, not waited for forever
    gate = threading.Event()
    monkeypatch.setattr(WDTagger, "load", lambda self: gate.wait(5))
    models = ModelManager.for_settings(settings, ["wd_tagger"])
    models.slots["wd_tagger"].ensure_loaded(wait=False)
    assert models.wait_for_loads(0.2) is False
    gate.set()
    assert models.wait_for_loads(5) is True


def test_a_hung_read_fails_alone_and_the_others_go_on(tmp_path, monkeypatch):
    """A read that never returns (a hung network mount) is given up after
    read_timeout_seconds: that job fails as a retryable io error; the images queued
    behind it on the one decode thread (this batch's and the next one's) are released
    and captioned by a fresh pool; nothing is lost."""
    rig = Rig(tmp_path, read_timeout_seconds=0.5, decode_workers=1, batch_size=2)
    rig.queue.max_attempts = 1  # fail once and stay failed: easy to see
    release = threading.Event()
    original = CaptionPipeline.prepare
    released: list[list[int]] = []
    original_release = rig.queue.release

    def prepare(self, item):
        if item.path.endswith("hang.png"):
            item.started = time.monotonic()  # the read timeout counts from here
            release.wait(30)
        return original(self, item)

    def spy_release(ids, **kw):
        released.append(list(ids))
        return original_release(ids, **kw)

    monkeypatch.setattr(CaptionPipeline, "prepare", prepare)
    monkeypatch.setattr(rig.queue, "release", spy_release)
    rig.add("hang.png")  # enqueued first: claimed first, in the first batch
    for i in range(5):
        rig.add(f"ok{i}.png")
    try:
        with rig:
            wait_for(lambda: rig.queue.outcome_counts().get("echo", {}).get("written") == 5)
            counts = rig.queue.counts()["echo"]
            assert counts.get("dead", 0) + counts.get("failed", 0) == 1
            assert rig.worker.stuck_threads == 1
            # the batch-mate and the next batch were queued behind it: released, not failed
            assert sum(len(ids) for ids in released) >= 2
        release.set()
        wait_for(lambda: rig.worker.stuck_threads == 0)
    finally:
        release.set()
    bad = rig.queue.recent_errors(1)[0]
    assert Path(bad.path).name == "hang.png" and bad.error_type == "io"
    assert "longer than 0.5 s" in bad.error_message
    assert not (rig.root / "hang.txt").exists()
    assert all((rig.root / f"ok{i}.txt").exists() for i in range(5))


def test_time_waiting_for_a_decode_thread_is_not_read_time(tmp_path, monkeypatch):
    """Six images of 0.25 s each on one decode thread, a 1 s read limit: the last one
    waits 1.25 s for the thread, but none of them is slow, so none is given up. (Each
    read stays 0.75 s below the limit: a loaded machine does not make it flaky.)"""
    rig = Rig(tmp_path, read_timeout_seconds=1.0, decode_workers=1, batch_size=8)
    original = CaptionPipeline.prepare

    def slow(self, item):
        item.started = time.monotonic()
        time.sleep(0.25)
        return original(self, item)

    monkeypatch.setattr(CaptionPipeline, "prepare", slow)
    for i in range(6):
        rig.add(f"s{i}.png")
    with rig:
        wait_for(lambda: rig.queue.outcome_counts().get("echo", {}).get("written") == 6)
    assert rig.queue.recent_errors() == [] and rig.worker.stuck_threads == 0


class Clock:
    """Stands in for the ``time`` module inside daemon.worker: a monotonic clock moved
    by hand."""

    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_progressing_gates_the_systemd_watchdog(tmp_path, monkeypatch):
    """What the watchdog asks the worker: the loop turned within ``stall_seconds``, or a
    model load is under way (a load counts as progress for up to an hour)."""
    import daemon.worker as worker_module

    clock = Clock()
    monkeypatch.setattr(worker_module, "time", clock)
    w = Rig(tmp_path).worker
    assert not w.alive and not w.progressing(60)  # a worker that does not run
    monkeypatch.setattr(Worker, "alive", property(lambda self: True))

    w.heartbeat = clock.now
    assert w.progressing(60)
    clock.now += 59.5
    assert w.progressing(60)
    clock.now += 0.5
    assert not w.progressing(60)  # exactly stall_seconds without a turn: stalled

    w.loading_since = clock.now  # the worker thread is loading a model
    clock.now += 600
    assert w.progressing(60)  # the heartbeat is old, but the load is progress
    limit = worker_module.LOAD_STALL_SECONDS  # an hour: a first download of a large model
    clock.now = w.loading_since + limit - 0.5
    assert w.progressing(60)
    clock.now = w.loading_since + limit
    assert not w.progressing(60)  # loading this long: stuck
    assert w.progressing(2 * limit)  # unless stall_seconds allows longer
    clock.now = w.loading_since + 2 * limit
    assert not w.progressing(2 * limit)

    w.loading_since = None
    w.heartbeat = clock.now
    assert w.progressing(60)
