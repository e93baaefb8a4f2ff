"""Folder watching: low-latency hints that an image is new, changed or gone.

Events are only hints. The periodic reconcile scan is the source of truth; the
watcher's jobs are to report settled files quickly, to survive anything the
filesystem or a callback throws at it, and to say when a root must be rescanned
(events lost to a queue overflow, an observer that died, an event storm).

Threads: watchdog's observer threads only record events (``RootWatcher`` methods
called from them never run a callback). Every callback (``on_file``, ``on_deleted``,
``on_dir``, ``on_rescan``) runs on the thread that calls ``RootWatcher.tick`` /
``check`` — in the daemon, the single ``WatchSupervisor`` thread — and an exception
in one is logged and counted, never propagated.

Facts this relies on (watchdog 7.1.0, see /work/shared/reference/watching-and-queue.md):
watches past ``fs.inotify.max_user_watches`` are dropped silently, so directories are
counted up front; inotify queue overflow reaches user code only through
``WatchCallback.on_queue_overflow``, hooked here via a watch-group subclass; a raising
handler kills the observer thread; polling never gives Closed events.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.config import WatchConfig
from daemon.confined import is_temp_name
from daemon.watch.mounts import fs_type, inotify_watch_limit, is_network_fs, read_mountinfo

log = structlog.get_logger(__name__)

# The events the watcher asks the kernel for (inotify's mask is built from them): a
# file appearing (created, moved in), written and closed, or going. Not opened or
# closed-without-writing (every read, captiond's own included), not modified (a
# write() each; the settle stat notices a file still growing), not a folder's
# "modified" (one per change in it). A sidecar captiond writes still shows as its temp
# file created, closed and moved: three events (see ``own_events``).
EVENT_FILTER = [
    FileCreatedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

MAX_PENDING = 512
"""More settling paths than this in one root collapse into one rescan (as Syncthing)."""
MIN_TICK_SECONDS = 0.01
"""The supervisor never wakes more often than this."""
STORM_MAX_SECONDS = 60.0
"""During an endless event storm, ask for a rescan at least this often."""
RESTART_BACKOFF_MAX = 60.0
"""Longest wait between attempts to restart a dead observer."""
HEALTHY_AFTER_SECONDS = 30.0
"""An observer alive this long resets the restart backoff."""

REASON_OVERFLOW = "event overflow"
REASON_DIED = "observer died"
REASON_STORM = "too many events"
REASON_SWITCHED = "switched to polling"

_TOUCH_EVENTS = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED})

try:
    from watchdog.observers.inotify import InotifyObserver

    _HAVE_INOTIFY = True
except ImportError:  # pragma: no cover - not Linux
    _HAVE_INOTIFY = False
try:  # watchdog >= 7.1 delivers IN_Q_OVERFLOW to WatchCallback.on_queue_overflow
    from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
    from watchdog.observers.inotify_c import InotifyFD

    _HAVE_OVERFLOW_HOOK = _HAVE_INOTIFY and hasattr(InotifyWatchGroup, "on_queue_overflow")
except ImportError:  # pragma: no cover - older watchdog: overflow goes undetected
    _HAVE_OVERFLOW_HOOK = False


def watch_reserve(limit: int) -> int:
    """Inotify watches left free for other programs: 10% of the limit, at least 1024,
    but never more than half of it (so tiny test limits still leave a budget)."""
    return min(max(1024, limit // 10), limit // 2)


def count_dirs(root: Path, *, recursive: bool = True, stop_after: int | None = None) -> int:
    """Directories an inotify watch of ``root`` needs (root included), as watchdog adds
    them: symlinked directories are not followed, unreadable ones are still counted.
    Counting stops early once the count passes ``stop_after``."""
    if not recursive:
        return 1
    count = 0
    stack = [str(root)]
    while stack:
        current = stack.pop()
        count += 1
        if stop_after is not None and count > stop_after:
            break
        try:
            with os.scandir(current) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue
    return count


def _stat_key(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file; None if it is gone or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    stat: tuple[int, int] | None
    due: float


class Settler:
    """Holds paths until they are quiet for ``settle_seconds`` with unchanged size and mtime.

    ``touch(path)`` records an event: the file is stat'ed and its quiet period restarts.
    ``due()`` hands back the paths whose quiet period is over and whose size and mtime
    still equal the stat taken at their last event; a path whose stat changed without
    an event (polling, network writes) waits another period; a vanished path is dropped.
    Thread-safe: events arrive on observer threads, ``due()`` runs on the tick thread.
    """

    def __init__(self, settle_seconds: float, *, clock: Callable[[], float] = time.monotonic):
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Path, _Pending] = {}

    def touch(self, path: Path) -> None:
        key = _stat_key(path)  # outside the lock: may be slow on a network mount
        with self._lock:
            self._pending[path] = _Pending(key, self._clock() + self.settle_seconds)

    def forget(self, path: Path) -> bool:
        """Drop one path; True if it was pending."""
        with self._lock:
            return self._pending.pop(path, None) is not None

    def forget_under(self, directory: Path) -> int:
        """Drop every pending path below ``directory``; returns how many."""
        with self._lock:
            gone = [p for p in self._pending if p.is_relative_to(directory)]
            for p in gone:
                del self._pending[p]
            return len(gone)

    def clear(self) -> int:
        with self._lock:
            n = len(self._pending)
            self._pending.clear()
            return n

    def due(self) -> list[Path]:
        """Paths settled since the last call, oldest first; they leave the settler."""
        now = self._clock()
        with self._lock:
            ripe = sorted(
                ((p, e) for p, e in self._pending.items() if e.due <= now),
                key=lambda pe: pe[1].due,
            )
        settled: list[Path] = []
        for path, entry in ripe:
            current = _stat_key(path)
            with self._lock:
                if self._pending.get(path) is not entry:
                    continue  # touched again (or forgotten) while we were stat'ing
                if current is None:
                    del self._pending[path]
                elif current == entry.stat:
                    del self._pending[path]
                    settled.append(path)
                else:  # changed without an event: wait another quiet period
                    entry.stat = current
                    entry.due = now + self.settle_seconds
        return settled

    def next_due(self) -> float | None:
        """The clock time at which the earliest pending path is due, if any."""
        with self._lock:
            return min((e.due for e in self._pending.values()), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def __contains__(self, path: object) -> bool:
        with self._lock:
            return path in self._pending


# --- watchdog observers ---------------------------------------------------------------

if _HAVE_OVERFLOW_HOOK:

    @dataclass
    class _OverflowWatchGroup(InotifyWatchGroup):
        """InotifyWatchGroup that also tells us when the kernel queue overflowed.

        watchdog calls ``on_queue_overflow`` on every callback of the observer's
        InotifyFD when it reads an IN_Q_OVERFLOW event; the base class discards
        half-paired moves and rebuilds its watches, we then flag a rescan."""

        overflow_hook: Callable[[], None] | None = None

        def on_queue_overflow(self) -> None:
            super().on_queue_overflow()
            if self.is_active and self.overflow_hook is not None:
                try:
                    self.overflow_hook()
                except Exception:  # must never kill InotifyFD's reader thread
                    log.exception("overflow_hook_failed", path=os.fsdecode(self.path))

    class _OverflowEmitter(InotifyEmitter):
        def __init__(self, *args: Any, on_overflow: Callable[[], None], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._on_overflow = on_overflow

        def on_thread_start(self) -> None:
            # Same as InotifyEmitter.on_thread_start, with the hooked watch group.
            self._inotify = _OverflowWatchGroup(
                self._inotify_fd,
                os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink,
                overflow_hook=self._on_overflow,
            )

    class _InotifyObserver(InotifyObserver):
        """InotifyObserver whose emitters report queue overflow to ``on_overflow``.

        Mirrors ``InotifyObserver.__init__`` (one private InotifyFD per observer, so an
        overflow is attributed to exactly this root)."""

        def __init__(self, on_overflow: Callable[[], None]) -> None:
            self._inotify_fd = InotifyFD()
            self._inotify_fd.start()
            BaseObserver.__init__(
                self, _OverflowEmitter, inotify_fd=self._inotify_fd, on_overflow=on_overflow
            )

        def reader_alive(self) -> bool:
            return self._inotify_fd.is_alive()


def _name(fn: Callable[..., Any]) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", repr(inner))


def _observer_alive(observer: BaseObserver) -> bool:
    """The dispatcher, every emitter and (inotify) the reader thread are running.

    An emitter stops by itself when the root is deleted, leaving the dispatcher alive
    but deaf, so emitters are checked too."""
    if not observer.is_alive():
        return False
    if not all(e.is_alive() for e in observer.emitters):
        return False
    reader_alive = getattr(observer, "reader_alive", None)
    return reader_alive is None or bool(reader_alive())


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: RootWatcher) -> None:
        self._owner = owner

    def dispatch(self, event: FileSystemEvent) -> None:
        self._owner._on_event(event)


# --- one root -------------------------------------------------------------------------


class RootWatcher:
    """Watches one configured root and turns events into settled hints.

    Mode (``status()["mode"]``): ``inotify``, ``polling`` or ``scan`` (no observer; the
    periodic reconcile alone). ``watch_mode = "auto"`` picks polling on network
    filesystems (``mounts.is_network_fs``) and inotify elsewhere. Inotify, whether auto
    or explicit, falls back to polling when the root's directory count exceeds the watch
    budget: ``watch_limit`` (default: ``fs.inotify.max_user_watches``) minus
    ``watch_reserve(limit)`` minus ``watches_in_use`` (held by other roots), because
    watchdog would silently leave the excess unwatched. It also falls back when inotify
    cannot be started (instance or watch limit errors).

    Callbacks: ``on_file(path)`` once a candidate file has settled; ``on_deleted(path)``
    for a candidate file deleted or moved away, or a directory gone (then forget
    everything under it); ``on_dir(path)`` for a directory created or moved in, once it
    has been quiet for ``settle_seconds`` (reconcile that subtree); ``on_rescan(reason)``
    when the whole root must be rescanned. Directories are never filtered by
    ``candidate``.
    """

    def __init__(
        self,
        watch: WatchConfig,
        *,
        candidate: Callable[[Path], bool],
        on_file: Callable[[Path], None],
        on_deleted: Callable[[Path], None],
        on_dir: Callable[[Path], None],
        on_rescan: Callable[[str], None],
        dir_count: int | None = None,
        watch_limit: int | None = None,
        mountinfo: str | None = None,
        watches_in_use: int = 0,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watch = watch
        self.name = watch.name
        self.root = Path(watch.path)
        self._candidate = candidate
        self._on_file = on_file
        self._on_deleted = on_deleted
        self._on_dir = on_dir
        self._on_rescan = on_rescan
        self._max_pending = max_pending
        self._clock = clock
        self._log = log.bind(root=self.name)

        self._lock = threading.Lock()  # event bookkeeping; held briefly, never over a callback
        self._life = threading.RLock()  # observer lifecycle: start/stop/check/update_dir_count
        self.settler = Settler(watch.settle_seconds, clock=clock)
        self._dirs: dict[Path, float] = {}  # directory hints -> due time
        self._deleted: dict[Path, None] = {}  # ordered set, drained by tick()
        self._rescans: dict[str, None] = {}  # reasons, drained by tick()
        self._storm_since: float | None = None
        self._last_event_mono: float | None = None
        self.events_seen = 0
        self.own_events = 0  # of those, on captiond's own temp files (its sidecar writes)
        self.errors = 0
        self.restarts = 0
        self.last_event_at: float | None = None  # wall clock, for status

        self._observer: BaseObserver | None = None
        self._observer_started_at = 0.0
        self._failures = 0  # consecutive failed/short-lived starts, for backoff
        self._next_start_at = 0.0
        self._started = False
        self._stopped = False

        self.fstype = ""
        self.dirs: int | None = dir_count
        self.watches_needed = 0
        self._budget: int | None = None  # inotify watches this root may use; None = unknown
        self._limit_text = ""
        self.mode, self.reason = self._choose_mode(
            dir_count, watch_limit, mountinfo, watches_in_use
        )

    # -- mode selection

    def _choose_mode(
        self,
        dir_count: int | None,
        watch_limit: int | None,
        mountinfo: str | None,
        watches_in_use: int,
    ) -> tuple[str, str]:
        requested = self.watch.watch_mode
        if requested == "scan":
            return "scan", "watch_mode = scan: periodic reconcile only"
        if requested == "polling":
            return "polling", "watch_mode = polling"
        self.fstype = fs_type(self.root, mountinfo)
        if is_network_fs(self.fstype):
            if requested == "auto":
                return "polling", f"network filesystem ({self.fstype})"
            self._log.warning("inotify_on_network_fs", fstype=self.fstype, path=str(self.root))
        if not _HAVE_INOTIFY:
            return "polling", "inotify is not available on this platform"
        limit = watch_limit if watch_limit is not None else inotify_watch_limit()
        if limit is not None:
            budget = max(0, limit - watch_reserve(limit) - watches_in_use)
            self._budget = budget
            self._limit_text = (
                f"max_user_watches {limit}, {watch_reserve(limit)} kept free, "
                f"{watches_in_use} used by other roots"
            )
            if not self.watch.recursive:
                needed = 1
            elif dir_count is not None:
                needed = dir_count
            else:
                needed = count_dirs(self.root, stop_after=budget)
            self.dirs = needed
            if needed > budget:
                more = "+" if dir_count is None else ""
                return "polling", self._over_budget(f"{needed}{more}")
            self.watches_needed = needed
        if requested == "inotify":
            return "inotify", "watch_mode = inotify"
        return "inotify", f"local filesystem ({self.fstype or 'unknown'})"

    def _over_budget(self, needed: str) -> str:
        return (
            f"{needed} directories exceed the inotify watch budget of {self._budget} "
            f"({self._limit_text})"
        )

    def _fall_back_to_polling(self, reason: str) -> None:
        self._log.warning("watch_fallback_polling", path=str(self.root), reason=reason)
        self.mode, self.reason = "polling", reason
        self.watches_needed = 0

    # -- lifecycle

    def _new_observer(self) -> BaseObserver:
        if self.mode == "inotify":
            if _HAVE_OVERFLOW_HOOK:
                return _InotifyObserver(on_overflow=self._overflowed)
            self._log.warning("overflow_undetectable", reason="watchdog lacks on_queue_overflow")
            return InotifyObserver()  # pragma: no cover - older watchdog
        return PollingObserver(timeout=self.watch.poll_interval_seconds)

    def _start_observer(self) -> bool:
        """Start a fresh observer; False (logged, counted) if that failed."""
        for _attempt in range(2):
            observer: BaseObserver | None = None
            try:
                observer = self._new_observer()
                observer.schedule(
                    _Handler(self),
                    str(self.root),
                    recursive=self.watch.recursive,
                    event_filter=EVENT_FILTER,
                )
                observer.start()
            except OSError as exc:
                self._discard(observer)
                if self.mode == "inotify" and exc.errno in (errno.EMFILE, errno.ENOSPC):
                    self._fall_back_to_polling(f"inotify unavailable: {exc}")
                    continue
                self._start_failed(exc)
                return False
            except Exception as exc:
                self._discard(observer)
                self._start_failed(exc)
                return False
            self._observer = observer
            self._observer_started_at = self._clock()
            return True
        return False  # pragma: no cover - the loop always returns

    def _start_failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._failures += 1
        self._next_start_at = self._clock() + min(RESTART_BACKOFF_MAX, 2.0 ** (self._failures - 1))
        self._log.warning(
            "watch_start_failed", path=str(self.root), mode=self.mode, error=repr(exc)
        )

    @staticmethod
    def _discard(observer: BaseObserver | None) -> None:
        if observer is None:
            return
        with contextlib.suppress(Exception):
            observer.stop()
        if observer.is_alive():
            with contextlib.suppress(Exception):
                observer.join(timeout=5)

    def start(self) -> None:
        """Start watching (no-op in scan mode). A failure is logged; ``check()`` retries."""
        with self._life:
            if self._started or self._stopped:
                return
            self._started = True
            if self.mode == "scan" or self._start_observer():
                self._log.info(
                    "watch_started", path=str(self.root), mode=self.mode, reason=self.reason
                )

    def stop(self) -> None:
        """Stop and join the observer; idempotent. A stopped watcher does not start again."""
        with self._life:
            self._stopped = True
            observer, self._observer = self._observer, None
            self._discard(observer)

    def update_dir_count(self, dirs: int) -> bool:
        """Re-check the watch budget with a fresh directory count, e.g. from a full scan.

        Count every directory, hidden and excluded ones too: watchdog watches them all.
        An inotify root that no longer fits switches to polling (its new observer starts
        at once, then ``on_rescan("switched to polling")`` covers the gap). True if it
        switched."""
        with self._life:
            self.dirs = dirs
            if self.mode != "inotify" or self._budget is None or not self.watch.recursive:
                return False
            if dirs <= self._budget:
                self.watches_needed = dirs
                return False
            self._fall_back_to_polling(self._over_budget(str(dirs)))
            if not self._started or self._stopped:
                return True
            old, self._observer = self._observer, None
            self._discard(old)
            restarted = self._start_observer()
        if restarted:
            self._call(self._on_rescan, REASON_SWITCHED)
        return True

    @property
    def observer(self) -> BaseObserver | None:
        return self._observer

    def is_alive(self) -> bool | None:
        """Observer threads running; None in scan mode (nothing to run)."""
        if self.mode == "scan":
            return None
        return self._observer is not None and _observer_alive(self._observer)

    def check(self) -> bool:
        """Restart a dead (or never started) observer, then ``on_rescan("observer died")``.

        Restarts back off exponentially (1 s .. 60 s) while they keep failing or the
        observer keeps dying within ``HEALTHY_AFTER_SECONDS``. Returns True if it restarted.
        """
        with self._life:
            if self.mode == "scan" or self._stopped or not self._started:
                return False
            now = self._clock()
            if self._observer is not None and _observer_alive(self._observer):
                if self._failures and now - self._observer_started_at > HEALTHY_AFTER_SECONDS:
                    self._failures = 0
                return False
            if now < self._next_start_at:
                return False
            if self._observer is not None:
                self._log.warning("observer_died", path=str(self.root), mode=self.mode)
                if now - self._observer_started_at < HEALTHY_AFTER_SECONDS:
                    self._failures += 1
                backoff = min(RESTART_BACKOFF_MAX, 2.0 ** max(0, self._failures - 1))
                self._next_start_at = now + backoff
                old, self._observer = self._observer, None
                self._discard(old)
            if not self._start_observer():
                return False
            self.restarts += 1
        self._log.info("observer_restarted", path=str(self.root), mode=self.mode)
        self._call(self._on_rescan, REASON_DIED)
        return True

    # -- events (observer threads)

    def _overflowed(self) -> None:
        with self._lock:
            self._rescans[REASON_OVERFLOW] = None
        self._log.warning("event_overflow", path=str(self.root))

    def _on_event(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:
            with self._lock:
                self.errors += 1
            with contextlib.suppress(Exception):  # even a logging failure must not escape
                self._log.exception(
                    "watch_event_failed", path=os.fsdecode(event.src_path), kind=event.event_type
                )

    def _handle(self, event: FileSystemEvent) -> None:
        now = self._clock()
        src_name = os.path.basename(os.fsdecode(event.src_path)) if event.src_path else ""
        own = is_temp_name(src_name)  # a sidecar being written, or renamed into place
        with self._lock:
            self.events_seen += 1
            self.own_events += own
            if own and event.event_type != EVENT_TYPE_MOVED:
                return  # (a move goes on: its destination is checked like any other)
            self.last_event_at = time.time()
            self._last_event_mono = now
            if self._storm_since is not None:
                return  # collapsed into a rescan; individual events no longer matter
        kind = event.event_type
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        dest = (
            Path(os.fsdecode(event.dest_path))
            if kind == EVENT_TYPE_MOVED and event.dest_path
            else None
        )

        if event.is_directory:
            if kind == EVENT_TYPE_CREATED and src is not None:
                self._dir_hint(src, now)
            elif kind == EVENT_TYPE_MOVED:
                if src is not None:
                    self._gone(src, directory=True)
                if dest is not None:
                    self._dir_hint(dest, now)
            elif kind == EVENT_TYPE_DELETED and src is not None:
                self._gone(src, directory=True)
            return

        if kind in _TOUCH_EVENTS and src is not None:
            if self._candidate(src):
                self._touch(src, now)
        elif kind == EVENT_TYPE_MOVED:
            if src is not None and self._candidate(src):
                self._gone(src, directory=False)
            if dest is not None and self._candidate(dest):
                self._touch(dest, now)
        elif kind == EVENT_TYPE_DELETED and src is not None and self._candidate(src):
            self._gone(src, directory=False)
        # opened, closed_no_write, attrib: nothing (the settle stat catches mtime changes)

    def _touch(self, path: Path, now: float) -> None:
        self.settler.touch(path)
        self._rearm_dirs(path, now)
        self._check_storm(now)

    def _dir_hint(self, path: Path, now: float) -> None:
        with self._lock:
            self._dirs[path] = now + self.watch.settle_seconds
        self._rearm_dirs(path, now)
        self._check_storm(now)

    def _rearm_dirs(self, path: Path, now: float) -> None:
        """Activity below a pending new directory delays its hint (a copy in progress)."""
        with self._lock:
            if not self._dirs:
                return
            due = now + self.watch.settle_seconds
            for parent in path.parents:
                if parent in self._dirs:
                    self._dirs[parent] = due
                if parent == self.root:
                    break

    def _gone(self, path: Path, *, directory: bool) -> None:
        if directory:
            self.settler.forget_under(path)
        else:
            self.settler.forget(path)
        with self._lock:
            if directory:
                for d in [d for d in self._dirs if d.is_relative_to(path)]:
                    del self._dirs[d]
            self._deleted[path] = None
        self._check_storm(self._clock())

    def _check_storm(self, now: float) -> None:
        with self._lock:
            if self._storm_since is not None:
                return
            # Deletions count too: a flapping network mount deletes everything at once.
            if len(self.settler) + len(self._dirs) + len(self._deleted) <= self._max_pending:
                return
            self._storm_since = now
            self._dirs.clear()
            self._deleted.clear()
        dropped = self.settler.clear()
        self._log.warning("event_storm", path=str(self.root), dropped=dropped)

    # -- delivery (tick thread)

    def tick(self) -> None:
        """Deliver what is ready: rescans, deletions, directory hints, settled files."""
        now = self._clock()
        with self._lock:
            if self._storm_since is not None:
                quiet = self._last_event_mono is None or (
                    now - self._last_event_mono >= self.watch.settle_seconds
                )
                if quiet or now - self._storm_since >= STORM_MAX_SECONDS:
                    self._rescans[REASON_STORM] = None
                    self._storm_since = None if quiet else now
            rescans = list(self._rescans)
            self._rescans.clear()
            deleted = list(self._deleted)
            self._deleted.clear()
            ready = {d for d, due in self._dirs.items() if due <= now}
            for d in ready:
                del self._dirs[d]
            # mkdir -p a/b/c: the hint for a (now or later) covers a/b and a/b/c
            dirs = sorted(
                d for d in ready if not any(p in ready or p in self._dirs for p in d.parents)
            )
        files = self.settler.due()
        for reason in rescans:
            self._log.info("rescan_requested", reason=reason, path=str(self.root))
            self._call(self._on_rescan, reason)
        for path in deleted:
            self._call(self._on_deleted, path)
        for path in dirs:
            self._call(self._on_dir, path)
        for path in files:
            self._call(self._on_file, path)

    def _call(self, fn: Callable[[Any], None], arg: Path | str) -> None:
        try:
            fn(arg)
        except Exception:
            with self._lock:
                self.errors += 1
            with contextlib.suppress(Exception):
                self._log.exception("watch_callback_failed", callback=_name(fn), arg=str(arg))

    def pending(self) -> int:
        with self._lock:
            return len(self._dirs) + len(self._deleted) + len(self.settler)

    def next_due(self) -> float | None:
        """When the earliest pending file settles (this watcher's clock), if any."""
        return self.settler.next_due()

    def status(self) -> dict[str, Any]:
        """A snapshot for ``captiond status``. ``alive`` is None in scan mode;
        ``last_event_at`` is a Unix time or None."""
        with self._lock:
            storm = self._storm_since is not None
            events, errors, last = self.events_seen, self.errors, self.last_event_at
            own = self.own_events
        return {
            "path": str(self.root),
            "mode": self.mode,
            "reason": self.reason,
            "fstype": self.fstype,
            "alive": self.is_alive(),
            "events_seen": events,
            "own_events": own,
            "errors": errors,
            "pending": self.pending(),
            "storm": storm,
            "last_event_at": last,
            "restarts": self.restarts,
            "dirs": self.dirs,
        }


# --- all roots ------------------------------------------------------------------------


class WatchSupervisor:
    """Owns one ``RootWatcher`` per configured watch and the one thread that drives them.

    Every ``tick_seconds`` the thread delivers settled hints (``RootWatcher.tick``); every
    ``check_seconds`` it runs ``check()``. Callbacks get the root (watch) name first.
    ``candidate(watch, path)`` has the signature of ``scanner.is_candidate``.
    Inotify roots share one watch budget: each root's directories count against the
    roots after it. ``dir_counts`` maps root name -> directory count from a scan; roots
    missing from it are counted here.
    """

    def __init__(
        self,
        watches: Iterable[WatchConfig],
        *,
        candidate: Callable[[WatchConfig, Path], bool],
        on_file: Callable[[str, Path], None],
        on_deleted: Callable[[str, Path], None],
        on_dir: Callable[[str, Path], None],
        on_rescan: Callable[[str, str], None],
        dir_counts: Mapping[str, int] | None = None,
        watch_limit: int | None = None,
        mountinfo: str | None = None,
        tick_seconds: float = 0.25,
        check_seconds: float = 1.0,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick_seconds = tick_seconds
        self._clock = clock  # shared with every root (settling is on this clock too)
        self.check_seconds = check_seconds
        if mountinfo is None:
            mountinfo = read_mountinfo()
        if watch_limit is None:
            watch_limit = inotify_watch_limit()
        dir_counts = dict(dir_counts or {})
        self.roots: dict[str, RootWatcher] = {}
        in_use = 0
        for w in watches:
            root = RootWatcher(
                w,
                candidate=functools.partial(candidate, w),
                on_file=functools.partial(on_file, w.name),
                on_deleted=functools.partial(on_deleted, w.name),
                on_dir=functools.partial(on_dir, w.name),
                on_rescan=functools.partial(on_rescan, w.name),
                dir_count=dir_counts.get(w.name),
                watch_limit=watch_limit,
                mountinfo=mountinfo,
                watches_in_use=in_use,
                max_pending=max_pending,
                clock=clock,
            )
            in_use += root.watches_needed
            self.roots[w.name] = root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Start every root's observer and the supervisor thread (once)."""
        if self._thread is not None or self._stopped:
            return
        for root in self.roots.values():
            try:
                root.start()
            except Exception:  # start() logs its own failures; this is belt and braces
                root.errors += 1
                log.exception("watch_start_failed", root=root.name)
        self._thread = threading.Thread(target=self._run, name="captiond-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and every observer, joining them; idempotent."""
        self._stopped = True
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        for root in self.roots.values():
            try:
                root.stop()
            except Exception:
                log.exception("watch_stop_failed", root=root.name)

    def tick(self) -> None:
        for root in self.roots.values():
            try:
                root.tick()
            except Exception:
                root.errors += 1
                log.exception("watch_tick_failed", root=root.name)

    def check(self) -> None:
        """Restart dead observers (each restart asks for a rescan of its root)."""
        for root in self.roots.values():
            try:
                root.check()
            except Exception:
                root.errors += 1
                log.exception("watch_check_failed", root=root.name)

    def _wait(self) -> float:
        """Seconds until the next tick: ``tick_seconds``, or less when a file settles
        sooner, so a settled file is delivered when it settles, not up to a tick later."""
        now = self._clock()
        dues = [d for r in self.roots.values() if (d := r.next_due()) is not None]
        if not dues:
            return self.tick_seconds
        return min(self.tick_seconds, max(MIN_TICK_SECONDS, min(dues) - now))

    def _run(self) -> None:
        next_check = self._clock() + self.check_seconds
        while not self._stop.wait(self._wait()):
            self.tick()
            if self._clock() >= next_check:
                self.check()
                next_check = self._clock() + self.check_seconds

    def update_dir_count(self, root: str, dirs: int) -> bool:
        """Feed a scan's directory count back (see ``RootWatcher.update_dir_count``)."""
        watcher = self.roots.get(root)
        return watcher is not None and watcher.update_dir_count(dirs)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: root.status() for name, root in self.roots.items()}
