"""Folder watcher tests on the real filesystem with real watchdog observers."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

from daemon.config import WatchConfig
from daemon.watch.watcher import (
    MIN_TICK_SECONDS,
    REASON_DIED,
    REASON_OVERFLOW,
    REASON_STORM,
    REASON_SWITCHED,
    RootWatcher,
    Settler,
    WatchSupervisor,
    count_dirs,
    watch_reserve,
)

# watchdog 7.1 warns when `mkdir -p` races its own recursive watch registration
# (it re-adds a watch it already holds); harmless and not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

SETTLE = 0.25  # a power of two: fake-clock sums stay exact
IMAGE_EXTS = {".jpg", ".png"}
TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", "~")


def is_image(path: Path) -> bool:
    """Stand-in for scanner.is_candidate: images, no dotfiles, no temp names."""
    return (
        path.suffix.lower() in IMAGE_EXTS
        and not path.name.startswith(".")
        and not path.name.endswith(TEMP_SUFFIXES)
    )


class FakeClock:
    """The watcher's clock in tests: settling time passes only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1024.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Collects callbacks with the (fake) time they arrived, and every path the watcher
    asked ``candidate`` about (how :func:`sync` knows an event has been handled)."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.calls: list[tuple[str, Any, float]] = []
        self.asked: list[Path] = []
        self.syncs = 0
        self._lock = threading.Lock()

    def _add(self, kind: str, arg: Any) -> None:
        with self._lock:
            self.calls.append((kind, arg, self.clock()))

    def on_file(self, p: Path) -> None:
        self._add("file", p)

    def on_deleted(self, p: Path) -> None:
        self._add("deleted", p)

    def on_dir(self, p: Path) -> None:
        self._add("dir", p)

    def on_rescan(self, reason: str) -> None:
        self._add("rescan", reason)

    def spy(self, candidate: Callable[[Path], bool]) -> Callable[[Path], bool]:
        def check(p: Path) -> bool:
            with self._lock:
                self.asked.append(p)
            return candidate(p)

        return check

    def of(self, kind: str) -> list[Any]:
        with self._lock:
            return [a for k, a, _ in self.calls if k == kind]

    def time_of(self, kind: str, arg: Any) -> float:
        with self._lock:
            return next(t for k, a, t in self.calls if k == kind and a == arg)


def make_watch(root: Path, **kw: Any) -> WatchConfig:
    root.mkdir(parents=True, exist_ok=True)
    kw.setdefault("settle_seconds", SETTLE)
    return WatchConfig(path=root, **kw)


def make_root(watch: WatchConfig, rec: Recorder, **kw: Any) -> RootWatcher:
    kw["candidate"] = rec.spy(kw.get("candidate", is_image))
    kw.setdefault("clock", rec.clock)
    return RootWatcher(
        watch,
        on_file=rec.on_file,
        on_deleted=rec.on_deleted,
        on_dir=rec.on_dir,
        on_rescan=rec.on_rescan,
        **kw,
    )


def sync(rw: RootWatcher, rec: Recorder, timeout: float = 10.0) -> None:
    """A barrier: every filesystem event caused before this call has been handled.

    A marker dotfile is created and we wait until the watcher has asked ``candidate``
    about it: one observer thread handles a watch's events in order. Twice, because a
    polling observer hands over one snapshot's events in no particular order."""
    for _ in range(2):
        rec.syncs += 1
        marker = rw.root / f".sync-{rec.syncs}"
        marker.touch()
        deadline = time.monotonic() + timeout
        while marker not in rec.asked:
            assert time.monotonic() < deadline, "the watcher never saw its sync marker"
            time.sleep(0.005)


def pump(rw: RootWatcher, until: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Tick the watcher (as the supervisor thread would) until ``until()``, moving the
    fake clock a tenth of SETTLE per turn (real time only bounds the wait for events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rw.tick()
        if until():
            return True
        if isinstance(rw._clock, FakeClock):
            rw._clock.now += SETTLE / 10
        time.sleep(0.005)
    return False


def drain(rw: RootWatcher, rec: Recorder) -> None:
    """Everything that happened so far has been handled and, once settled, delivered:
    after this, a missing callback is really missing, not late."""
    sync(rw, rec)
    rec.clock.now += 10 * SETTLE
    rw.tick()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def started(root: Path, rec: Recorder) -> Iterator[RootWatcher]:
    rw = make_root(make_watch(root), rec)
    rw.start()
    assert rw.mode == "inotify" and rw.is_alive()
    yield rw
    rw.stop()


# --- Settler ----------------------------------------------------------------------------


def test_settler_waits_for_quiet_and_unchanged_stat(tmp_path: Path) -> None:
    clock = FakeClock()
    s = Settler(2.0, clock=clock)
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    s.touch(f)
    clock.now += 1.0
    assert s.due() == []  # not quiet long enough
    f.write_bytes(b"xyz")  # grows without an event (polling, NFS)
    clock.now += 1.5
    assert s.due() == []  # quiet, but size changed since the event: wait again
    assert f in s and len(s) == 1
    clock.now += 2.0
    assert s.due() == [f]
    assert s.due() == [] and len(s) == 0


def test_settler_drops_vanished_and_forgets(tmp_path: Path) -> None:
    clock = FakeClock()
    s = Settler(0.5, clock=clock)
    (tmp_path / "d").mkdir()
    a, b, c = tmp_path / "a.jpg", tmp_path / "d" / "b.jpg", tmp_path / "c.jpg"
    for p in (a, b, c):
        p.write_bytes(b"x")
        s.touch(p)
    a.unlink()
    assert s.forget_under(tmp_path / "d") == 1
    clock.now += 1
    assert s.due() == [c]  # a vanished, b forgotten
    assert len(s) == 0


# --- inotify: the usual ways files arrive -------------------------------------------------


def test_file_written_in_one_go_reported_once_after_settling(
    started: RootWatcher, rec: Recorder, root: Path
) -> None:
    f = root / "a.jpg"
    t0 = rec.clock.now
    f.write_bytes(b"\xff" * 4096)
    sync(started, rec)
    started.tick()
    rec.clock.now += SETTLE / 2
    started.tick()
    assert rec.of("file") == []  # not quiet long enough
    rec.clock.now += SETTLE / 2
    started.tick()
    assert rec.of("file") == [f] and rec.time_of("file", f) == t0 + SETTLE
    drain(started, rec)
    assert rec.of("file") == [f]  # once
    st = started.status()
    assert st["events_seen"] >= 2 and st["pending"] == 0 and st["errors"] == 0
    assert st["last_event_at"] is not None and st["mode"] == "inotify"


def test_slow_chunked_write_reported_once_after_last_write(
    started: RootWatcher, rec: Recorder, root: Path
) -> None:
    f = root / "slow.png"
    with open(f, "wb") as fh:
        for _ in range(8):  # 8 x 0.125 s: the size keeps changing for longer than SETTLE
            fh.write(b"\0" * 1000)
            fh.flush()
            sync(started, rec)
            started.tick()
            rec.clock.now += SETTLE / 2
            started.tick()
            assert rec.of("file") == []
    last_write = rec.clock.now  # closing is the last event
    sync(started, rec)
    rec.clock.now += SETTLE / 2
    started.tick()
    assert rec.of("file") == []
    rec.clock.now += SETTLE / 2
    started.tick()
    assert rec.of("file") == [f] and rec.time_of("file", f) == last_write + SETTLE
    drain(started, rec)
    assert rec.of("file") == [f]


def test_rsync_temp_then_rename_reported_under_real_name(
    started: RootWatcher, rec: Recorder, root: Path
) -> None:
    tmp = root / ".photo.jpg.Xa81Qz"
    tmp.write_bytes(b"data")
    os.rename(tmp, root / "photo.jpg")
    drain(started, rec)
    assert rec.of("file") == [root / "photo.jpg"]
    assert rec.of("deleted") == []  # the temp name is not a candidate


def test_mv_from_outside_the_tree(
    started: RootWatcher, rec: Recorder, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.jpg").write_bytes(b"b")
    os.rename(outside / "b.jpg", root / "b.jpg")
    assert pump(started, lambda: rec.of("file"))
    assert rec.of("file") == [root / "b.jpg"]


def test_folder_moved_in_gives_on_dir_and_its_images(
    started: RootWatcher, rec: Recorder, root: Path, tmp_path: Path
) -> None:
    album = tmp_path / "outside" / "album"
    (album / "sub").mkdir(parents=True)
    (album / "1.jpg").write_bytes(b"1")
    (album / "sub" / "2.png").write_bytes(b"2")
    (album / "notes.txt").write_text("no")
    os.rename(album, root / "album")
    want = {root / "album" / "1.jpg", root / "album" / "sub" / "2.png"}
    assert pump(started, lambda: set(rec.of("file")) >= want and rec.of("dir"))
    assert root / "album" in rec.of("dir")
    drain(started, rec)
    assert sorted(rec.of("file")) == sorted(want)  # each once; notes.txt ignored


def test_nested_new_dirs_give_one_hint(started: RootWatcher, rec: Recorder, root: Path) -> None:
    os.makedirs(root / "new" / "a" / "b")
    (root / "new" / "a" / "b" / "deep.jpg").write_bytes(b"x")
    assert pump(started, lambda: rec.of("dir") and rec.of("file"))
    drain(started, rec)
    assert rec.of("dir") == [root / "new"]
    assert rec.of("file") == [root / "new" / "a" / "b" / "deep.jpg"]


def test_non_candidates_ignored(started: RootWatcher, rec: Recorder, root: Path) -> None:
    for name in (".hidden.jpg", "x.jpg.tmp", "y.jpg.part", "z.jpg.crdownload", "a.jpg~"):
        (root / name).write_bytes(b"x")
    (root / "a.txt").write_text("a sidecar")
    (root / "a.txt").unlink()
    (root / "marker.jpg").write_bytes(b"m")
    drain(started, rec)
    assert root / "x.jpg.tmp" in rec.asked  # seen and turned down, not missed
    assert rec.of("file") == [root / "marker.jpg"]
    assert rec.of("deleted") == []


def test_deleted_file_passed_on(started: RootWatcher, rec: Recorder, root: Path) -> None:
    f = root / "gone.jpg"
    f.write_bytes(b"x")
    assert pump(started, lambda: rec.of("file"))
    f.unlink()
    assert pump(started, lambda: rec.of("deleted"))
    assert rec.of("deleted") == [f]
    # deleted while still settling: no on_file, just on_deleted
    g = root / "brief.jpg"
    g.write_bytes(b"x")
    g.unlink()
    assert pump(started, lambda: g in rec.of("deleted"))
    drain(started, rec)
    assert g not in rec.of("file")


def test_raising_candidate_does_not_kill_observer(root: Path, rec: Recorder) -> None:
    def candidate(p: Path) -> bool:
        if p.name == "boom.jpg":
            raise RuntimeError("bad filter")
        return is_image(p)

    rw = make_root(make_watch(root), rec, candidate=candidate)
    rw.start()
    try:
        (root / "boom.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rw.status()["errors"] > 0)
        (root / "after.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rec.of("file"))
        assert rec.of("file") == [root / "after.jpg"]
        assert rw.is_alive() and rw.observer is not None and rw.observer.is_alive()
    finally:
        rw.stop()


def test_raising_callback_is_caught_and_counted(root: Path, rec: Recorder) -> None:
    def on_file(p: Path) -> None:
        if p.name == "first.jpg":
            raise RuntimeError("daemon bug")
        rec.on_file(p)

    rw = RootWatcher(
        make_watch(root),
        candidate=is_image,
        on_file=on_file,
        on_deleted=rec.on_deleted,
        on_dir=rec.on_dir,
        on_rescan=rec.on_rescan,
        clock=rec.clock,
    )
    rw.start()
    try:
        (root / "first.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rw.status()["errors"] == 1)
        (root / "second.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rec.of("file"))
        assert rec.of("file") == [root / "second.jpg"]
        assert rw.is_alive()
    finally:
        rw.stop()


# --- liveness, overflow, storms -------------------------------------------------------------


def test_dead_observer_restarted_by_check(started: RootWatcher, rec: Recorder, root: Path) -> None:
    old = started.observer
    assert old is not None
    assert started.check() is False  # healthy: nothing to do
    old.stop()
    old.join(timeout=5)
    assert started.status()["alive"] is False
    assert started.check() is True
    assert rec.of("rescan") == [REASON_DIED]
    assert started.observer is not old and started.is_alive()
    assert started.status()["restarts"] == 1
    (root / "later.jpg").write_bytes(b"x")
    assert pump(started, lambda: rec.of("file"))


def test_dead_emitter_counts_as_dead(started: RootWatcher, rec: Recorder) -> None:
    # The emitter stops by itself when the root is deleted; the dispatcher lives on, deaf.
    assert started.observer is not None
    (emitter,) = started.observer.emitters
    emitter.stop()
    emitter.join(timeout=5)
    assert started.observer.is_alive() and not started.is_alive()
    assert started.check() is True
    assert rec.of("rescan") == [REASON_DIED]


def _inject_overflow(rw: RootWatcher) -> None:
    """Feed IN_Q_OVERFLOW (wd -1) to the observer's inotify reader, as the kernel would."""
    fd = rw.observer._inotify_fd  # type: ignore[union-attr]
    fd.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))


def test_overflow_requests_rescan(started: RootWatcher, rec: Recorder, root: Path) -> None:
    _inject_overflow(started)
    _inject_overflow(started)  # two before a tick: one rescan
    started.tick()
    assert rec.of("rescan") == [REASON_OVERFLOW]
    assert started.is_alive()
    (root / "after.jpg").write_bytes(b"x")  # watches were rebuilt; still watching
    assert pump(started, lambda: rec.of("file"))


def test_real_kernel_queue_overflow(started: RootWatcher, rec: Recorder, root: Path) -> None:
    """Stall the reader thread so the kernel queue (max_queued_events) really overflows."""
    queued = Path("/proc/sys/fs/inotify/max_queued_events")
    limit = int(queued.read_text()) if queued.exists() else 16384
    if limit > 20000:
        pytest.skip("max_queued_events too large to overflow quickly")
    (emitter,) = started.observer.emitters  # type: ignore[union-attr]
    with emitter._inotify._lock:  # type: ignore[attr-defined]
        (root / "first.jpg").write_bytes(b"x")
        # the reader thread is now blocked delivering that event (on the lock we hold)
        deadline = time.monotonic() + 10
        while not _a_thread_waits_in("on_event", "watchdog/observers/inotify.py"):
            assert time.monotonic() < deadline, "the inotify reader never blocked"
            time.sleep(0.005)
        for i in range(limit // 2 + 500):  # create + close_write per file (no modify)
            (root / f"f{i}.jpg").write_bytes(b"x")
    assert pump(started, lambda: REASON_OVERFLOW in rec.of("rescan"), timeout=10)


def _a_thread_waits_in(function: str, filename: str) -> bool:
    """Some other thread's innermost Python frame is ``function`` of ``filename``
    (blocked there)."""
    me = threading.get_ident()
    return any(
        frame.f_code.co_name == function and frame.f_code.co_filename.endswith(filename)
        for ident, frame in sys._current_frames().items()
        if ident != me
    )


def test_event_storm_collapses_into_one_rescan(root: Path, rec: Recorder) -> None:
    rw = make_root(make_watch(root), rec, max_pending=20)
    rw.start()
    try:
        for i in range(60):
            (root / f"{i}.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rec.of("rescan"))
        assert rec.of("rescan") == [REASON_STORM]
        assert len(rec.of("file")) <= 20  # the burst went to the rescan, not file by file
        assert rw.status()["storm"] is False
        (root / "calm.jpg").write_bytes(b"x")  # back to normal afterwards
        assert pump(rw, lambda: root / "calm.jpg" in rec.of("file"))
        assert rec.of("rescan") == [REASON_STORM]
    finally:
        rw.stop()


# --- mode selection -----------------------------------------------------------------------


def test_watch_limit_exceeded_falls_back_to_polling(root: Path, rec: Recorder) -> None:
    for i in range(12):
        (root / f"d{i}").mkdir(parents=True)
    assert count_dirs(root) == 13
    assert watch_reserve(10) == 5
    watch = make_watch(root, poll_interval_seconds=0.1)
    rw = make_root(watch, rec, watch_limit=10)
    assert rw.mode == "polling"
    assert "watch budget" in rw.reason and "max_user_watches 10" in rw.reason
    rw.start()
    try:
        st = rw.status()
        assert st["mode"] == "polling" and st["alive"] is True and "watch budget" in st["reason"]
        f = root / "d3" / "new.jpg"
        f.write_bytes(b"x")  # polling: Created + Modified, never Closed
        assert pump(rw, lambda: rec.of("file"))
        assert rec.of("file") == [f]
    finally:
        rw.stop()


def test_dir_count_from_caller_and_budget() -> None:
    assert watch_reserve(8192) == 1024
    assert watch_reserve(1_048_576) == 104_857


def test_dir_count_passed_in_is_used(root: Path, rec: Recorder) -> None:
    watch = make_watch(root)
    big = make_root(watch, rec, dir_count=950_000, watch_limit=1_048_576)
    assert big.mode == "polling" and "950000 directories" in big.reason
    ok = make_root(watch, rec, dir_count=10, watch_limit=1_048_576)
    assert ok.mode == "inotify" and ok.watches_needed == 10
    shared = make_root(watch, rec, dir_count=10, watch_limit=100, watches_in_use=45)
    assert shared.mode == "polling"  # 100 - 50 reserved - 45 used elsewhere < 10


def test_growing_tree_switches_to_polling(root: Path, rec: Recorder) -> None:
    watch = make_watch(root, poll_interval_seconds=0.1)
    rw = make_root(watch, rec, dir_count=10, watch_limit=1000)  # budget 500
    rw.start()
    try:
        assert rw.mode == "inotify"
        assert rw.update_dir_count(400) is False and rw.mode == "inotify"
        assert rw.update_dir_count(600) is True
        st = rw.status()
        assert st["mode"] == "polling" and "600 directories" in st["reason"] and st["alive"]
        assert type(rw.observer).__name__ == "PollingObserver"
        assert rec.of("rescan") == [REASON_SWITCHED]
        (root / "p.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rec.of("file"))
    finally:
        rw.stop()


def test_network_fs_uses_polling(root: Path, rec: Recorder) -> None:
    info = f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 22 0:50 / {root} rw shared:1 - nfs4 s:/x rw"
    rw = make_root(make_watch(root, poll_interval_seconds=0.1), rec, mountinfo=info)
    assert rw.mode == "polling" and "nfs4" in rw.reason
    rw.start()
    try:
        assert type(rw.observer).__name__ == "PollingObserver"
        (root / "n.jpg").write_bytes(b"x")
        assert pump(rw, lambda: rec.of("file"))
    finally:
        rw.stop()
    # an explicit choice is honoured
    explicit = make_root(make_watch(root, watch_mode="inotify"), rec, mountinfo=info)
    assert explicit.mode == "inotify"
    local = make_root(make_watch(root), rec, mountinfo=info.replace("nfs4", "xfs"))
    assert local.mode == "inotify" and "xfs" in local.reason


def test_explicit_polling(root: Path, rec: Recorder) -> None:
    rw = make_root(make_watch(root, watch_mode="polling"), rec)
    assert (rw.mode, rw.reason) == ("polling", "watch_mode = polling")


def test_scan_mode_has_no_observer(root: Path, rec: Recorder) -> None:
    rw = make_root(make_watch(root, watch_mode="scan"), rec)
    rw.start()
    (root / "x.jpg").write_bytes(b"x")
    rec.clock.now += 10 * SETTLE
    rw.tick()  # no observer: nothing can have been heard, nothing is delivered
    assert rw.observer is None and rw.check() is False
    st = rw.status()
    assert st["mode"] == "scan" and st["alive"] is None and "scan" in st["reason"]
    assert rec.calls == []
    rw.stop()


def test_missing_root_retried_by_check(tmp_path: Path, rec: Recorder) -> None:
    root = tmp_path / "later"
    root.mkdir()
    watch = WatchConfig(path=root, settle_seconds=SETTLE)
    root.rmdir()
    rw = make_root(watch, rec)
    rw.start()  # logs and counts; does not raise
    assert rw.is_alive() is False and rw.status()["errors"] == 1
    root.mkdir()
    assert rw.check() is False  # backing off (1 s after the first failure)
    rec.clock.now += 1.0
    assert rw.check() is True and rw.is_alive()
    rw.stop()


# --- supervisor -----------------------------------------------------------------------------


def test_supervisor_runs_roots_and_restarts(tmp_path: Path) -> None:
    calls: list[tuple[str, str, Any]] = []
    a = make_watch(tmp_path / "a", name="a")
    b = make_watch(tmp_path / "b", name="b", watch_mode="scan")
    sup = WatchSupervisor(
        [a, b],
        candidate=lambda w, p: w.name == "a" and is_image(p),
        on_file=lambda r, p: calls.append(("file", r, p)),
        on_deleted=lambda r, p: calls.append(("deleted", r, p)),
        on_dir=lambda r, p: calls.append(("dir", r, p)),
        on_rescan=lambda r, why: calls.append(("rescan", r, why)),
        tick_seconds=0.05,
        check_seconds=0.1,
    )
    sup.start()
    try:
        st = sup.status()
        assert set(st) == {"a", "b"}
        assert st["a"]["mode"] == "inotify" and st["b"]["mode"] == "scan"
        (tmp_path / "a" / "x.jpg").write_bytes(b"x")
        (tmp_path / "a" / "sub").mkdir()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(calls) < 2:
            time.sleep(0.05)
        assert ("file", "a", tmp_path / "a" / "x.jpg") in calls
        assert ("dir", "a", tmp_path / "a" / "sub") in calls
        observer = sup.roots["a"].observer
        assert observer is not None
        observer.stop()  # the supervisor thread notices and restarts it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ("rescan", "a", REASON_DIED) not in calls:
            time.sleep(0.05)
        assert ("rescan", "a", REASON_DIED) in calls
        assert sup.status()["a"]["alive"] is True
    finally:
        sup.stop()
    sup.stop()  # idempotent
    assert not sup.is_alive()
    assert sup.status()["a"]["alive"] is False
    assert observer is not None and not observer.is_alive()


class RecordingEvent(threading.Event):
    """A stop event that records how long each wait() was asked to sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


def test_supervisor_wakes_when_the_earliest_file_settles(tmp_path: Path) -> None:
    """The supervisor sleeps until the earliest pending file is due (never longer than a
    tick), so a settled file is not held back for up to a tick."""
    clock = FakeClock()
    delivered: list[Path] = []
    a = make_watch(tmp_path / "a", name="a", settle_seconds=0.5)
    sup = WatchSupervisor(
        [a],
        candidate=lambda w, p: is_image(p),
        on_file=lambda root, p: delivered.append(p),
        on_deleted=lambda *_: None,
        on_dir=lambda *_: None,
        on_rescan=lambda *_: None,
        tick_seconds=1.0,
        clock=clock,
    )
    x = tmp_path / "a" / "x.jpg"
    assert sup._wait() == 1.0  # nothing pending: a whole tick
    x.write_bytes(b"x")
    sup.roots["a"].settler.touch(x)
    assert sup._wait() == 0.5  # due in 0.5 s: wake then, not after 1 s
    clock.now += 0.5
    assert sup._wait() == MIN_TICK_SECONDS  # due now: at once (with a floor)
    clock.now -= 0.5
    # the supervisor thread sleeps for what _wait() says, not a fixed tick
    stop = sup._stop = RecordingEvent()
    sup.start()
    try:
        deadline = time.monotonic() + 10
        while not stop.waits:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert stop.waits[0] == 0.5
        clock.now += 0.5  # the thread wakes after 0.5 s (real time) and delivers x
        while not delivered:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert delivered == [x]
        while len(stop.waits) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert stop.waits[1] == 1.0  # nothing pending any more: a whole tick
    finally:
        sup.stop()


def test_supervisor_shares_the_watch_budget(tmp_path: Path) -> None:
    def noop(*_: Any) -> None:
        return None

    watches = [make_watch(tmp_path / n, name=n) for n in ("a", "b")]
    sup = WatchSupervisor(
        watches,
        candidate=lambda w, p: True,
        on_file=noop,
        on_deleted=noop,
        on_dir=noop,
        on_rescan=noop,
        dir_counts={"a": 60, "b": 60},
        watch_limit=200,  # 100 reserved: a (60) fits, b (60 more) does not
    )
    assert sup.roots["a"].mode == "inotify"
    assert sup.roots["b"].mode == "polling" and "60 used by other roots" in sup.roots["b"].reason


def test_reads_and_captionds_own_writes_cost_few_events(
    started: RootWatcher, rec: Recorder, root: Path
) -> None:
    """Reading images (as the worker does) raises no event at all; a sidecar written
    the way captiond writes one raises three, all counted as captiond's own, and none
    becomes a hint. A new image still is one."""
    from daemon.confined import Folder

    (root / "a.jpg").write_bytes(b"x")
    assert pump(started, lambda: rec.of("file"))
    seen = started.status()["events_seen"]
    for _ in range(20):
        (root / "a.jpg").read_bytes()
    with Folder.at(root) as folder:
        folder.write_atomic("a.txt", b"tags\n")
    assert pump(started, lambda: started.status()["own_events"] == 3)
    status = started.status()
    assert status["events_seen"] - seen == 3  # the temp file created, closed, moved
    (root / "b.jpg").write_bytes(b"y")
    assert pump(started, lambda: len(rec.of("file")) == 2)
    assert [Path(p).name for p in rec.of("file")] == ["a.jpg", "b.jpg"]
