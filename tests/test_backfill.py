"""The backfill without Ray: lease owners in the queue, the actor class called directly
on batches, and the driver with the actor in-process (:class:`InlineExecutor`), killed
at each dangerous moment and run again. The Ray runs are in test_backfill_ray.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from daemon.backfill import INSTALL_HINT
from daemon.backfill.actor import ActorStartError, CaptionActor
from daemon.backfill.driver import (
    Backfill,
    BackfillError,
    BackfillOptions,
    Chunk,
    InlineExecutor,
)
from daemon.backfill.feeder import Feeder
from daemon.backfill.progress import line, summary
from daemon.backfill.spec import (
    PathMap,
    local_facts,
    map_path,
    parse_path_map,
    version_problem,
)
from daemon.backfill.status import backfill_status
from daemon.cli import format_status, main
from daemon.hashing import content_hash
from daemon.oneshot import run_once
from daemon.queue import Database, JobQueue
from daemon.queue.backfills import BackfillRegistry
from tests.backfillkit import Site, check_tag_captions, recolour, tags_site
from tests.daemonproc import REPO, make_image

GEN = "wd_tagger"

# -- the queue: leases under an owner ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _queues(tmp_path: Path) -> tuple[Clock, JobQueue, JobQueue]:
    clock = Clock()
    db = Database(tmp_path / "q.db")
    daemon = JobQueue(db, clock=clock, lease_seconds=600)
    bf = JobQueue(db, clock=clock, lease_seconds=60, owner="backfill:x")
    return clock, daemon, bf


def test_a_backfill_claims_only_its_folders_generator_and_no_requests(tmp_path: Path) -> None:
    _, daemon, bf = _queues(tmp_path)
    daemon.enqueue_many(
        [("/a/1.png", GEN, 0), ("/a/2.png", GEN, 100), ("/a/3.png", "vlm", 0), ("/b/4.png", GEN, 0)]
    )
    daemon.enqueue("/a/5.png", GEN, 200, options={"request": "r1"})
    got = bf.claim_under(GEN, 10, ["/a"])
    assert [j.path for j in got] == ["/a/2.png", "/a/1.png"]  # claim order, higher first
    # the daemon's worker never gets them; it still gets the request and the rest
    assert sorted(j.path for j in daemon.claim(GEN, 10)) == ["/a/5.png", "/b/4.png"]
    assert daemon.leased_by_owner() == {"backfill:x": 2}
    assert bf.held([j.id for j in got] + [999]) == {j.id for j in got}


def test_daemon_start_keeps_a_live_backfills_leases_and_recovers_its_own(tmp_path: Path) -> None:
    clock, daemon, bf = _queues(tmp_path)
    daemon.enqueue_many([(f"/a/{i}.png", GEN, 0) for i in range(4)])
    mine = daemon.claim(GEN, 2)
    theirs = bf.claim_under(GEN, 2, ["/a"])
    assert daemon.recover_all_leased() == 2  # the daemon's own, dead with its process
    assert bf.held([j.id for j in theirs]) == {j.id for j in theirs}
    assert {j.id for j in daemon.claim(GEN, 10)} == {j.id for j in mine}
    clock.t += 61  # the backfill's lease has expired: it died
    assert daemon.recover_all_leased() == 2 + 2  # own again, and the dead backfill's
    assert bf.held([j.id for j in theirs]) == set()


def test_periodic_recovery_takes_expired_foreign_leases_only(tmp_path: Path) -> None:
    clock, daemon, bf = _queues(tmp_path)
    daemon.enqueue_many([(f"/a/{i}.png", GEN, 0) for i in range(4)])
    daemon.claim(GEN, 2)
    theirs = bf.claim_under(GEN, 2, ["/a"])
    clock.t += 30
    assert daemon.recover_expired_foreign() == 0
    assert bf.extend_owned() == 2  # the driver's heartbeat keeps them
    clock.t += 45
    assert daemon.recover_expired_foreign() == 0
    clock.t += 700  # the daemon's own are long expired too: never touched here
    assert daemon.recover_expired_foreign() == 2
    assert daemon.totals()["leased"] == 2 and bf.held([j.id for j in theirs]) == set()
    job = daemon.get_by_id(theirs[0].id)
    assert job is not None and str(job.state) == "pending" and job.attempts == 1


def test_acks_fails_and_releases_only_touch_the_owners_jobs(tmp_path: Path) -> None:
    _, daemon, bf = _queues(tmp_path)
    daemon.enqueue_many([(f"/a/{i}.png", GEN, 0) for i in range(3)])
    a, b, c = bf.claim_under(GEN, 3, ["/a"])
    daemon.ack(a.id, "written")
    assert daemon.fail(b.id, "io", "x", True) is not None
    daemon.release([c.id])
    assert daemon.totals()["leased"] == 3  # nothing changed
    bf.ack(a.id, "written")
    bf.fail(b.id, "bad_image", "broken", False)
    bf.release([c.id])
    t = daemon.totals()
    assert (t["done"], t["failed"], t["pending"], t["leased"]) == (1, 1, 1, 0)
    assert daemon.get_by_id(c.id).attempts == 0  # a release gives the attempt back


def test_a_dead_owners_leases_come_back_at_once(tmp_path: Path) -> None:
    _, daemon, bf = _queues(tmp_path)
    daemon.enqueue_many([(f"/a/{i}.png", GEN, 0) for i in range(3)])
    bf.claim_under(GEN, 3, ["/a"])
    assert sorted(daemon.leased_paths("backfill:x")) == ["/a/0.png", "/a/1.png", "/a/2.png"]
    assert daemon.recover_owner("backfill:x") == 3
    assert daemon.totals()["pending"] == 3


# -- spec: path maps, versions ---------------------------------------------------------


def test_path_maps() -> None:
    assert parse_path_map("/mnt/nas=/data/nas") == PathMap("/mnt/nas", "/data/nas")
    assert parse_path_map("gpu2:/mnt/nas/=/nas") == PathMap("/mnt/nas", "/nas", "gpu2")
    for bad in ("mnt=/x", "/a=b", "/a", "/a/../b=/c", "gpu2:"):
        with pytest.raises(ValueError):
            parse_path_map(bad)
    maps = [PathMap("/mnt/nas", "/data/nas"), PathMap("/mnt/nas/photos", "/p", "gpu2")]
    here = {"gpu1", "10.0.0.5"}
    assert map_path("/mnt/nas/a/b.png", maps, here, driver_node=False) == "/data/nas/a/b.png"
    assert map_path("/mnt/nasty/b.png", maps, here, driver_node=False) == "/mnt/nasty/b.png"
    assert map_path("/mnt/nas/photos/x", maps, {"gpu2"}, driver_node=False) == "/p/x"
    # the daemon's host sees the roots where the daemon watches them
    assert map_path("/mnt/nas/a.png", maps, here, driver_node=True) == "/mnt/nas/a.png"


def test_version_problems_name_the_node_and_the_versions() -> None:
    mine = local_facts()
    assert version_problem(mine, dict(mine)) is None
    other = mine | {"host": "gpu7", "captiond": "0.0.9"}
    msg = version_problem(mine, other)
    assert msg is not None and "gpu7" in msg and "0.0.9" in msg and mine["captiond"] in msg
    drift = mine | {"host": "gpu7", "code": "deadbeef"}
    msg = version_problem(mine, drift)
    assert msg is not None and "deadbeef" in msg and "other code" in msg


# -- the actor, called directly ----------------------------------------------------------


def _spec(site: Site, **over: Any) -> dict[str, Any]:
    opts = BackfillOptions()
    bf = Backfill(site.settings(), opts)
    try:
        return bf.spec() | over
    finally:
        bf.db.close()


def _rows(site: Site, paths: list[Path]) -> list[tuple[int, int, str]]:
    return [(i, 0, str(p.relative_to(site.root))) for i, p in enumerate(paths)]


def test_actor_captions_a_batch_and_writes_nothing(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    paths = site.add(5, folders=2)
    bad = site.add_bad()
    missing = site.root / "d1" / "gone.png"
    outside = tmp_path / "secret.png"
    make_image(outside, "green")
    (site.root / "d1" / "link.png").symlink_to(outside)
    before = sorted(p.name for p in site.root.rglob("*"))
    actor = CaptionActor(_spec(site, batch_size=2))  # odd batches: 2, 2, 2, 2, 1
    rows = _rows(site, [*paths, bad, missing, site.root / "d1" / "link.png"])
    out = actor({"job": [r[0] for r in rows], "root": [r[1] for r in rows],
                 "rel": [r[2] for r in rows]})  # fmt: skip
    import json

    results = [json.loads(x) for x in out["result"]]
    assert [r["job"] for r in results] == list(range(len(rows)))
    for p, r in zip(paths, results, strict=False):
        assert "background" in r["caption"] and "error" not in r
        assert r["hash"] == content_hash(p.read_bytes())
        assert r["size"] == [64, 48] and r["owner"] == [os.getuid(), os.getgid()]
    errors = {r["job"]: r["error"] for r in results if "error" in r}
    assert errors[5]["type"] == "bad_image" and not errors[5]["retryable"]
    assert errors[6]["type"] == "io" and errors[6]["condition"] is None
    assert errors[7]["type"] == "io" and "outside its root" in errors[7]["message"]
    assert sorted(p.name for p in site.root.rglob("*")) == before  # no sidecar, no temp


def test_actor_raw_captions_are_the_pipelines(tmp_path: Path, wd_model_dir: Path) -> None:
    """The actor runs the daemon's pipeline stages: raw captions equal what the
    pipeline's generate() gives for the same images in-process."""
    from daemon.pipeline.caption import CaptionPipeline, ImageTask
    from daemon.queue import FileIndex

    site = Site(tmp_path, wd_model_dir)
    paths = site.add(4)
    spec = _spec(site)
    actor = CaptionActor(spec)
    got = [r["caption"] for r in actor.caption(_rows(site, paths))]
    settings = site.settings()
    db, _, _ = site.open()
    pipe = CaptionPipeline(actor.generator, FileIndex(db), postprocess=settings.postprocess,
                           max_image_pixels=settings.worker.max_image_pixels)  # fmt: skip
    with pipe.open([ImageTask(str(p), settings.watch[0]) for p in paths]) as batch:
        for item in batch.items:
            pipe.prepare(item)
        assert got == pipe.generate([i.value for i in batch.items])
    db.close()


def test_actor_start_failures_name_the_node_and_cause(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(1)
    host = socket.gethostname()
    spec = _spec(site)
    with pytest.raises(
        ActorStartError, match=rf"node {host} runs captiond 0\.1\.0 \(driver: 0\.0\.1\)"
    ):
        CaptionActor(spec | {"expect": spec["expect"] | {"captiond": "0.0.1"}})
    gone = tmp_path / "nowhere"
    roots = [{"path": str(gone), "watch": spec["roots"][0]["watch"]}]
    with pytest.raises(ActorStartError, match=rf"node {host}: cannot open the root .*--path-map"):
        CaptionActor(spec | {"roots": roots})
    empty = tmp_path / "mountpoint"
    empty.mkdir()
    roots = [{"path": str(empty), "watch": spec["roots"][0]["watch"]}]
    with pytest.raises(ActorStartError, match="is empty: is the share mounted"):
        CaptionActor(spec | {"roots": roots})
    # the share is mounted elsewhere on this node: --path-map makes it work
    maps = [[None, str(gone), str(site.root)]]
    actor = CaptionActor(spec | {"roots": [{"path": str(gone), "watch": roots[0]["watch"]}],
                                 "path_maps": maps})  # fmt: skip
    assert str(actor.watches[0].path) == str(site.root)
    bad_model = spec["config"] | {"model": str(tmp_path / "no-model")}
    started = time.monotonic()
    load_failed = (
        r"could not load wd_tagger after 2 attempts: "
        r"ModelUnavailableError: model folder .*no-model does not exist"
    )
    with pytest.raises(ActorStartError, match=load_failed):
        CaptionActor(spec | {"config": bad_model, "start_attempts": 2})
    assert time.monotonic() - started < 10  # bounded


def test_feeder_gives_a_retried_token_the_same_chunk() -> None:
    import asyncio

    async def scenario() -> None:
        f = Feeder()
        waiting = asyncio.ensure_future(f.take(0))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # waits for the driver
        await f.put([(1, 0, "a")])
        await f.put([(2, 0, "b")])
        room = asyncio.ensure_future(f.wait_room(2))
        await asyncio.sleep(0.01)
        assert await waiting == [(1, 0, "a")]
        assert await room == 1  # a chunk was taken: room for the next
        assert await f.take(0) == [(1, 0, "a")]  # Ray retried token 0
        assert await f.take(1) == [(2, 0, "b")]
        await f.close()
        assert await f.take(2) == []
        await f.forget([0, 1])
        assert (await f.stats())["retakes"] == 1 and (await f.stats())["given"] == 1

    asyncio.run(scenario())


# -- the driver with the actor in-process ----------------------------------------------


def _run(site: Site, executor: Any = None, **opts: Any) -> Any:
    bf = Backfill(site.settings(), BackfillOptions(**({"chunk_size": 8} | opts)),
                  executor=executor)  # fmt: skip
    return bf.run()


def test_inline_run_records_like_the_daemon(tmp_path: Path, wd_model_dir: Path) -> None:
    """Every image captioned once, recorded and acked; sidecars byte for byte what
    ``captiond caption --once`` (the daemon's worker) writes for a copy of the folder."""
    site = Site(tmp_path / "a", wd_model_dir)
    site.add(30, folders=3)
    site.add_bad()
    site.scan()
    p = _run(site)
    assert p.state == "finished" and p.done == 31 and p.outcomes == {"written": 30}
    assert dict(p.failures) == {"bad_image": 1}
    site.check_exactly_once()
    twin_site = Site(tmp_path / "b", wd_model_dir)  # the same settings, another folder
    copy = twin_site.root
    shutil.copytree(site.root, copy, ignore=shutil.ignore_patterns("*.txt"), dirs_exist_ok=True)
    result = run_once(twin_site.settings(), copy)
    assert result.outcomes == {"written": 30}
    for img in site.images:
        twin = copy / img.relative_to(site.root)
        assert twin.with_suffix(".txt").read_bytes() == img.with_suffix(".txt").read_bytes()
    assert _run(site).total == 0  # nothing left


class Spy(InlineExecutor):
    """The in-process actor, with a hook before each chunk's results go back."""

    def __init__(self, before: Callable[[int, list[dict[str, Any]]], None] | None = None):
        super().__init__()
        self.before = before
        self.rows: list[Any] = []

    def run(self, spec: dict[str, Any], tokens: int, next_chunk: Callable[[], Chunk | None]
            ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:  # fmt: skip
        def counted() -> Chunk | None:
            c = next_chunk()
            if c is not None:
                self.rows += c.rows
            return c

        for n, (actor, node, results) in enumerate(super().run(spec, tokens, counted)):
            if self.before:
                self.before(n, results)
            yield actor, node, results


def test_planned_skips_never_reach_the_model(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    paths = site.add(6)
    paths[0].with_suffix(".txt").write_text("a person's caption\n")
    site.scan()
    spy = Spy()
    p = _run(site, spy)
    assert p.outcomes == {"written": 5, "caption_exists": 1}
    assert len(spy.rows) == 5 and all(not r[2].endswith(paths[0].name) for r in spy.rows)
    assert paths[0].with_suffix(".txt").read_text() == "a person's caption\n"


def test_limit_and_requests_are_left_to_the_daemon(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    paths = site.add(10)
    site.scan()
    db, q, _ = site.open()
    q.enqueue(str(paths[9]), GEN, 200, options={"request": "r1", "force": True})
    db.close()
    p = _run(site, limit=4)
    assert p.total == 4 and p.done == 4
    rows = site.job_rows()
    assert rows[str(paths[9])][0] == "pending"  # the explicit request waits for the daemon
    assert sum(1 for r in rows.values() if r[0] == "done") == 4


def test_results_of_a_lost_lease_are_dropped(tmp_path: Path, wd_model_dir: Path) -> None:
    """If the daemon took the jobs back (the driver stalled past its lease), the
    driver writes no sidecar for them: the daemon's own run will."""
    site = Site(tmp_path, wd_model_dir)
    site.add(16)
    site.scan()
    db, q, _ = site.open()

    def steal(n: int, results: list[dict[str, Any]]) -> None:
        if n == 0:
            owner = next(iter(q.leased_by_owner()))
            assert q.recover_owner(owner) == 8
            assert len(q.claim(GEN, 8)) == 8  # the daemon's worker has them now

    p = _run(site, Spy(steal))
    db.close()
    assert p.lost == 8 and p.outcomes == {"written": 8}
    assert len(list(site.root.rglob("*.txt"))) == 8
    assert site.totals()["leased"] == 8  # the daemon's, untouched


def test_a_condition_of_the_system_returns_jobs_without_an_attempt(
    tmp_path: Path, wd_model_dir: Path
) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(8)
    site.scan()

    def unmounted(n: int, results: list[dict[str, Any]]) -> None:
        for r in results:  # the share went away on the actor's node
            job = r["job"]
            r.clear()
            r |= {"job": job, "error": {"type": "io", "message": "[Errno 116] Stale file handle",
                                        "retryable": True, "errno": 116,
                                        "condition": "stale_handle", "node": "gpu3"}}  # fmt: skip

    p = _run(site, Spy(unmounted))
    assert p.released == 8 and not p.failures
    assert all(r[0] == "pending" and r[2] == 0 for r in site.job_rows().values())


def test_no_progress_stops_the_run_with_a_clear_message(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(8)
    site.scan()
    stuck = threading.Event()

    class Hung(InlineExecutor):
        def run(self, spec: dict[str, Any], tokens: int, next_chunk: Any) -> Iterator[Any]:
            next_chunk()
            stuck.wait(30)  # an actor pool that never answers
            yield from ()

    started = time.monotonic()
    p = _run(site, Hung(), stall_seconds=1.5)
    stuck.set()
    assert time.monotonic() - started < 10
    assert p.state == "failed" and "no progress for" in p.message and "first result" in p.message
    assert site.totals() == {"pending": 8, "leased": 0, "done": 0, "failed": 0, "dead": 0}
    stuck.clear()
    p = _run(site, Hung(), time_limit=1.0)
    stuck.set()
    assert p.state == "stopped" and "time limit" in p.message


def test_a_failure_while_feeding_stops_the_run(tmp_path: Path, wd_model_dir: Path) -> None:
    """The feed thread (Ray's executor) failing to plan leaves the actors waiting for
    chunks for ever: the supervisor stops the run with the error at once."""
    site = Site(tmp_path, wd_model_dir)
    site.add(4)
    site.scan()
    release = threading.Event()

    class FeedFails(InlineExecutor):
        feed_error: BaseException | None = None

        def run(self, spec: dict[str, Any], tokens: int, next_chunk: Any) -> Iterator[Any]:
            next_chunk()
            self.feed_error = OSError(5, "Input/output error")
            release.wait(30)  # actors waiting at the feeder
            yield from ()

    started = time.monotonic()
    p = _run(site, FeedFails())
    release.set()
    assert time.monotonic() - started < 10
    assert p.state == "failed" and "Input/output error" in p.message
    assert site.totals()["pending"] == 4  # the chunk went back


def test_status_shows_a_running_backfill(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(16)
    site.scan()
    seen: list[dict[str, Any]] = []
    db, q, _ = site.open()

    def look(n: int, results: list[dict[str, Any]]) -> None:
        if n == 1:
            time.sleep(2.2)  # a heartbeat passes
            seen.append(backfill_status(q))

    _run(site, Spy(look))
    (running,) = seen[0]["runs"]
    assert running["state"] == "running" and running["leased"] == 8
    assert running["done"] == 8 and running["generator"] == GEN and running["host"]
    assert running["actors"][0]["images"] == 8
    after = backfill_status(q)
    db.close()
    assert after["running"] == 0 and after["runs"][0]["state"] == "finished"
    text = format_status({"backfills": after})
    assert "backfill finished" in text and "16/16 wd_tagger" in text
    assert "16/16" in line(after["runs"][0]) and "16 written" in summary(after["runs"][0])


def test_a_dead_drivers_row_and_leases_are_recovered_by_the_next(
    tmp_path: Path, wd_model_dir: Path
) -> None:
    site = Site(tmp_path, wd_model_dir)
    site.add(8)
    site.scan()
    db, _, _ = site.open()
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"backfill:{socket.gethostname()}:{dead.pid}:x"
    JobQueue(db, owner=owner).claim_under(GEN, 5, [str(site.root)])
    BackfillRegistry(db).register(owner, socket.gethostname(), dead.pid, {"proc_start": "1"})
    db.close()
    p = _run(site)
    assert p.done == 8 and p.outcomes == {"written": 8}
    db, q, _ = site.open()
    assert BackfillRegistry(db).get(owner).state == "died"
    assert backfill_status(q)["runs"][0]["state"] == "finished"
    db.close()
    site.check_exactly_once()


def test_a_tags_prompt_gets_the_taggers_recorded_caption(
    tmp_path: Path, wd_model_dir: Path, monkeypatch
) -> None:
    """A describer whose prompt uses {tags}: each image gets the tagger's caption the
    index has for its content (a person's edit of it included). One not tagged yet, or
    changed since, is left to the daemon without using an attempt, its tagger job
    queued; once tagged, the next run captions it."""
    import daemon.backfill.driver as driver_mod

    # given back at once: the run must still not take them again (it skips them)
    monkeypatch.setattr(driver_mod, "DEPENDENCY_DELAY_SECONDS", 0.0)
    site = tags_site(tmp_path, wd_model_dir, monkeypatch)
    tagged = site.add(6, folders=2)
    bad = site.add_bad()
    (before,) = site.add(1, start=9, folders=1)
    before.with_suffix(".txt").write_text("1boy, written before captiond came\n")
    site.images.pop(before)
    site.scan()
    assert _run(site, generator="wd_tagger").outcomes == {"written": 6, "caption_exists": 1}
    edited, changed = tagged[0], tagged[1]
    edited.with_suffix(".txt").write_text("1girl, edited by a person\n")
    late = site.add(2, start=6, folders=2)  # dropped after the tagger's run: no tags yet
    site.scan()
    recolour(site, changed)  # after the scan: its tagger job stays done, the record old
    db, q, _ = site.open()
    assert q.get(str(late[0]), "wd_tagger").state == "pending"
    q.forget(str(late[1]))  # the describer's job alone: no tagger job at all
    q.enqueue(str(late[1]), "tagecho", 0)
    db.close()

    p = _run(site, generator="tagecho")
    assert p.outcomes == {"written": 6} and p.waiting == 3 and p.done == 7
    assert dict(p.failures) == {"generation": 1}  # the broken image: the tagger failed on it
    assert "3 left to the daemon" in summary(p.to_json())
    by_person = "an image with 1girl, edited by a person.\n"
    assert edited.with_suffix(".caption").read_text() == by_person
    before_us = "an image with 1boy, written before captiond came.\n"
    assert before.with_suffix(".caption").read_text() == before_us
    check_tag_captions(tagged[2:])
    for img in (changed, *late):
        assert not img.with_suffix(".caption").exists()
    db, q, _ = site.open()
    for img in (changed, *late):
        job = q.get(str(img), "tagecho")
        assert (str(job.state), job.attempts) == ("pending", 0), job  # given back, no attempt
        assert str(q.get(str(img), "wd_tagger").state) == "pending"  # its tags are on the way
    assert "wd_tagger failed on this image" in q.get(str(bad), "tagecho").error_message
    db.close()

    assert _run(site, generator="wd_tagger").outcomes == {"written": 3}  # as the daemon would
    p = _run(site, generator="tagecho")
    assert p.outcomes == {"written": 3} and p.waiting == 0
    check_tag_captions([changed, *late])


def test_tags_are_not_there_while_the_record_is_ahead_of_its_sidecar(tmp_path: Path) -> None:
    """The tagger's writer records before it renames the new sidecar into place: in
    between (or after a crash there) the file still holds the caption it replaces,
    which must not be served as the new content's tags. A person's edit is served."""
    from daemon.config import WatchConfig
    from daemon.hashing import sidecar_hash
    from daemon.pipeline.tags import recorded_tags
    from daemon.queue import CaptionRecord, FileIndex

    root = tmp_path / "data"
    img = make_image(root / "a.png", "red")
    txt = root / "a.txt"
    txt.write_text("old tags\n")
    watch = WatchConfig(path=root, generators=["wd_tagger"])
    db = Database(tmp_path / "q.db")
    index = FileIndex(db)
    old, new = sidecar_hash(b"old tags\n"), sidecar_hash(b"new tags\n")
    index.record_captions([CaptionRecord(str(img), "wd_tagger", "c2", str(txt), new, 1.0, old)])
    assert recorded_tags(index, watch, str(img), "wd_tagger") is None  # not renamed yet
    txt.write_text("new tags\n")
    assert recorded_tags(index, watch, str(img), "wd_tagger") == ("c2", "new tags")
    txt.write_text("a person's tags\n")
    assert recorded_tags(index, watch, str(img), "wd_tagger") == ("c2", "a person's tags")
    assert recorded_tags(index, watch, str(img), "wd_tagger", lambda h: h == "c1") is None
    db.close()


def test_a_tags_prompt_without_a_tagger_in_the_watch_fails_with_the_reason(
    tmp_path: Path, wd_model_dir: Path, monkeypatch
) -> None:
    site = tags_site(tmp_path, wd_model_dir, monkeypatch, generators=("tagecho",))
    site.add(2)
    site.scan()
    p = _run(site, generator="tagecho")
    assert p.outcomes == {} and dict(p.failures) == {"generation": 2}
    db, q, _ = site.open()
    assert all("no tagging generator" in (j.error_message or "") for j in q.jobs(limit=10))
    db.close()


def test_validation_errors(tmp_path: Path, wd_model_dir: Path) -> None:
    site = Site(tmp_path, wd_model_dir)
    with pytest.raises(BackfillError, match="not a watched folder"):
        Backfill(site.settings(), BackfillOptions(roots=[str(tmp_path / "elsewhere")]))
    with pytest.raises(BackfillError, match="not among the generators"):
        Backfill(site.settings(), BackfillOptions(generator="vlm"))


# -- the driver SIGKILLed at each dangerous moment, then run again -----------------------

DRIVER = """
import sys
from daemon.backfill.driver import Backfill, BackfillOptions
from daemon.config import load_settings
p = Backfill(load_settings(sys.argv[1]), BackfillOptions(chunk_size=6)).run()
print(p.state)
"""


@pytest.mark.parametrize("point", ["after_stage", "after_record", "after_rename", "mid_acks"])
def test_driver_killed_mid_run_then_run_again(
    tmp_path: Path, wd_model_dir: Path, point: str
) -> None:
    """SIGKILL between staging and recording, recording and renaming, renaming and
    acking, or halfway through the acks of the 2nd chunk: the next run (which sees the
    driver's pid gone) finishes, every sidecar once, none mistaken for a person's."""
    site = Site(tmp_path, wd_model_dir)
    site.add(24)
    site.scan()
    env = os.environ | {"CAPTIOND_CRASH_AT": f"{point}@2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(site.config)], env=env,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert site.totals()["leased"] > 0  # it died holding leases
    if point in ("after_stage", "after_record"):
        assert site.temp_files()
    p = _run(site, sweep_guard_seconds=0.5)
    assert p.state == "finished"
    site.check_exactly_once()
    outcomes = {r[1] for r in site.job_rows().values()}
    assert outcomes <= {"written", "unchanged"}, outcomes  # never caption_exists/edited


# -- the command --------------------------------------------------------------------------


def test_backfill_without_ray_says_how_to_install(
    tmp_path: Path, wd_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    site = Site(tmp_path, wd_model_dir)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("ray") else real(n, *a)
    )
    r = CliRunner().invoke(main, ["--config", str(site.config), "backfill"])
    assert r.exit_code == 2 and INSTALL_HINT in r.output


def test_backfill_command_refuses_bad_arguments(tmp_path: Path, wd_model_dir: Path) -> None:
    pytest.importorskip("ray.data")
    site = Site(tmp_path, wd_model_dir)
    r = CliRunner().invoke(main, ["--config", str(site.config), "backfill", "--path-map", "x"])
    assert r.exit_code == 2 and "write FROM=TO" in r.output
    r = CliRunner().invoke(main, ["--config", str(site.config), "backfill", "/elsewhere"])
    assert r.exit_code == 2 and "not a watched folder" in r.output


def test_the_daemons_worker_recovers_a_dead_drivers_leases_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only at start: a driver that dies while the daemon runs loses its jobs to the
    daemon's worker once its leases expire; the daemon's own leases are never touched."""
    import daemon.worker as worker_mod
    from daemon.config import Settings
    from daemon.generators.registry import Discovered
    from daemon.queue import FileIndex
    from daemon.residency.manager import ModelManager
    from daemon.worker import Worker
    from tests.daemonproc import wait_for
    from tests.fakegen import EchoConfig, EchoGenerator

    monkeypatch.setattr(worker_mod, "FOREIGN_RECOVERY_SECONDS", 0.2)
    root = tmp_path / "data"
    paths = [make_image(root / f"{i}.png") for i in range(3)]
    settings = Settings(
        state_dir=tmp_path / "state",
        watch=[{"path": root, "generators": ["echo"], "sidecar_extension": "txt"}],
        worker={"preload": []},
    )
    db = Database(tmp_path / "q.db")
    queue = JobQueue(db)
    queue.enqueue_many([(str(p), "echo", 0) for p in paths])
    models = ModelManager.build(
        ["echo"], {"echo": Discovered("echo", EchoGenerator)}, lambda n, c: EchoConfig()
    )
    worker = Worker(settings=settings, queue=queue, index=FileIndex(db), models=models)
    worker.paused = True  # claims nothing of its own
    dead = JobQueue(db, owner="backfill:elsewhere:1:x", lease_seconds=2.0)
    held = dead.claim_under("echo", 3, [str(root)])
    mine = make_image(root / "mine.png")
    queue.enqueue(str(mine), "echo", 0)
    (own,) = JobQueue(db, lease_seconds=0.5).claim("echo", 1)  # the daemon's, expiring
    worker.start()
    try:
        time.sleep(0.5)
        assert dead.held([j.id for j in held]) == {j.id for j in held}  # not expired yet
        wait_for(lambda: queue.totals()["pending"] == 3, timeout=10)  # expired: back
        worker.paused = False
        worker.wake()
        wait_for(lambda: queue.totals()["done"] == 3, timeout=10)
        assert str(queue.get_by_id(own.id).state) == "leased"  # its own: left for the start
    finally:
        worker.stop()
        db.close()
    assert all(p.with_suffix(".txt").exists() for p in paths)
