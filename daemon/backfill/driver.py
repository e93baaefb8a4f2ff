"""The backfill driver: leases the daemon's pending jobs in chunks, plans them, feeds
them to the actors, records the results exactly as the daemon's worker would, and
watches over the run (leases, heartbeat, progress checks, a wall-clock limit).

Threads:

- the *supervisor* (the caller's): extends the leases and writes the status row now
  and then, checks progress and the time limit, stops the run with a clear message;
- the *feed* (Ray executor): keeps a few planned chunks waiting at the feeder;
- the *collector*: takes the actors' results off Ray Data and queues them;
- the *recorders* (4): each finishes a chunk with the caption pipeline (sidecars,
  index) and acks it in one transaction; their time is mostly fsync waits.

Exactly once: a job is recorded only while this driver still holds its lease, and at
most once per run; actors write nothing. A job whose result never came back is released
at the end; if the driver dies, its leases expire (or the next backfill on this host,
seeing the driver's pid gone, recovers them at once) and the jobs return to the queue.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue as queue_mod
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from daemon import faults
from daemon.backfill.cluster import ClusterError
from daemon.backfill.spec import (
    WAITING,
    PathMap,
    RemoteFailure,
    Row,
    failure_of,
    local_facts,
)
from daemon.conditions import condition_of, errno_of
from daemon.config import Settings, WatchConfig, discover_generators, generator_config
from daemon.confined import Root, is_temp_name
from daemon.errors import DependencyPendingError, classify
from daemon.generators.base import Generator
from daemon.overrides import Overrides, apply_overrides
from daemon.pipeline.caption import CaptionPipeline, ImageTask, Outcome
from daemon.pipeline.tags import (
    DEPENDENCY_DELAY_SECONDS,
    recorded_tags,
    tagger_of,
    tags_when_unrecorded,
)
from daemon.queue import Database, FileIndex, Job, JobQueue
from daemon.queue.backfills import BackfillRegistry
from daemon.watch.mounts import fs_type, is_network_fs

log = structlog.get_logger(__name__)

CHUNK = 256  # images per chunk: leased, planned, sent and recorded together
LEASE_SECONDS = 120.0
HEARTBEAT_SECONDS = 2.0
STALL_SECONDS = 600.0
TIME_LIMIT_SECONDS = 48 * 3600.0
# An actor that failed to start (after its own start_attempts) is replaced this many
# times (perhaps on another node) before the run stops.
ACTOR_REPLACEMENTS = 1
RECORDERS = 4
SYSTEMIC_STOP = 64  # failures by a condition of the system in a row stop the run


class BackfillError(Exception):
    """The backfill cannot start or had to stop; the message says why."""


@dataclass
class BackfillOptions:
    roots: list[str] = field(default_factory=list)  # watch names or folders; [] = all
    generator: str | None = None
    ray: str = "local"  # local | auto | ADDRESS
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    batch_size: int | None = None
    limit: int | None = None
    path_maps: list[PathMap] = field(default_factory=list)
    chunk_size: int = CHUNK
    time_limit: float = TIME_LIMIT_SECONDS
    stall_seconds: float = STALL_SECONDS
    lease_seconds: float = LEASE_SECONDS
    start_attempts: int = 3
    # A dead driver's temp files are swept this long after its death was seen, so that
    # no live process's write in the same folder (the daemon's) can be under way.
    sweep_guard_seconds: float = 10.0
    # Threads finishing chunks (sidecars, index, acks): their time is mostly fsync
    # waits, which overlap (bench/README.md, Backfill).
    recorders: int = RECORDERS
    local_cpus: int | None = None  # --ray local: CPUs of the instance (default: all)
    test: dict[str, Any] = field(default_factory=dict)  # test-only hooks for the actors


@dataclass
class Progress:
    total: int = 0
    done: int = 0  # recorded: acked or failed
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    released: int = 0
    waiting: int = 0  # {tags} jobs handed back until their tagger's caption is there
    lost: int = 0  # results dropped: the lease was no longer ours
    leased: int = 0
    started: float = field(default_factory=time.time)
    last_progress: float = field(default_factory=time.monotonic)
    first_result: float | None = None
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "starting"
    message: str = ""
    cluster: str = ""

    def rate(self) -> float:
        if self.first_result is None:
            return 0.0
        spent = time.monotonic() - self.first_result
        return self.done / spent if spent > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        rate = self.rate()
        left = max(0, self.total - self.done - self.waiting)
        return {
            "state": self.state,
            "message": self.message,
            "cluster": self.cluster,
            "total": self.total,
            "done": self.done,
            "outcomes": dict(self.outcomes),
            "failures": dict(self.failures),
            "released": self.released,
            "waiting_for_tags": self.waiting,
            "lost_leases": self.lost,
            "leased": self.leased,
            "images_per_second": round(rate, 2),
            "eta_seconds": round(left / rate) if rate > 0 else None,
            "elapsed_seconds": round(time.time() - self.started, 1),
            "actors": list(self.actors.values()),
        }


@dataclass
class Chunk:
    rows: list[Row]


class Executor(Protocol):
    """Runs the actors over the chunks the planner gives: :meth:`run` yields (actor
    label, node, results) per chunk, until the planner has no more."""

    def run(
        self, spec: dict[str, Any], tokens: int, next_chunk: Callable[[], Chunk | None]
    ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]: ...

    def stop(self) -> None: ...


class InlineExecutor:
    """The actor in this process, one chunk after another (tests, and the measure of
    what Ray adds)."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def run(
        self, spec: dict[str, Any], tokens: int, next_chunk: Callable[[], Chunk | None]
    ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        from daemon.backfill.actor import CaptionActor

        actor = CaptionActor(spec)
        while not self._stop.is_set() and (chunk := next_chunk()) is not None:
            yield actor.actor_id, actor.node, actor.caption(chunk.rows)

    def stop(self) -> None:
        self._stop.set()


class RayExecutor:
    """A Ray Data actor pool (:class:`~daemon.backfill.actor.FedCaptionActor`) over
    tokens, fed by a :class:`~daemon.backfill.feeder.Feeder` on this node."""

    def __init__(self, actors: int, cpus: float, gpus: float, start_attempts: int) -> None:
        self.actors, self.cpus, self.gpus = actors, cpus, gpus
        self.start_attempts = start_attempts
        self._stop = threading.Event()
        self.feed_error: BaseException | None = None
        self.feeder: Any = None

    def run(
        self, spec: dict[str, Any], tokens: int, next_chunk: Callable[[], Chunk | None]
    ) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        import json

        import ray
        from ray.data import ActorPoolStrategy, DataContext
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from daemon.backfill.actor import FedCaptionActor
        from daemon.backfill.feeder import Feeder

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.actor_init_retry_on_errors = False  # the actor retries its load itself
        ctx.max_consecutive_actor_init_deaths = ACTOR_REPLACEMENTS
        here = ray.get_runtime_context().get_node_id()
        self.feeder = feeder = (
            ray.remote(Feeder)
            .options(
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
            )
            .remote()
        )
        depth = max(2, self.actors + 1)
        feed = threading.Thread(
            target=self._feed, args=(feeder, next_chunk, depth), name="captiond-feed", daemon=True
        )
        feed.start()
        ds = ray.data.from_items([{"token": i} for i in range(tokens)], override_num_blocks=tokens)
        out = ds.map_batches(
            FedCaptionActor,
            batch_size=1,
            compute=ActorPoolStrategy(size=self.actors),
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            fn_constructor_kwargs={"spec": spec, "feeder": feeder},
        )
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            done = []
            for token, payload in zip(batch["token"], batch["payload"], strict=True):
                data = json.loads(payload)
                done.append(int(token))
                yield data["actor"], data["node"], data["results"]
            feeder.forget.remote(done)
            if self._stop.is_set():
                return
            if self.feed_error is not None:
                raise self.feed_error

    def _feed(self, feeder: Any, next_chunk: Callable[[], Chunk | None], depth: int) -> None:
        import ray

        try:
            room = None
            while not self._stop.is_set():
                room = room or feeder.wait_room.remote(depth)
                ready, _ = ray.wait([room], timeout=1.0)
                if not ready:
                    continue  # full: look at the stop flag now and then
                room = None
                chunk = next_chunk()
                if chunk is None:
                    break
                ray.get(feeder.put.remote(chunk.rows))
            ray.get(feeder.close.remote())
        except BaseException as exc:  # the supervisor reports it
            self.feed_error = exc

    def stop(self) -> None:
        self._stop.set()


def _owner_name() -> str:
    return f"backfill:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (from /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().rsplit(b")", 1)[1].split()
        return stat[19].decode()
    except (OSError, IndexError):
        return None


def resolve_targets(
    settings: Settings, roots: list[str], generator: str | None
) -> tuple[list[WatchConfig], list[str], str]:
    """(watches, folder prefixes, generator) for the roots asked for: watch names,
    watched folders or folders inside them; all watches when none is given."""
    watches: list[WatchConfig] = []
    prefixes: list[str] = []
    by_name = {w.name: w for w in settings.watch}
    for r in roots or [w.name for w in settings.watch]:
        if r in by_name:
            w, prefix = by_name[r], str(by_name[r].path)
        else:
            path = os.path.abspath(os.path.expanduser(r))
            w = settings.watch_for(path)
            if w is None:
                known = ", ".join(f"{x.name} ({x.path})" for x in settings.watch) or "none"
                raise BackfillError(f"{r} is not a watched folder or inside one (watched: {known})")
            prefix = path
        if w not in watches:
            watches.append(w)
        prefixes.append(prefix.rstrip("/") or "/")
    if not watches:
        raise BackfillError("no watched folders: add [[watch]] tables to the configuration")
    if generator is None:
        firsts = {w.generators[0] for w in watches}
        if len(firsts) > 1:
            raise BackfillError(
                f"the folders' first generators differ ({', '.join(sorted(firsts))}): choose one "
                "with -g"
            )
        generator = firsts.pop()
    missing = [w.name for w in watches if generator not in w.generators]
    if missing:
        raise BackfillError(f"generator {generator} is not among the generators of {missing}")
    return watches, sorted(set(prefixes)), generator


class Backfill:
    """One run: ``Backfill(settings, options).run(on_progress)``."""

    def __init__(
        self,
        settings: Settings,
        options: BackfillOptions,
        *,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.warnings = apply_overrides(settings, Overrides.load(settings.runtime_settings_path))
        self.settings = settings
        self.watches, self.prefixes, self.generator = resolve_targets(
            settings, options.roots, options.generator
        )
        discovered = discover_generators(settings)
        found = discovered.get(self.generator)
        if found is None or found.cls is None:
            raise BackfillError(
                f"generator {self.generator}: {found.error if found else 'unknown generator'}"
            )
        self.gen_cls = found.cls
        self.gen_config = generator_config(settings, self.generator, found.cls)
        gen = found.cls(self.gen_config, cache_dir=settings.cache_dir)
        gen.name = self.generator
        self.gen = gen
        # A {tags} prompt: each row carries the tagger's recorded caption (made by the
        # daemon or an earlier backfill); the actors use it for the content it was made of.
        self._peers: dict[str, Generator] = {}
        self._peer_pipes: dict[str, CaptionPipeline] = {}
        self._needs_tags = "tags" in gen.context_keys
        if self._needs_tags:
            for name in {g for w in self.watches for g in w.generators} - {self.generator}:
                peer = discovered.get(name)
                if peer is not None and peer.cls is not None:
                    self._peers[name] = peer.cls(
                        generator_config(settings, name, peer.cls), cache_dir=settings.cache_dir
                    )
        self.owner = _owner_name()
        self.db = Database(settings.db_path)
        kw = settings.queue.queue_kwargs() | {"lease_seconds": options.lease_seconds}
        self.queue = JobQueue(self.db, owner=self.owner, clock=clock, **kw)
        self.index = FileIndex(self.db)
        self.registry = BackfillRegistry(self.db, clock=clock)
        self.executor = executor
        self.progress = Progress()
        self.batch_size = options.batch_size or max(
            settings.worker.batch_size, gen.preferred_batch_size or 0
        )
        self._network = {}
        for w in self.watches:
            try:
                self._network[w.name] = is_network_fs(fs_type(w.path))
            except OSError:
                self._network[w.name] = False
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._outstanding: dict[int, Job] = {}  # leased by us, result not recorded
        self._given_back: set[int] = set()  # {tags} jobs without tags: not taken again
        self._recording: set[int] = set()  # being recorded by a recorder thread
        self._claimed = 0
        self._cap = 0  # jobs this run takes at most: the backlog when it began (or --limit)
        self._stop = threading.Event()
        self._systemic_run = 0
        self._abort: str | None = None
        self._sweep: dict[str, float] = {}  # folders of a dead driver's jobs -> its death
        self._plan_pipe = self._pipeline()
        self._finish_pipe = self._pipeline()

    def _pipeline(self) -> CaptionPipeline:
        return CaptionPipeline(
            self.gen,
            self.index,
            postprocess=self.settings.postprocess,
            max_image_pixels=self.settings.worker.max_image_pixels,
        )

    # -- the actor's specification ---------------------------------------------------
    def spec(self, driver_node: str = "") -> dict[str, Any]:
        cls = self.gen_cls
        return {
            "generator": self.generator,
            "cls": f"{cls.__module__}:{cls.__qualname__}",
            "config": self.gen_config.model_dump(mode="json"),
            "cache_dir": str(self.settings.cache_dir),
            "roots": [
                {"path": str(w.path), "watch": w.model_dump(mode="json")} for w in self.watches
            ],
            "path_maps": [[m.node, m.src, m.dst] for m in self.options.path_maps],
            "driver_node": driver_node,
            "max_image_pixels": self.settings.worker.max_image_pixels,
            "batch_size": self.batch_size,
            "cpus": self.options.cpus_per_actor,
            "expect": local_facts(),
            "start_attempts": self.options.start_attempts,
            "test": self.options.test,
        }

    # -- leases of drivers that died ---------------------------------------------------
    def recover_dead(self) -> int:
        """Leases of backfills on this host whose process is gone: back to the queue now
        (others' expire on their own). Their folders get their temp files swept at the
        end of this run."""
        n = 0
        host = socket.gethostname()
        for row in self.registry.running():
            if row.owner == self.owner:
                continue
            if row.host != host:  # elsewhere: its leases expire; its row says so later
                lease = float(row.info.get("lease_seconds") or LEASE_SECONDS)
                if time.time() - row.updated_at > 3 * lease:
                    self.registry.mark(row.owner, "died")
                continue
            start = row.info.get("proc_start")
            alive = _proc_start(row.pid)
            if alive is not None and (start is None or alive == start):
                continue
            folders = self._folders_of_owner(row.owner)
            got = self.queue.recover_owner(row.owner)
            self.registry.mark(row.owner, "died")
            now = time.time()
            for f in folders:
                self._sweep.setdefault(f, now)
            log.warning("backfill_dead_driver_recovered", owner=row.owner, jobs=got)
            n += got
        n += self.queue.recover_expired_foreign()
        return n

    def _folders_of_owner(self, owner: str) -> set[str]:
        return {p.rpartition("/")[0] for p in self.queue.leased_paths(owner)}

    # -- planning (feed thread) --------------------------------------------------------
    def next_chunk(self) -> Chunk | None:
        """Lease and plan jobs until ``chunk_size`` rows need the model; None when
        nothing is left (or the run stops)."""
        rows: list[Row] = []
        while not self._stop.is_set() and len(rows) < self.options.chunk_size:
            want = self.options.chunk_size - len(rows)
            want = min(want, self._cap - self._claimed)
            if want <= 0:
                break
            with self._claim_lock:  # never after _end() took its snapshot
                if self._stop.is_set():
                    break
                jobs = self.queue.claim_under(
                    self.generator, want, self.prefixes, skip=self._given_back
                )
                with self._lock:
                    self._claimed += len(jobs)
                    for j in jobs:
                        self._outstanding[j.id] = j
                    self.progress.leased = len(self._outstanding)
            if not jobs:
                break
            rows += self._plan(jobs)
        if not rows:
            return None
        return Chunk(rows)

    def _root_of(self, path: str) -> int:
        for i, w in enumerate(self.watches):
            base = str(w.path).rstrip("/")
            if path.startswith(base + "/"):
                return i
        raise KeyError(path)

    def _plan(self, jobs: list[Job]) -> list[Row]:
        pipe = self._plan_pipe
        tasks = []
        for job in jobs:
            w = self.watches[self._root_of(job.path)]
            tasks.append(ImageTask(job.path, w, key=job))
        rows: list[Row] = []
        with pipe.open(tasks) as batch:
            pipe.plan(batch)
            skipped: list[tuple[Job, Outcome]] = []
            for item in batch.items:
                job = item.task.key
                if item.error is not None:
                    self._fail(job, item.error)
                elif item.skip is not None:
                    skipped.append((job, pipe.skipped(item)))
                else:
                    i = self._root_of(job.path)
                    row: Row = (job.id, i, Root(str(self.watches[i].path)).rel(job.path))
                    if self._needs_tags:
                        try:
                            row = (*row, self._tags(job, self.watches[i]))
                        except DependencyPendingError as exc:
                            self._wait(job, exc)
                            continue
                        except Exception as exc:
                            self._fail(job, exc)
                            continue
                    rows.append(row)
            self._ack(skipped)
        return rows

    def _tags(self, job: Job, watch: WatchConfig) -> list[str | None]:
        """[content hash, text] of the tagger's caption for a ``{tags}`` prompt (the
        hash None for a person's sidecar the tagger left alone); the actor checks the
        hash against the content it reads. DependencyPendingError: not tagged yet."""
        tagger = tagger_of(watch, self._peers)
        found = recorded_tags(self.index, watch, job.path, tagger)
        if found is not None:
            return list(found)
        peer = self._peer_pipes.get(tagger)
        if peer is None:  # once per tagger: where its sidecars go, for a person's one
            peer = self._peer_pipes[tagger] = CaptionPipeline(
                self._peers[tagger],
                self.index,
                postprocess=self.settings.postprocess,
                max_image_pixels=self.settings.worker.max_image_pixels,
            )
        text = tags_when_unrecorded(
            self.queue,
            job.path,
            tagger,
            lambda: peer.sidecar_of(job.path, watch).data,
            job.priority,
        )
        return [None, text]

    def _wait(self, job: Job, exc: BaseException) -> None:
        """A ``{tags}`` job whose tags are not there yet (the tagger's job is queued):
        back to the queue without using an attempt, for the daemon, which captions it
        once tagged; this run does not take it again."""
        self.queue.release([job.id], delay=DEPENDENCY_DELAY_SECONDS)
        log.info("backfill_job_waits", job_id=job.id, path=job.path, reason=str(exc))
        with self._lock:
            self._given_back.add(job.id)
            self.progress.waiting += 1
            if self._outstanding.pop(job.id, None) is not None:
                self.progress.last_progress = time.monotonic()
            self.progress.leased = len(self._outstanding)

    def _queue_tagger(self, job: Job) -> None:
        """The image changed since it was tagged: its tagger's job again (as the daemon's
        worker would ask), unless it is already on its way."""
        try:
            watch = self.watches[self._root_of(job.path)]
            tagger = tagger_of(watch, self._peers)
            tags_when_unrecorded(self.queue, job.path, tagger, lambda: None, job.priority)
        except Exception:  # waiting, or a tagger that failed: the daemon will say why
            pass

    # -- recording (recorder thread) -----------------------------------------------------
    def record(
        self,
        actor: str,
        node: str,
        results: list[dict[str, Any]],
        *,
        pipe: CaptionPipeline | None = None,
    ) -> None:
        """Finish one chunk's results as the daemon's writer does: sidecars and index,
        then the acks in one transaction. Results for jobs no longer ours are dropped."""
        ids = [int(r["job"]) for r in results]
        held = self.queue.held(ids)
        mine: list[tuple[Job, dict[str, Any]]] = []
        with self._lock:
            for r in results:
                jid = int(r["job"])
                job = self._outstanding.get(jid)
                if job is None or jid in self._recording:
                    continue  # a duplicate (at-least-once upstream): recorded already
                if jid not in held:
                    self._outstanding.pop(jid, None)
                    self.progress.lost += 1
                    log.warning("backfill_lease_lost", job_id=jid, path=job.path)
                    continue
                mine.append((job, r))
                self._recording.add(jid)
            a = self.progress.actors.setdefault(
                actor, {"actor": actor, "node": node, "images": 0, "last_seen": 0.0}
            )
            a["images"] += len(results)
            a["last_seen"] = round(time.time(), 1)
        try:
            if mine:
                self._finish(mine, pipe or self._finish_pipe)
        finally:
            with self._lock:
                self._recording.difference_update(j.id for j, _ in mine)

    def _finish(self, mine: list[tuple[Job, dict[str, Any]]], pipe: CaptionPipeline) -> None:
        tasks = [
            ImageTask(job.path, self.watches[self._root_of(job.path)], key=job) for job, _ in mine
        ]
        with pipe.open(tasks) as batch:
            ready, raws = [], []
            for item, (job, r) in zip(batch.items, mine, strict=True):
                failure = failure_of(r)
                if item.error is not None:
                    self._fail(job, item.error)
                elif failure is not None:
                    self._fail(job, failure)
                else:
                    item.content_hash = r["hash"]
                    item.owner = tuple(r["owner"]) if r.get("owner") else None
                    item.size = tuple(r["size"]) if r.get("size") else None
                    ready.append(item)
                    raws.append(r["caption"])
            if ready:
                try:
                    outcomes = pipe.finish(ready, raws)
                except Exception as exc:  # a bug: every job fails, none is lost
                    log.exception("backfill_finish_failed")
                    outcomes = [Outcome(i.task, error=exc) for i in ready]
                done = []
                for item, outcome in zip(ready, outcomes, strict=True):
                    if outcome.error is not None:
                        self._fail(item.task.key, outcome.error)
                    else:
                        done.append((item.task.key, outcome))
                self._ack(done)

    def _ack(self, done: list[tuple[Job, Outcome]]) -> None:
        if not done:
            return
        with self.queue.transaction():
            half = len(done) // 2
            for i, (job, outcome) in enumerate(done):
                if i == half:
                    faults.point("mid_acks")
                assert outcome.action is not None
                self.queue.ack(job.id, outcome.action.value, options=job.options)
        with self._lock:
            for job, outcome in done:
                assert outcome.action is not None
                self.progress.outcomes[outcome.action.value] += 1
                self._settled(job.id)
            self._systemic_run = 0

    def _fail(self, job: Job, exc: BaseException) -> None:
        kind = getattr(exc, "condition", None)
        if kind == WAITING:  # the image's content changed since it was tagged
            self._queue_tagger(job)
            self._wait(job, exc)
            return
        if kind is None:
            watch = self.watches[self._root_of(job.path)]
            cond = condition_of(exc, network_fs=self._network.get(watch.name, False))
            kind = cond[0] if cond else None
        if kind is not None:
            # Not the image's fault (a vanished share, a full disk): back to the queue
            # without using an attempt. Many in a row stop the run.
            self.queue.release([job.id])
            with self._lock:
                self.progress.released += 1
                self._settled(job.id)
                self._systemic_run += 1
                if self._systemic_run >= SYSTEMIC_STOP and self._abort is None:
                    node = getattr(exc, "node", "") or "this host"
                    self._abort = (
                        f"{self._systemic_run} images in a row failed by a condition of the "
                        f"system ({kind}) on {node}: {exc}"
                    )
            return
        c = classify(exc)
        errno = exc.errno if isinstance(exc, RemoteFailure) else errno_of(exc)
        self.queue.fail(job.id, c.error_type.value, c.message, c.retryable, errno=errno)
        log.warning(
            "backfill_job_failed", job_id=job.id, path=job.path, error_type=c.error_type.value,
            error=c.message,
        )  # fmt: skip
        with self._lock:
            self.progress.failures[c.error_type.value] += 1
            self._settled(job.id)
            self._systemic_run = 0

    def _settled(self, job_id: int) -> None:
        """Under the lock: a job recorded (acked, failed or released)."""
        if self._outstanding.pop(job_id, None) is not None:
            self.progress.done += 1
            self.progress.last_progress = time.monotonic()
            if self.progress.first_result is None:
                self.progress.first_result = time.monotonic()
        self.progress.leased = len(self._outstanding)

    # -- the run -----------------------------------------------------------------------
    def run(
        self,
        on_progress: Callable[[Progress], None] = lambda p: None,
        *,
        make_executor: Callable[[Backfill], tuple[Executor, str]] | None = None,
    ) -> Progress:
        """Lease, caption and record until nothing is left, the limit or the time limit
        is reached, or a check stops the run; the progress at the end.

        ``make_executor(self)`` -> (executor, driver's node id) builds the executor
        once the database side is ready (the Ray executor connects and checks nodes).
        """
        p = self.progress
        self.registry.register(self.owner, socket.gethostname(), os.getpid(), self._info())
        self.registry.prune()
        try:
            recovered = self.recover_dead()
            if recovered:
                log.warning("backfill_leases_recovered", jobs=recovered)
            total = self.queue.count_claimable(self.generator, self.prefixes)
            p.total = min(total, self.options.limit) if self.options.limit is not None else total
            self._cap = p.total  # later arrivals are the daemon's (or the next run's)
            driver_node = ""
            if make_executor is not None:
                self.executor, driver_node = make_executor(self)
            if self.executor is None:
                self.executor = InlineExecutor()
            spec = self.spec(driver_node)
            tokens = self._tokens(p.total)
            p.state = "running"
            self._heartbeat()
            if p.total == 0:
                p.state = "finished"
                p.message = "nothing pending"
                return p
            self._loop(spec, tokens, on_progress)
        except KeyboardInterrupt:
            self._abort = self._abort or "stopped by the user (Ctrl-C)"
            p.state = "stopped"
        except (BackfillError, ClusterError) as exc:
            self._abort = str(exc)
            p.state = "failed"
        except BaseException as exc:
            self._abort = self._abort or f"{type(exc).__name__}: {exc}"
            p.state = "failed"
            raise
        finally:
            self._end(on_progress)
        return p

    def _tokens(self, total: int) -> int:
        chunks = math.ceil(total / max(1, self.options.chunk_size))
        extra = max(self.options.actors or 1, 1) + math.ceil(chunks * 0.05) + 2
        return chunks + extra

    def _loop(
        self, spec: dict[str, Any], tokens: int, on_progress: Callable[[Progress], None]
    ) -> None:
        p = self.progress
        assert self.executor is not None
        results: queue_mod.Queue[Any] = queue_mod.Queue(
            maxsize=max(4, 2 * (self.options.actors or 1))
        )
        errors: list[BaseException] = []
        finished = threading.Event()
        writers = max(1, self.options.recorders)
        running = [writers]

        def collect() -> None:
            try:
                assert self.executor is not None
                for item in self.executor.run(spec, tokens, self.next_chunk):
                    while not self._stop.is_set():
                        try:
                            results.put(item, timeout=0.5)
                            break
                        except queue_mod.Full:
                            continue
                    if self._stop.is_set():
                        break
            except BaseException as exc:
                errors.append(exc)
            finally:
                for _ in range(writers):
                    with contextlib.suppress(queue_mod.Full):
                        results.put(None, timeout=5)

        def write() -> None:
            pipe = self._pipeline()  # one per recorder thread
            try:  # after a stop: what is queued is recorded, then it ends
                while True:
                    try:
                        item = results.get(timeout=0.5)
                    except queue_mod.Empty:
                        if self._stop.is_set():
                            break
                        continue
                    if item is None:
                        break
                    self.record(*item, pipe=pipe)
            except BaseException as exc:
                errors.append(exc)
                self._stop.set()
            finally:
                with self._lock:
                    running[0] -= 1
                    if running[0] == 0:
                        finished.set()

        threads = [
            threading.Thread(target=collect, name="captiond-collect", daemon=True),
            *(
                threading.Thread(target=write, name=f"captiond-record-{i}", daemon=True)
                for i in range(writers)
            ),
        ]
        for t in threads:
            t.start()
        try:
            self._supervise(finished, errors, on_progress)
        finally:  # also on Ctrl-C: what is queued is recorded before the leases go back
            self._stop.set()
            self.executor.stop()
            finished.wait(60)
        if errors and self._abort is None:
            self._abort = _describe(errors[0])
        if self._abort is not None and p.state == "running":
            p.state = "failed"
        if self._abort is None:
            p.state = "finished"

    def _supervise(
        self,
        finished: threading.Event,
        errors: list[BaseException],
        on_progress: Callable[[Progress], None],
    ) -> None:
        """Until the recorders end: leases, heartbeat, progress; the checks that stop
        a run (an error, a condition, the time limit, no progress)."""
        p = self.progress
        deadline = time.monotonic() + self.options.time_limit
        lease_every = max(1.0, self.options.lease_seconds / 4)
        next_lease = next_beat = 0.0
        while not finished.wait(0.25):
            now = time.monotonic()
            if now >= next_lease:
                self.queue.extend_owned()
                next_lease = now + lease_every
            if now >= next_beat:
                self._heartbeat()
                on_progress(p)
                next_beat = now + HEARTBEAT_SECONDS
            feed_error = getattr(self.executor, "feed_error", None)
            if feed_error is not None and not errors:  # planning failed: actors would wait
                errors.append(feed_error)
            if errors:
                break
            if self._abort is not None:
                break
            if now > deadline:
                self._abort = (
                    f"the time limit ({self.options.time_limit:g} s) was reached; run "
                    "again to go on"
                )
                p.state = "stopped"
                break
            stalled = now - p.last_progress
            if stalled > self.options.stall_seconds:
                what = "the first result" if p.first_result is None else "a result"
                self._abort = (
                    f"no progress for {stalled:.0f} s (waiting for {what}; actors: "
                    f"{self._actors_line()}); stopped (--stall-timeout)"
                )
                break

    def _actors_line(self) -> str:
        a = self.progress.actors
        if not a:
            return "none has answered yet"
        return ", ".join(f"{v['actor']}: {v['images']}" for v in a.values())

    def _end(self, on_progress: Callable[[Progress], None]) -> None:
        p = self.progress
        with self._claim_lock:
            self._stop.set()
        with self._lock:
            left = list(self._outstanding)
        if left:
            try:
                self.queue.release(left)
            except Exception:
                log.exception("backfill_release_failed", jobs=len(left))
            with self._lock:
                p.released += len(left)
                self._outstanding.clear()
                p.leased = 0
        if self._abort:
            p.message = self._abort
        elif left:
            p.message = f"{len(left)} jobs got no result and went back to the queue"
        elif p.state == "finished" and not p.message:
            p.message = "done"
        self._sweep_temps()
        try:
            self.registry.update(self.owner, self._info(), state=p.state)
        except Exception:
            log.exception("backfill_status_not_written")
        on_progress(p)
        self.db.close()

    def _heartbeat(self) -> None:
        self.registry.update(self.owner, self._info())

    def _info(self) -> dict[str, Any]:
        with self._lock:
            info = self.progress.to_json()
        return info | {
            "generator": self.generator,
            "roots": self.prefixes,
            "ray": self.options.ray,
            "lease_seconds": self.options.lease_seconds,
            "proc_start": _proc_start(os.getpid()),
        }

    def _sweep_temps(self) -> None:
        """captiond temp files a dead driver left in its jobs' folders: those created
        before its death was seen, once ``sweep_guard_seconds`` have passed since (a
        write by a live process -- the daemon's -- lasts seconds at most)."""
        found = self._stale_temps(remove=False)
        if not found:
            return
        latest = max(self._sweep.values())
        time.sleep(max(0.0, min(latest + self.options.sweep_guard_seconds - time.time(), 60)))
        self._stale_temps(remove=True)

    def _stale_temps(self, *, remove: bool) -> int:
        n = 0
        for folder, before in self._sweep.items():
            try:
                root = Root(str(self.watches[self._root_of(folder + "/x")].path))
                with root.folder(root.rel(folder)) as f:
                    for name in f.names(fresh=True):
                        if not is_temp_name(name):
                            continue
                        st = f.lstat(name)
                        if st is not None and st.st_mtime < before:
                            n += 1
                            if remove:
                                f.unlink(name)
                                log.info("backfill_stale_temp_removed", path=f"{folder}/{name}")
            except (OSError, ValueError, KeyError) as exc:
                log.warning("backfill_temp_sweep_failed", folder=folder, error=str(exc))
        return n


def ray_executor(options: BackfillOptions) -> Callable[[Backfill], tuple[Executor, str]]:
    """Connect to Ray, check the nodes and size the pool: the executor of a real run."""

    def make(bf: Backfill) -> tuple[Executor, str]:
        from daemon.backfill import cluster

        line = cluster.connect(options.ray, num_cpus=options.local_cpus)
        nodes = cluster.check_nodes()
        actors, gpus = cluster.plan_actors(
            nodes, options.actors, options.cpus_per_actor, options.gpus_per_actor
        )
        options.actors, options.gpus_per_actor = actors, gpus
        log.info("backfill_cluster", connection=line, nodes=[n.label for n in nodes],
                 actors=actors, gpus_per_actor=gpus)  # fmt: skip
        bf.progress.cluster = (
            f"{actors} actor(s) ({options.cpus_per_actor:g} CPU, {gpus:g} GPU each) on "
            f"{len(nodes)} node(s)"
        )
        executor = RayExecutor(actors, options.cpus_per_actor, gpus, options.start_attempts)
        return executor, cluster.node_id()

    return make


def _describe(exc: BaseException) -> str:
    """A Ray error as one clear line: the actor's own message when it has one."""
    text = str(exc)
    for line in text.splitlines():
        i = line.find("backfill actor on node")
        if i >= 0 and "raise " not in line:
            return line[i:].strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and "backfill actor on node" in str(cause):
        return _describe(cause)
    last = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {last[-1] if last else ''}"[:2000]
