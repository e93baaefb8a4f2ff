"""The durable job queue: upsert, claim order, retries, leases, concurrency."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon.config import PRIORITY_BACKFILL, PRIORITY_EXPLICIT, PRIORITY_NEW
from daemon.queue import Database, Job, JobQueue, JobState
from daemon.queue.jobs import BATCH

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "state" / "captiond.db")
    yield d
    d.close()


def make_queue(db: Database, clock: FakeClock, **kw) -> JobQueue:
    kw.setdefault("rng", lambda: 0.5)  # jitter factor 1.0
    return JobQueue(db, clock=clock, **kw)


@pytest.fixture
def q(db: Database, clock: FakeClock) -> JobQueue:
    return make_queue(db, clock)


def only(q: JobQueue, gen: str = "wd") -> Job:
    jobs = q.claim(gen, 10)
    assert len(jobs) == 1, jobs
    return jobs[0]


# -- database ------------------------------------------------------------------------


def test_database_pragmas_schema_and_parent_dir(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "q.db"
    db = Database(path, busy_timeout_ms=1234)
    assert path.exists()
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
    assert db.user_version() == 1
    assert db.integrity_check() == "ok"
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "files", "captions", "dir_versions"} <= tables
    db.close()
    # reopening keeps data and version
    db2 = Database(path)
    assert db2.user_version() == 1
    db2.close()


def test_a_checkpoint_moves_the_wal_into_the_file_and_waits_for_no_reader(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    db = Database(path)
    q = JobQueue(db)
    db.checkpoint()
    q.enqueue_many((f"/img/{i}.jpg", "wd", 1) for i in range(200))
    size = path.stat().st_size
    busy, frames, done = db.checkpoint()
    assert (busy, done) == (0, frames) and frames > 0
    assert path.stat().st_size > size  # the pages are in the database file now

    # A reader holding a snapshot: the frames it may still need stay in the WAL, and
    # the checkpoint returns at once instead of waiting for it.
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM jobs").fetchone()
    q.enqueue_many((f"/more/{i}.jpg", "wd", 1) for i in range(50))
    busy, frames, done = db.checkpoint()
    assert frames > done
    reader.rollback()
    reader.close()
    assert db.checkpoint()[2] == db.checkpoint()[1]
    assert db.integrity_check() == "ok" and q.totals()["pending"] == 250
    db.close()


def test_a_database_made_before_jobs_state_gets_it_at_open_and_keeps_its_version(
    tmp_path: Path,
) -> None:
    """A queue written before the status index existed gets the index at open, keeps
    every job, and stays at schema version 1, so an earlier captiond still opens it."""
    from daemon.queue.db import _SCHEMA_V1

    path = tmp_path / "q.db"
    conn = sqlite3.connect(path)
    for stmt in _SCHEMA_V1:
        conn.execute(stmt)
    conn.execute(
        "INSERT INTO jobs (path, generator, priority, state, enqueued_at, updated_at, outcome)"
        " VALUES ('/a.jpg', 'wd', 1, 'done', 1.0, 1.0, 'written'),"
        " ('/b.jpg', 'wd', 1, 'pending', 2.0, 2.0, NULL)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    db = Database(path)
    assert db.user_version() == 1
    indexes = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "jobs_state" in indexes
    q = JobQueue(db)
    assert q.counts()["wd"] == {"pending": 1, "leased": 0, "done": 1, "failed": 0, "dead": 0}
    assert q.outcome_counts() == {"wd": {"written": 1}}
    assert db.integrity_check() == "ok"
    db.close()


def test_status_counts_read_the_index_only(db: Database, q: JobQueue) -> None:
    """The counts behind /status must not walk the table (5x slower at 100k jobs):
    every query they run is answered from a covering index."""
    q.enqueue_many([(f"/d/{i}.jpg", "wd", PRIORITY_BACKFILL) for i in range(50)])
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    try:
        q.tally()
        q.oldest_pending_age()
    finally:
        db.conn.set_trace_callback(None)
    selects = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2
    for sql in selects:
        plan = " ".join(str(r[3]) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "COVERING INDEX jobs_state" in plan, (sql, plan)


def test_pending_generators_probes_the_index_instead_of_reading_the_backlog(
    db: Database, q: JobQueue, clock: FakeClock
) -> None:
    """The worker asks before every claim: every table access must be an index search
    (a SCAN would read the whole backlog: 20-70 ms at 100,000 pending)."""
    q.enqueue_many([(f"/d/{i}.jpg", g, PRIORITY_BACKFILL) for i in range(20) for g in "abc"])
    db.execute("UPDATE jobs SET not_before = ? WHERE generator = 'b'", (clock.t + 60,))
    q.claim("c", 20)  # all of c leased
    assert q.pending_generators() == {"a"}
    clock.advance(61)
    assert q.pending_generators() == {"a", "b"}
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    try:
        q.pending_generators()
    finally:
        db.conn.set_trace_callback(None)
    (sql,) = [s for s in seen if "WITH RECURSIVE" in s]
    plan = [str(r[3]) for r in db.conn.execute("EXPLAIN QUERY PLAN " + sql)]
    on_jobs = [p for p in plan if " jobs" in p]
    assert on_jobs and all(p.startswith("SEARCH jobs USING INDEX jobs_due") for p in on_jobs), plan


def test_tally_adds_up_null_and_empty_outcomes(db: Database, q: JobQueue) -> None:
    q.enqueue_many([(f"/d/{i}.jpg", "wd", PRIORITY_BACKFILL) for i in range(3)])
    db.execute("UPDATE jobs SET state = 'done', outcome = CASE WHEN id = 1 THEN '' END")
    assert q.tally() == {("wd", "done", ""): 3}
    assert q.counts()["wd"]["done"] == 3
    assert q.outcome_counts() == {"wd": {"": 3}}


def test_tally_counts_and_outcomes_agree(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue_many([(f"/d/{i}.jpg", g, PRIORITY_BACKFILL) for i in range(4) for g in ("wd", "vlm")])
    jobs = q.claim("wd", 3)
    q.ack(jobs[0].id, "written")
    q.ack(jobs[1].id, "caption_exists")
    q.fail(jobs[2].id, "bad_image", "truncated", retryable=False)
    tally = q.tally()
    assert tally[("wd", "done", "written")] == 1
    assert tally[("wd", "done", "caption_exists")] == 1
    assert tally[("vlm", "pending", "")] == 4
    assert q.counts() == {
        "wd": {"pending": 1, "leased": 0, "done": 2, "failed": 1, "dead": 0},
        "vlm": {"pending": 4, "leased": 0, "done": 0, "failed": 0, "dead": 0},
    }
    assert q.outcome_counts() == {"wd": {"written": 1, "caption_exists": 1}}


def test_database_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    from daemon.queue import DatabaseError

    with pytest.raises(DatabaseError, match="newer"):
        Database(path)


def test_open_errors_advise_by_cause(tmp_path: Path) -> None:
    """Only a damaged file is worth moving aside; a locked (or full) one is not."""
    from daemon.queue import DatabaseError

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="Move the file aside"):
        Database(junk)
    path = tmp_path / "q.db"
    Database(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(DatabaseError) as ei:
            Database(path, busy_timeout_ms=50)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "locked" in str(ei.value) and "was not changed" in str(ei.value)
    assert "aside" not in str(ei.value)


def test_transaction_rolls_back_on_error(db: Database, q: JobQueue) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        q.enqueue("/a.jpg", "wd", 0)
        raise RuntimeError
    assert q.get("/a.jpg", "wd") is None
    with db.transaction():
        q.enqueue("/a.jpg", "wd", 0)
    assert q.get("/a.jpg", "wd") is not None


def test_one_connection_per_thread(db: Database) -> None:
    mine = db.conn
    assert db.conn is mine
    other: list[sqlite3.Connection] = []
    t = threading.Thread(target=lambda: other.append(db.conn))
    t.start()
    t.join()
    assert other[0] is not mine


def test_closed_database_refuses_use(tmp_path: Path) -> None:
    from daemon.queue import DatabaseError

    db = Database(tmp_path / "q.db")
    db.close()
    with pytest.raises(DatabaseError):
        db.conn  # noqa: B018


# -- enqueue / upsert --------------------------------------------------------------


def test_enqueue_new_is_pending(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)
    j = q.get("/a.jpg", "wd")
    assert j is not None
    assert (j.state, j.priority, j.attempts, j.enqueued_at) == (
        JobState.PENDING,
        100,
        0,
        clock.t,
    )


def test_upsert_dedups_pending_keeps_age_raises_priority(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)
    t0 = clock.t
    clock.advance(10)
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)
    clock.advance(10)
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)  # lower: does not lower it
    jobs = q.jobs(JobState.PENDING)
    assert len(jobs) == 1
    assert jobs[0].priority == PRIORITY_NEW
    assert jobs[0].enqueued_at == t0
    # another generator is another job
    q.enqueue("/a.jpg", "blip", 0)
    assert q.counts()["blip"]["pending"] == 1
    assert q.counts()["wd"]["pending"] == 1


def test_enqueue_many_batches_and_dedups(q: JobQueue) -> None:
    items = [(f"/d/{i}.jpg", "wd", 0) for i in range(2500)]
    assert q.enqueue_many(items) == 2500
    assert q.enqueue_many([*items[:10], ("/d/0.jpg", "wd", 50)]) == 11
    assert q.counts()["wd"]["pending"] == 2500
    assert q.get("/d/0.jpg", "wd").priority == 50


@pytest.mark.parametrize("final", ["done", "failed", "dead"])
def test_enqueue_after_finished_requeues_afresh(db: Database, clock: FakeClock, final: str) -> None:
    q = make_queue(db, clock, max_attempts=1)
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)
    j = only(q)
    if final == "done":
        q.ack(j.id, "written")
    else:
        assert q.fail(j.id, "io", "boom", retryable=final == "dead") == JobState(final)
    clock.advance(100)
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)
    j2 = q.get("/a.jpg", "wd")
    assert j2.state == JobState.PENDING
    assert j2.id == j.id
    assert (j2.attempts, j2.error_type, j2.error_message, j2.outcome) == (0, None, None, None)
    assert j2.priority == PRIORITY_BACKFILL  # the new priority, not max
    assert j2.enqueued_at == clock.t
    assert j2.not_before == 0


# -- claim ---------------------------------------------------------------------------


def test_claim_priority_order(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/backfill1.jpg", "wd", PRIORITY_BACKFILL)
    clock.advance(1)
    q.enqueue("/new1.jpg", "wd", PRIORITY_NEW)
    clock.advance(1)
    q.enqueue("/explicit.jpg", "wd", PRIORITY_EXPLICIT)
    clock.advance(1)
    q.enqueue("/new2.jpg", "wd", PRIORITY_NEW)
    clock.advance(1)
    q.enqueue("/backfill2.jpg", "wd", PRIORITY_BACKFILL)
    q.enqueue("/watchprio.jpg", "wd", PRIORITY_BACKFILL + 10)
    q.enqueue("/other.jpg", "blip", 1000)
    got = [j.path for j in q.claim("wd", 3)]
    assert got == ["/explicit.jpg", "/new1.jpg", "/new2.jpg"]
    got = [j.path for j in q.claim("wd", 10)]
    assert got == ["/watchprio.jpg", "/backfill1.jpg", "/backfill2.jpg"]
    assert q.claim("wd", 10) == []


def test_claim_sets_lease_and_counts_attempt(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    j = only(q)
    assert j.state == JobState.LEASED
    assert j.attempts == 1
    assert j.lease_until == clock.t + q.lease_seconds
    assert q.get("/a.jpg", "wd").state == JobState.LEASED
    assert q.claim("wd", 1) == []  # not claimable twice


def test_claim_respects_not_before(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    q.release([only(q).id], delay=30)
    assert q.claim("wd", 1) == []
    assert q.pending_generators() == set()
    assert q.next_due("wd") == clock.t + 30
    clock.advance(30)
    assert q.pending_generators() == {"wd"}
    assert len(q.claim("wd", 1)) == 1


# -- ack / fail / release ----------------------------------------------------------


def test_ack_marks_done_with_outcome(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    q.enqueue("/b.jpg", "wd", 0)
    a, b = q.claim("wd", 2)
    q.ack(a.id)
    q.ack(b.id, "caption_exists")
    assert q.get("/a.jpg", "wd").state == JobState.DONE
    assert q.get("/a.jpg", "wd").outcome == "written"
    assert q.get("/a.jpg", "wd").lease_until is None
    assert q.outcome_counts() == {"wd": {"written": 1, "caption_exists": 1}}
    assert q.counts()["wd"] == {"pending": 0, "leased": 0, "done": 2, "failed": 0, "dead": 0}


def test_ack_of_unleased_job_is_ignored(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    j = q.get("/a.jpg", "wd")
    q.ack(j.id)
    assert q.get("/a.jpg", "wd").state == JobState.PENDING
    q.ack(999_999)  # unknown id: no error


def test_backoff_grows_exponentially_with_jitter(db: Database, clock: FakeClock) -> None:
    rolls = iter([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    q = make_queue(
        db, clock, max_attempts=10, backoff_base=5, backoff_max=30, rng=lambda: next(rolls)
    )
    q.enqueue("/a.jpg", "wd", 0)
    delays = []
    for _ in range(6):
        j = only(q)
        assert q.fail(j.id, "generation", "oops", retryable=True) == JobState.PENDING
        nb = q.get("/a.jpg", "wd").not_before
        delays.append(nb - clock.t)
        clock.t = nb
    # base*2**(n-1), capped at 30, times (0.5 + rng): rng 0 -> x0.5, rng 1 -> x1.5
    assert delays == pytest.approx([2.5, 15.0, 20.0, 30.0, 30.0, 30.0])
    j = q.get("/a.jpg", "wd")
    assert (j.attempts, j.error_type, j.error_message) == (6, "generation", "oops")
    assert [e.path for e in q.recent_errors()] == ["/a.jpg"]


def test_jitter_spreads_retries(db: Database, clock: FakeClock) -> None:
    import random

    q = JobQueue(db, clock=clock, rng=random.Random(7).random)
    q.enqueue_many([(f"/{i}.jpg", "wd", 0) for i in range(20)])
    for j in q.claim("wd", 20):
        q.fail(j.id, "io", "x", retryable=True)
    due = {j.not_before for j in q.jobs(JobState.PENDING)}
    assert len(due) == 20  # all different
    assert all(clock.t + 2.5 <= d <= clock.t + 7.5 for d in due)


def test_max_attempts_then_dead(db: Database, clock: FakeClock) -> None:
    q = make_queue(db, clock, max_attempts=3)
    q.enqueue("/a.jpg", "wd", 0)
    states = []
    for _ in range(3):
        j = only(q)
        states.append(q.fail(j.id, "timeout", "slow", retryable=True))
        clock.advance(10_000)
    assert states == [JobState.PENDING, JobState.PENDING, JobState.DEAD]
    assert q.claim("wd", 1) == []
    assert q.counts()["wd"]["dead"] == 1


def test_non_retryable_fails_at_once(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    j = only(q)
    assert q.fail(j.id, "bad_image", "truncated", retryable=False) == JobState.FAILED
    j = q.get("/a.jpg", "wd")
    assert (j.state, j.error_type, j.error_message, j.attempts) == (
        JobState.FAILED,
        "bad_image",
        "truncated",
        1,
    )
    assert q.recent_errors()[0].path == "/a.jpg"
    assert q.claim("wd", 1) == []


def test_fail_of_unknown_or_unleased_job(q: JobQueue) -> None:
    assert q.fail(424242, "io", "x", retryable=True) is None
    q.enqueue("/a.jpg", "wd", 0)
    j = q.get("/a.jpg", "wd")
    assert q.fail(j.id, "io", "x", retryable=False) == JobState.PENDING  # unchanged
    assert q.get("/a.jpg", "wd").error_type is None


def test_release_does_not_count_attempt(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    q.enqueue("/b.jpg", "wd", 0)
    ids = [j.id for j in q.claim("wd", 2)]
    q.release(ids, delay=60)
    for p in ("/a.jpg", "/b.jpg"):
        j = q.get(p, "wd")
        assert (j.state, j.attempts, j.not_before, j.lease_until) == (
            JobState.PENDING,
            0,
            clock.t + 60,
            None,
        )
    q.release([])  # no-op


def test_extend_lease(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    j = only(q)
    clock.advance(500)
    q.extend_lease([j.id])
    assert q.get("/a.jpg", "wd").lease_until == clock.t + q.lease_seconds
    q.extend_lease([j.id], seconds=5)
    assert q.get("/a.jpg", "wd").lease_until == clock.t + 5
    clock.advance(6)
    assert q.recover_expired() == 1


# -- rerun while leased --------------------------------------------------------------


def test_enqueue_while_leased_sets_rerun_and_ack_requeues(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)
    j = only(q)
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)  # the file changed while being captioned
    leased = q.get("/a.jpg", "wd")
    assert leased.state == JobState.LEASED
    assert leased.rerun is True
    assert leased.priority == PRIORITY_NEW
    q.ack(j.id)
    j2 = q.get("/a.jpg", "wd")
    assert (j2.state, j2.rerun, j2.attempts, j2.outcome) == (JobState.PENDING, False, 0, None)
    j3 = only(q)
    q.ack(j3.id)
    assert q.get("/a.jpg", "wd").state == JobState.DONE


def test_rerun_survives_non_retryable_failure(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    j = only(q)
    q.enqueue("/a.jpg", "wd", 0)
    assert q.fail(j.id, "bad_image", "half written", retryable=False) == JobState.PENDING
    assert q.get("/a.jpg", "wd").rerun is False
    assert len(q.claim("wd", 1)) == 1


# -- leases and crash recovery ---------------------------------------------------------


def test_recover_expired_leases(db: Database, clock: FakeClock) -> None:
    q = make_queue(db, clock, lease_seconds=60)
    q.enqueue("/old.jpg", "wd", 0)
    only(q)
    clock.advance(30)
    q.enqueue("/young.jpg", "wd", 0)
    only(q)
    clock.advance(31)  # /old.jpg is past its lease, /young.jpg is not
    assert q.recover_expired() == 1
    old, young = q.get("/old.jpg", "wd"), q.get("/young.jpg", "wd")
    assert (old.state, old.attempts, old.lease_until) == (JobState.PENDING, 1, None)
    assert young.state == JobState.LEASED
    assert q.recover_all_leased() == 1
    assert q.get("/young.jpg", "wd").state == JobState.PENDING


def test_lease_expiring_on_last_attempt_goes_dead(db: Database, clock: FakeClock) -> None:
    q = make_queue(db, clock, max_attempts=2, lease_seconds=10)
    q.enqueue("/poison.jpg", "wd", 0)
    for _ in range(2):
        only(q)
        clock.advance(11)  # the worker died mid-job
        q.recover_expired()
    j = q.get("/poison.jpg", "wd")
    assert j.state == JobState.DEAD
    assert j.error_type == "worker_crash"


def test_forget_deletes_every_state(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    q.enqueue("/a.jpg", "blip", 0)
    q.enqueue("/b.jpg", "wd", 0)
    only(q, "blip")
    assert q.forget("/a.jpg") == 2
    assert q.get("/a.jpg", "wd") is None
    assert q.get("/a.jpg", "blip") is None
    assert q.forget_many(["/b.jpg", "/nope.jpg"]) == 1
    assert q.counts() == {}


# -- inspection ------------------------------------------------------------------------


def test_counts_include_zero_states_and_ages(q: JobQueue, clock: FakeClock) -> None:
    assert q.oldest_pending_age() is None
    assert q.next_due("wd") is None
    q.enqueue("/a.jpg", "wd", 0)
    clock.advance(5)
    q.enqueue("/b.jpg", "wd", 0)
    clock.advance(5)
    assert q.counts() == {"wd": {"pending": 2, "leased": 0, "done": 0, "failed": 0, "dead": 0}}
    assert q.oldest_pending_age() == 10
    assert [j.path for j in q.jobs(JobState.PENDING)] == ["/a.jpg", "/b.jpg"]
    j = q.claim("wd", 1)[0]
    assert [x.id for x in q.jobs(JobState.LEASED)] == [j.id]
    assert len(q.jobs(limit=1)) == 1
    assert q.get_by_id(j.id).path == "/a.jpg"


# -- concurrency -------------------------------------------------------------------------


def test_threads_claim_each_job_exactly_once(db: Database) -> None:
    q = JobQueue(db)
    n = 2000
    q.enqueue_many([(f"/img/{i}.jpg", "wd", i % 3) for i in range(n)])
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def worker(k: int) -> None:
        try:
            start.wait()
            while jobs := q.claim("wd", 8):
                for j in jobs:
                    q.ack(j.id)
                    claimed[k].append(j.id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def producer() -> None:  # writes during the claims, on its own connection
        try:
            start.wait()
            q.enqueue_many([(f"/img/{i}.jpg", "other", 0) for i in range(n)])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=producer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ids = [i for c in claimed for i in c]
    assert len(ids) == n
    assert len(set(ids)) == n
    assert sum(1 for c in claimed if c) >= 2  # they really shared the work
    assert q.counts()["wd"]["done"] == n
    assert q.counts()["other"]["pending"] == n


_CHILD = r"""
import json, os, sys, time
from pathlib import Path
from daemon.queue import Database, JobQueue
db_path, ready, go, mine, other = sys.argv[1], *map(Path, sys.argv[2:6])
q = JobQueue(Database(db_path))
ready.touch()
while not go.exists():
    time.sleep(0.005)
ids = []
while jobs := q.claim("wd", 8):
    for j in jobs:
        q.ack(j.id)
        ids.append(j.id)
    if not mine.exists():  # after the first claim: wait until the other claimed too
        mine.touch()
        while not other.exists():
            time.sleep(0.001)
print(json.dumps(ids))
"""


def test_two_processes_claim_each_job_exactly_once(tmp_path: Path) -> None:
    db_path = tmp_path / "q.db"
    db = Database(db_path)
    q = JobQueue(db)
    n = 3000
    q.enqueue_many([(f"/img/{i}.jpg", "wd", 0) for i in range(n)])
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    claimed = [tmp_path / "claimed0", tmp_path / "claimed1"]
    for k in range(2):
        ready = tmp_path / f"ready{k}"
        args = [str(db_path), str(ready), str(go), str(claimed[k]), str(claimed[1 - k])]
        p = subprocess.Popen(
            [sys.executable, "-c", _CHILD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append((p, ready))
    deadline = time.monotonic() + 30
    while not all(r.exists() for _, r in procs):
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for p, _ in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "locked" not in err
        results.append(json.loads(out))
    ids = [i for r in results for i in r]
    assert len(ids) == n
    assert len(set(ids)) == n
    assert all(results), "both processes claimed (each waits for the other's first claim)"
    assert q.counts()["wd"]["done"] == n
    db.close()


def test_claim_uses_the_claim_index_without_sorting(q: JobQueue) -> None:
    from daemon.queue.jobs import _CLAIM

    q.enqueue_many([(f"/{i}.jpg", "wd", i % 3) for i in range(500)])
    q.db.conn.execute("ANALYZE")
    plan = " ".join(
        r[3] for r in q.db.conn.execute("EXPLAIN QUERY PLAN " + _CLAIM, (1.0, 1.0, "wd", 8))
    )
    assert "jobs_claim" in plan
    assert "TEMP B-TREE" not in plan


def test_raised_priority_ends_retry_wait(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)
    q.fail(only(q).id, "model_download", "offline", retryable=True)
    waiting = q.get("/a.jpg", "wd").not_before
    assert waiting > clock.t
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)  # same priority: still waits
    assert q.get("/a.jpg", "wd").not_before == waiting
    q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT)  # a person asked: due now
    j = q.get("/a.jpg", "wd")
    assert (j.not_before, j.priority, j.attempts) == (0, PRIORITY_EXPLICIT, 1)
    assert len(q.claim("wd", 1)) == 1


def test_thread_connections_are_closed_when_threads_end(db: Database) -> None:
    import gc

    def use() -> None:
        db.conn.execute("SELECT 1").fetchone()

    for _ in range(30):
        t = threading.Thread(target=use)
        t.start()
        t.join()
    gc.collect()
    assert len(db._holders) <= 2  # this thread's, perhaps one not yet collected
    # the connections of ended threads are reused, not opened anew: at most a few open
    opened = []
    real = db._connect

    def counting():
        opened.append(1)
        return real()

    db._connect = counting  # type: ignore[method-assign]
    for _ in range(30):
        t = threading.Thread(target=use)
        t.start()
        t.join()
    assert len(opened) <= 1
    idle = list(db._pool.idle)
    assert 1 <= len(idle) <= db._pool.SIZE
    db.close()
    for conn in idle:  # closed with the database
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")


def test_a_connection_left_in_a_transaction_is_not_reused(db: Database) -> None:
    def begin_and_die() -> None:
        db.conn.execute("BEGIN")
        db.conn.execute("CREATE TABLE IF NOT EXISTS scratch (x)")

    t = threading.Thread(target=begin_and_die)
    t.start()
    t.join()
    import gc

    gc.collect()
    assert all(not c.in_transaction for c in db._pool.idle)
    db.conn.execute("BEGIN IMMEDIATE")  # the write lock was given back
    db.conn.execute("ROLLBACK")


def _child_enqueue(db: Database) -> None:
    inherited = db._local.holder.conn  # the parent's connection, copied by fork
    fresh = db.conn is not inherited
    JobQueue(db).enqueue("/from_child.jpg", "wd", 0)
    sys.exit(0 if fresh else 3)


def test_forked_child_opens_its_own_connection(db: Database, q: JobQueue) -> None:
    import multiprocessing

    q.enqueue("/parent.jpg", "wd", 0)  # the parent's connection exists before the fork
    p = multiprocessing.get_context("fork").Process(target=_child_enqueue, args=(db,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert q.get("/from_child.jpg", "wd") is not None
    assert db.integrity_check() == "ok"


def test_prune_drops_unconfigured_jobs_but_not_leased_ones(tmp_path):
    from daemon.queue import Database, JobQueue

    q = JobQueue(Database(tmp_path / "q.db"))
    q.enqueue_many([("/a/1.png", "wd", 0), ("/a/2.png", "old", 0), ("/gone/3.png", "wd", 0)])
    q.enqueue("/gone/4.png", "wd", 0)
    leased = q.claim("wd", 10)
    assert len(leased) == 3
    q.ack(leased[0].id)
    assert q.prune(lambda path, gen: path.startswith("/a/") and gen == "wd") == 1
    assert q.get("/a/2.png", "old") is None
    assert q.get("/a/1.png", "wd") is not None
    assert q.get("/gone/3.png", "wd") is not None  # leased: left for its worker


def test_history_keeps_crashes_and_burials_but_not_a_fresh_start(tmp_path) -> None:
    now = [1000.0]
    db = Database(tmp_path / "h.db")
    q = JobQueue(db, max_attempts=2, clock=lambda: now[0], rng=lambda: 0.5, lease_seconds=10)
    q.enqueue("/r/a.png", "wd", 1)
    q.claim("wd", 1)
    now[0] += 20
    assert q.recover_expired() == 1  # the first attempt crashed without an error: no row
    assert q.failed_attempts("/r/a.png") == []
    q.claim("wd", 1)
    assert q.recover_all_leased() == 1  # the last attempt: dead, as the worker's crash
    (row,) = q.failed_attempts("/r/a.png")
    assert (row["state"], row["error_type"], row["attempt"]) == ("dead", "worker_crash", 2)
    q.enqueue("/r/b.png", "wd", 1)
    (job,) = q.claim("wd", 1)
    assert q.bury(job.id, "worker_crash", "crashed the model's process 3 times")
    (row,) = q.failed_attempts("/r/b.png")
    assert (row["state"], row["attempt"]) == ("dead", 1)
    q.enqueue("/r/c.png", "wd", 1)
    (job,) = q.claim("wd", 1)
    q.fail(job.id, "io", "hiccup", retryable=True)
    now[0] += 100
    q.claim("wd", 1)
    q.enqueue("/r/c.png", "wd", 1)  # changed while leased: rerun
    now[0] += 100
    q.recover_expired()  # a fresh start, not an attempt
    assert [r["attempt"] for r in q.failed_attempts("/r/c.png")] == [1]
    db.close()


# -- the queue's parts used by the API: options, cancel, retry, purge, counts ----------


def test_the_queues_defaults_are_the_documented_settings(db: Database) -> None:
    from daemon.config import QueueConfig

    q = JobQueue(db)
    kw = QueueConfig().queue_kwargs()
    assert (q.max_attempts, q.backoff_base, q.backoff_max, q.lease_seconds) == (
        kw["max_attempts"],
        kw["backoff_base"],
        kw["backoff_max"],
        kw["lease_seconds"],
    )


def test_a_requests_options_travel_with_its_job(q: JobQueue) -> None:
    opts = {"request": "r1", "force": True, "post_process": False}
    assert q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options=opts).options == opts
    assert q.get("/a.jpg", "wd").options == opts
    (job,) = q.claim("wd", 1)
    assert job.options == opts
    q.ack(job.id, options=job.options)
    assert q.get("/a.jpg", "wd").options is None  # the request is over
    assert q.enqueue("/b.jpg", "wd", 0, options={}).options is None


def test_a_rerun_after_a_request_does_not_inherit_its_options(q: JobQueue) -> None:
    """The request's job is enqueued again by the scanner (``requeued``, written by
    SQLite's JSON), and again while it is captioned: the rerun is for the file's own
    sake, so the finished request's options (force...) must not come with it."""
    opts = {"request": "r1", "force": True}
    q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options=opts)
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)  # the scanner: needs captioning anyway
    (job,) = q.claim("wd", 1)
    assert job.options == {"force": True, "request": "r1", "requeued": True}
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)  # changed while being captioned
    q.ack(job.id, options=job.options)
    rerun = q.get("/a.jpg", "wd")
    assert (rerun.state, rerun.options) == (JobState.PENDING, None)
    # a new request made meanwhile keeps its own options for the rerun
    (job,) = q.claim("wd", 1)
    q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r2"})
    q.ack(job.id, options=job.options)
    assert q.get("/a.jpg", "wd").options == {"request": "r2"}


def test_cancel_gives_back_the_state_before_the_request(q: JobQueue, clock: FakeClock) -> None:
    # a new image: the request's row goes away
    job = q.enqueue("/new.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r1"})
    assert q.cancel(job.id, None, {"request": "r1"})
    assert q.get("/new.jpg", "wd") is None
    # a finished image: back to done, with its outcome and age
    q.enqueue("/old.jpg", "wd", PRIORITY_BACKFILL)
    (done,) = q.claim("wd", 1)
    q.ack(done.id, "caption_exists")
    before = q.get("/old.jpg", "wd")
    clock.advance(10)
    job = q.enqueue("/old.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r2", "force": True})
    assert job.state == JobState.PENDING
    assert not q.cancel(job.id, before, {"request": "other"})  # not this request's
    assert q.cancel(job.id, before, {"request": "r2"})
    after = q.get("/old.jpg", "wd")
    assert (after.state, after.outcome, after.priority, after.enqueued_at, after.options) == (
        JobState.DONE,
        "caption_exists",
        PRIORITY_BACKFILL,
        before.enqueued_at,
        None,
    )
    assert (after.lease_until, after.rerun, after.updated_at) == (None, False, clock.t)
    # a failed image keeps its error and attempts
    q.enqueue("/bad.jpg", "wd", PRIORITY_BACKFILL)
    (bad,) = q.claim("wd", 1)
    q.fail(bad.id, "bad_image", "truncated", retryable=False)
    before = q.get("/bad.jpg", "wd")
    job = q.enqueue("/bad.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r3"})
    assert q.cancel(job.id, before, {"request": "r3"})
    after = q.get("/bad.jpg", "wd")
    assert (after.state, after.error_type, after.error_message, after.attempts) == (
        JobState.FAILED,
        "bad_image",
        "truncated",
        1,
    )
    assert not q.cancel(424242, None, {"request": "r3"})


def test_cancel_of_a_pending_job_keeps_it_pending_and_leased_restores_as_pending(
    q: JobQueue, clock: FakeClock
) -> None:
    q.enqueue("/p.jpg", "wd", PRIORITY_BACKFILL)
    before = q.get("/p.jpg", "wd")
    job = q.enqueue("/p.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r1"})
    assert q.cancel(job.id, before, {"request": "r1"})
    after = q.get("/p.jpg", "wd")
    assert (after.state, after.priority, after.options) == (
        JobState.PENDING,
        PRIORITY_BACKFILL,
        None,
    )
    leased_before = dataclasses.replace(before, state=JobState.LEASED)
    job = q.enqueue("/p.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r2"})
    assert q.cancel(job.id, leased_before, {"request": "r2"})
    assert q.get("/p.jpg", "wd").state == JobState.PENDING


def test_cancel_after_the_scanner_requeued_the_image_leaves_it_pending(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_BACKFILL)
    (j,) = q.claim("wd", 1)
    q.ack(j.id)
    before = q.get("/a.jpg", "wd")
    job = q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r1"})
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)  # the image changed: it needs a caption now
    assert q.cancel(job.id, before, {"request": "r1"})
    after = q.get("/a.jpg", "wd")
    assert (after.state, after.options, after.priority) == (
        JobState.PENDING,
        None,
        PRIORITY_BACKFILL,
    )
    job = q.enqueue("/n.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r2"})
    q.enqueue("/n.jpg", "wd", PRIORITY_NEW)
    assert q.cancel(job.id, None, {"request": "r2"})
    after = q.get("/n.jpg", "wd")
    assert (after.state, after.options, after.priority) == (
        JobState.PENDING,
        None,
        PRIORITY_EXPLICIT,
    )
    # started: too late to cancel
    (started,) = q.claim("wd", 1)
    assert not q.cancel(started.id, None, started.options)


def finished(q: JobQueue, clock: FakeClock) -> dict[str, JobState]:
    """/r/a done, /r/b failed, /r/c dead, /r/d pending, /s/e leased, /r/f failed (gen x)."""
    q.max_attempts = 1
    for p in ("/r/a.jpg", "/r/b.jpg", "/r/c.jpg"):
        q.enqueue(p, "wd", 0)
    jobs = {j.path: j for j in q.claim("wd", 10)}
    q.ack(jobs["/r/a.jpg"].id)
    q.fail(jobs["/r/b.jpg"].id, "bad_image", "x", retryable=False)
    q.fail(jobs["/r/c.jpg"].id, "io", "y", retryable=True)
    q.enqueue("/s/e.jpg", "wd", 0)
    q.claim("wd", 1)
    q.enqueue("/r/d.jpg", "wd", 0)
    q.enqueue("/r/f.jpg", "x", 0)
    (fx,) = q.claim("x", 1)
    q.fail(fx.id, "bad_image", "z", retryable=False)
    clock.advance(5)
    return {p: j.state for p, j in ((j.path, j) for j in q.jobs(limit=50))}


def test_retry_puts_failed_and_dead_jobs_back_afresh(q: JobQueue, clock: FakeClock) -> None:
    finished(q, clock)
    assert q.retry(["failed"], generator="x") == 1
    assert q.retry(["done", "pending", "leased"]) == 0
    assert q.retry(["dead"], prefix="/s") == 0
    assert q.retry(prefix="/r/") == 2
    for p in ("/r/b.jpg", "/r/c.jpg"):
        j = q.get(p, "wd")
        assert (j.state, j.attempts, j.not_before, j.outcome, j.updated_at) == (
            JobState.PENDING,
            0,
            0.0,
            None,
            clock.t,
        )
        assert j.error_type is not None  # kept until the next run says otherwise
    assert q.get("/r/a.jpg", "wd").state == JobState.DONE
    assert q.get("/s/e.jpg", "wd").state == JobState.LEASED


def test_retry_job_puts_one_failed_or_dead_job_back(q: JobQueue, clock: FakeClock) -> None:
    finished(q, clock)
    assert not q.retry_job("/r/a.jpg", "wd")  # done
    assert not q.retry_job("/r/d.jpg", "wd")  # pending
    assert not q.retry_job("/r/b.jpg", "x")  # no such job
    assert q.retry_job("/r/c.jpg", "wd")
    j = q.get("/r/c.jpg", "wd")
    assert (j.state, j.attempts, j.not_before, j.lease_until, j.outcome, j.updated_at) == (
        JobState.PENDING,
        0,
        0.0,
        None,
        None,
        clock.t,
    )
    assert q.get("/r/b.jpg", "wd").state == JobState.FAILED


def test_purge_deletes_the_states_asked_for_but_never_leased_jobs(
    q: JobQueue, clock: FakeClock
) -> None:
    finished(q, clock)
    assert q.purge(["leased"]) == []
    assert q.purge([]) == []
    assert q.purge(["failed"], generator="x") == [("/r/f.jpg", "failed")]
    assert sorted(q.purge(["done", "dead", "leased"], prefix="/r")) == [
        ("/r/a.jpg", "done"),
        ("/r/c.jpg", "dead"),
    ]
    assert q.get("/s/e.jpg", "wd").state == JobState.LEASED
    assert sorted(q.purge()) == [("/r/b.jpg", "failed")]
    assert sorted(j.path for j in q.jobs(limit=50)) == ["/r/d.jpg", "/s/e.jpg"]


def test_narrowing_by_folder_is_by_whole_folder_names(q: JobQueue) -> None:
    for p in ("/data/a/1.jpg", "/data/a/sub/2.jpg", "/data/ab/3.jpg", "/data/a.jpg"):
        q.enqueue(p, "wd", 0)
    assert q.counts_under(["/data/a", "/data/a/", "/data/ab", "/none"]) == {
        "/data/a": {"pending": 2},
        "/data/a/": {"pending": 2},
        "/data/ab": {"pending": 1},
        "/none": {},
    }
    q.claim("wd", 1, exclude_prefixes=["/data/a", "/data/ab/"])
    assert q.get("/data/a.jpg", "wd").state == JobState.LEASED
    assert {j.path for j in q.claim("wd", 10, exclude_prefixes=["/data/a/"])} == {"/data/ab/3.jpg"}
    assert {j.path for j in q.claim("wd", 10)} == {"/data/a/1.jpg", "/data/a/sub/2.jpg"}
    for j in q.jobs(JobState.LEASED, limit=10):
        q.fail(j.id, "bad_image", "x", retryable=False)
    assert sorted(p for p, _ in q.purge(["failed"], prefix="/data/a/")) == [
        "/data/a/1.jpg",
        "/data/a/sub/2.jpg",
    ]


def test_a_paused_folder_is_skipped_by_the_claim_whatever_else_is_paused(q: JobQueue) -> None:
    for p in ("/one/a.jpg", "/two/b.jpg", "/three/c.jpg", "/four/d.jpg"):
        q.enqueue(p, "wd", 0)
    paused = ["/one", "/two/", "/four"]
    assert [j.path for j in q.claim("wd", 10, exclude_prefixes=paused)] == ["/three/c.jpg"]
    assert {j.path for j in q.claim("wd", 10, exclude_prefixes=["/one"])} == {
        "/two/b.jpg",
        "/four/d.jpg",
    }


def test_jobs_failed_by_a_condition_of_the_system_are_counted_and_revived(
    q: JobQueue, clock: FakeClock
) -> None:
    q.max_attempts = 1
    for p in ("/r/full.jpg", "/r/old.jpg", "/r/bad.jpg", "/s/full.jpg", "/r/gone.jpg"):
        q.enqueue(p, "wd", 0)
    jobs = {j.path: j for j in q.claim("wd", 10)}
    q.fail(jobs["/r/full.jpg"].id, "io", "disk full", retryable=True, errno=28)
    q.fail(jobs["/r/old.jpg"].id, "io", "[Errno 28] No space left", retryable=False)
    q.fail(jobs["/r/bad.jpg"].id, "bad_image", "[Errno 28] in a name", retryable=False)
    q.fail(jobs["/s/full.jpg"].id, "io", "disk full", retryable=False, errno=28)
    q.fail(jobs["/r/gone.jpg"].id, "io", "gone", retryable=False, errno=2)
    assert q.count_systemic([28]) == 3
    assert q.count_systemic([28, 2]) == 4
    assert q.count_systemic([5]) == 0
    clock.advance(3)
    assert q.revive_systemic("/r/", [28]) == 2
    for p in ("/r/full.jpg", "/r/old.jpg"):
        j = q.get(p, "wd")
        assert (j.state, j.attempts, j.not_before, j.lease_until, j.updated_at) == (
            JobState.PENDING,
            0,
            0.0,
            None,
            clock.t,
        )
    assert q.get("/r/bad.jpg", "wd").state == JobState.FAILED
    assert q.get("/s/full.jpg", "wd").state == JobState.FAILED
    assert q.count_systemic([28]) == 1


def test_crashes_are_counted_per_job_and_forgotten_when_the_image_changes(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    (j,) = q.claim("wd", 1)
    assert [q.record_crash(j.id) for _ in range(3)] == [1, 2, 3]
    assert q.record_crash(424242) == 0
    q.ack(j.id)
    q.enqueue("/a.jpg", "wd", 0)  # changed: a fresh start
    (j,) = q.claim("wd", 1)
    assert q.record_crash(j.id) == 1


def test_history_records_each_failed_attempt_in_full(q: JobQueue, clock: FakeClock) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    q.enqueue("/a.jpg", "blip", 0)
    (j,) = q.claim("wd", 1)
    assert q.fail(j.id, "io", "read error", retryable=True) == JobState.PENDING
    first = clock.t
    clock.advance(1000)
    (j,) = q.claim("wd", 1)
    q.recover_all_leased()  # the worker died on the second attempt: back to pending
    clock.advance(1000)
    (j,) = q.claim("blip", 1)
    assert q.bury(j.id, "worker_crash", "crashed 3 times")
    assert q.failed_attempts("/a.jpg") == [
        {
            "generator": "blip",
            "at": clock.t,
            "state": "dead",
            "error_type": "worker_crash",
            "error_message": "crashed 3 times",
            "attempt": 1,
        },
        {
            "generator": "wd",
            "at": first + 1000,
            "state": "pending",
            "error_type": "io",
            "error_message": "read error",
            "attempt": 2,
        },
        {
            "generator": "wd",
            "at": first,
            "state": "pending",
            "error_type": "io",
            "error_message": "read error",
            "attempt": 1,
        },
    ]
    assert q.get("/a.jpg", "blip").state == JobState.DEAD
    assert not q.bury(j.id, "worker_crash", "again")  # no longer leased


def test_a_retried_jobs_first_attempt_that_crashes_is_in_the_history(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    (j,) = q.claim("wd", 1)
    q.fail(j.id, "bad_image", "truncated", retryable=False)
    q.retry_job("/a.jpg", "wd")
    q.claim("wd", 1)
    q.recover_all_leased()
    assert [(r["attempt"], r["state"]) for r in q.failed_attempts("/a.jpg")] == [
        (1, "pending"),
        (1, "failed"),
    ]


def test_lookups_by_id_and_path(q: JobQueue, clock: FakeClock) -> None:
    a = q.enqueue("/a.jpg", "wd", 0)
    b = q.enqueue("/a.jpg", "blip", 0)
    c = q.enqueue("/c.jpg", "wd", 0)
    assert q.get_by_id(c.id) == c and q.get_by_id(424242) is None
    many = q.get_many([a.id, c.id, 424242])
    assert many == {a.id: a, c.id: c}
    assert len(q.get_many(range(1, 1200))) == 3  # more ids than one query takes
    assert q.jobs_of("/a.jpg") == [b, a]  # by generator
    assert q.jobs_of("/none.jpg") == []


def test_finished_since_lists_what_ended_in_order(q: JobQueue, clock: FakeClock) -> None:
    for p in ("/a.jpg", "/b.jpg", "/c.jpg"):
        q.enqueue(p, "wd", 0)
    a, b, c = q.claim("wd", 3)
    q.ack(a.id)
    clock.advance(10)
    since = clock.t
    q.fail(b.id, "bad_image", "x", retryable=False)
    clock.advance(1)
    q.ack(c.id)
    q.enqueue("/d.jpg", "wd", 0)
    assert [(j.path, j.state) for j in q.finished_since(since)] == [
        ("/b.jpg", JobState.FAILED),
        ("/c.jpg", JobState.DONE),
    ]


def test_pending_and_leased_jobs_by_priority_class(q: JobQueue) -> None:
    for i, prio in enumerate([200, 150, 149, 50, 49, 0, 150]):
        q.enqueue(f"/{i}.jpg", "wd", prio)
    q.claim("wd", 1)  # leased still counts
    q.enqueue("/done.jpg", "other", 500)
    (done,) = q.claim("other", 1)
    q.ack(done.id)  # finished: not counted
    assert q.pending_by_priority([150, 50]) == [3, 2, 2]
    assert q.pending_by_priority([]) == [7]


def test_totals_add_up_every_generator(q: JobQueue) -> None:
    for gen in ("wd", "blip", "x"):
        q.enqueue("/a.jpg", gen, 0)
    q.claim("x", 1)
    assert q.totals() == {"pending": 2, "leased": 1, "done": 0, "failed": 0, "dead": 0}


def test_the_oldest_pending_age_counts_from_its_enqueue(q: JobQueue, clock: FakeClock) -> None:
    assert q.oldest_pending_age() is None
    q.enqueue("/a.jpg", "wd", 0)
    assert q.oldest_pending_age() == 0.0
    clock.advance(7.5)
    q.enqueue("/b.jpg", "wd", 0)
    assert q.oldest_pending_age() == 7.5


def test_released_jobs_are_due_at_once_unless_delayed(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", 0)
    (j,) = q.claim("wd", 1)
    q.release([j.id])
    assert [x.id for x in q.claim("wd", 1)] == [j.id]


def test_a_folder_is_narrowed_to_by_its_whole_name_whatever_it_ends_in(
    q: JobQueue, clock: FakeClock
) -> None:
    """A folder ending in a letter like X, and folders beside it whose names only start
    like it (``a0``, ``aB``): each narrowing (counts, paused folders, retry, purge,
    revival after a full disk) takes the folder's own jobs, no others."""
    q.max_attempts = 1
    paths = ["/d/X/1.jpg", "/d/Y/2.jpg", "/d/a/3.jpg", "/d/a0/4.jpg", "/d/aB/5.jpg"]
    for p in paths:
        q.enqueue(p, "wd", 0)
    assert q.counts_under(["/d/X", "/d/a"]) == {"/d/X": {"pending": 1}, "/d/a": {"pending": 1}}
    claimed = q.claim("wd", 10, exclude_prefixes=["/d/X", "/d/a"])
    assert sorted(j.path for j in claimed) == ["/d/Y/2.jpg", "/d/a0/4.jpg", "/d/aB/5.jpg"]
    claimed += q.claim("wd", 10)
    for j in claimed:
        q.fail(j.id, "io", "disk full", retryable=False, errno=28)
    assert q.revive_systemic("/d/X", [28]) == 1
    assert q.revive_systemic("/d/a/", [28]) == 1
    assert {j.path for j in q.jobs(JobState.PENDING)} == {"/d/X/1.jpg", "/d/a/3.jpg"}
    for j in q.claim("wd", 10):
        q.fail(j.id, "bad_image", "x", retryable=False)
    assert q.retry(prefix="/d/X") == 1
    assert q.purge(["failed"], prefix="/d/a") == [("/d/a/3.jpg", "failed")]
    assert sorted(j.path for j in q.jobs(limit=10)) == [p for p in paths if p != "/d/a/3.jpg"]


def test_cancel_puts_back_the_options_of_the_request_before(q: JobQueue) -> None:
    q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r1", "force": True})
    before = q.get("/a.jpg", "wd")
    job = q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r2"})
    assert job.options == {"request": "r2"}
    assert q.cancel(job.id, before, {"request": "r2"})
    assert q.get("/a.jpg", "wd").options == {"request": "r1", "force": True}


def test_options_are_compared_as_values_not_by_the_order_of_their_keys(q: JobQueue) -> None:
    """The finished run's options given back in another key order are still the same
    options: the rerun does not inherit them."""
    q.enqueue("/a.jpg", "wd", PRIORITY_EXPLICIT, options={"request": "r1", "force": True})
    (job,) = q.claim("wd", 1)
    q.enqueue("/a.jpg", "wd", PRIORITY_NEW)  # changed while being captioned
    q.ack(job.id, options={"force": True, "request": "r1"})
    assert q.get("/a.jpg", "wd").options is None


def test_forgetting_more_paths_than_one_batch_counts_them_all(q: JobQueue) -> None:
    n = BATCH + 5
    q.enqueue_many((f"/f/{i}.jpg", "wd", 0) for i in range(n))
    assert q.forget_many(f"/f/{i}.jpg" for i in range(n)) == n
    assert q.jobs(limit=10) == []


def test_listings_default_to_a_page_of_100_jobs_and_20_errors(q: JobQueue) -> None:
    q.enqueue_many((f"/p/{i:03}.jpg", "wd", 0) for i in range(101))
    assert len(q.jobs()) == 100 and len(q.jobs(JobState.PENDING)) == 100
    for j in q.claim("wd", 21):
        q.fail(j.id, "bad_image", "x", retryable=False)
    assert len(q.recent_errors()) == 20


# -- leasing under an owner (a backfill driver), and the report's listing ----------


def owned(db: Database, clock: FakeClock, owner: str = "backfill:a", **kw) -> JobQueue:
    return make_queue(db, clock, owner=owner, **kw)


def owners(db: Database) -> dict[str, str | None]:
    """path -> lease_owner of every leased job."""
    rows = db.conn.execute("SELECT path, lease_owner FROM jobs WHERE state = 'leased'")
    return dict(rows.fetchall())


def test_claim_under_leases_due_pending_jobs_under_its_folders_for_its_owner(
    db: Database, q: JobQueue, clock: FakeClock
) -> None:
    bf = owned(db, clock, lease_seconds=60)
    for p in ("/d/a/1.jpg", "/d/a/sub/2.jpg", "/d/a0/3.jpg", "/d/ab/4.jpg", "/d/b/5.jpg"):
        q.enqueue(p, "wd", PRIORITY_BACKFILL)
    q.enqueue("/d/a/hi.jpg", "wd", PRIORITY_NEW)  # higher priority: first
    q.enqueue("/d/a/other-gen.jpg", "vlm", PRIORITY_NEW)
    q.enqueue("/d/a/asked.jpg", "wd", PRIORITY_EXPLICIT, options={"force": True})
    q.enqueue("/d/a/later.jpg", "wd", PRIORITY_EXPLICIT + 1)
    later = q.claim("wd", 1)[0]  # a retry wait: not due yet
    q.fail(later.id, "io", "x", retryable=True)
    assert q.get("/d/a/later.jpg", "wd").not_before > clock()

    assert bf.claim_under("wd", 10, []) == []
    jobs = bf.claim_under("wd", 10, ["/d/a/", "/d/b"])
    assert [j.path for j in jobs] == ["/d/a/hi.jpg", "/d/a/1.jpg", "/d/a/sub/2.jpg", "/d/b/5.jpg"]
    assert all(j.state == JobState.LEASED and j.attempts == 1 for j in jobs)
    assert {j.lease_until for j in jobs} == {clock() + 60}
    assert {j.updated_at for j in jobs} == {clock()}
    assert owners(db) == {j.path: "backfill:a" for j in jobs}
    # the daemon's claim takes the rest: the explicit request, the folders beside /d/a
    assert {j.path for j in q.claim("wd", 10)} == {"/d/a/asked.jpg", "/d/a0/3.jpg", "/d/ab/4.jpg"}
    assert bf.claim_under("wd", 10, ["/d/a"]) == []


def test_claim_under_takes_at_most_limit_in_claim_order(db: Database, clock: FakeClock) -> None:
    bf = owned(db, clock)
    for i in range(5):
        bf.enqueue(f"/r/{i}.jpg", "wd", 0)
        clock.advance(1)
    bf.enqueue("/r/urgent.jpg", "wd", 9)
    assert [j.path for j in bf.claim_under("wd", 3, ["/r"])] == [
        "/r/urgent.jpg",
        "/r/0.jpg",
        "/r/1.jpg",
    ]
    assert [j.path for j in bf.claim_under("wd", 3, ["/r"])] == ["/r/2.jpg", "/r/3.jpg", "/r/4.jpg"]
    given_back = [j.id for j in bf.jobs(JobState.LEASED) if j.path in ("/r/0.jpg", "/r/3.jpg")]
    bf.release(given_back)  # the caller gave these back: skipped, the others come
    bf.release([j.id for j in bf.jobs(JobState.LEASED) if j.path == "/r/4.jpg"])
    assert [j.path for j in bf.claim_under("wd", 3, ["/r"], skip=given_back)] == ["/r/4.jpg"]


def test_count_claimable_counts_what_claim_under_would_take_due_or_not(
    db: Database, q: JobQueue, clock: FakeClock
) -> None:
    for p in ("/d/a/1.jpg", "/d/a/2.jpg", "/d/a/sub/3.jpg", "/d/a0/x.jpg", "/d/ab/y.jpg"):
        q.enqueue(p, "wd", 0)
    for p in ("/d/b/1.jpg", "/d/b/2.jpg"):
        q.enqueue(p, "wd", 0)
    q.enqueue("/d/a/gen.jpg", "vlm", 0)
    q.enqueue("/d/a/asked.jpg", "wd", 0, options={"force": True})
    q.enqueue("/d/a/wait.jpg", "wd", 9)
    q.fail(q.claim("wd", 1)[0].id, "io", "x", retryable=True)  # pending, due later: counted
    q.enqueue("/d/a/done.jpg", "wd", 9)
    q.ack(q.claim("wd", 1)[0].id)
    assert q.count_claimable("wd", []) == 0
    assert q.count_claimable("wd", ["/d/a/"]) == 4
    assert q.count_claimable("wd", ["/d/a", "/d/b"]) == 6
    assert q.count_claimable("wd", ["/d/b", "/none"]) == 2
    assert q.count_claimable("vlm", ["/d/a"]) == 1


def test_extend_owned_extends_only_the_owners_leases(db: Database, clock: FakeClock) -> None:
    bf = owned(db, clock, lease_seconds=60)
    other = owned(db, clock, owner="backfill:b", lease_seconds=60)
    daemon = make_queue(db, clock, lease_seconds=60)
    for i in range(4):
        bf.enqueue(f"/a/{i}.jpg", "wd", 0)
        bf.enqueue(f"/b/{i}.jpg", "wd", 0)
    mine = bf.claim_under("wd", 3, ["/a"])
    theirs = other.claim_under("wd", 1, ["/b"])
    daemons = daemon.claim("wd", 1)
    clock.advance(10)
    assert bf.extend_owned() == 3
    assert {daemon.get_by_id(j.id).lease_until for j in mine} == {clock() + 60}
    assert bf.extend_owned(5) == 3
    assert {daemon.get_by_id(j.id).lease_until for j in mine} == {clock() + 5}
    for j in theirs + daemons:
        assert daemon.get_by_id(j.id).lease_until == clock() - 10 + 60
    bf.ack(mine[0].id)
    assert bf.extend_owned() == 2


def two_owners_and_the_daemon(
    db: Database, clock: FakeClock
) -> tuple[JobQueue, JobQueue, JobQueue]:
    """Backfills a and b and the daemon on one queue, with six pending jobs in /a."""
    bf = owned(db, clock)
    for i in range(6):
        bf.enqueue(f"/a/{i}.jpg", "wd", 0)
    return bf, owned(db, clock, owner="backfill:b"), make_queue(db, clock)


def test_held_names_the_jobs_still_leased_by_the_owner(db: Database, clock: FakeClock) -> None:
    bf, other, daemon = two_owners_and_the_daemon(db, clock)
    a, b, c = bf.claim_under("wd", 3, ["/a"])
    d = other.claim_under("wd", 1, ["/a"])[0]
    e = daemon.claim("wd", 1)[0]
    pending = daemon.get("/a/5.jpg", "wd")
    bf.ack(c.id)
    assert bf.held([a.id, b.id, c.id, d.id, e.id, pending.id, 999]) == {a.id, b.id}
    assert bf.held([]) == set()
    assert other.held([a.id, d.id]) == {d.id}
    assert daemon.held([a.id, e.id]) == {e.id}


def test_held_and_get_many_ask_in_chunks_below_sqlites_limit_of_variables(
    db: Database, clock: FakeClock
) -> None:
    """A backfill may hold more jobs than one statement may name (999 variables in
    SQLite builds before 3.32)."""
    db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    bf = owned(db, clock)
    bf.enqueue_many((f"/a/{i:04}.jpg", "wd", 0) for i in range(1200))
    ids = [j.id for j in bf.claim_under("wd", 1200, ["/a"])]
    assert len(ids) == 1200
    assert bf.held(iter(ids)) == set(ids)
    assert set(bf.get_many(iter(ids))) == set(ids)


def test_leased_paths_and_counts_by_owner(db: Database, clock: FakeClock) -> None:
    bf, other, daemon = two_owners_and_the_daemon(db, clock)
    assert bf.leased_by_owner() == {} and bf.leased_paths("backfill:a") == []
    bf.claim_under("wd", 2, ["/a"])
    theirs = other.claim_under("wd", 3, ["/a"])
    daemon.claim("wd", 1)
    assert sorted(daemon.leased_paths("backfill:a")) == ["/a/0.jpg", "/a/1.jpg"]
    assert sorted(daemon.leased_paths("backfill:b")) == ["/a/2.jpg", "/a/3.jpg", "/a/4.jpg"]
    assert daemon.leased_by_owner() == {"backfill:a": 2, "backfill:b": 3}
    other.release([j.id for j in theirs])
    assert daemon.leased_by_owner() == {"backfill:a": 2}
    assert daemon.leased_paths("backfill:b") == []


def test_open_count_is_pending_and_leased_jobs(q: JobQueue) -> None:
    assert q.open_count() == 0
    for i in range(5):
        q.enqueue(f"/a/{i}.jpg", "wd", 0)
    a, b = q.claim("wd", 2)
    assert q.open_count() == 5
    q.ack(a.id)
    q.fail(b.id, "bad_image", "x", retryable=False)
    assert q.open_count() == 3


def test_recover_expired_foreign_leaves_the_daemons_and_live_leases(
    db: Database, clock: FakeClock
) -> None:
    daemon = make_queue(db, clock, lease_seconds=60, max_attempts=1)
    dead = owned(db, clock, owner="backfill:dead", lease_seconds=10, max_attempts=1)
    live = owned(db, clock, owner="backfill:live", lease_seconds=100)
    for i in range(4):
        daemon.enqueue(f"/a/{i}.jpg", "wd", 0)
    mine = daemon.claim("wd", 1)[0]
    gone = dead.claim_under("wd", 1, ["/a"])[0]
    alive = live.claim_under("wd", 1, ["/a"])[0]
    clock.advance(61)  # the daemon's own lease expired too: not this call's business
    assert daemon.recover_expired_foreign() == 1
    after = daemon.get_by_id(gone.id)
    assert after.state == JobState.DEAD  # its last attempt (max_attempts 1)
    assert after.error_type == "worker_crash" and after.updated_at == clock()
    assert daemon.get_by_id(mine.id).state == JobState.LEASED
    assert daemon.get_by_id(alive.id).state == JobState.LEASED
    assert daemon.leased_by_owner() == {"backfill:live": 1}


def test_recover_owner_takes_back_every_lease_of_that_owner_expired_or_not(
    db: Database, clock: FakeClock
) -> None:
    daemon = make_queue(db, clock)
    gone = owned(db, clock, owner="backfill:gone", lease_seconds=600)
    other = owned(db, clock, owner="backfill:other")
    for i in range(5):
        daemon.enqueue(f"/a/{i}.jpg", "wd", 0)
    taken = gone.claim_under("wd", 2, ["/a"])
    kept = other.claim_under("wd", 1, ["/a"])[0]
    mine = daemon.claim("wd", 1)[0]
    clock.advance(5)
    assert daemon.recover_owner("backfill:gone") == 2
    for j in taken:
        after = daemon.get_by_id(j.id)
        assert (after.state, after.attempts, after.lease_until) == (JobState.PENDING, 1, None)
        assert after.updated_at == clock()
    assert daemon.get_by_id(kept.id).state == JobState.LEASED
    assert daemon.get_by_id(mine.id).state == JobState.LEASED
    assert daemon.recover_owner("backfill:gone") == 0


def test_report_jobs_lists_all_but_captiond_own_captions_under_a_folder(
    q: JobQueue, clock: FakeClock
) -> None:
    outcomes = {"w": "written", "u": "unchanged", "e": "caption_exists", "x": "caption_edited"}
    for name, outcome in outcomes.items():
        q.enqueue(f"/d/a/{name}.jpg", "wd", 0)
        q.ack(only(q).id, outcome)
    q.enqueue("/d/a/sub/bad.jpg", "wd", 0)
    q.fail(only(q).id, "bad_image", "é" * 300, retryable=False)
    q.enqueue("/d/a/wait.jpg", "wd", 0)
    q.enqueue("/d/a0/no.jpg", "wd", 0)
    q.enqueue("/d/ab/no.jpg", "wd", 0)
    q.enqueue("/d/a.jpg", "wd", 0)
    want = [
        ("/d/a/e.jpg", "wd", "done", "caption_exists", None, None),
        ("/d/a/sub/bad.jpg", "wd", "failed", None, "bad_image", "é" * 200),
        ("/d/a/wait.jpg", "wd", "pending", None, None, None),
        ("/d/a/x.jpg", "wd", "done", "caption_edited", None, None),
    ]
    assert sorted(q.report_jobs("/d/a")) == want
    assert sorted(q.report_jobs("/d/a/")) == want
    assert q.report_jobs("/none") == []


def test_owner_leases_and_the_report_take_a_folder_whose_name_ends_in_x_whole(
    db: Database, q: JobQueue, clock: FakeClock
) -> None:
    """Only the slash is stripped from a folder's end ("/d/MAX" is not "/d/MA")."""
    for p in ("/d/MAX/1.jpg", "/d/MA/2.jpg", "/d/MA/4.jpg", "/d/M/3.jpg"):
        q.enqueue(p, "wd", 0)
    assert q.count_claimable("wd", ["/d/MAX"]) == 1
    assert [r[0] for r in q.report_jobs("/d/MAX")] == ["/d/MAX/1.jpg"]
    assert [j.path for j in owned(db, clock).claim_under("wd", 10, ["/d/MAX"])] == ["/d/MAX/1.jpg"]
