"""Runs reconcile scans on one background thread: at start, periodically, and
when the watcher asks (a new folder, an observer restart, an event overflow).
Requests for the same root and subtree are merged while they wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from daemon.config import PRIORITY_BACKFILL, WatchConfig
from daemon.scanning.reconcile import ScanError, Scanner, ScanStats

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ScanRequest:
    root: str
    subdir: Path | None = None
    priority_class: int = PRIORITY_BACKFILL
    reason: str = ""


class ScanScheduler:
    def __init__(
        self,
        scanner: Scanner,
        watches: list[WatchConfig],
        *,
        interval_seconds: float,
        on_enqueued: Callable[[], None] = lambda: None,
        on_root_scanned: Callable[[str, ScanStats], None] = lambda root, stats: None,
        on_failed: Callable[[str, BaseException], None] = lambda root, exc: None,
        skip: Callable[[str], bool] = lambda root: False,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``on_failed(root, exc)``: a scan failed (the root vanished, a full state disk).
        ``skip(root)``: True while a root must not be scanned (a condition holds it;
        it is scanned again when the condition clears)."""
        self.scanner = scanner
        self.watches = {w.name: w for w in watches}
        self.interval = interval_seconds
        self.on_enqueued = on_enqueued
        self.on_root_scanned = on_root_scanned  # after each whole-root scan that succeeded
        self.on_failed = on_failed
        self.skip = skip
        self._clock = clock  # periodic scans and the heartbeat (tests inject one)
        self._pending: dict[tuple[str, Path | None], ScanRequest] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.last: dict[str, dict[str, Any]] = {}
        self.heartbeat = self._clock()
        self.scanning: str | None = None
        self._next_periodic = self._clock() + interval_seconds

    def request(self, req: ScanRequest) -> None:
        with self._cond:
            self._request_locked(req)
            self._cond.notify()

    def _request_locked(self, req: ScanRequest) -> None:
        key = (req.root, req.subdir)
        old = self._pending.get(key)
        if old is None or req.priority_class > old.priority_class:
            self._pending[key] = req

    def request_all(self, reason: str, priority_class: int = PRIORITY_BACKFILL) -> None:
        for name in self.watches:
            self.request(ScanRequest(name, None, priority_class, reason))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captiond-scan", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _next(self) -> ScanRequest | None:
        with self._cond:
            while not self._stop:
                now = self._clock()
                if self.interval > 0 and now >= self._next_periodic:
                    # Due even while hints keep arriving: periodic scans are not postponed.
                    self._next_periodic = now + self.interval
                    for name in self.watches:
                        self._request_locked(ScanRequest(name, None, reason="periodic"))
                if self._pending:
                    break
                wait = self._next_periodic - now if self.interval > 0 else 5.0
                self._cond.wait(max(0.01, min(wait, 5.0)))
                self.heartbeat = self._clock()
            if self._stop:
                return None
            # Whole-root scans first; a subtree scan is implied by its root's scan, which
            # inherits the highest priority of what it absorbs.
            key = min(self._pending, key=lambda k: k[1] is not None)
            req = self._pending.pop(key)
            if req.subdir is None:
                for k in [k for k in self._pending if k[0] == req.root]:
                    absorbed = self._pending.pop(k)
                    if absorbed.priority_class > req.priority_class:
                        req = replace(req, priority_class=absorbed.priority_class)
            return req

    def _run(self) -> None:
        while (req := self._next()) is not None:
            self.heartbeat = self._clock()
            watch = self.watches.get(req.root)
            if watch is None:
                continue
            if self.skip(req.root):
                log.info("scan_held", root=req.root, reason=req.reason)
                continue
            self.scanning = req.root
            try:
                stats = self.scanner.reconcile(
                    watch, priority_class=req.priority_class, subdir=req.subdir
                )
            except ScanError as exc:
                log.error("scan_failed", root=req.root, reason=req.reason, error=str(exc))
                self.last[req.root] = {"ok": False, "error": str(exc), "at": time.time()}
                self._failed(req.root, exc)
            except Exception as exc:
                log.exception("scan_crashed", root=req.root, reason=req.reason)
                self.last[req.root] = {
                    "ok": False,
                    "error": f"{type(exc).__name__}: {exc}",
                    "at": time.time(),
                }
                self._failed(req.root, exc)
            else:
                log.info("scan_done", root=req.root, reason=req.reason, **_stats(stats))
                if stats.new or stats.changed:
                    self.on_enqueued()
                if req.subdir is None:
                    self.last[req.root] = {"ok": True, "at": time.time(), **_stats(stats)}
                    try:
                        self.on_root_scanned(req.root, stats)
                    except Exception:
                        log.exception("scan_callback_failed", root=req.root)
            finally:
                self.scanning = None
                self.heartbeat = self._clock()

    def _failed(self, root: str, exc: BaseException) -> None:
        try:
            self.on_failed(root, exc)
        except Exception:
            log.exception("scan_failure_callback_failed", root=root)

    def status(self) -> dict[str, Any]:
        with self._cond:
            pending = len(self._pending)
        return {
            "alive": self.alive,
            "scanning": self.scanning,
            "pending": pending,
            "last": self.last,
        }


def _stats(stats: Any) -> dict[str, Any]:
    out = asdict(stats)
    out.pop("root", None)
    return out
