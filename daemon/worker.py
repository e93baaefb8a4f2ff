"""The resident worker: scheduling around the caption pipeline.

It claims a batch per generator, plans it (:class:`~daemon.pipeline.caption.CaptionPipeline`),
reads and decodes its images in a thread pool while the previous batch runs on the
model, generates, and hands the batch to a writer thread that finishes it (sidecars,
index) and acknowledges its jobs in one transaction, so that the model goes on while a
write waits for fsync. It also gives up reads that hang (a stalled network mount), keeps
``{tags}`` prompts waiting for their tagger, and reports results to explicit requests.

One bad image never stops the queue: a batch that fails is retried image by image so
only the poisonous one fails; an out-of-memory error halves the batch first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import structlog
from PIL import Image

from daemon import faults, metrics
from daemon.conditions import errno_of
from daemon.config import Settings, WatchConfig
from daemon.errors import (
    DependencyPendingError,
    ReadStalledError,
    classify,
)
from daemon.hashing import bytes_match
from daemon.pipeline import stages
from daemon.pipeline.caption import CaptionPipeline, ImageTask, Item, Outcome, SidecarInfo
from daemon.pipeline.sidecars import Action
from daemon.pipeline.stages import STAGES
from daemon.pipeline.tags import (
    DEPENDENCY_DELAY_SECONDS,
    recorded_tags,
    tagger_of,
    tags_when_unrecorded,
)
from daemon.queue import FileIndex, Job, JobQueue
from daemon.residency.manager import ModelManager
from daemon.residency.slot import ModelSlot

log = structlog.get_logger(__name__)

PIPELINE_DEPTH = 2  # batches decoding ahead of the model
SYNC_THREADS = 8  # a batch's sidecars fsynced at once
# Decode threads stuck in a hung read are left behind (a blocked read cannot be
# interrupted); while this many are still stuck the pool is no longer replaced, and
# the worker waits (the systemd watchdog restarts a daemon that makes no progress).
MAX_STUCK_THREADS = 32
WAIT_SLICE_SECONDS = 1.0  # how often a wait for a decode checks its read timeout
LOAD_STALL_SECONDS = 3600.0  # a first download of a large model may take this long
FOREIGN_RECOVERY_SECONDS = 15.0  # how often a dead backfill driver's leases are looked for


@dataclass(frozen=True, slots=True)
class JobResult:
    """What became of one claimed job, for whoever asked for it (the API).

    ``state``: the job's state afterwards (``done``; ``pending`` when a retry is due;
    ``failed``; ``dead``). ``outcome`` is the done job's outcome (``written``...).
    """

    job_id: int
    path: str
    generator: str
    options: dict[str, Any] | None
    state: str
    outcome: str | None = None
    caption: str | None = None
    caption_type: str | None = None
    sidecar: str | None = None
    error_type: str | None = None
    error: str | None = None
    retryable: bool = False


@dataclass(slots=True)
class _Job:
    """A claimed job and its image's way through the pipeline."""

    job: Job
    item: Item
    future: Future[None] | None = None
    pool: ThreadPoolExecutor | None = None  # the decode pool it was submitted to


@dataclass(slots=True)
class _Batch:
    pipeline: CaptionPipeline
    batch: Any  # the pipeline's Batch (its open folders)
    jobs: list[_Job] = field(default_factory=list)


def _task(job: Job, watch: WatchConfig) -> ImageTask:
    opts = job.options or {}
    return ImageTask(
        job.path,
        watch,
        force=bool(opts.get("force")),
        post_process=opts.get("post_process") is not False,
        key=job,
    )


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        queue: JobQueue,
        index: FileIndex,
        models: ModelManager,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[JobResult], None] | None = None,
        systemic: Callable[[str, BaseException], bool] = lambda path, exc: False,
        held_roots: Callable[[], Iterable[str]] = lambda: (),
        intake_open: Callable[[], bool] = lambda: True,
    ):
        """``systemic(path, exc)``: True when a job's failure is a condition of the
        system (reported by the caller): the job goes back without using an attempt.
        ``held_roots()``: roots whose jobs wait (a condition). ``intake_open()``: False
        while the database cannot be written: nothing is claimed, and writes to it that
        failed are kept until :meth:`resume_deferred`."""
        self.settings = settings
        self.systemic = systemic
        self.held_roots = held_roots
        self.intake_open = intake_open
        self._deferred: deque[Callable[[], None]] = deque()
        self.queue = queue
        self.index = index
        self.models = models
        self._clock = clock
        self.on_result = on_result  # called on the worker thread: must not block
        # (path, generator, outcome, caption) of each batch's finished jobs, after their
        # acks, on the writer thread: must not block (the report's checks queue them).
        self.on_done: Callable[[list[tuple[str, str, str, str | None]]], None] | None = None
        self.pipelines: dict[str, CaptionPipeline] = {}
        # fsyncs of a batch's sidecars at once (the filesystem groups them)
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, "captiond-fsync")
        for name, slot in models.slots.items():
            self.rebuild_pipeline(name, slot)
        # The daemon owns its process: Pillow's own bomb check follows the config.
        Image.MAX_IMAGE_PIXELS = settings.worker.max_image_pixels
        self._pool = ThreadPoolExecutor(settings.worker.decode_threads(), "captiond-decode")
        self._stuck: list[Future[None]] = []  # decodes given up on while running
        # Sidecars are written, recorded and acked on their own thread, so that the model
        # thread goes on with the next batch while a write waits for fsync.
        self._writer = ThreadPoolExecutor(1, "captiond-write")
        self._writing: deque[Future[None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rr = 0
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.loading_since: float | None = None
        self.stem_clashes: deque[dict[str, str]] = deque(maxlen=50)
        self.captions_written = 0
        self.paused = False  # no job is claimed
        self.paused_roots: frozenset[str] = frozenset()  # no job under these is claimed
        self._calls: deque[Callable[[], None]] = deque()
        self._next_foreign_recovery = 0.0

    def rebuild_pipeline(self, name: str, slot: ModelSlot | None = None) -> None:
        """(Re)build the pipeline of generator ``name`` from its slot."""
        slot = slot or self.models.get(name)
        if slot is None or slot.generator is None:
            self.pipelines.pop(name, None)
            return
        self.pipelines[name] = CaptionPipeline(
            slot.generator,
            self.index,
            postprocess=self.settings.postprocess,
            max_image_pixels=self.settings.worker.max_image_pixels,
            tags=self._tags_for,
            clock=self._clock,
            sync_pool=self._sync_pool,
        )

    def set_postprocess(self, pp: Any) -> None:
        """Use another post-processing configuration for the captions finished next."""
        for p in self.pipelines.values():
            p.set_postprocess(pp)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread between batches, with no batch in flight
        (batches claimed ahead go back to the queue first)."""
        self._calls.append(fn)
        self._wake.set()

    def run_on_writer(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the sidecar writer thread and return its result (or raise its
        exception): it is then serialised with the worker's own sidecar writes. Inline
        once the worker has stopped (nothing else writes then)."""
        try:
            future = self._writer.submit(fn)
        except RuntimeError:  # shut down
            return fn()
        return future.result()

    def sidecar_of(self, path: str, generator: str) -> SidecarInfo:
        """``generator``'s sidecar of the image at ``path``: where it goes (or is) and
        what is there now."""
        watch = self.settings.watch_for(path)
        pipeline = self.pipelines.get(generator)
        if watch is None or pipeline is None:
            raise FileNotFoundError(f"{path} is not under a watched folder")
        return pipeline.sidecar_of(path, watch)

    # -- life cycle -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captiond-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        self._sync_pool.shutdown(wait=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- main loop ------------------------------------------------------------------
    # The daemon's own leases (no owner) are recovered at start only, never under a
    # running batch (the socket lock keeps a second daemon out); a backfill driver's
    # expired leases are recovered now and then (_recover_foreign).
    def _run(self) -> None:
        self._load_all(self.settings.worker.preload)
        inflight: deque[_Batch] = deque()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            batch: _Batch | None = None
            try:
                # residency: idle unloading; models with a batch claimed stay
                self.models.tick(busy={b.pipeline.name for b in inflight})
                if self._calls:
                    self._release(inflight)
                    inflight.clear()
                    self._drain_writes(0)
                    self._run_calls()
                if self._deferred and self.intake_open():
                    self.resume_deferred()
                self._recover_foreign()
                while (
                    len(inflight) < PIPELINE_DEPTH
                    and not self._stop.is_set()
                    and not self.paused
                    and self.intake_open()
                ):
                    claimed = self._claim_next()
                    if claimed is None:
                        break
                    inflight.append(claimed)
                if not inflight:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                batch = inflight.popleft()
                self._process(batch)
            except Exception:
                # A bug here must not kill the worker or strand the batch's jobs.
                log.exception("worker_loop_error")
                if batch is not None:
                    self._release([batch])
                self._stop.wait(1.0)
        self._release(inflight)
        self._drain_writes(0)

    def _recover_foreign(self) -> None:
        """Now and then: the expired leases of a backfill driver that died go back to
        the queue (the daemon's own leases are never touched here)."""
        now = time.monotonic()
        if now < self._next_foreign_recovery:
            return
        self._next_foreign_recovery = now + FOREIGN_RECOVERY_SECONDS
        if n := self.queue.recover_expired_foreign():
            log.warning("backfill_leases_recovered", jobs=n)

    def _drain_writes(self, keep: int) -> None:
        """Wait until at most ``keep`` batches are still being written."""
        while len(self._writing) > keep:
            self._writing.popleft().result()

    def _run_calls(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("worker_call_failed")

    def _release(self, batches: Iterable[_Batch]) -> None:
        """Jobs not finished go back to the queue (only leased ones are touched)."""
        batches = list(batches)
        ids = [j.job.id for b in batches for j in b.jobs]
        try:
            self.queue.release(ids)
        except Exception:
            log.exception("release_failed", jobs=len(ids))
        for b in batches:
            b.batch.close()

    def _load_all(self, names: Iterable[str]) -> None:
        for name in names:
            if slot := self.models.get(name):
                self._ensure_loaded(slot)

    def _ensure_loaded(self, slot: ModelSlot) -> bool:
        """Load under the watchdog's eye: a load counts as progress for a while."""
        if slot.ready:
            return True
        self.loading_since = time.monotonic()
        try:
            return slot.ensure_loaded()
        finally:
            self.loading_since = None
            self.heartbeat = time.monotonic()

    def progressing(self, stall_seconds: float) -> bool:
        """For the systemd watchdog: the loop turns, or a model load is under way."""
        if not self.alive:
            return False
        now = time.monotonic()
        if self.loading_since is not None:
            return now - self.loading_since < max(stall_seconds, LOAD_STALL_SECONDS)
        return now - self.heartbeat < stall_seconds

    def _claim_next(self) -> _Batch | None:
        """Claim, plan and start preparing a batch for the next generator with due work."""
        names = sorted(self.queue.pending_generators())
        if not names:
            return None
        for offset in range(len(names)):
            name = names[(self._rr + offset) % len(names)]
            slot = self.models.get(name)
            pipeline = self.pipelines.get(name)
            if slot is None or pipeline is None or not self._ensure_loaded(slot):
                continue  # jobs wait in the queue until the model can load
            self._rr = (self._rr + offset + 1) % max(1, len(names))
            size = max(
                self.settings.worker.batch_size, pipeline.generator.preferred_batch_size or 0
            )
            limit = min(size, pipeline.batch_limit or 1 << 30)
            if slot.probing:
                limit = 1  # the breaker lets one probe through: one image
            held = sorted({*self.paused_roots, *self.held_roots()})
            t0 = stages.now()
            jobs = self.queue.claim(name, limit, exclude_prefixes=held)
            if not jobs:
                continue
            try:
                return self._start(pipeline, jobs)
            finally:
                STAGES.add("claim", stages.now() - t0)
        return None

    def _start(self, pipeline: CaptionPipeline, jobs: list[Job]) -> _Batch:
        tasks, lost = [], []
        for job in jobs:
            watch = self.settings.watch_for(job.path)
            if watch is None:
                lost.append(job)
            else:
                tasks.append(_task(job, watch))
        for job in lost:
            self._fail(
                job,
                FileNotFoundError(f"{job.path} is no longer under a watched folder"),
                pipeline.name,
            )
        batch = pipeline.open(tasks)
        pipeline.plan(batch)
        out = _Batch(pipeline, batch)
        for item in batch.items:
            j = _Job(item.task.key, item)
            if item.error is None and item.skip is None:
                j.pool = self._pool
                j.future = self._pool.submit(pipeline.prepare, item)
            out.jobs.append(j)
        return out

    # -- per batch, on the worker thread -----------------------------------------------
    def _process(self, batch: _Batch) -> None:
        pipeline = batch.pipeline
        ready: list[_Job] = []
        for j in batch.jobs:
            item = j.item
            if item.error is not None:
                self._fail(j.job, item.error, pipeline.name)
                continue
            if item.skip is not None:
                self._skipped(pipeline, j, pipeline.skipped(item))
                continue
            try:
                self._wait_prepared(j)
            except ReadStalledError as exc:
                self._fail(j.job, exc, pipeline.name)
                continue
            except CancelledError:  # queued in a pool given up on: back as it was
                self.queue.release([j.job.id])
                continue
            except DependencyPendingError as exc:
                log.debug("job_deferred", job_id=j.job.id, path=j.job.path, reason=str(exc))
                self.queue.release([j.job.id], delay=DEPENDENCY_DELAY_SECONDS)
                continue
            except Exception as exc:
                self._fail(j.job, exc, pipeline.name)
                continue
            ready.append(j)
        if not ready:
            batch.batch.close()
            return
        self.busy_since = started = time.monotonic()
        try:
            results = pipeline.generate([j.item.value for j in ready])
        finally:
            self.busy_since = None
        seconds = time.monotonic() - started
        metrics.GENERATION_SECONDS.labels(pipeline.name).observe(seconds)
        metrics.IMAGE_SECONDS.labels(pipeline.name).observe(seconds / len(ready))
        self._drain_writes(1)  # at most one batch behind: bounded memory, prompt acks
        self._writing.append(self._writer.submit(self._finish_all, batch, ready, results))

    def _wait_prepared(self, j: _Job) -> None:
        """Wait for the job's decode. One running for longer than
        ``worker.read_timeout_seconds`` (a read stuck on a hung mount) is given up:
        ReadStalledError, and its pool is replaced so the images queued behind it run
        on fresh threads (they come back here as cancelled). Time spent waiting for a
        free thread does not count."""
        future = j.future
        assert future is not None
        timeout = self.settings.worker.read_timeout_seconds
        while True:
            started = j.item.started
            if started is None and self._stop.is_set():
                future.cancel()
                raise CancelledError  # not started: released, the next start does it
            left = WAIT_SLICE_SECONDS if started is None else started + timeout - time.monotonic()
            if left <= 0 and not future.done():
                self._give_up(j)
                raise ReadStalledError(
                    f"reading and decoding took longer than {timeout:g} s "
                    "(worker.read_timeout_seconds; a hung network mount?)"
                )
            try:
                future.result(timeout=max(0.0, min(left, WAIT_SLICE_SECONDS)))
            except FutureTimeout:
                continue
            self.heartbeat = time.monotonic()
            return

    @property
    def stuck_threads(self) -> int:
        """Decode threads still stuck in a read that was given up on."""
        self._stuck = [f for f in self._stuck if not f.done()]
        return len(self._stuck)

    def _give_up(self, j: _Job) -> None:
        """Leave ``j``'s decode thread behind; replace the decode pool if it is the
        current one (other stalled items of the same pool share one replacement)."""
        assert j.future is not None
        self._stuck.append(j.future)
        self.heartbeat = time.monotonic()  # a stalled read resolved is progress
        if j.pool is not self._pool:
            return
        if self.stuck_threads > MAX_STUCK_THREADS:
            log.error("decode_pool_not_replaced", stuck_threads=len(self._stuck))
            return
        old = self._pool
        self._pool = ThreadPoolExecutor(self.settings.worker.decode_threads(), "captiond-decode")
        old.shutdown(wait=False, cancel_futures=True)
        log.warning("decode_pool_replaced", path=j.job.path, stuck_threads=len(self._stuck))

    # -- on the writer thread --------------------------------------------------------------
    def _finish_all(
        self, batch: _Batch, ready: list[_Job], results: list[str | BaseException]
    ) -> None:
        """Sidecars and index for the batch, then one transaction of acks; a failure
        fails its job only."""
        pipeline = batch.pipeline
        try:
            try:
                outcomes = pipeline.finish([j.item for j in ready], results)
            except Exception as exc:  # a bug: every job of the batch fails, none is lost
                log.exception("finish_failed", generator=pipeline.name)
                outcomes = [Outcome(j.item.task, error=exc) for j in ready]
            done: list[tuple[Job, Outcome]] = []
            for j, outcome in zip(ready, outcomes, strict=True):
                if outcome.error is not None:
                    self._fail_safely(j.job, outcome.error, pipeline.name)
                else:
                    done.append((j.job, outcome))
            self._ack_all(pipeline, done)
        finally:
            batch.batch.close()

    def _fail_safely(self, job: Job, exc: BaseException, generator: str) -> None:
        try:
            self._fail(job, exc, generator)
        except Exception:  # the job stays leased and returns at the next start
            log.exception("job_fail_not_recorded", job_id=job.id)

    def _ack_all(self, pipeline: CaptionPipeline, done: list[tuple[Job, Outcome]]) -> None:
        if not done:
            return

        def ack() -> None:
            half = len(done) // 2
            t0 = stages.now()
            with self.queue.transaction():
                for i, (job, outcome) in enumerate(done):
                    if i == half:
                        faults.point("mid_acks")
                    assert outcome.action is not None
                    self.queue.ack(job.id, outcome.action.value, options=job.options)
            STAGES.add("ack", stages.now() - t0)

        try:
            ack()
        except Exception as exc:
            if not self.systemic(done[0][0].path, exc):
                raise
            self._defer(ack)  # the sidecars are in place; the acks wait for the database
        for job, outcome in done:
            self._after_done(pipeline, job, outcome)
        if self.on_done is not None:
            try:
                self.on_done(
                    [
                        (j.path, pipeline.name, o.action.value, o.caption)
                        for j, o in done
                        if o.action
                    ]
                )
            except Exception:
                log.exception("on_done_failed")

    def _defer(self, op: Callable[[], None]) -> None:
        """A write to the database that failed while it cannot be written: kept (in
        memory; at worst the jobs are redone after a restart) and retried later."""
        self._deferred.append(op)
        log.warning("database_write_deferred", waiting=len(self._deferred))

    def resume_deferred(self) -> None:
        """Retry the database writes kept while it could not be written."""
        while self._deferred:
            op = self._deferred[0]
            try:
                op()
            except Exception as exc:
                log.warning(
                    "database_write_still_failing", error=str(exc), waiting=len(self._deferred)
                )
                return
            self._deferred.popleft()

    def _after_done(self, pipeline: CaptionPipeline, job: Job, outcome: Outcome) -> None:
        action = outcome.action
        bound = log.bind(
            job_id=job.id, path=job.path, generator=pipeline.name, sidecar=outcome.sidecar
        )
        if outcome.clash_with is not None:
            clash = {
                "image": job.path,
                "sidecar": outcome.sidecar or "",
                "shares_stem_with": outcome.clash_with,
            }
            if clash not in self.stem_clashes:
                self.stem_clashes.append(clash)
                log.warning("stem_clash", **clash)
                try:
                    self.index.record_stem_clash(
                        job.path, clash["sidecar"], clash["shares_stem_with"]
                    )
                except Exception:
                    log.exception("stem_clash_not_recorded", path=job.path)
        if action is Action.WRITE:
            self.captions_written += 1
            metrics.CAPTIONS_WRITTEN.labels(pipeline.name).inc()
            bound.info("caption_written")
        elif action is Action.UNCHANGED:
            bound.info("caption_same")
        elif action is Action.EDITED:
            bound.warning("caption_edited_left_alone")
        else:
            bound.info("caption_exists_skipped")
        self._report(
            JobResult(
                job.id,
                job.path,
                pipeline.name,
                job.options,
                "done",
                outcome=action.value if action else None,
                caption=outcome.caption
                if action in (Action.WRITE, Action.UNCHANGED) or job.options
                else None,
                caption_type=pipeline.generator.caption_type,
                sidecar=outcome.sidecar,
            )
        )

    def _skipped(self, pipeline: CaptionPipeline, j: _Job, outcome: Outcome) -> None:
        """A job whose outcome was known without the model (a person's caption)."""
        self._ack_all(pipeline, [(j.job, outcome)])

    def _report(self, result: JobResult) -> None:
        if self.on_result is None or not result.options:
            return  # only explicit requests (they carry options) are waited for
        try:
            self.on_result(result)
        except Exception:
            log.exception("result_callback_failed", job_id=result.job_id)

    def _fail(self, job: Job, exc: BaseException, generator: str) -> None:
        if self.systemic(job.path, exc):
            # A full disk, a vanished share: not this image's fault. Back to the queue
            # without using an attempt; its root waits until the condition clears.
            log.info("job_held", job_id=job.id, path=job.path, reason=str(exc))
            try:
                self.queue.release([job.id])
            except Exception:
                self._defer(lambda: self.queue.release([job.id]))
            return
        if self.models.job_failed(self.queue, job.id, exc, generator):
            return  # the model cannot run now: back to the queue, no attempt used
        c = classify(exc)
        metrics.FAILURES.labels(generator, c.error_type.value).inc()
        state = self.queue.fail(
            job.id, c.error_type.value, c.message, c.retryable, errno=errno_of(exc)
        )
        log.warning(
            "job_failed",
            job_id=job.id,
            path=job.path,
            generator=generator,
            error_type=c.error_type.value,
            error=c.message,
            retryable=c.retryable,
            state=str(state),
        )
        self._report(
            JobResult(
                job.id,
                job.path,
                generator,
                job.options,
                str(state) if state is not None else "gone",
                error_type=c.error_type.value,
                error=c.message,
                retryable=c.retryable,
            )
        )

    # -- {tags} prompts ------------------------------------------------------------------
    def _tags_for(self, task: ImageTask, data: bytes, digest: str) -> str:
        """The watch's tagger's caption of this very content, for a ``{tags}`` prompt.

        Computed once by the tagger's own job and read back from its sidecar (a
        person's edits to it included); until that job is done this job waits."""
        watch, path = task.watch, task.path
        tagger = tagger_of(watch, {n: p.generator for n, p in self.pipelines.items()})
        found = recorded_tags(
            self.index, watch, path, tagger, lambda h: bytes_match(data, h, current=digest)
        )
        if found is not None:
            return found[1]
        requester: Job | None = task.key if isinstance(task.key, Job) else None
        return tags_when_unrecorded(
            self.queue,
            path,
            tagger,
            lambda: self.pipelines[tagger].sidecar_of(path, watch).data,
            requester.priority if requester else 0,
        )

    def _stem_clashes(self) -> list[dict[str, str]]:
        try:
            return list(reversed(self.index.stem_clashes(50)))
        except Exception:  # status must answer, e.g. while the database is unreadable
            return list(self.stem_clashes)

    def status(self) -> dict[str, Any]:
        return {
            "alive": self.alive,
            "heartbeat_age_seconds": round(time.monotonic() - self.heartbeat, 1),
            "busy_seconds": (
                round(time.monotonic() - self.busy_since, 1) if self.busy_since else None
            ),
            "captions_written": self.captions_written,
            "paused": self.paused,
            "paused_roots": sorted(self.paused_roots),
            "stem_clashes": self._stem_clashes(),
            # CPU seconds per stage of the pipeline since start (daemon.pipeline.stages)
            "images_finished": STAGES.images,
            "stage_cpu_seconds": {k: round(v, 4) for k, v in STAGES.snapshot().items()},
        }
