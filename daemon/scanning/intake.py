"""From the watcher to the queue: what each watcher hint does.

A settled file is checked against the index (:meth:`Scanner.check_file`) and queued
when new or changed; a deleted file is forgotten; a new or removed folder, an event
overflow or a restarted observer asks for a reconcile scan. While the state side cannot
be written (a full state disk), hints are not dropped: they are kept in memory (up to
``max_backlog`` paths, beyond which the whole root is rescanned) and replayed once the
database takes writes again (:meth:`Intake.replay`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from daemon.conditions import STATE, condition_of
from daemon.config import PRIORITY_NEW, WatchConfig
from daemon.scanning.reconcile import ScanError, Scanner, ScanStats
from daemon.scanning.rules import is_candidate
from daemon.scanning.scheduler import ScanRequest, ScanScheduler

log = structlog.get_logger(__name__)

MAX_BACKLOG = 10_000


class Intake:
    """The watcher's callbacks (``on_file``, ``on_deleted``, ``on_dir``, ``on_rescan``)
    and the scheduler's ``on_root_scanned``."""

    def __init__(
        self,
        watches: list[WatchConfig],
        scanner: Scanner,
        scans: ScanScheduler,
        *,
        wake: Callable[[], None],
        report: Callable[[str, str, str, int | None], bool],
        dir_count_changed: Callable[[str, int], bool] = lambda root, dirs: False,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.watches = {w.name: w for w in watches}
        self.scanner = scanner
        self.scans = scans
        self.wake = wake
        self.report = report  # (scope, kind, message, errno) -> new?
        self.dir_count_changed = dir_count_changed
        self.max_backlog = max_backlog
        self._lock = threading.Lock()
        self._backlog: dict[str, dict[Path, None]] = {}  # root -> paths, in order
        self._overflowed: set[str] = set()
        self.replayed = 0

    # -- watcher callbacks ------------------------------------------------------------------
    def on_file(self, root: str, path: Path) -> None:
        try:
            if self.scanner.check_file(self.watches[root], path, priority_class=PRIORITY_NEW):
                self.wake()
        except ScanError as exc:  # the root vanished (unmounted): forget nothing
            log.warning("file_check_skipped", root=root, path=str(path), error=str(exc))
            self.report(root, "vanished", str(exc), None)
        except Exception as exc:
            if not self._held(root, path, exc):
                raise

    def on_deleted(self, root: str, path: Path) -> None:
        watch = self.watches[root]
        if is_candidate(watch, path):
            self.on_file(root, path)  # check_file forgets a file that is gone
        else:  # a folder went away: reconcile the tree around it
            parent = path.parent if watch.path not in (path, path.parent) else None
            self.scans.request(ScanRequest(root, parent, PRIORITY_NEW, "folder removed"))

    def on_dir(self, root: str, path: Path) -> None:
        self.scans.request(ScanRequest(root, path, PRIORITY_NEW, "new folder"))

    def on_rescan(self, root: str, reason: str) -> None:
        self.scans.request(ScanRequest(root, None, PRIORITY_NEW, reason))

    def on_root_scanned(self, root: str, stats: ScanStats) -> None:
        """A tree that outgrew the inotify budget since the start switches to polling.
        The scan's count skips hidden and excluded folders (which inotify watches too),
        so it is a lower bound: enough to notice a tree that no longer fits."""
        if self.dir_count_changed(root, stats.dirs):
            log.warning("watch_switched_to_polling", root=root, dirs=stats.dirs)

    # -- the state side ------------------------------------------------------------------
    def _held(self, root: str, path: Path, exc: Exception) -> bool:
        """Keep a hint the database could not take; True when ``exc`` is a state-side
        condition (reported), False for anything else (the caller raises it)."""
        found = condition_of(exc)
        if found is None:
            return False
        kind, err = found
        self.report(STATE, kind, f"the state database: {exc}", err)
        with self._lock:
            if root in self._overflowed:
                return True
            paths = self._backlog.setdefault(root, {})
            paths[path] = None
            if sum(len(p) for p in self._backlog.values()) > self.max_backlog:
                self._overflowed.add(root)
                self._backlog.pop(root, None)
                log.warning("intake_backlog_full", root=root, action="the root is rescanned later")
        return True

    @property
    def backlog(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._backlog.values())

    def replay(self) -> None:
        """The database takes writes again: the kept hints, then a scan of every root
        whose hints overflowed."""
        with self._lock:
            backlog, self._backlog = self._backlog, {}
            overflowed, self._overflowed = self._overflowed, set()
        for root, paths in backlog.items():
            for path in paths:
                self.on_file(root, path)
                self.replayed += 1
        for root in overflowed:
            self.on_rescan(root, "state database writable again")
        log.info(
            "intake_replayed", paths=sum(len(p) for p in backlog.values()), rescans=len(overflowed)
        )
