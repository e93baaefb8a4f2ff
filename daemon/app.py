"""Wires the parts into the running daemon and owns start-up and shutdown order:
database -> models -> worker -> watchers -> scans -> socket -> READY=1."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import structlog

from daemon import __version__, faults, metrics
from daemon.api.control import Control
from daemon.api.listeners import ControlServer
from daemon.api.routes import register_api
from daemon.api.security import load_token
from daemon.backfill.status import backfill_status
from daemon.conditions import STATE, SYSTEMIC_ERRNOS, WRITE_KINDS, Condition, Conditions
from daemon.config import PRIORITY_BACKFILL, PRIORITY_NEW, Settings
from daemon.confined import Folder, Root, resolver_mode
from daemon.notify import Notifier, ProgressWatchdog, watchdog_interval
from daemon.overrides import Overrides, apply_overrides
from daemon.queue import Database, FileIndex, JobQueue, counts_of, outcomes_of, totals_of
from daemon.report.service import Maintainer, ReportService
from daemon.residency.manager import ModelManager
from daemon.scanning.intake import Intake
from daemon.scanning.reconcile import ScanError, Scanner
from daemon.scanning.rules import is_candidate
from daemon.scanning.scheduler import ScanRequest, ScanScheduler
from daemon.watch.mounts import fs_type, is_network_fs
from daemon.watch.watcher import WatchSupervisor
from daemon.web import register_web
from daemon.worker import Worker

log = structlog.get_logger(__name__)

STOP_TIMEOUT_SECONDS = 45.0  # below the unit's TimeoutStopSec=60
SHUTDOWN_LOAD_WAIT_SECONDS = 30.0  # an in-process model load under way at a stop


class Daemon:
    def __init__(self, settings: Settings):
        self.started_at = time.time()
        self._stop = threading.Event()
        self.warnings: list[str] = []

        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_path)
        self.queue = JobQueue(self.db, **settings.queue.queue_kwargs())
        self.index = FileIndex(self.db)
        # Settings changed through the API, applied over the file before parts are built.
        self.file_settings = settings.model_copy(deep=True)
        self.overrides = Overrides.load(settings.runtime_settings_path)
        self.warnings += apply_overrides(settings, self.overrides)
        self.settings = settings
        self._check_state_dir()
        self.watches = {w.name: w for w in settings.watch}
        network = frozenset(w.name for w in settings.watch if _network(w.path))
        self.scanner = Scanner(
            self.index, self.queue, stale_temps_before=self.started_at, network_roots=network
        )
        self.conditions = Conditions(
            self._probe,
            self._cleared,
            network_scopes=network,
            backoff_base=min(1.0, settings.worker.condition_probe_seconds),
            backoff_max=settings.worker.condition_probe_seconds,
        )

        used = [g for w in settings.watch for g in w.generators] + settings.worker.preload
        self.models = ModelManager.for_settings(settings, used)
        self.worker = Worker(
            settings=settings,
            queue=self.queue,
            index=self.index,
            models=self.models,
            systemic=self._systemic,
            held_roots=self._held_roots,
            intake_open=lambda: self.conditions.state_ok,
        )
        # The dataset report: caption checks after each batch, pHashes in the background.
        self.reports = ReportService.for_models(
            settings=settings, index=self.index, queue=self.queue, models=self.models
        )
        self.maintainer = Maintainer(self.reports)
        self.worker.on_done = self.maintainer.notify
        self.scans = ScanScheduler(
            self.scanner,
            settings.watch,
            interval_seconds=settings.scan.interval_seconds,
            on_enqueued=self.worker.wake,
            on_root_scanned=lambda root, stats: self.intake.on_root_scanned(root, stats),
            on_failed=self._scan_failed,
            skip=lambda root: self.conditions.affects(root),
        )
        self.intake = Intake(
            settings.watch,
            self.scanner,
            self.scans,
            wake=self.worker.wake,
            report=self.conditions.report,
            dir_count_changed=lambda root, dirs: self.watchers.update_dir_count(root, dirs),
        )
        self.watchers = WatchSupervisor(
            settings.watch,
            candidate=is_candidate,
            on_file=self.intake.on_file,
            on_deleted=self.intake.on_deleted,
            on_dir=self.intake.on_dir,
            on_rescan=self.intake.on_rescan,
        )
        self.server = ControlServer(
            settings.resolved_socket_path(),
            mode=settings.socket_mode,
            group=settings.socket_group,
            privileged=lambda peer: self.control.auth.privileged(peer),
        )
        self.control = Control(
            settings=settings,
            queue=self.queue,
            index=self.index,
            worker=self.worker,
            models=self.models,
            scans=self.scans,
            overrides=self.overrides,
            file_settings=self.file_settings,
            conditions=self.conditions.active,
            reports=self.reports,
        )
        register_api(
            self.server.router,
            self.control,
            status=self.status,
            health=self.health,
            metrics=lambda: (metrics.render(), metrics.CONTENT_TYPE),
        )
        self._collector = metrics.register_daemon(self.status)
        token = None
        if settings.api.tcp.enabled:  # off by default; bearer token from a 0600 file
            tcp = settings.api.tcp
            token = load_token(tcp.token_file)
            self.server.enable_tcp(tcp.host, tcp.port, token)
        self.server.allowed_hosts = frozenset(h.lower() for h in settings.ui.allowed_hosts)
        if settings.ui.enabled:  # the web UI: routes over the same facade, under /ui/
            self.ui = register_web(
                self.server.router, self.control, status=self.status, token=token
            )
            self.server.tcp_gate = self.ui.auth.tcp_gate
        for slot in self.models.slots.values():  # e.g. a remote server over plain http
            for w in getattr(slot.raw, "warnings", lambda: [])():
                self.warnings.append(f"generator {slot.name}: {w}")
                log.warning("generator_warning", generator=slot.name, warning=w)
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

    # -- conditions of the system (a full disk, a vanished share) ----------------------------
    def _systemic(self, path: str, exc: BaseException) -> bool:
        """A job's failure that is a condition of the system: reported (its root, or all
        intake, pauses) and True, so that the job goes back without using an attempt."""
        watch = self.settings.watch_for(path)
        scope = watch.name if watch is not None else STATE
        if self.conditions.check(scope, exc):
            return True
        if isinstance(exc, FileNotFoundError) and watch is not None:
            gone = self.scanner.root_gone(str(watch.path))
            if gone:
                self.conditions.report(watch.name, "vanished", gone)
                return True
        return False

    def _held_roots(self) -> list[str]:
        scopes = self.conditions.paused_scopes()
        return [str(w.path) for name, w in self.watches.items() if name in scopes]

    def _scan_failed(self, root: str, exc: BaseException) -> None:
        if isinstance(exc, ScanError):
            self.conditions.report(root, "vanished", str(exc))
        else:
            self.conditions.check(root, exc)

    def _probe(self, scope: str, cond: Condition) -> str | None:
        """None once the condition has cleared, else why not."""
        if scope == STATE:
            self.db.probe_write()
            return None
        watch = self.watches[scope]
        if gone := self.scanner.root_gone(str(watch.path)):
            return gone
        if cond.kind in WRITE_KINDS:  # a small write where the sidecars go
            with Folder(Root(str(watch.path)), "", Root(str(watch.path)).open()) as folder:
                folder.stage(".captiond-probe", b"\0" * 4096).discard()
        return None

    def _cleared(self, scope: str, cond: Condition) -> None:
        if scope == STATE:
            self.worker.resume_deferred()
            self.intake.replay()
            self.scans.request_all("state database writable again", PRIORITY_NEW)
        else:
            self.scans.request(ScanRequest(scope, None, PRIORITY_NEW, f"{cond.kind} cleared"))
        self.worker.wake()

    # -- run ------------------------------------------------------------------------
    def start(self) -> None:
        # Claim the socket first: a second instance must fail before touching leases.
        self.server.bind()
        if n := self.queue.recover_all_leased():
            log.warning("leases_recovered_at_start", jobs=n)
        if n := self.queue.prune(self._job_configured):
            log.info("jobs_pruned", jobs=n, reason="folder or generator no longer configured")
        self.conditions.start()
        self.worker.start()
        self.maintainer.start()
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
            confinement=resolver_mode(),
            overrides=self.overrides.active() or None,
        )

    def _job_configured(self, path: str, generator: str) -> bool:
        watch = self.settings.watch_for(path)
        return watch is not None and generator in watch.generators

    def _worker_progressing(self) -> bool:
        return self.worker.progressing(self.settings.worker.stall_seconds)

    def _scanner_alive(self) -> bool:
        return self.scans.alive

    def _status_line(self) -> str:
        counts = self.queue.totals()
        line = (
            f"queue: {counts.get('pending', 0)} pending, {counts.get('leased', 0)} working, "
            f"{counts.get('dead', 0)} dead"
        )
        for scope, c in self.conditions.active().items():
            what = "all intake" if scope == STATE else scope
            line += f"; PAUSED {what}: {c['message']} since {c['since_text']}, probing"
        return line

    def stop(self) -> None:
        log.info("captiond_stopping")
        self.notifier.stopping()
        if self.progress is not None:
            self.progress.stop()
        self.server.stop()
        self.watchers.stop()
        self.scans.stop()
        self.conditions.stop()
        self.worker.stop()
        self.maintainer.stop()
        if not self.models.wait_for_loads(SHUTDOWN_LOAD_WAIT_SECONDS):
            log.warning("exiting_during_model_load", waited_s=SHUTDOWN_LOAD_WAIT_SECONDS)
        if not self.worker.alive:  # else a load or generate() still runs; we exit anyway
            self.models.unload_all()
        metrics.unregister_daemon(self._collector)
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
            next_checkpoint = time.monotonic()
            while not self._stop.wait(0.5):
                every = self.settings.queue.checkpoint_seconds
                if every > 0 and time.monotonic() >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = time.monotonic() + every
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

    def checkpoint(self) -> None:
        """A PASSIVE WAL checkpoint, from the main thread (which otherwise only waits for
        a signal): it moves committed pages into the database file without waiting for
        anyone, so the WAL stays small between SQLite's own checkpoints (every 1000
        pages, on whichever thread commits) and a restart has less to recover.
        ``CAPTIOND_CRASH_AT=checkpoint`` kills the daemon once it writes the file."""
        path = self.db.path

        def written(before: tuple[int, int] = _file_state(path)) -> bool:
            return _file_state(path) != before

        try:
            with faults.during("checkpoint", written):
                busy, frames, done = self.db.checkpoint()
        except Exception as exc:  # a full or failing disk: reported by the writes themselves
            log.warning("wal_checkpoint_failed", error=str(exc))
            return
        log.debug("wal_checkpoint", busy=bool(busy), frames=frames, checkpointed=done)

    @staticmethod
    def _stop_timed_out() -> None:
        log.error("shutdown_timed_out", seconds=STOP_TIMEOUT_SECONDS, action="exiting now")
        os._exit(1)

    # -- status -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        conditions = self.conditions.active()
        if not conditions:
            return {}
        return {"status": "degraded", "conditions": conditions}

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
                "failed_by_conditions": self.queue.count_systemic(SYSTEMIC_ERRNOS),
            },
            "conditions": self.conditions.active(),
            "intake_backlog": self.intake.backlog,
            "generators": self.models.status(),
            "residency": self.models.summary(),
            "watchers": self.watchers.status(),
            "scans": self.scans.status(),
            "worker": self.worker.status(),
            "files_indexed": self.index.count_files(),
            "flags": self.reports.flag_status(),
            "confinement": resolver_mode(),
            "overrides": self.overrides.active(),
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
            "backfills": backfill_status(self.queue),
            "warnings": self.warnings,
        }


def _file_state(path: Any) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _network(path: Any) -> bool:
    try:
        return is_network_fs(fs_type(path))
    except OSError:
        return False
