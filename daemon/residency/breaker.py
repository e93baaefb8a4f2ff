"""A circuit breaker per generator.

Closed: work flows. After ``threshold`` consecutive failures (loads or generate()
calls) it opens for ``cooldown`` seconds: the generator's jobs wait in the queue
instead of burning attempts. Then it is half-open: exactly one attempt (a probe) is let
through; until it ends nothing else is; a success closes the breaker, a failure opens
it again (the cool-down doubles, up to an hour). A probe whose outcome never comes
(the caller gave up on it) is released after ``probe_timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from daemon.errors import Classified

MAX_COOLDOWN_SECONDS = 3600.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Not thread-safe by itself: the model manager calls it under its lock."""

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.opened_at: float | None = None
        self.last_error: Classified | None = None
        self.last_failure_kind = ""
        self.times_opened = 0
        self.probe_timeout = 3600.0
        self._probe_since: float | None = None  # a half-open probe is under way

    def allows(self) -> bool:
        """May work (a load or a batch) be attempted now? Moves open -> half-open and
        then lets exactly one probe through until it succeeds or fails."""
        now = self._clock()
        if self.state is BreakerState.OPEN:
            assert self.opened_at is not None
            if now - self.opened_at < self.cooldown:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probe_since = None
        if self.state is BreakerState.HALF_OPEN:
            if self._probe_since is not None and now - self._probe_since < self.probe_timeout:
                return False  # the probe is still running
            self._probe_since = now
        return True

    def blocked(self) -> bool:
        """Open and still cooling down. An open breaker past its cool-down turns
        half-open here (without taking the probe: :meth:`allows` does that)."""
        if self.state is BreakerState.OPEN:
            assert self.opened_at is not None
            if self._clock() - self.opened_at < self.cooldown:
                return True
            self.state = BreakerState.HALF_OPEN
            self._probe_since = None
        return False

    def may_try(self) -> bool:
        """Would :meth:`allows` let work through now? Takes nothing: check this before
        the other reasons not to try, then take the probe with :meth:`allows`."""
        if self.blocked():
            return False
        if self.state is BreakerState.HALF_OPEN and self._probe_since is not None:
            return self._clock() - self._probe_since >= self.probe_timeout
        return True

    def release(self) -> None:
        """The probe taken by :meth:`allows` said nothing about health (the image's own
        fault, or the attempt never started): let the next attempt probe instead."""
        self._probe_since = None

    def half_open(self) -> None:
        """Let the next attempt through as a probe now (an explicit load request)."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self._probe_since = None

    def success(self) -> None:
        self._probe_since = None
        if self.state is not BreakerState.CLOSED or self.consecutive:
            self.state = BreakerState.CLOSED
            self.consecutive = 0
            self.cooldown = self.base_cooldown

    def failure(self, kind: str, error: Classified) -> bool:
        """Record a failure; True when this failure opened the breaker."""
        self._probe_since = None
        self.consecutive += 1
        self.last_error = error
        self.last_failure_kind = kind
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, MAX_COOLDOWN_SECONDS)
            return self._open()
        if self.state is BreakerState.CLOSED and self.consecutive >= self.threshold:
            return self._open()
        return False

    def _open(self) -> bool:
        self.state = BreakerState.OPEN
        self.opened_at = self._clock()
        self.times_opened += 1
        return True

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state.value,
            "consecutive_failures": self.consecutive,
            "threshold": self.threshold,
            "times_opened": self.times_opened,
        }
        if self.state is BreakerState.OPEN and self.opened_at is not None:
            left = self.cooldown - (self._clock() - self.opened_at)
            out["retry_in_seconds"] = max(0.0, round(left, 1))
        if self.last_error is not None:
            out["last_error"] = {
                "kind": self.last_failure_kind,
                "error_type": self.last_error.error_type.value,
                "message": self.last_error.message,
            }
        return out
