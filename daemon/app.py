"""Wires the parts into the running daemon and owns start-up and shutdown order:
database -> models -> worker -> watchers -> scans -> socket -> READY=1."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__, metrics
from daemon.api.control import Control, apply_runtime_settings
from daemon.api.http import Request, Response
from daemon.api.listeners import create_health_server
from daemon.api.routes import register_api
from daemon.api.security import load_token
from daemon.config import (
    PRIORITY_BACKFILL,
    PRIORITY_NEW,
    Settings,
)
from daemon.notify import Notifier, ProgressWatchdog, watchdog_interval
from daemon.overrides import RuntimeSettings
from daemon.queue import Database, FileIndex, JobQueue, counts_of, outcomes_of, totals_of
from daemon.residency.manager import ModelManager
from daemon.scanning.reconcile import ScanError, Scanner, ScanStats
from daemon.scanning.rules import is_candidate
from daemon.scanning.scheduler import ScanRequest, ScanScheduler
from daemon.watch.mounts import fs_type, is_network_fs
from daemon.watch.watcher import WatchSupervisor
from daemon.worker import Worker

log = structlog.get_logger(__name__)

STOP_TIMEOUT_SECONDS = 45.0  # below the unit's TimeoutStopSec=60


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.started_at = time.time()
        self._stop = threading.Event()
        self.warnings: list[str] = []

        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._check_state_dir()
        self.db = Database(settings.db_path)
        self.queue = JobQueue(self.db, **settings.queue.queue_kwargs())
        self.index = FileIndex(self.db)
        # Settings changed through the API, applied over the file before parts are built.
        self.runtime = RuntimeSettings.load(settings.runtime_settings_path)
        self.warnings += apply_runtime_settings(settings, self.runtime)
        self.scanner = Scanner(self.index, self.queue, stale_temps_before=self.started_at)

        used = [g for w in settings.watch for g in w.generators] + settings.worker.preload
        self.models = ModelManager.for_settings(settings, used)
        self._generator_warnings()
        self.worker = Worker(
            settings=settings, queue=self.queue, index=self.index, models=self.models
        )
        self.scans = ScanScheduler(
            self.scanner,
            settings.watch,
            interval_seconds=settings.scan.interval_seconds,
            on_enqueued=self.worker.wake,
            on_root_scanned=self._on_root_scanned,
        )
        self.watches = {w.name: w for w in settings.watch}
        self.watchers = WatchSupervisor(
            settings.watch,
            candidate=is_candidate,
            on_file=self._on_file,
            on_deleted=self._on_deleted,
            on_dir=self._on_dir,
            on_rescan=self._on_rescan,
        )
        self.server = create_health_server(
            settings.resolved_socket_path(),
            mode=settings.socket_mode,
            group=settings.socket_group,
            status_provider=self.status,
        )
        self.control = Control(self, self.runtime)
        register_api(self.server, self.control)
        metrics.register_daemon(self.status)
        self.server.add_route("GET", "/metrics", self._metrics)
        if settings.api.tcp.enabled:  # off by default; bearer token from a 0600 file
            tcp = settings.api.tcp
            self.server.enable_tcp(tcp.host, tcp.port, load_token(tcp.token_file))
        self.notifier = Notifier()
        self.progress: ProgressWatchdog | None = None

    def _check_state_dir(self) -> None:
        try:
            fstype = fs_type(self.settings.state_dir)
        except OSError:
            return
        if is_network_fs(fstype):
            msg = (
                f"the state directory {self.settings.state_dir} is on a network filesystem "
                f"({fstype}); SQLite's WAL mode is unsafe there: use a local disk"
            )
            self.warnings.append(msg)
            log.warning("state_dir_on_network_fs", path=str(self.settings.state_dir), fstype=fstype)

    def _generator_warnings(self) -> None:
        """Settings a generator finds worth a warning (plain http:// to another host)."""
        for name, slot in self.models.slots.items():
            gen = slot.raw
            for msg in gen.warnings() if gen is not None else ():
                self.warnings.append(f"generator {name}: {msg}")
                log.warning("generator_warning", generator=name, warning=msg)

    def _on_file(self, root: str, path: Path) -> None:
        try:
            if self.scanner.check_file(self.watches[root], path, priority_class=PRIORITY_NEW):
                self.worker.wake()
        except ScanError as exc:  # the root vanished (unmounted): forget nothing
            log.warning("file_check_skipped", root=root, path=str(path), error=str(exc))

    def _on_deleted(self, root: str, path: Path) -> None:
        watch = self.watches[root]
        if is_candidate(watch, path):
            self._on_file(root, path)  # check_file forgets a file that is gone
        else:  # a folder went away: reconcile the tree around it
            parent = path.parent if watch.path not in (path, path.parent) else None
            self.scans.request(ScanRequest(root, parent, PRIORITY_NEW, "folder removed"))

    def _on_dir(self, root: str, path: Path) -> None:
        self.scans.request(ScanRequest(root, path, PRIORITY_NEW, "new folder"))

    def _on_rescan(self, root: str, reason: str) -> None:
        self.scans.request(ScanRequest(root, None, PRIORITY_NEW, reason))

    def _on_root_scanned(self, root: str, stats: ScanStats) -> None:
        """A tree that outgrew the inotify budget since the start switches to polling.
        The scan's count skips hidden and excluded folders (which inotify watches too),
        so it is a lower bound: enough to notice a tree that no longer fits."""
        if self.watchers.update_dir_count(root, stats.dirs):
            log.warning("watch_switched_to_polling", root=root, dirs=stats.dirs)

    # -- run ------------------------------------------------------------------------
    def start(self) -> None:
        # Claim the socket first: a second instance must fail before touching leases.
        self.server.bind()
        if n := self.queue.recover_all_leased():
            log.warning("leases_recovered_at_start", jobs=n)
        if n := self.queue.prune(self._job_configured):
            log.info("jobs_pruned", jobs=n, reason="folder or generator no longer configured")
        self.worker.start()
        self.watchers.start()  # before the scan, so nothing slips between them
        self.scans.start()
        if self.settings.scan.on_start:
            self.scans.request_all("start", PRIORITY_BACKFILL)
        self.server.start()
        self.notifier.ready()
        if self.notifier.enabled:  # STATUS= always; WATCHDOG=1 when systemd asks for it
            self.progress = ProgressWatchdog(
                self.notifier,
                watchdog_interval(),
                checks=[self._worker_progressing, self._scanner_alive, self.watchers.is_alive],
                status=self._status_line,
            )
            self.progress.start()
        log.info(
            "captiond_started",
            version=__version__,
            config=self.settings.source,
            socket=str(self.settings.resolved_socket_path()),
            roots=[str(w.path) for w in self.settings.watch],
        )

    @staticmethod
    def _metrics(request: Request) -> Response:
        return Response(200, metrics.render(), content_type=metrics.CONTENT_TYPE)

    def _job_configured(self, path: str, generator: str) -> bool:
        watch = self.settings.watch_for(path)
        return watch is not None and generator in watch.generators

    def _worker_progressing(self) -> bool:
        return self.worker.progressing(self.settings.worker.stall_seconds)

    def _scanner_alive(self) -> bool:
        return self.scans.alive

    def _status_line(self) -> str:
        counts = self._queue_totals()
        return (
            f"queue: {counts.get('pending', 0)} pending, {counts.get('leased', 0)} working, "
            f"{counts.get('dead', 0)} dead"
        )

    def _queue_totals(self) -> dict[str, int]:
        return totals_of(self.queue.counts())

    def stop(self) -> None:
        log.info("captiond_stopping")
        self.notifier.stopping()
        if self.progress is not None:
            self.progress.stop()
        self.server.stop()
        self.watchers.stop()
        self.scans.stop()
        self.worker.stop()
        if not self.worker.alive:  # else a load or generate() still runs; we exit anyway
            self.models.unload_all()
        self.db.close()
        log.info("captiond_stopped")

    def run_forever(self) -> int:
        received: list[int] = []

        def _signal(signum: int, _frame: Any) -> None:
            # Only set the event here: logging from a signal handler can deadlock on a
            # lock the interrupted main thread holds. A second signal exits at once:
            # nothing is lost (sidecars are atomic, claimed jobs return at the next start).
            if received:
                os._exit(128 + signum)
            received.append(signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        try:
            # Wake up now and then: a signal the kernel hands to another thread only
            # runs its Python handler once the main thread wakes (a plain wait() can
            # sleep through SIGTERM for ever).
            while not self._stop.wait(0.5):
                pass
            if received:
                log.info("signal", signal=signal.Signals(received[0]).name)
        finally:
            # A shutdown that hangs (a stuck NFS read, a wedged model) must not outlive
            # systemd's patience: exit hard after STOP_TIMEOUT_SECONDS.
            timer = threading.Timer(STOP_TIMEOUT_SECONDS, self._stop_timed_out)
            timer.daemon = True
            timer.start()
            self.stop()
            timer.cancel()
        if stuck := self.worker.stuck_threads:
            # Python joins every decode thread at exit, also one stuck in a hung read:
            # leave without waiting for it (everything is closed and flushed by now).
            log.warning("exit_with_stuck_reads", threads=stuck)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0

    @staticmethod
    def _stop_timed_out() -> None:
        log.error("shutdown_timed_out", seconds=STOP_TIMEOUT_SECONDS, action="exiting now")
        os._exit(1)

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        oldest = self.queue.oldest_pending_age()
        tally = self.queue.tally()  # one pass for the three counts below
        by_generator = counts_of(tally)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "config": self.settings.source,
            "queue": {
                "totals": totals_of(by_generator),
                "by_generator": by_generator,
                "outcomes": outcomes_of(tally),
                "oldest_pending_seconds": None if oldest is None else round(oldest, 1),
            },
            "generators": self.models.status(),
            "residency": self.models.summary(),
            "watchers": self.watchers.status(),
            "scans": self.scans.status(),
            "worker": self.worker.status(),
            "files_indexed": self.index.count_files(),
            "recent_errors": [
                {
                    "path": j.path,
                    "generator": j.generator,
                    "state": str(j.state),
                    "error_type": j.error_type,
                    "error": j.error_message,
                    "attempts": j.attempts,
                }
                for j in self.queue.recent_errors(20)
            ],
            "warnings": self.warnings,
        }
