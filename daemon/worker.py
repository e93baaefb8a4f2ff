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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from daemon.config import Settings, WatchConfig
from daemon.errors import (
    BadImageError,
    FileChangingError,
    GenerationError,
    classify,
    is_out_of_memory,
)
from daemon.generators.base import Generator, ImageInput
from daemon.hashing import hash_bytes
from daemon.images import decode_image
from daemon.models import ModelManager
from daemon.postprocess import Pipeline, PostContext, pipeline_for
from daemon.queue import FileIndex, Job, JobQueue
from daemon.sidecar import (
    Action,
    candidate_paths,
    decide,
    read_existing,
    stem_siblings,
    write_atomic,
)

log = structlog.get_logger(__name__)

PIPELINE_DEPTH = 2  # batches decoding ahead of the model
RECOVER_EVERY_SECONDS = 30.0


@dataclass(slots=True)
class _Item:
    job: Job
    watch: WatchConfig | None
    future: Future[tuple[Any, str]] | None = None


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
    ):
        self.settings = settings
        self.queue = queue
        self.index = index
        self.models = models
        self._clock = clock
        # Longest root first, so nested roots resolve to the innermost watch.
        self._watches = sorted(settings.watch, key=lambda w: len(str(w.path)), reverse=True)
        pp = settings.postprocess
        self._pipelines: dict[str, Pipeline] = {
            name: pipeline_for(pp.steps, pp.overrides, name) for name in models.slots
        }
        self._batch_limit: dict[str, int] = {}
        # The daemon owns its process: Pillow's own bomb check follows the config.
        Image.MAX_IMAGE_PIXELS = settings.worker.max_image_pixels
        self._pool = ThreadPoolExecutor(settings.worker.decode_workers, "captiond-decode")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rr = 0
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self.stem_clashes: deque[dict[str, str]] = deque(maxlen=50)
        self.captions_written = 0

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

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- main loop ------------------------------------------------------------------
    def _run(self) -> None:
        self.models.preload(self.settings.worker.preload)
        inflight: deque[_Batch] = deque()
        last_recover = 0.0
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if self.heartbeat - last_recover > RECOVER_EVERY_SECONDS:
                if n := self.queue.recover_expired():
                    log.warning("leases_recovered", jobs=n)
                last_recover = self.heartbeat
            try:
                while len(inflight) < PIPELINE_DEPTH and not self._stop.is_set():
                    batch = self._claim_next()
                    if batch is None:
                        break
                    inflight.append(batch)
                if not inflight:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                self._process(inflight.popleft())
            except Exception:
                # A bug here must not kill the worker; leases expire and jobs return.
                log.exception("worker_loop_error")
                self._stop.wait(1.0)
        self._release(inflight)

    def _release(self, inflight: deque[_Batch]) -> None:
        ids = [it.job.id for b in inflight for it in b.items]
        if ids:
            self.queue.release(ids)

    def _claim_next(self) -> _Batch | None:
        """Claim and start preparing a batch for the next generator with due work."""
        names = sorted(self.queue.pending_generators())
        if not names:
            return None
        for offset in range(len(names)):
            name = names[(self._rr + offset) % len(names)]
            slot = self.models.get(name)
            if slot is None or not slot.ensure_loaded():
                continue  # jobs wait in the queue until the model can load
            self._rr = (self._rr + offset + 1) % max(1, len(names))
            gen = slot.generator
            assert gen is not None
            limit = self._batch_limit.get(name, self.settings.worker.batch_size)
            jobs = self.queue.claim(name, limit)
            if not jobs:
                continue
            batch = _Batch(gen)
            for job in jobs:
                item = _Item(job, self._watch_for(job.path))
                item.future = self._pool.submit(self._prepare, gen, item)
                batch.items.append(item)
            return batch
        return None

    def _watch_for(self, path: str) -> WatchConfig | None:
        for w in self._watches:
            root = str(w.path)
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return w
        return None

    # -- per image, in the decode pool -----------------------------------------------
    def _prepare(self, gen: Generator, item: _Item) -> tuple[Any, str]:
        if item.watch is None:
            raise FileNotFoundError(f"{item.job.path} is no longer under a watched folder")
        path = Path(item.job.path)
        before = os.stat(path)
        data = path.read_bytes()
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
            data
        ) != after.st_size:
            raise FileChangingError("the file changed while it was read")
        try:
            image = decode_image(
                data, draft_size=gen.draft_size, max_pixels=self.settings.worker.max_image_pixels
            )
        except BadImageError:
            if self._clock() - after.st_mtime < max(item.watch.settle_seconds, 1.0) * 2:
                raise FileChangingError("unreadable image, modified moments ago") from None
            raise
        context = {"name": path.stem, "folder": path.parent.name}
        return gen.prepare(ImageInput(path, image, context)), hash_bytes(data)

    # -- per batch, on the worker thread -----------------------------------------------
    def _process(self, batch: _Batch) -> None:
        gen = batch.generator
        ready: list[tuple[_Item, Any, str]] = []
        for item in batch.items:
            assert item.future is not None
            try:
                prepared, content_hash = item.future.result()
            except Exception as exc:
                self._fail(item.job, exc, gen.name)
                continue
            ready.append((item, prepared, content_hash))
        if not ready:
            return
        self.busy_since = time.monotonic()
        try:
            results = self._generate(gen, [p for _, p, _ in ready])
        finally:
            self.busy_since = None
        for (item, _, content_hash), result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                self._fail(item.job, result, gen.name)
                continue
            try:
                self._finish(gen, item, result, content_hash)
            except Exception as exc:
                self._fail(item.job, exc, gen.name)

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

    def _finish(self, gen: Generator, item: _Item, raw: str, content_hash: str) -> None:
        job, watch = item.job, item.watch
        assert watch is not None
        image = Path(job.path)
        sep = getattr(gen.config, "separator", ", ")
        ctx = PostContext(
            caption_type=gen.caption_type,
            separator=sep,
            trigger_word=watch.trigger_word,
            case=self.settings.postprocess.case,
            underscores_to_spaces=getattr(gen.config, "remove_underscores", True),
        )
        text = self._pipelines[gen.name](raw, ctx)
        if not text.strip():
            raise GenerationError(f"{gen.name} produced an empty caption")
        target = self._target(image, watch.extension_for(gen.name, gen.caption_type), watch)
        record = self.index.get_caption(job.path, gen.name)
        decision = decide(
            new_text=text,
            existing=read_existing(target),
            recorded_hash=(
                record.sidecar_hash if record and record.sidecar_path == str(target) else None
            ),
            seen_before=record is not None,
            policy=watch.existing_caption,
            tags=ctx.is_tags,
            separator=sep,
        )
        bound = log.bind(job_id=job.id, path=job.path, generator=gen.name, sidecar=str(target))
        if decision.action in (Action.WRITE, Action.UNCHANGED):
            if decision.action is Action.WRITE:
                digest = write_atomic(target, decision.text, owner_of=image)
                self.captions_written += 1
            else:
                digest = hash_bytes(target.read_bytes())
            self.index.record_caption(job.path, gen.name, content_hash, str(target), digest)
            bound.info("caption_written" if decision.action is Action.WRITE else "caption_same")
        elif decision.action is Action.EDITED:
            bound.warning("caption_edited_left_alone")
        else:
            bound.info("caption_exists_skipped")
        self.queue.ack(job.id, decision.action.value)

    def _target(self, image: Path, ext: str, watch: WatchConfig) -> Path:
        stem_form, name_form = candidate_paths(image, ext)
        if watch.sidecar_naming == "name":
            return name_form
        siblings = stem_siblings(image, watch.image_extensions)
        if not siblings:
            return stem_form
        owner = self.index.caption_by_sidecar(str(stem_form))
        if owner is not None and owner.image_path == str(image):
            return stem_form
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
        c = classify(exc)
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

    def status(self) -> dict[str, Any]:
        return {
            "alive": self.alive,
            "heartbeat_age_seconds": round(time.monotonic() - self.heartbeat, 1),
            "busy_seconds": (
                round(time.monotonic() - self.busy_since, 1) if self.busy_since else None
            ),
            "captions_written": self.captions_written,
            "stem_clashes": list(self.stem_clashes),
        }
