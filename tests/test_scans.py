import threading
import time
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


def test_periodic_scans_are_not_postponed_by_hints(tmp_path):
    scanner = FakeScanner()
    s = ScanScheduler(scanner, watches(tmp_path), interval_seconds=0.5)
    s.start()
    try:
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:  # a hint every 0.1 s
            s.request(ScanRequest("a", tmp_path / "a" / "x", PRIORITY_NEW, "hint"))
            time.sleep(0.1)
        periodic = [c for c in scanner.calls if c[1] is None and c[0] == "b"]
        assert len(periodic) >= 2
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
        gate.set()
        wait_for(lambda: len(scanner.calls) == 2)
        time.sleep(0.1)
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
