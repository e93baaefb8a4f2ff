"""Conditions of the whole system, not faults of one image: a full disk, a quota, a
share remounted read-only, a stale NFS handle, a vanished mount or server.

They are told apart by errno (:func:`condition_of`), on the dataset side (a watched
root: the errno of a read or write under it) and on the state side (the database:
SQLite's full, I/O or read-only error). While one lasts, the affected root (or, for the
state side, all intake) is paused: its jobs go back to the queue without using an
attempt, as they do for a model whose circuit breaker is open. :class:`Conditions`
probes each with backoff (:attr:`probe`) and, once it clears, calls ``on_clear`` so the
daemon resumes and reconciles what arrived meanwhile. Nothing needs a person.
"""

from __future__ import annotations

import errno
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

log = structlog.get_logger(__name__)

STATE = "state"  # the scope of the state side (the database)

# errno -> condition kind, on any filesystem
_ERRNO_KINDS = {
    errno.ENOSPC: "disk_full",
    errno.EDQUOT: "quota",
    errno.EROFS: "read_only",
    errno.ESTALE: "stale_handle",
    errno.ENOTCONN: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
}
# ... and on a network filesystem, where an I/O error is the server, not the disk
_NETWORK_KINDS = {
    errno.EIO: "io_error",
    errno.ETIMEDOUT: "unreachable",
    errno.ECONNREFUSED: "unreachable",
}
SYSTEMIC_ERRNOS = frozenset(_ERRNO_KINDS)
NETWORK_ERRNOS = frozenset(_NETWORK_KINDS)
WRITE_KINDS = frozenset({"disk_full", "quota", "read_only"})  # cleared by a write probe

_SQLITE_KINDS = {
    sqlite3.SQLITE_FULL: "disk_full",
    sqlite3.SQLITE_IOERR: "io_error",
    sqlite3.SQLITE_READONLY: "read_only",
    sqlite3.SQLITE_CANTOPEN: "unreachable",
}
_LEGACY_ERRNO = re.compile(r"\[Errno (\d+)\]")

DESCRIPTIONS = {
    "disk_full": "no space left",
    "quota": "disk quota exceeded",
    "read_only": "read-only filesystem",
    "stale_handle": "stale NFS file handle",
    "unreachable": "server unreachable or mount gone",
    "io_error": "I/O errors from a network filesystem",
    "vanished": "the folder is gone or unmounted",
}


class SystemicError(Exception):
    """Raised where a systemic condition is met, to stop and wait instead of failing."""

    def __init__(self, scope: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.kind = kind


def condition_of(exc: BaseException, *, network_fs: bool = False) -> tuple[str, int | None] | None:
    """(kind, errno) when ``exc`` is a condition of the system, else None."""
    for e in _chain(exc):
        if isinstance(e, SystemicError):
            return e.kind, None
        if isinstance(e, OSError) and e.errno is not None:
            kind = _ERRNO_KINDS.get(e.errno) or (
                _NETWORK_KINDS.get(e.errno) if network_fs else None
            )
            if kind is not None:
                return kind, e.errno
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            if code in _SQLITE_KINDS:
                return _SQLITE_KINDS[code], None
    return None


def errno_of(exc: BaseException) -> int | None:
    """The errno of the first OSError in ``exc``'s chain."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    return None


def legacy_errno(message: str | None) -> int | None:
    """The errno in an error message recorded before errnos were kept (``[Errno 28]``)."""
    m = _LEGACY_ERRNO.search(message or "")
    return int(m.group(1)) if m else None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


@dataclass(slots=True)
class Condition:
    scope: str  # a watch name, or STATE
    kind: str
    message: str
    since: float  # Unix time
    errno: int | None = None
    probes: int = 0
    next_probe: float = 0.0  # monotonic
    last_probe_error: str = ""

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "kind": self.kind,
            "message": self.message,
            "since": self.since,
            "since_text": datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S"),
            "errno": self.errno,
            "probes": self.probes,
            "next_probe_in_seconds": max(0.0, round(self.next_probe - now, 1)),
            "action": (
                "all intake paused; events kept and replayed" if self.scope == STATE
                else "folder paused; jobs wait without using attempts"
            ) + "; probing with backoff, resumes by itself",
        }  # fmt: skip


class Conditions:
    """The conditions in force, their probes and their end.

    ``probe(scope, condition)`` returns None when the condition has cleared, else a
    short reason; ``on_clear(scope, condition)`` runs once it has. Thread-safe; the
    monitor thread (:meth:`start`) probes what is due.
    """

    def __init__(
        self,
        probe: Callable[[str, Condition], str | None],
        on_clear: Callable[[str, Condition], None],
        *,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        network_scopes: frozenset[str] = frozenset(),
    ) -> None:
        self.network_scopes = network_scopes  # roots on network filesystems
        self.probe = probe
        self.on_clear = on_clear
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._active: dict[str, Condition] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cleared = 0  # conditions that ended, for status and tests

    # -- reporting ----------------------------------------------------------------------
    def report(self, scope: str, kind: str, message: str, errno: int | None = None) -> bool:
        """A condition seen (again). True when it is new."""
        with self._lock:
            if scope in self._active:
                return False
            desc = DESCRIPTIONS.get(kind, kind)
            text = f"{desc}: {message}" if message else desc
            self._active[scope] = Condition(
                scope, kind, text, self.wall(), errno, next_probe=self.clock() + self.backoff_base
            )
        log.error("condition_started", scope=scope, kind=kind, message=message, action="paused")
        self._wake.set()
        return True

    def check(self, scope: str, exc: BaseException) -> bool:
        """Report ``exc`` when it is a condition of the system (of root ``scope``, or of
        the state side for a database error); True if it is one."""
        found = condition_of(exc, network_fs=scope in self.network_scopes)
        if found is None:
            return False
        kind, err = found
        state = any(isinstance(e, sqlite3.Error) for e in _chain(exc))
        self.report(STATE if state else scope, kind, _short(exc), err)
        return True

    def active(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return {s: c.to_json(now) for s, c in self._active.items()}

    def affects(self, scope: str) -> bool:
        with self._lock:
            return scope in self._active or STATE in self._active

    def paused_scopes(self) -> set[str]:
        with self._lock:
            return set(self._active)

    @property
    def state_ok(self) -> bool:
        with self._lock:
            return STATE not in self._active

    # -- probing ------------------------------------------------------------------------
    def tick(self) -> float:
        """Probe every condition that is due; seconds until the next one is."""
        now = self.clock()
        with self._lock:
            due = [c for c in self._active.values() if c.next_probe <= now]
        for c in due:
            try:
                why = self.probe(c.scope, c)
            except Exception as exc:  # a probe that raises has not cleared
                why = f"{type(exc).__name__}: {exc}"
            if why is None:
                with self._lock:
                    self._active.pop(c.scope, None)
                    self.cleared += 1
                log.info(
                    "condition_cleared",
                    scope=c.scope,
                    kind=c.kind,
                    lasted_seconds=round(self.wall() - c.since, 1),
                )
                try:
                    self.on_clear(c.scope, c)
                except Exception:
                    log.exception("condition_clear_failed", scope=c.scope)
            else:
                with self._lock:
                    c.probes += 1
                    c.last_probe_error = why
                    delay = min(self.backoff_max, self.backoff_base * 2 ** min(c.probes, 16))
                    c.next_probe = self.clock() + delay
        with self._lock:
            nxt = min((c.next_probe for c in self._active.values()), default=None)
        return 5.0 if nxt is None else max(0.05, nxt - self.clock())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captiond-conditions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.tick()
            self._wake.wait(min(wait, 5.0))
            self._wake.clear()
