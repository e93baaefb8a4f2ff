"""sd_notify without libsystemd, and a watchdog that pings only while work progresses.

A notification is one datagram to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a
leading ``@`` is the abstract namespace). Everything here is a no-op when the variable
is unset (not under systemd, or ``Type=`` is not ``notify``) and never raises.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

log = structlog.get_logger("captiond.notify")


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        raw = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failure_logged = False
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            log.warning("notify_socket_unsupported", notify_socket=raw)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(payload, self._address)
        except Exception as exc:  # never let a notification take the daemon down
            if not self._failure_logged:
                self._failure_logged = True
                log.warning("sd_notify_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([_status_line(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(_status_line(text))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (e.g. while a model loads before READY)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if disabled.

    ``WATCHDOG_PID``, when set, must be this process, else the watchdog is someone else's.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Heartbeat:
    """A timestamp a loop refreshes each iteration; ``recent(max_age)`` is a watchdog check.

    A loop that blocks waiting for work must wake up (e.g. a queue ``get`` with a
    timeout) and beat, or an idle daemon looks wedged.
    """

    def __init__(
        self, name: str = "heartbeat", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last

    def recent(self, max_age: float) -> Callable[[], bool]:
        def check() -> bool:
            return self.age() <= max_age

        check.__name__ = f"{self.name}_within_{max_age:g}s"
        return check


class ProgressWatchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds while every check returns True.

    When a check fails (or raises) pings stop, so systemd restarts a wedged daemon
    after ``WatchdogSec``; they resume when all checks pass again. ``status`` (optional)
    returns the ``STATUS=`` text, which is sent whenever it changes (checked every
    ``status_interval`` seconds). With ``interval=None`` only the status is updated.
    ``clock`` decides when a ping is due (injectable for tests); the thread's waits
    between rounds are real time.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float | None,
        checks: Sequence[Callable[[], bool]],
        status: Callable[[], str] | None = None,
        *,
        status_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self._clock = clock
        self.interval = interval
        self.checks = list(checks)
        self.status = status
        self.status_interval = status_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()
        self._last_status: str | None = None
        self._last_ping = float("-inf")
        self.pings = 0  # WATCHDOG=1 sent, for status/tests

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.interval is None and self.status is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def healthy(self) -> bool:
        """Run every check (all of them, to log each failure) and report whether all pass."""
        failing: set[str] = set()
        for check in self.checks:
            name = getattr(check, "__name__", repr(check))
            try:
                ok = bool(check())
            except Exception as exc:
                ok = False
                if name not in self._failing:
                    log.warning("watchdog_check_raised", check=name, error=repr(exc))
            if not ok:
                failing.add(name)
        for name in failing - self._failing:
            log.error("watchdog_check_failed", check=name, action="withholding WATCHDOG=1")
        for name in self._failing - failing:
            log.info("watchdog_check_recovered", check=name)
        self._failing = failing
        return not failing

    def tick(self) -> None:
        """One round: ping if due and healthy, refresh STATUS= if changed."""
        now = self._clock()
        due = self.interval is not None and now - self._last_ping >= self.interval * 0.99
        if due and self.healthy() and self.notifier.watchdog():
            self._last_ping = now
            self.pings += 1
        if self.status is not None:
            try:
                text = self.status()
            except Exception as exc:
                log.warning("watchdog_status_failed", error=repr(exc))
            else:
                if text != self._last_status and self.notifier.status(text):
                    self._last_status = text

    def _period(self) -> float:
        periods = [self.status_interval] if self.status is not None else []
        if self.interval is not None:
            periods.append(self.interval)
        return max(0.01, min(periods))

    def _run(self) -> None:
        period = self._period()
        # While a check fails, re-check often so that a recovery is pinged well before
        # systemd's deadline (a ping is already overdue by then).
        retry = min(period, max(0.01, (self.interval or period) / 10))
        while True:
            try:
                self.tick()
            except Exception:  # tick() guards itself; this is belt and braces
                log.exception("watchdog_tick_failed")
            if self._stop.wait(retry if self._failing else period):
                return
