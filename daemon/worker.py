"""The resident worker: claim a batch per generator, decode and prepare it in a
thread pool while the previous batch runs on the model, generate, post-process,
write sidecars, ack.

One bad image never stops the queue: a batch that fails is retried image by image
so only the poisonous one fails; an out-of-memory error halves the batch first.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from daemon import metrics
from daemon.config import Settings, WatchConfig
from daemon.errors import (
    BadImageError,
    DependencyPendingError,
    FileChangingError,
    GenerationError,
    ReadStalledError,
    classify,
    is_out_of_memory,
)
from daemon.generators.base import Generator, ImageInput
from daemon.hashing import bytes_match, content_hash, sidecar_hash
from daemon.pipeline.images import decode_image
from daemon.pipeline.sidecars import (
    Action,
    candidate_paths,
    decide,
    precheck,
    read_existing,
    stage,
    stem_siblings,
)
from daemon.queue import CaptionRecord, FileIndex, Job, JobQueue, JobState
from daemon.residency.manager import ModelManager
from daemon.residency.slot import ModelSlot
from daemon.text.postprocess import PostContext, pipeline_for

log = structlog.get_logger(__name__)

PIPELINE_DEPTH = 2  # batches decoding ahead of the model
# Decode threads stuck in a hung read are left behind (a blocked read cannot be
# interrupted); while this many are still stuck the pool is no longer replaced, and
# the worker waits (the systemd watchdog restarts a daemon that makes no progress).
MAX_STUCK_THREADS = 32
WAIT_SLICE_SECONDS = 1.0  # how often a wait for a decode checks its read timeout
LOAD_STALL_SECONDS = 3600.0  # a first download of a large model may take this long
DEPENDENCY_DELAY_SECONDS = 5.0  # a {tags} prompt waits this long for the tagger's job


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where an image's caption goes, and what of that file is captiond's."""

    target: Path
    record: CaptionRecord | None
    ours: frozenset[str]


@dataclass(slots=True)
class _Prepared:
    plan: _Plan
    value: Any = None  # the generator's prepared input
    content_hash: str = ""
    skip: Action | None = None  # decided before generation: no model call needed


@dataclass(slots=True)
class _Item:
    job: Job
    watch: WatchConfig | None
    future: Future[_Prepared] | None = None
    pool: ThreadPoolExecutor | None = None  # the decode pool it was submitted to
    started: float | None = None  # monotonic time its decode thread picked it up

    @property
    def force(self) -> bool:
        return bool(self.job.options and self.job.options.get("force"))

    @property
    def post_process(self) -> bool:
        return not (self.job.options and self.job.options.get("post_process") is False)


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
class _Batch:
    generator: Generator
    items: list[_Item] = field(default_factory=list)


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
    ):
        self.settings = settings
        self.queue = queue
        self.index = index
        self.models = models
        self._clock = clock
        self.on_result = on_result  # called on the worker thread: must not block
        self.set_postprocess(settings.postprocess)
        self._batch_limit: dict[str, int] = {}
        # The daemon owns its process: Pillow's own bomb check follows the config.
        Image.MAX_IMAGE_PIXELS = settings.worker.max_image_pixels
        self._pool = ThreadPoolExecutor(settings.worker.decode_workers, "captiond-decode")
        self._stuck: list[Future[_Prepared]] = []  # decodes given up on while running
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

    def set_postprocess(self, pp: Any) -> None:
        """Use another post-processing configuration for the captions finished next."""
        pipelines = {name: pipeline_for(pp.steps, pp.overrides, name) for name in self.models.slots}
        self._postprocess, self._pipelines = pp, pipelines

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

    def sidecar_target(self, path: str, generator: Generator) -> Path:
        """Where ``generator``'s caption of the image at ``path`` goes (or is)."""
        watch = self.settings.watch_for(path)
        if watch is None:
            raise FileNotFoundError(f"{path} is not under a watched folder")
        return self._plan_for(generator, path, watch).target

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

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- main loop ------------------------------------------------------------------
    # This process is the only one holding leases (the socket lock keeps a second
    # daemon out), so leases are recovered at start only, never under a running batch.
    def _run(self) -> None:
        self._load_all(self.settings.worker.preload)
        inflight: deque[_Batch] = deque()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            batch: _Batch | None = None
            try:
                # residency: idle unloading; models with a batch claimed stay
                self.models.tick(busy={b.generator.name for b in inflight})
                if self._calls:
                    self._release(inflight)
                    inflight.clear()
                    self._drain_writes(0)
                    self._run_calls()
                while (
                    len(inflight) < PIPELINE_DEPTH and not self._stop.is_set() and not self.paused
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
        ids = [it.job.id for b in batches for it in b.items]
        try:
            self.queue.release(ids)
        except Exception:
            log.exception("release_failed", jobs=len(ids))

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
        """Claim and start preparing a batch for the next generator with due work."""
        names = sorted(self.queue.pending_generators())
        if not names:
            return None
        for offset in range(len(names)):
            name = names[(self._rr + offset) % len(names)]
            slot = self.models.get(name)
            if slot is None or not self._ensure_loaded(slot):
                continue  # jobs wait in the queue until the model can load
            self._rr = (self._rr + offset + 1) % max(1, len(names))
            gen = slot.generator
            assert gen is not None
            size = max(self.settings.worker.batch_size, gen.preferred_batch_size or 0)
            limit = self._batch_limit.get(name, size)
            jobs = self.queue.claim(name, limit, exclude_prefixes=sorted(self.paused_roots))
            if not jobs:
                continue
            batch = _Batch(gen)
            for job in jobs:
                item = _Item(job, self.settings.watch_for(job.path))
                item.pool = self._pool
                item.future = self._pool.submit(self._timed_prepare, gen, item)
                batch.items.append(item)
            return batch
        return None

    # -- per image, in the decode pool -----------------------------------------------
    def _timed_prepare(self, gen: Generator, item: _Item) -> _Prepared:
        item.started = time.monotonic()  # the read timeout counts from here
        return self._prepare(gen, item)

    def _prepare(self, gen: Generator, item: _Item) -> _Prepared:
        """Read, hash and decode one image, unless its sidecar rules out a write."""
        if item.watch is None:
            raise FileNotFoundError(f"{item.job.path} is no longer under a watched folder")
        path = Path(item.job.path)
        plan = self._plan(gen, item)
        skip = precheck(
            existing=read_existing(plan.target),
            ours=plan.ours,
            seen_before=plan.record is not None,
            policy=item.watch.existing_caption,
            force=item.force,
        )
        if skip is not None:
            return _Prepared(plan, skip=skip)
        before = os.stat(path)
        data = path.read_bytes()
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
            data
        ) != after.st_size:
            raise FileChangingError("the file changed while it was read")
        try:
            image = decode_image(
                data,
                draft_size=gen.draft_size,
                draft_longer_side=gen.draft_longer_side,
                max_pixels=self.settings.worker.max_image_pixels,
            )
        except BadImageError:
            if self._clock() - after.st_mtime < max(item.watch.settle_seconds, 1.0) * 2:
                raise FileChangingError("unreadable image, modified moments ago") from None
            raise
        digest = content_hash(data)
        context = {"name": path.stem, "folder": path.parent.name}
        if "tags" in gen.context_keys:
            context["tags"] = self._tags_for(gen, item, data, digest)
        prepared = gen.prepare(ImageInput(path, image, context))
        return _Prepared(plan, value=prepared, content_hash=digest)

    def _tags_for(self, gen: Generator, item: _Item, data: bytes, digest: str) -> str:
        """The watch's tagger's caption of this very content, for a ``{tags}`` prompt.

        Computed once by the tagger's own job and read back from its sidecar (a
        person's edits to it included); until that job is done this job waits."""
        watch, path = item.watch, item.job.path
        assert watch is not None
        tagger = next(
            (
                g
                for g in watch.generators
                if g != gen.name
                and (slot := self.models.get(g)) is not None
                and slot.generator is not None
                and slot.generator.caption_type == "tags"
            ),
            None,
        )
        if tagger is None:
            raise GenerationError(
                f"the prompt of {gen.name} uses {{tags}}, but watch {watch.name!r} has no "
                "tagging generator (add wd_tagger to its generators, listed first)"
            )
        record = self.index.get_caption(path, tagger)
        if record is not None and bytes_match(data, record.content_hash, current=digest):
            text = read_existing(Path(record.sidecar_path))
            if text is not None:
                return text.decode("utf-8", "replace").strip()
        job = self.queue.get(path, tagger)
        if job is None or job.state in (JobState.DONE, JobState.FAILED, JobState.DEAD):
            if job is not None and job.state is not JobState.DONE:
                raise GenerationError(f"{tagger} failed on this image: {job.error_message}")
            if job is not None and job.outcome in (Action.EXISTS.value, Action.EDITED.value):
                # The tagger left a person's sidecar alone: those are the tags.
                target = self._plan_for_name(tagger, path, watch)
                if target is not None and (text := read_existing(target)) is not None:
                    return text.decode("utf-8", "replace").strip()
            self.queue.enqueue(path, tagger, item.job.priority)
        raise DependencyPendingError(f"waiting for {tagger}'s tags")

    def _plan_for_name(self, name: str, path: str, watch: WatchConfig) -> Path | None:
        slot = self.models.get(name)
        if slot is None or slot.generator is None:
            return None
        return self._plan_for(slot.generator, path, watch).target

    def _plan(self, gen: Generator, item: _Item) -> _Plan:
        assert item.watch is not None
        return self._plan_for(gen, item.job.path, item.watch)

    def _plan_for(self, gen: Generator, path: str, watch: WatchConfig) -> _Plan:
        image = Path(path)
        record = self.index.get_caption(path, gen.name)
        ext = watch.extension_for(gen.name, gen.caption_type)
        target = self._target(image, ext, watch, record)
        if target == image:
            raise ValueError(f"sidecar path {target} would be the image itself")
        ours = record.owned_hashes(str(target)) if record else frozenset()
        return _Plan(target, record, ours)

    # -- per batch, on the worker thread -----------------------------------------------
    def _process(self, batch: _Batch) -> None:
        gen = batch.generator
        ready: list[tuple[_Item, _Prepared]] = []
        for item in batch.items:
            assert item.future is not None
            try:
                prepared = self._wait_prepared(item)
            except ReadStalledError as exc:
                self._fail(item.job, exc, gen.name)
                continue
            except CancelledError:  # queued in a pool given up on: back as it was
                self.queue.release([item.job.id])
                continue
            except DependencyPendingError as exc:
                log.debug("job_deferred", job_id=item.job.id, path=item.job.path, reason=str(exc))
                self.queue.release([item.job.id], delay=DEPENDENCY_DELAY_SECONDS)
                continue
            except Exception as exc:
                self._fail(item.job, exc, gen.name)
                continue
            if prepared.skip is not None:
                self._skipped(gen, item, prepared.plan, prepared.skip)
            else:
                ready.append((item, prepared))
        if not ready:
            return
        self.busy_since = started = time.monotonic()
        try:
            results = self._generate(gen, [p.value for _, p in ready])
        finally:
            self.busy_since = None
        seconds = time.monotonic() - started
        metrics.GENERATION_SECONDS.labels(gen.name).observe(seconds)
        metrics.IMAGE_SECONDS.labels(gen.name).observe(seconds / len(ready))
        self._drain_writes(1)  # at most one batch behind: bounded memory, prompt acks
        self._writing.append(self._writer.submit(self._finish_all, gen, ready, results))

    def _wait_prepared(self, item: _Item) -> _Prepared:
        """The item's decode result. One that has been running for longer than
        ``worker.read_timeout_seconds`` (a read stuck on a hung mount) is given up:
        ReadStalledError, and its pool is replaced so the images queued behind it run
        on fresh threads (they come back here as cancelled). Time spent waiting for a
        free thread does not count."""
        future = item.future
        assert future is not None
        timeout = self.settings.worker.read_timeout_seconds
        while True:
            started = item.started
            if started is None and self._stop.is_set():
                future.cancel()
                raise CancelledError  # not started: released, the next start does it
            left = WAIT_SLICE_SECONDS if started is None else started + timeout - time.monotonic()
            if left <= 0 and not future.done():
                self._give_up(item)
                raise ReadStalledError(
                    f"reading and decoding took longer than {timeout:g} s "
                    "(worker.read_timeout_seconds; a hung network mount?)"
                )
            try:
                result = future.result(timeout=max(0.0, min(left, WAIT_SLICE_SECONDS)))
            except FutureTimeout:
                continue
            self.heartbeat = time.monotonic()
            return result

    @property
    def stuck_threads(self) -> int:
        """Decode threads still stuck in a read that was given up on."""
        self._stuck = [f for f in self._stuck if not f.done()]
        return len(self._stuck)

    def _give_up(self, item: _Item) -> None:
        """Leave ``item``'s decode thread behind; replace the decode pool if it is the
        current one (other stalled items of the same pool share one replacement)."""
        assert item.future is not None
        self._stuck.append(item.future)
        self.heartbeat = time.monotonic()  # a stalled read resolved is progress
        if item.pool is not self._pool:
            return
        if self.stuck_threads > MAX_STUCK_THREADS:
            log.error("decode_pool_not_replaced", stuck_threads=len(self._stuck))
            return
        old = self._pool
        self._pool = ThreadPoolExecutor(self.settings.worker.decode_workers, "captiond-decode")
        old.shutdown(wait=False, cancel_futures=True)
        log.warning("decode_pool_replaced", path=item.job.path, stuck_threads=len(self._stuck))

    def _finish_all(
        self,
        gen: Generator,
        ready: list[tuple[_Item, _Prepared]],
        results: list[str | BaseException],
    ) -> None:
        """On the writer thread: one sidecar per image; a failure fails its job only."""
        for (item, prepared), result in zip(ready, results, strict=True):
            try:
                if isinstance(result, BaseException):
                    self._fail(item.job, result, gen.name)
                else:
                    self._finish(gen, item, prepared, result)
            except Exception as exc:
                try:
                    self._fail(item.job, exc, gen.name)
                except Exception:  # the job stays leased and returns at the next start
                    log.exception("job_fail_not_recorded", job_id=item.job.id)

    def _generate(self, gen: Generator, items: Sequence[Any]) -> list[str | BaseException]:
        try:
            captions = gen.generate(items)
            if len(captions) != len(items):
                raise GenerationError(
                    f"{gen.name} returned {len(captions)} captions for {len(items)} images"
                )
            return list(captions)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            if is_out_of_memory(exc):
                limit = min(len(items) // 2, self._batch_limit.get(gen.name, len(items)))
                self._batch_limit[gen.name] = limit = max(1, limit)
                log.warning("out_of_memory_halving_batch", generator=gen.name, batch=limit)
                out: list[str | BaseException] = []
                start = 0
                while start < len(items):  # the limit may shrink again on the way
                    step = self._batch_limit[gen.name]
                    out += self._generate(gen, items[start : start + step])
                    start += step
                return out
            log.warning(
                "batch_failed_isolating", generator=gen.name, batch=len(items), error=str(exc)
            )
            return [r for it in items for r in self._generate(gen, [it])]

    def _finish(self, gen: Generator, item: _Item, prepared: _Prepared, raw: str) -> None:
        """Post-process, apply the sidecar rules, write atomically, record, ack.

        The record is written before the rename: after a crash in between, the file on
        disk (the old content, ``prev_hash``) still counts as ours.
        """
        job, watch = item.job, item.watch
        assert watch is not None
        image = Path(job.path)
        sep = getattr(gen.config, "separator", ", ")
        ctx = PostContext(
            caption_type=gen.caption_type,
            separator=sep,
            trigger_word=watch.trigger_word,
            case=self._postprocess.case,
            underscores_to_spaces=getattr(gen.config, "remove_underscores", True),
            max_words=self._postprocess.max_words,
            prompt=getattr(gen, "prompt", "") or "",
        )
        text = self._pipelines[gen.name](raw, ctx) if item.post_process else raw.strip()
        if not text.strip():
            raise GenerationError(f"{gen.name} produced an empty caption")
        plan = self._plan(gen, item)  # again: the folder may have changed meanwhile
        record = plan.record
        decision = decide(
            new_text=text,
            existing=read_existing(plan.target),
            ours=plan.ours,
            base_text=record.base_text if record and plan.ours else None,
            seen_before=record is not None,
            policy=watch.existing_caption,
            tags=ctx.is_tags,
            separator=sep,
            force=item.force,
        )
        if decision.action not in (Action.WRITE, Action.UNCHANGED):
            self._skipped(gen, item, plan, decision.action)
            return
        bound = log.bind(job_id=job.id, path=job.path, generator=gen.name, sidecar=str(plan.target))
        if decision.action is Action.UNCHANGED:
            digest = sidecar_hash(plan.target.read_bytes())
            self.index.record_caption(
                job.path,
                gen.name,
                prepared.content_hash,
                str(plan.target),
                digest,
                prev_hash=record.prev_hash if record else None,
                base_text=decision.base_text,
            )
            bound.info("caption_same")
        else:
            staged = stage(plan.target, decision.text, owner_of=image)
            try:
                self.index.record_caption(
                    job.path,
                    gen.name,
                    prepared.content_hash,
                    str(plan.target),
                    staged.digest,
                    prev_hash=decision.prev_hash,
                    base_text=decision.base_text,
                )
                staged.commit()
            except BaseException:
                staged.discard()
                raise
            self.captions_written += 1
            metrics.CAPTIONS_WRITTEN.labels(gen.name).inc()
            bound.info("caption_written")
        self._done(gen, job, decision.action, plan.target, decision.text)

    def _report(self, result: JobResult) -> None:
        if self.on_result is None or not result.options:
            return  # only explicit requests (they carry options) are waited for
        try:
            self.on_result(result)
        except Exception:
            log.exception("result_callback_failed", job_id=result.job_id)

    def _skipped(self, gen: Generator, item: _Item, plan: _Plan, action: Action) -> None:
        bound = log.bind(
            job_id=item.job.id, path=item.job.path, generator=gen.name, sidecar=str(plan.target)
        )
        if action is Action.EDITED:
            bound.warning("caption_edited_left_alone")
        else:
            bound.info("caption_exists_skipped")
        job = item.job
        existing = read_existing(plan.target) if job.options else None
        caption = None if existing is None else existing.decode("utf-8", "replace")
        self._done(gen, job, action, plan.target, caption)

    def _done(
        self, gen: Generator, job: Job, action: Action, target: Path, caption: str | None
    ) -> None:
        """Ack the job and tell an explicit request (if any) how it ended."""
        self.queue.ack(job.id, action.value, options=job.options)
        self._report(
            JobResult(
                job.id,
                job.path,
                gen.name,
                job.options,
                "done",
                outcome=action.value,
                caption=caption,
                caption_type=gen.caption_type,
                sidecar=str(target),
            )
        )

    def _target(
        self, image: Path, ext: str, watch: WatchConfig, record: CaptionRecord | None
    ) -> Path:
        stem_form, name_form = candidate_paths(image, ext)
        if record is not None and record.sidecar_path in (str(stem_form), str(name_form)):
            return Path(record.sidecar_path)  # an image keeps the sidecar it has
        if watch.sidecar_naming == "name":
            return name_form
        siblings = stem_siblings(image, watch.image_extensions)
        if not siblings:
            return stem_form
        owner = self.index.caption_by_sidecar(str(stem_form))
        if owner is None and min([image, *siblings], key=lambda p: p.name) == image:
            return stem_form  # unowned: the first name in sort order takes it
        clash = {
            "image": str(image),
            "sidecar": str(name_form),
            "shares_stem_with": str(siblings[0]),
        }
        if clash not in self.stem_clashes:
            self.stem_clashes.append(clash)
            log.warning("stem_clash", **clash)
        return name_form

    def _fail(self, job: Job, exc: BaseException, generator: str) -> None:
        if self.models.job_failed(self.queue, job.id, exc, generator):
            return  # the model cannot run now: back to the queue, no attempt used
        c = classify(exc)
        metrics.FAILURES.labels(generator, c.error_type.value).inc()
        state = self.queue.fail(job.id, c.error_type.value, c.message, c.retryable)
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
            "stem_clashes": list(self.stem_clashes),
        }
