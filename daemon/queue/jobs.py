"""The durable job queue: one row per (image path, generator).

States: ``pending`` -> ``leased`` (claimed by a worker) -> ``done`` | ``failed`` (not
retryable) | ``dead`` (retries exhausted), or back to ``pending`` for a retry. Rows are
never deleted on claim, so a crash mid-caption loses nothing: an expired lease goes back
to ``pending``.

Every write is a single statement (or a ``BEGIN IMMEDIATE`` transaction), so several
threads and processes may enqueue and claim at once; each job is claimed once.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import Any

from daemon.errors import ErrorType
from daemon.queue.db import HISTORY_KEEP, Database

BATCH = 1000


class JobState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


@dataclass(slots=True)
class Job:
    id: int
    path: str
    generator: str
    priority: int
    state: JobState
    attempts: int
    enqueued_at: float
    not_before: float
    lease_until: float | None
    error_type: str | None
    error_message: str | None
    outcome: str | None
    rerun: bool
    updated_at: float
    options: dict | None = None  # an explicit request's options (force, post_process...)


_COLS = (
    "id, path, generator, priority, state, attempts, enqueued_at, not_before, "
    "lease_until, error_type, error_message, outcome, rerun, updated_at, options"
)


def _job(row: tuple) -> Job:
    j = Job(*row)
    j.state = JobState(j.state)
    j.rerun = bool(j.rerun)
    j.not_before = float(j.not_before)
    j.options = json.loads(j.options) if j.options else None
    return j


def _options_json(options: dict | None) -> str | None:
    return json.dumps(options, sort_keys=True, separators=(",", ":")) if options else None


def _claim_order(j: Job) -> tuple[int, float, int]:
    return (-j.priority, j.enqueued_at, j.id)


# Upsert. In SET, column names refer to the row's values *before* the update.
#   new                  -> pending
#   pending              -> priority = max(old, new); age and attempts kept; a raised
#                           priority also ends a retry wait (an explicit request acts now)
#   leased               -> rerun = 1, priority raised; ack() then re-queues it
#   done / failed / dead -> pending afresh (attempts 0, error cleared, enqueued now)
# options (an explicit request's JSON) replace the old ones when given; an enqueue
# without options keeps those of a pending/leased job and clears those of a finished one.
# On a pending job it also marks them ``"requeued": true``: the file needs captioning
# for its own sake now, so cancelling the request must not put back a finished state.
_ENQUEUE = """
INSERT INTO jobs (path, generator, priority, state, attempts, enqueued_at, not_before,
                  updated_at, options)
VALUES (?1, ?2, ?3, 'pending', 0, ?4, 0, ?4, ?5)
ON CONFLICT (path, generator) DO UPDATE SET
    options       = CASE WHEN state = 'pending' AND excluded.options IS NULL AND options IS NOT NULL
                         THEN json_set(options, '$.requeued', json('true'))
                         WHEN state IN ('pending', 'leased')
                         THEN coalesce(excluded.options, options) ELSE excluded.options END,
    priority      = CASE WHEN state IN ('pending', 'leased')
                         THEN max(priority, excluded.priority) ELSE excluded.priority END,
    rerun         = CASE WHEN state = 'leased' THEN 1 ELSE rerun END,
    attempts      = CASE WHEN state IN ('pending', 'leased') THEN attempts ELSE 0 END,
    crashes       = CASE WHEN state IN ('pending', 'leased') THEN crashes ELSE 0 END,
    errno         = CASE WHEN state IN ('pending', 'leased') THEN errno END,
    error_type    = CASE WHEN state IN ('pending', 'leased') THEN error_type END,
    error_message = CASE WHEN state IN ('pending', 'leased') THEN error_message END,
    outcome       = CASE WHEN state IN ('pending', 'leased') THEN outcome END,
    enqueued_at   = CASE WHEN state IN ('pending', 'leased')
                         THEN enqueued_at ELSE excluded.enqueued_at END,
    not_before    = CASE WHEN state = 'leased' THEN not_before
                         WHEN state = 'pending' AND excluded.priority <= priority THEN not_before
                         ELSE 0 END,
    lease_until   = CASE WHEN state = 'leased' THEN lease_until END,
    state         = CASE WHEN state = 'leased' THEN 'leased' ELSE 'pending' END,
    updated_at    = excluded.updated_at
"""

# The generators with pending jobs, one index probe each (a recursive "skip scan":
# the next generator name after the last one), then whether any of them is due.
_PENDING_GENERATORS = """
WITH RECURSIVE g(name) AS (
    SELECT (SELECT min(generator) FROM jobs INDEXED BY jobs_due WHERE state = 'pending')
    UNION ALL
    SELECT (SELECT min(generator) FROM jobs INDEXED BY jobs_due
            WHERE state = 'pending' AND generator > g.name)
    FROM g WHERE g.name IS NOT NULL
)
SELECT name FROM g WHERE name IS NOT NULL AND EXISTS (
    SELECT 1 FROM jobs INDEXED BY jobs_due
    WHERE state = 'pending' AND generator = g.name AND not_before <= ?1
)
"""
# INDEXED BY: otherwise the planner may prefer jobs_due for the not_before range and
# sort every pending job of the generator on each claim (measured: 1,400 vs 9,000/s).
_CLAIM = f"""
UPDATE jobs SET state = 'leased', lease_until = ?1, attempts = attempts + 1, updated_at = ?2
WHERE id IN (
    SELECT id FROM jobs INDEXED BY jobs_claim
    WHERE state = 'pending' AND generator = ?3 AND not_before <= ?2
    ORDER BY priority DESC, enqueued_at, id
    LIMIT ?4
)
RETURNING {_COLS}
"""

# A backfill's claim (JobQueue with an owner): pending jobs of one generator under some
# folders, not explicit requests (options: someone waits for the daemon's answer), in
# claim order, leased under the owner's name.
_CLAIM_OWNED = f"""
UPDATE jobs SET state = 'leased', lease_until = :until, lease_owner = :owner,
    attempts = attempts + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM jobs INDEXED BY jobs_claim
    WHERE state = 'pending' AND generator = :generator AND not_before <= :now
      AND options IS NULL AND ({{under}}){{skip}}
    ORDER BY priority DESC, enqueued_at, id
    LIMIT :limit
)
RETURNING {_COLS}
"""

# A rerun (the file changed while leased) always goes back to pending, afresh. Its
# options are kept only when a new request replaced those of the finished run (?4).
_ACK = """
UPDATE jobs SET
    options       = CASE WHEN rerun AND options IS NOT ?4 THEN options END,
    state         = CASE WHEN rerun THEN 'pending' ELSE 'done' END,
    outcome       = CASE WHEN rerun THEN NULL ELSE ?1 END,
    attempts      = CASE WHEN rerun THEN 0 ELSE attempts END,
    crashes       = CASE WHEN rerun THEN 0 ELSE crashes END,
    not_before    = 0,
    rerun         = 0,
    lease_until   = NULL,
    error_type    = NULL,
    error_message = NULL,
    errno         = NULL,
    lease_owner   = NULL,
    updated_at    = ?2
WHERE id = ?3 AND state = 'leased' AND lease_owner IS ?5
"""

# ?1 retryable, ?2 max_attempts, ?3 now, ?4 backoff_max, ?5 backoff_base, ?6 jitter
# factor, ?7 error_type, ?8 message, ?9 id. Delay: min(max, base * 2**(attempts-1)) * jitter.
_FAIL = """
UPDATE jobs SET
    state = CASE
        WHEN rerun THEN 'pending'
        WHEN NOT ?1 THEN 'failed'
        WHEN attempts < ?2 THEN 'pending'
        ELSE 'dead' END,
    not_before = CASE
        WHEN rerun THEN 0
        WHEN ?1 AND attempts < ?2
            THEN ?3 + min(?4, ?5 * (1 << min(max(attempts - 1, 0), 40))) * ?6
        ELSE not_before END,
    attempts      = CASE WHEN rerun THEN 0 ELSE attempts END,
    crashes       = CASE WHEN rerun THEN 0 ELSE crashes END,
    rerun         = 0,
    lease_until   = NULL,
    error_type    = ?7,
    error_message = ?8,
    errno         = ?10,
    lease_owner   = NULL,
    updated_at    = ?3
WHERE id = ?9 AND state = 'leased' AND lease_owner IS ?11
RETURNING state, path, generator
"""

_RELEASE = """
UPDATE jobs SET state = 'pending', attempts = max(attempts - 1, 0), not_before = ?1,
    lease_until = NULL, lease_owner = NULL, rerun = 0, updated_at = ?2
WHERE id = ?3 AND state = 'leased' AND lease_owner IS ?4
"""

# Lease recovery. An attempt that crashed the worker counts: a job that keeps killing
# the worker goes dead after max_attempts instead of looping forever. ``{which}``
# chooses whose leases (see the recover_* methods).
_RECOVER_SET = f"""
UPDATE jobs SET
    state = CASE WHEN rerun OR attempts < ?1 THEN 'pending' ELSE 'dead' END,
    attempts = CASE WHEN rerun THEN 0 ELSE attempts END,
    error_type = CASE WHEN rerun OR attempts < ?1 THEN error_type
                      ELSE '{ErrorType.WORKER_CRASH.value}' END,
    error_message = CASE WHEN rerun OR attempts < ?1 THEN error_message
                         ELSE 'lease expired on the last attempt (worker crashed?)' END,
    not_before = 0, rerun = 0, lease_until = NULL, lease_owner = NULL, updated_at = ?2
"""
# Jobs leased by the daemon itself carry no owner; a backfill driver (daemon.backfill)
# leases under its own name. jobs_lease holds the leased rows only.
_RECOVER = _RECOVER_SET + "WHERE state = 'leased' AND lease_until < ?3"
_RECOVER_OWN_ALL = (
    _RECOVER_SET + "WHERE state = 'leased' AND (lease_owner IS NULL OR lease_until < ?3)"
)
_RECOVER_FOREIGN = (
    _RECOVER_SET + "WHERE state = 'leased' AND lease_until < ?3 AND lease_owner IS NOT NULL"
)
_RECOVER_OWNER = _RECOVER_SET + "WHERE state = 'leased' AND lease_until >= 0 AND lease_owner = ?4"
_RECOVERED = " RETURNING path, generator, state, error_type, error_message, attempts"
_RECOVER, _RECOVER_OWN_ALL, _RECOVER_FOREIGN, _RECOVER_OWNER = (
    q + _RECOVERED for q in (_RECOVER, _RECOVER_OWN_ALL, _RECOVER_FOREIGN, _RECOVER_OWNER)
)

# One failed attempt into job_history, and the job's rows beyond the last HISTORY_KEEP out.
_HISTORY = """
INSERT INTO job_history (path, generator, at, state, error_type, error_message, attempt)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
"""
_HISTORY_TRIM = f"""
DELETE FROM job_history WHERE path = ?1 AND generator = ?2 AND id <= (
    SELECT id FROM job_history WHERE path = ?1 AND generator = ?2
    ORDER BY id DESC LIMIT 1 OFFSET {HISTORY_KEEP})
"""


def counts_of(tally: dict[tuple[str, str, str], int]) -> dict[str, dict[str, int]]:
    """generator -> state -> jobs, every state present, from :meth:`JobQueue.tally`."""
    out: dict[str, dict[str, int]] = {}
    for (gen, state, _), n in tally.items():
        states = out.setdefault(gen, {s.value: 0 for s in JobState})
        states[state] = states.get(state, 0) + n
    return out


def totals_of(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """state -> jobs over every generator, from :meth:`JobQueue.counts` or
    :func:`counts_of`."""
    totals: dict[str, int] = {}
    for states in counts.values():
        for state, n in states.items():
            totals[state] = totals.get(state, 0) + n
    return totals


def outcomes_of(tally: dict[tuple[str, str, str], int]) -> dict[str, dict[str, int]]:
    """generator -> outcome -> done jobs, from :meth:`JobQueue.tally`."""
    out: dict[str, dict[str, int]] = {}
    for (gen, state, outcome), n in tally.items():
        if state == JobState.DONE.value:
            out.setdefault(gen, {})[outcome] = n
    return out


def _narrow(sql: str, params: list, generator: str | None, prefix: str | None) -> tuple[str, list]:
    if generator is not None:
        sql += " AND generator = ?"
        params.append(generator)
    if prefix is not None:
        prefix = prefix.rstrip("/")
        sql += " AND path >= ? AND path < ?"
        params += [prefix + "/", prefix + "0"]
    return sql, params


def _chunks(items: Iterable, n: int) -> Iterable[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class JobQueue:
    """Durable, de-duplicating priority queue of caption jobs.

    ``clock`` and ``rng`` are injectable for tests. Priority: higher first; within a
    priority, oldest ``enqueued_at`` first.
    """

    def __init__(
        self,
        db: Database,
        *,
        max_attempts: int = 5,
        backoff_base: float = 5.0,
        backoff_max: float = 3600.0,
        lease_seconds: float = 600.0,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        owner: str | None = None,
    ) -> None:
        """``owner``: the name this queue leases under. None is the daemon (whose leases
        are all recovered when it starts); a backfill driver gives its own, so that the
        daemon leaves its leases alone until they expire."""
        self.owner = owner
        self.db = db
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.rng = rng

    def transaction(self) -> AbstractContextManager[Any]:
        """Group several calls (acks of a batch) in one ``BEGIN IMMEDIATE`` transaction."""
        return self.db.transaction()

    # -- producing -----------------------------------------------------------------

    def enqueue(
        self, path: str, generator: str, priority: int, *, options: dict | None = None
    ) -> Job:
        """Upsert one job; returns it as it is now. ``options`` (JSON-able) travel with
        the job to the worker (an explicit request's ``force``, ``post_process``...)."""
        with self.db.transaction() as conn:
            conn.execute(
                _ENQUEUE, (path, generator, priority, self.clock(), _options_json(options))
            )
            row = conn.execute(
                f"SELECT {_COLS} FROM jobs WHERE path = ? AND generator = ?", (path, generator)
            ).fetchone()
        return _job(row)

    def enqueue_many(self, items: Iterable[tuple[str, str, int]]) -> int:
        """Upsert (path, generator, priority) items, 1,000 per transaction.

        Returns the number of items processed.
        """
        n = 0
        for chunk in _chunks(items, BATCH):
            now = self.clock()
            with self.db.transaction() as conn:
                conn.executemany(_ENQUEUE, [(p, g, pr, now, None) for p, g, pr in chunk])
            n += len(chunk)
        return n

    # -- consuming -----------------------------------------------------------------

    def claim(
        self, generator: str, limit: int, *, exclude_prefixes: Sequence[str] = ()
    ) -> list[Job]:
        """Lease up to ``limit`` due pending jobs of ``generator``, in priority order.

        ``exclude_prefixes``: folders (absolute, no trailing slash) whose jobs are not
        claimed (paused roots).
        """
        now = self.clock()
        sql, params = _CLAIM, [now + self.lease_seconds, now, generator, limit]
        if exclude_prefixes:
            clause = "".join(
                f" AND NOT (path >= ?{5 + 2 * i} AND path < ?{6 + 2 * i})"
                for i in range(len(exclude_prefixes))
            )
            sql = sql.replace("AND not_before <= ?2", "AND not_before <= ?2" + clause)
            for prefix in exclude_prefixes:
                prefix = prefix.rstrip("/")
                params += [prefix + "/", prefix + "0"]  # '0' sorts right after '/'
        rows = self.db.conn.execute(sql, params).fetchall()
        return sorted((_job(r) for r in rows), key=_claim_order)

    def ack(self, job_id: int, outcome: str = "written", *, options: dict | None = None) -> None:
        """Leased -> done (or back to pending when the file changed meanwhile).

        ``options``: those the finished run was claimed with (cleared unless a new
        request replaced them meanwhile). No effect on a job that is no longer leased.
        """
        self.db.conn.execute(
            _ACK, (outcome, self.clock(), job_id, _options_json(options), self.owner)
        )

    def fail(
        self,
        job_id: int,
        error_type: str,
        message: str,
        retryable: bool,
        *,
        errno: int | None = None,
    ) -> JobState | None:
        """Record a failed attempt and return the job's new state.

        Retryable with attempts left -> pending after backoff
        ``min(backoff_max, backoff_base * 2**(attempts-1)) * (0.5 + rng())``; retryable but
        exhausted -> dead; not retryable -> failed. A job whose file changed while leased
        (rerun) goes back to pending afresh. For a job that is not leased, nothing
        changes and its current state is returned; None if the job no longer exists.
        """
        now = self.clock()
        with self.db.transaction() as conn:
            before = conn.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            row = conn.execute(
                _FAIL,
                (
                    1 if retryable else 0,
                    self.max_attempts,
                    now,
                    self.backoff_max,
                    self.backoff_base,
                    0.5 + self.rng(),
                    str(error_type),
                    message,
                    job_id,
                    errno,
                    self.owner,
                ),
            ).fetchone()
            if row is not None:
                state, path, generator = row
                error = str(error_type)
                self._remember(conn, path, generator, now, state, error, message, before[0])
        if row is not None:
            return JobState(row[0])
        cur = self.db.conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if cur is None else JobState(cur[0])

    def release(self, job_ids: Sequence[int], delay: float = 0.0) -> None:
        """Leased -> pending without counting the attempt, due after ``delay`` seconds.

        For jobs not processed at all (model not loaded, circuit open, shutdown).
        """
        if not job_ids:
            return
        now = self.clock()
        with self.db.transaction() as conn:
            conn.executemany(_RELEASE, [(now + delay, now, i, self.owner) for i in job_ids])

    def extend_lease(self, job_ids: Sequence[int], seconds: float | None = None) -> None:
        if not job_ids:
            return
        now = self.clock()
        until = now + (self.lease_seconds if seconds is None else seconds)
        with self.db.transaction() as conn:
            conn.executemany(
                "UPDATE jobs SET lease_until = ?, updated_at = ? "
                "WHERE id = ? AND state = 'leased' AND lease_owner IS ?",
                [(until, now, i, self.owner) for i in job_ids],
            )

    def recover_expired(self) -> int:
        """Leased jobs past their lease -> pending (dead if that was the last attempt)."""
        now = self.clock()
        return self._recover(_RECOVER, (self.max_attempts, now, now))

    def recover_all_leased(self) -> int:
        """At daemon start: every lease of the daemon's own (no owner) belongs to a dead
        process; recover them all, and other owners' (a backfill's) expired ones. A live
        backfill's leases stay with it."""
        now = self.clock()
        return self._recover(_RECOVER_OWN_ALL, (self.max_attempts, now, now))

    def recover_expired_foreign(self) -> int:
        """Expired leases of other owners (a backfill driver that died) -> pending (dead
        on the last attempt). The daemon calls it now and then; never touches its own."""
        now = self.clock()
        return self._recover(_RECOVER_FOREIGN, (self.max_attempts, now, now))

    def recover_owner(self, owner: str) -> int:
        """Every lease of ``owner`` (known dead: its process is gone) at once."""
        now = self.clock()
        return self._recover(_RECOVER_OWNER, (self.max_attempts, now, None, owner))

    def _recover(self, sql: str, params: tuple) -> int:
        now = self.clock()
        with self.db.transaction() as conn:
            rows = conn.execute(sql, params).fetchall()
            for path, generator, state, error_type, message, attempts in rows:
                # an attempt that ended with an error: the last one's, or the worker's crash
                # (attempts 0: the file changed meanwhile, a fresh start, not an attempt)
                if error_type is not None and (state != "pending" or attempts > 0):
                    self._remember(conn, path, generator, now, state, error_type, message, attempts)
        return len(rows)

    @staticmethod
    def _remember(
        conn: Any,
        path: str,
        generator: str,
        at: float,
        state: str,
        error_type: str,
        message: str | None,
        attempt: int,
    ) -> None:
        """One attempt that ended with an error, into the job's history (see db.py)."""
        conn.execute(_HISTORY, (path, generator, at, state, error_type, message, attempt))
        conn.execute(_HISTORY_TRIM, (path, generator))

    # -- leasing under an owner (a backfill driver) ---------------------------------

    def claim_under(
        self, generator: str, limit: int, prefixes: Sequence[str], skip: Collection[int] = ()
    ) -> list[Job]:
        """Lease, under this queue's owner, up to ``limit`` due pending jobs of
        ``generator`` under ``prefixes`` (folders, absolute), in claim order; explicit
        requests (jobs with options) are left to the daemon, and so are the ids in
        ``skip`` (jobs the caller gave back)."""
        if not prefixes:
            return []
        now = self.clock()
        params: dict[str, Any] = {
            "until": now + self.lease_seconds,
            "owner": self.owner,
            "now": now,
            "generator": generator,
            "limit": limit,
        }
        terms = []
        for i, prefix in enumerate(prefixes):
            p = prefix.rstrip("/")
            params[f"lo{i}"], params[f"hi{i}"] = p + "/", p + "0"
            terms.append(f"(path >= :lo{i} AND path < :hi{i})")
        if skip:
            params["skip"] = json.dumps(sorted(skip))
        sql = _CLAIM_OWNED.replace("{under}", " OR ".join(terms)).replace(
            "{skip}", " AND id NOT IN (SELECT value FROM json_each(:skip))" if skip else ""
        )
        rows = self.db.conn.execute(sql, params).fetchall()
        return sorted((_job(r) for r in rows), key=_claim_order)

    def extend_owned(self, seconds: float | None = None) -> int:
        """Extend every lease this queue's owner holds; how many it still holds."""
        now = self.clock()
        until = now + (self.lease_seconds if seconds is None else seconds)
        return self.db.conn.execute(
            "UPDATE jobs INDEXED BY jobs_lease SET lease_until = ? "
            "WHERE state = 'leased' AND lease_until >= 0 AND lease_owner IS ?",
            (until, self.owner),
        ).rowcount

    def held(self, job_ids: Iterable[int]) -> set[int]:
        """Those of ``job_ids`` still leased by this queue's owner."""
        out: set[int] = set()
        for chunk in _chunks(job_ids, 500):
            sql = (
                f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(chunk))}) "
                "AND state = 'leased' AND lease_owner IS ?"
            )
            out.update(r[0] for r in self.db.conn.execute(sql, [*chunk, self.owner]))
        return out

    def leased_paths(self, owner: str) -> list[str]:
        """Paths of the jobs ``owner`` holds."""
        rows = self.db.conn.execute(
            "SELECT path FROM jobs INDEXED BY jobs_lease "
            "WHERE state = 'leased' AND lease_until >= 0 AND lease_owner = ?",
            (owner,),
        )
        return [r[0] for r in rows]

    def leased_by_owner(self) -> dict[str, int]:
        """owner -> jobs leased, for owners other than the daemon."""
        rows = self.db.conn.execute(
            "SELECT lease_owner, count(*) FROM jobs INDEXED BY jobs_lease "
            "WHERE state = 'leased' AND lease_until >= 0 AND lease_owner IS NOT NULL "
            "GROUP BY lease_owner"
        )
        return dict(rows.fetchall())

    def count_claimable(self, generator: str, prefixes: Sequence[str]) -> int:
        """Pending jobs of ``generator`` under ``prefixes`` that :meth:`claim_under`
        would take (due or not)."""
        total = 0
        for prefix in prefixes:
            p = prefix.rstrip("/")
            row = self.db.conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'pending' AND generator = ? "
                "AND path >= ? AND path < ? AND options IS NULL",
                (generator, p + "/", p + "0"),
            ).fetchone()
            total += int(row[0])
        return total

    # -- removal -------------------------------------------------------------------

    def forget(self, path: str) -> int:
        """Delete every job of ``path`` (any state); returns how many."""
        return self.db.conn.execute("DELETE FROM jobs WHERE path = ?", (path,)).rowcount

    def forget_many(self, paths: Iterable[str]) -> int:
        """:meth:`forget` for many paths, 1,000 per transaction."""
        n = 0
        for chunk in _chunks(paths, BATCH):
            with self.db.transaction() as conn:
                before = conn.total_changes
                conn.executemany("DELETE FROM jobs WHERE path = ?", [(p,) for p in chunk])
                n += conn.total_changes - before
        return n

    def prune(self, keep: Callable[[str, str], bool]) -> int:
        """Delete the jobs (not leased ones) for which ``keep(path, generator)`` is False:
        jobs of a folder or generator removed from the configuration."""
        rows = self.db.conn.execute(
            "SELECT id, path, generator FROM jobs WHERE state != 'leased'"
        ).fetchall()
        drop = [(i,) for i, path, gen in rows if not keep(path, gen)]
        for chunk in _chunks(drop, BATCH):
            with self.db.transaction() as conn:
                conn.executemany("DELETE FROM jobs WHERE id = ?", chunk)
        return len(drop)

    # -- control (the API) ---------------------------------------------------------

    def retry(
        self,
        states: Iterable[str] = ("failed", "dead"),
        *,
        generator: str | None = None,
        prefix: str | None = None,
    ) -> int:
        """Failed/dead jobs -> pending afresh (attempts 0, error kept until the run)."""
        states = [str(s) for s in states if str(s) in ("failed", "dead")]
        if not states:
            return 0
        sql = (
            "UPDATE jobs SET state = 'pending', attempts = 0, not_before = 0, rerun = 0, "
            "lease_until = NULL, outcome = NULL, updated_at = ? "
            f"WHERE state IN ({','.join('?' * len(states))})"
        )
        params: list = [self.clock(), *states]
        sql, params = _narrow(sql, params, generator, prefix)
        return self.db.conn.execute(sql, params).rowcount

    def purge(
        self,
        states: Iterable[str] = ("done", "failed", "dead"),
        *,
        generator: str | None = None,
        prefix: str | None = None,
    ) -> list[tuple[str, str]]:
        """Delete jobs in ``states`` (never leased ones); returns (path, state) of each."""
        states = [str(s) for s in states if str(s) != "leased"]
        if not states:
            return []
        sql = f"DELETE FROM jobs WHERE state IN ({','.join('?' * len(states))})"
        sql, params = _narrow(sql, list(states), generator, prefix)
        with self.db.transaction() as conn:
            return [(r[0], r[1]) for r in conn.execute(sql + " RETURNING path, state", params)]

    def _systemic_where(self, errnos: Iterable[int]) -> tuple[str, list]:
        """Failed or dead jobs whose error was one of ``errnos``; also those recorded
        before errnos were kept, whose message carries it (``[Errno 28] ...``)."""
        codes = sorted(set(errnos))
        marks = " OR ".join("error_message LIKE ?" for _ in codes)
        sql = (
            f"state IN ('failed', 'dead') AND (errno IN ({','.join('?' * len(codes))}) "
            f"OR (errno IS NULL AND error_type = 'io' AND ({marks})))"
        )
        return sql, [*codes, *(f"%[Errno {c}]%" for c in codes)]

    def revive_systemic(self, prefix: str, errnos: Iterable[int]) -> int:
        """Failed or dead jobs under ``prefix`` that failed because of a condition of
        the system (a full disk, a vanished share; see :mod:`daemon.conditions`) ->
        pending afresh: the image was never at fault."""
        where, params = self._systemic_where(errnos)
        p = prefix.rstrip("/")
        cur = self.db.conn.execute(
            "UPDATE jobs SET state = 'pending', attempts = 0, not_before = 0, outcome = NULL, "
            f"lease_until = NULL, updated_at = ? WHERE {where} AND path >= ? AND path < ?",
            (self.clock(), *params, p + "/", p + "0"),
        )
        return cur.rowcount

    def count_systemic(self, errnos: Iterable[int]) -> int:
        """Failed or dead jobs whose error was one of ``errnos``."""
        where, params = self._systemic_where(errnos)
        return int(
            self.db.conn.execute(f"SELECT count(*) FROM jobs WHERE {where}", params).fetchone()[0]
        )

    def record_crash(self, job_id: int) -> int:
        """Count one crash of the model's process on this job's image; the count so far
        (kept with the job, so it survives a restart of the daemon)."""
        row = self.db.conn.execute(
            "UPDATE jobs SET crashes = crashes + 1 WHERE id = ? RETURNING crashes", (job_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def bury(self, job_id: int, error_type: str, message: str) -> bool:
        """Leased -> dead at once (an image that keeps crashing the model's process),
        unless its file changed meanwhile (``rerun``). True if it was buried."""
        now = self.clock()
        with self.db.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET state = 'dead', lease_until = NULL, lease_owner = NULL, "
                "error_type = ?, error_message = ?, updated_at = ? "
                "WHERE id = ? AND state = 'leased' AND NOT rerun AND lease_owner IS ? "
                "RETURNING path, generator, attempts",
                (error_type, message, now, job_id, self.owner),
            ).fetchone()
            if row is not None:
                self._remember(conn, row[0], row[1], now, "dead", error_type, message, row[2])
        return row is not None

    def cancel(self, job_id: int, restore: Job | None, options: dict | None) -> bool:
        """Undo an explicit enqueue while the job is still pending with the request's
        options: the row returns to ``restore`` (its state before the request) or is
        deleted when there was none. When the job was enqueued again since (the scanner
        found the image changed: ``requeued``), it stays pending, without the request's
        options, instead of going back to a finished state or away. False when the job
        already started, finished or belongs to another request."""
        rid = (options or {}).get("request")
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            job = _job(row)
            if job.state != JobState.PENDING or (job.options or {}).get("request") != rid:
                return False
            requeued = bool((job.options or {}).get("requeued"))
            r = restore
            if requeued and (r is None or r.state not in (JobState.PENDING, JobState.LEASED)):
                conn.execute(
                    "UPDATE jobs SET options = NULL, priority = ?, updated_at = ? WHERE id = ?",
                    (job.priority if r is None else r.priority, self.clock(), job_id),
                )
                return True
            if r is None:
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                return True
            conn.execute(
                "UPDATE jobs SET state = ?, priority = ?, attempts = ?, enqueued_at = ?, "
                "not_before = ?, error_type = ?, error_message = ?, outcome = ?, options = ?, "
                "rerun = 0, lease_until = NULL, updated_at = ? WHERE id = ?",
                (
                    str(r.state) if r.state != JobState.LEASED else "pending",
                    r.priority,
                    r.attempts,
                    r.enqueued_at,
                    r.not_before,
                    r.error_type,
                    r.error_message,
                    r.outcome,
                    _options_json(r.options),
                    self.clock(),
                    job_id,
                ),
            )
            return True

    # -- inspection ----------------------------------------------------------------

    def tally(self) -> dict[tuple[str, str, str], int]:
        """(generator, state, outcome or "") -> number of jobs: one pass over the
        ``jobs_state`` index, from which :meth:`counts` and :meth:`outcome_counts` are
        derived (see :func:`counts_of` and :func:`outcomes_of`)."""
        out: dict[tuple[str, str, str], int] = {}
        for state, gen, outcome, n in self.db.conn.execute(
            "SELECT state, generator, outcome, count(*) FROM jobs "
            "GROUP BY state, generator, outcome"
        ):
            key = (gen, state, outcome or "")  # NULL and "" are one outcome: add them up
            out[key] = out.get(key, 0) + n
        return out

    def open_count(self) -> int:
        """Jobs pending or leased (through the state index: costs what is open)."""
        row = self.db.conn.execute(
            "SELECT count(*) FROM jobs INDEXED BY jobs_state WHERE state IN ('pending', 'leased')"
        ).fetchone()
        return int(row[0])

    def totals(self) -> dict[str, int]:
        """state -> number of jobs over every generator."""
        return totals_of(counts_of(self.tally()))

    def counts_under(self, prefixes: Sequence[str]) -> dict[str, dict[str, int]]:
        """prefix (a folder, absolute) -> state -> number of jobs under it."""
        out: dict[str, dict[str, int]] = {}
        for prefix in prefixes:
            p = prefix.rstrip("/")
            rows = self.db.conn.execute(
                "SELECT state, count(*) FROM jobs WHERE path >= ? AND path < ? GROUP BY state",
                (p + "/", p + "0"),
            )
            out[prefix] = dict(rows.fetchall())
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """generator -> state -> number of jobs (every state present, zeros included)."""
        return counts_of(self.tally())

    def outcome_counts(self) -> dict[str, dict[str, int]]:
        """generator -> outcome -> number of done jobs."""
        return outcomes_of(self.tally())

    def pending_generators(self) -> set[str]:
        """Generators that have pending jobs due now. The worker asks before every
        claim, so this is a skip scan over ``jobs_due``: one index probe per generator,
        whatever the backlog (100,000 pending: 0.03 ms; a plain ``DISTINCT`` read
        every pending entry, 20-70 ms)."""
        return {r[0] for r in self.db.conn.execute(_PENDING_GENERATORS, (self.clock(),))}

    def next_due(self, generator: str) -> float | None:
        """Earliest ``not_before`` among the pending jobs of ``generator``."""
        row = self.db.conn.execute(
            "SELECT min(not_before) FROM jobs WHERE state = 'pending' AND generator = ?",
            (generator,),
        ).fetchone()
        return row[0]

    def oldest_pending_age(self) -> float | None:
        """Seconds since the oldest pending job was enqueued; None when none pending."""
        row = self.db.conn.execute(
            "SELECT min(enqueued_at) FROM jobs WHERE state = 'pending'"
        ).fetchone()
        return None if row[0] is None else max(0.0, self.clock() - row[0])

    def jobs(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """Jobs of one state (pending: in claim order; others: most recently updated first)."""
        if state is None:
            sql = f"SELECT {_COLS} FROM jobs ORDER BY updated_at DESC, id DESC LIMIT ?"
            params: tuple = (limit,)
        elif state == JobState.PENDING:
            sql = (
                f"SELECT {_COLS} FROM jobs WHERE state = 'pending' "
                "ORDER BY priority DESC, enqueued_at, id LIMIT ?"
            )
            params = (limit,)
        else:
            sql = (
                f"SELECT {_COLS} FROM jobs WHERE state = ? ORDER BY updated_at DESC, id DESC "
                "LIMIT ?"
            )
            params = (str(state), limit)
        return [_job(r) for r in self.db.conn.execute(sql, params)]

    def finished_since(self, since: float) -> list[Job]:
        """Jobs that ended (done, failed, dead) at or after ``since``."""
        rows = self.db.conn.execute(
            f"SELECT {_COLS} FROM jobs WHERE updated_at >= ? "
            "AND state IN ('done', 'failed', 'dead') ORDER BY updated_at, id",
            (since,),
        )
        return [_job(r) for r in rows]

    def recent_errors(self, limit: int = 20) -> list[Job]:
        """Jobs carrying an error (failed, dead, or pending a retry), newest first."""
        rows = self.db.conn.execute(
            f"SELECT {_COLS} FROM jobs WHERE error_type IS NOT NULL "
            "ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [_job(r) for r in rows]

    def report_jobs(self, prefix: str) -> list[tuple]:
        """(path, generator, state, outcome, error_type, error message cut to 200
        characters) of the jobs under the folder ``prefix`` that a dataset report counts:
        all but those done with captiond's own caption (written, unchanged)."""
        p = prefix.rstrip("/")
        return self.db.conn.execute(
            "SELECT path, generator, state, outcome, error_type, substr(error_message, 1, 200) "
            "FROM jobs WHERE path >= ? AND path < ? AND NOT (state = 'done' AND outcome IN "
            "('written', 'unchanged'))",
            (p + "/", p + "0"),
        ).fetchall()

    def get(self, path: str, generator: str) -> Job | None:
        row = self.db.conn.execute(
            f"SELECT {_COLS} FROM jobs WHERE path = ? AND generator = ?", (path, generator)
        ).fetchone()
        return None if row is None else _job(row)

    def get_many(self, job_ids: Iterable[int]) -> dict[int, Job]:
        """Jobs by id (missing ids are absent), 500 per query."""
        out: dict[int, Job] = {}
        for chunk in _chunks(job_ids, 500):
            sql = f"SELECT {_COLS} FROM jobs WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self.db.conn.execute(sql, chunk):
                out[row[0]] = _job(row)
        return out

    def get_by_id(self, job_id: int) -> Job | None:
        row = self.db.conn.execute(f"SELECT {_COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    # -- browsing (the web UI) -------------------------------------------------------

    def jobs_of(self, path: str) -> list[Job]:
        """Every job of one image (one per generator)."""
        rows = self.db.conn.execute(
            f"SELECT {_COLS} FROM jobs WHERE path = ? ORDER BY generator", (path,)
        )
        return [_job(r) for r in rows]

    def failed_attempts(self, path: str) -> list[dict[str, Any]]:
        """The attempts of an image's jobs that ended with an error, newest first (the
        last ``HISTORY_KEEP`` per job: see ``db.py``)."""
        rows = self.db.conn.execute(
            "SELECT generator, at, state, error_type, error_message, attempt FROM job_history "
            "WHERE path = ? ORDER BY id DESC",
            (path,),
        )
        keys = ("generator", "at", "state", "error_type", "error_message", "attempt")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def retry_job(self, path: str, generator: str) -> bool:
        """One failed or dead job -> pending afresh (as :meth:`retry`)."""
        cur = self.db.conn.execute(
            "UPDATE jobs SET state = 'pending', attempts = 0, not_before = 0, rerun = 0, "
            "lease_until = NULL, outcome = NULL, updated_at = ? "
            "WHERE path = ? AND generator = ? AND state IN ('failed', 'dead')",
            (self.clock(), path, generator),
        )
        return cur.rowcount > 0

    def pending_by_priority(self, bounds: Sequence[int]) -> list[int]:
        """Pending and leased jobs per priority class: ``bounds`` are the classes'
        lower bounds, highest first (``[150, 50]`` -> [>= 150, 50..149, < 50])."""
        out = [0] * (len(bounds) + 1)
        for priority, n in self.db.conn.execute(
            "SELECT priority, count(*) FROM jobs WHERE state IN ('pending', 'leased') "
            "GROUP BY priority"
        ):
            i = next((k for k, b in enumerate(bounds) if priority >= b), len(bounds))
            out[i] += n
        return out
