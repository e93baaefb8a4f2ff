"""Backfills as ``captiond status`` and ``GET /api/backfills`` show them: read from the
database (the driver's row and the jobs it holds), so the daemon never imports Ray."""

from __future__ import annotations

import time
from typing import Any

from daemon.queue import JobQueue
from daemon.queue.backfills import BackfillRegistry


def backfill_status(queue: JobQueue, *, limit: int = 5) -> dict[str, Any]:
    """The latest runs (newest first) with their progress, actors and leased jobs; a
    ``running`` row whose heartbeat is older than its lease reads ``unresponsive``."""
    registry = BackfillRegistry(queue.db)
    leased = queue.leased_by_owner()
    now = time.time()
    runs = []
    for row in registry.recent(limit):
        info = dict(row.info)
        state = row.state
        lease = float(info.get("lease_seconds") or 120.0)
        if state == "running" and now - row.updated_at > lease:
            state = "unresponsive"
        info.pop("proc_start", None)
        runs.append(
            info
            | {
                "owner": row.owner,
                "host": row.host,
                "pid": row.pid,
                "state": state,
                "started_at": row.started_at,
                "heartbeat_age_seconds": round(now - row.updated_at, 1),
                "leased": leased.get(row.owner, 0),
            }
        )
    return {
        "running": sum(1 for r in runs if r["state"] == "running"),
        "leased": sum(leased.values()),
        "runs": runs,
    }
