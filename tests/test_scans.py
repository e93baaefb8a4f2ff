import threading
from dataclasses import dataclass
from pathlib import Path

from daemon.config import PRIORITY_BACKFILL, PRIORITY_NEW, WatchConfig
from daemon.scanning.reconcile import ScanError
from daemon.scanning.scheduler import ScanRequest, ScanScheduler
from tests.daemonproc import wait_for


@dataclass
class Stats:
    root: str
    files_seen: int = 0
    new: int = 0
    changed: int = 0
    touched: int = 0
    removed: int = 0
    dirs: int = 0
    seconds: float = 0.0


class FakeScanner:
    def __init__(self, block: threading.Event | None = None, fail: bool = False):
        self.calls: list[tuple[str, Path | None, int]] = []
        self.block = block
        self.fail = fail

    def reconcile(self, watch, *, priority_class, subdir=None):
        self.calls.append((watch.name, subdir, priority_class))
        if self.block is not None:
            self.block.wait(10)
        if self.fail:
            raise ScanError("root is missing")
        return Stats(str(watch.path), new=1)


def watches(tmp_path):
    return [WatchConfig(path=tmp_path / "a"), WatchConfig(path=tmp_path / "b")]


class FakeClock:
    def __init__(self, now: float = 1024.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def idle(s: ScanScheduler) -> bool:
    """The scan thread is parked on its condition with nothing pending: every request
    made so far has been scanned or absorbed (it checks for work before it waits, and a
    request takes it off the condition's waiters)."""
    with s._cond:
        return not s._pending and len(s._cond._waiters) > 0  # type: ignore[attr-defined]


def test_periodic_scans_are_not_postponed_by_hints(tmp_path):
    """A hint every 0.25 s (fake clock) for 2 s, periodic interval 0.5 s: both roots get
    their periodic whole-root scan every 0.5 s (a hint for a absorbed into a's)."""
    clock = FakeClock()
    scanner = FakeScanner()
    s = ScanScheduler(scanner, watches(tmp_path), interval_seconds=0.5, clock=clock)
    s.start()
    try:
        for _ in range(8):
            clock.now += 0.25
            s.request(ScanRequest("a", tmp_path / "a" / "x", PRIORITY_NEW, "hint"))
            wait_for(lambda: idle(s))
        periodic_b = [c for c in scanner.calls if c == ("b", None, PRIORITY_BACKFILL)]
        assert len(periodic_b) == 4  # at 0.5, 1.0, 1.5 and 2.0 s
        hints = [c for c in scanner.calls if c[1] is not None]
        assert len(hints) == 4  # the other four hints; each periodic scan absorbed one
        assert s.heartbeat == clock.now
    finally:
        s.stop()


def test_root_scan_absorbs_subtree_requests_and_their_priority(tmp_path):
    gate = threading.Event()
    scanner = FakeScanner(block=gate)
    s = ScanScheduler(scanner, watches(tmp_path), interval_seconds=0)
    s.start()
    try:
        s.request(ScanRequest("b", None, PRIORITY_BACKFILL, "start"))  # occupies the thread
        wait_for(lambda: scanner.calls)
        s.request(ScanRequest("a", None, PRIORITY_BACKFILL, "start"))
        s.request(ScanRequest("a", tmp_path / "a" / "new", PRIORITY_NEW, "new folder"))
        assert s.status()["pending"] == 2
        gate.set()
        wait_for(lambda: idle(s))  # nothing left to do: no periodic scans
        assert scanner.calls[1] == ("a", None, PRIORITY_NEW)
        assert len(scanner.calls) == 2  # the subtree scan was implied by the root scan
    finally:
        s.stop()


def test_failed_scan_is_reported_and_the_thread_survives(tmp_path):
    scanner = FakeScanner(fail=True)
    s = ScanScheduler(scanner, watches(tmp_path), interval_seconds=0)
    s.start()
    try:
        s.request_all("start")
        wait_for(lambda: len(s.last) == 2)
        assert s.last["a"]["ok"] is False and "missing" in s.last["a"]["error"]
        assert s.alive
    finally:
        s.stop()


def test_whole_root_scans_report_their_stats(tmp_path):
    scanner = FakeScanner()
    seen: list[tuple[str, int]] = []
    s = ScanScheduler(
        scanner,
        watches(tmp_path),
        interval_seconds=0,
        on_root_scanned=lambda root, stats: seen.append((root, stats.new)),
    )
    s.start()
    try:
        s.request(ScanRequest("a", tmp_path / "a" / "sub", PRIORITY_NEW, "hint"))
        wait_for(lambda: len(scanner.calls) == 1)
        s.request(ScanRequest("b", None, PRIORITY_BACKFILL, "periodic"))
        wait_for(lambda: seen)
        assert seen == [("b", 1)]  # the subtree scan of a did not report
    finally:
        s.stop()
