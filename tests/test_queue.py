"""The durable job queue: upsert, claim order, retries, leases, concurrency."""

from __future__ import annotations

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
