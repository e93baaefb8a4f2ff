"""The record of backfill runs (:mod:`daemon.backfill`): one row per driver, named by
its lease owner, with where it runs and its progress as JSON.

The driver rewrites its row every few seconds (its heartbeat, read by ``captiond
status`` and ``GET /api/backfills``) and marks it finished, failed or stopped at the
end. A row left ``running`` by a driver that died is told apart by its age
(:func:`daemon.backfill.status.backfill_status`) or, on the same host, by its pid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.queue.db import Database

KEEP_FINISHED = 20  # rows of runs that ended, kept for status


@dataclass(slots=True)
class BackfillRow:
    owner: str
    host: str
    pid: int
    started_at: float
    updated_at: float
    state: str  # running, finished, failed, stopped, died
    info: dict[str, Any]


_COLS = "owner, host, pid, started_at, updated_at, state, info"


def _row(r: tuple) -> BackfillRow:
    return BackfillRow(r[0], r[1], int(r[2]), r[3], r[4], r[5], json.loads(r[6] or "{}"))


class BackfillRegistry:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def register(self, owner: str, host: str, pid: int, info: dict[str, Any]) -> None:
        now = self.clock()
        self.db.conn.execute(
            f"INSERT OR REPLACE INTO backfills ({_COLS}) VALUES (?, ?, ?, ?, ?, 'running', ?)",
            (owner, host, pid, now, now, json.dumps(info)),
        )

    def update(self, owner: str, info: dict[str, Any], state: str | None = None) -> None:
        """New progress (and state); also the heartbeat of a running driver."""
        self.db.conn.execute(
            "UPDATE backfills SET info = ?, updated_at = ?, state = coalesce(?, state) "
            "WHERE owner = ?",
            (json.dumps(info), self.clock(), state, owner),
        )

    def mark(self, owner: str, state: str) -> None:
        self.db.conn.execute("UPDATE backfills SET state = ? WHERE owner = ?", (state, owner))

    def get(self, owner: str) -> BackfillRow | None:
        r = self.db.conn.execute(
            f"SELECT {_COLS} FROM backfills WHERE owner = ?", (owner,)
        ).fetchone()
        return None if r is None else _row(r)

    def running(self) -> list[BackfillRow]:
        rows = self.db.conn.execute(
            f"SELECT {_COLS} FROM backfills WHERE state = 'running' ORDER BY started_at"
        )
        return [_row(r) for r in rows]

    def recent(self, limit: int = 5) -> list[BackfillRow]:
        """The latest runs, newest first."""
        rows = self.db.conn.execute(
            f"SELECT {_COLS} FROM backfills ORDER BY started_at DESC LIMIT ?", (limit,)
        )
        return [_row(r) for r in rows]

    def prune(self, keep: int = KEEP_FINISHED) -> None:
        """Forget all but the ``keep`` latest runs that ended."""
        self.db.conn.execute(
            "DELETE FROM backfills WHERE state != 'running' AND owner NOT IN ("
            "SELECT owner FROM backfills WHERE state != 'running' "
            "ORDER BY started_at DESC LIMIT ?)",
            (keep,),
        )
