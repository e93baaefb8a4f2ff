"""The caption pipeline: a batch of images through one generator, from the image files
to their sidecars.

Stages, each callable on its own so that a scheduler can spread them over threads (the
worker) or run them in a row (:meth:`CaptionPipeline.run`: the one-shot run, the API,
a Ray actor):

1. :meth:`~CaptionPipeline.plan` (per batch): where each caption goes
   (:func:`~daemon.pipeline.targets.sidecar_target`) and whether the outcome is already
   known without the model (a person's caption left alone).
2. :meth:`~CaptionPipeline.prepare` (per image, thread-safe): read the image confined
   to its root (:mod:`daemon.confined`), hash, decode, the generator's ``prepare()``.
3. :meth:`~CaptionPipeline.generate` (per batch): the model; an out-of-memory error
   halves the batch, any other failure isolates the image that causes it.
4. :meth:`~CaptionPipeline.finish` (per batch): post-process, decide
   (:mod:`daemon.pipeline.sidecars`), stage every sidecar (temp file, fsync), record the
   batch in the index in one transaction, rename each into place, fsync each folder
   once. Recording comes before the rename: after a crash in between, the file on disk
   (the old content, ``prev_hash``) still counts as captiond's.

No threads, no queue, no HTTP: the caller owns scheduling and acknowledgement. Every
failure is per image (:attr:`Outcome.error`); the caller classifies it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon import faults
from daemon.config import PostProcessConfig, WatchConfig
from daemon.confined import Folder, Root, Staged
from daemon.errors import (
    BadImageError,
    FileChangingError,
    GenerationError,
    UnsafeSidecarError,
    is_out_of_memory,
)
from daemon.generators.base import ImageInput
from daemon.hashing import content_hash, sidecar_hash
from daemon.pipeline import stages
from daemon.pipeline.images import decode_image, full_size
from daemon.pipeline.sidecars import Action, Decision, decide, precheck
from daemon.pipeline.stages import STAGES
from daemon.pipeline.targets import Target, image_stem, siblings_of, sidecar_target
from daemon.queue.index import CaptionRecord
from daemon.text.postprocess import Pipeline, PostContext, pipeline_for

log = structlog.get_logger(__name__)


class CaptionIndex(Protocol):
    """What the pipeline reads and writes of the index (``FileIndex`` provides it)."""

    def get_captions(
        self, generator: str, image_paths: Iterable[str]
    ) -> dict[str, CaptionRecord]: ...
    def caption_by_sidecar(self, sidecar_path: str) -> CaptionRecord | None: ...
    def names_by_stem(self, root: str, dir: str, stems: Iterable[str]) -> list[str]: ...
    def record_captions(self, records: Iterable[CaptionRecord]) -> None: ...
    def record_images(self, rows: Iterable[tuple[str, int, int]]) -> None: ...


TagsSource = Callable[["ImageTask", bytes, str], str]
"""``(task, image bytes, content hash) -> tags`` for a ``{tags}`` prompt; raises
DependencyPendingError while the tagger's caption of this content is not there yet."""


@dataclass(slots=True)
class ImageTask:
    """One image to caption: its absolute path (under its watch's root) and options."""

    path: str
    watch: WatchConfig
    force: bool = False  # replace any caption, a person's too
    post_process: bool = True
    context: Mapping[str, str] | None = None  # prompt variables given by the caller
    key: Any = None  # the caller's handle (a job)


@dataclass(slots=True)
class Outcome:
    """How one image ended. ``action`` (written, unchanged, caption_exists,
    caption_edited) or ``error``; ``caption`` is the text written, or the caption found
    when a person's was left alone."""

    task: ImageTask
    action: Action | None = None
    caption: str | None = None
    sidecar: str | None = None
    error: BaseException | None = None
    clash_with: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class Item:
    """One image on its way through the stages."""

    task: ImageTask
    root: Root
    rel_dir: str
    name: str
    folder: Folder | None = None
    target: Target | None = None
    existing: bytes | None = None
    skip: Action | None = None
    value: Any = None  # the generator's prepared input
    content_hash: str = ""
    owner: tuple[int, int] | None = None
    size: tuple[int, int] | None = None  # the image's width and height (not drafted)
    siblings: list[str] | None = None  # other images with its stem (planned once)
    error: BaseException | None = None
    started: float | None = None  # monotonic time prepare() began (read timeouts)

    @property
    def path(self) -> str:
        return self.task.path


@dataclass(slots=True)
class Batch:
    """A batch's items and the folders they opened (closed by :meth:`close`)."""

    items: list[Item]
    folders: dict[tuple[str, str], Folder] = field(default_factory=dict)

    def close(self) -> None:
        for f in self.folders.values():
            f.close()
        self.folders.clear()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def root_of(watch: WatchConfig) -> Root:
    return Root(str(watch.path), watch.follow_symlinks)


class CaptionPipeline:
    """The pipeline for one generator (see the module doc)."""

    def __init__(
        self,
        generator: Any,
        index: CaptionIndex,
        *,
        postprocess: PostProcessConfig,
        max_image_pixels: int,
        tags: TagsSource | None = None,
        clock: Callable[[], float] = time.time,
        sync_pool: Executor | None = None,
    ) -> None:
        """``sync_pool``: the caller's threads for fsyncing a batch's sidecars at once
        (the pipeline itself starts no thread)."""
        self.generator = generator
        self.sync_pool = sync_pool
        self.index = index
        self.max_image_pixels = max_image_pixels
        self.tags = tags
        self.clock = clock
        self.batch_limit: int | None = None  # lowered after an out-of-memory error
        self.set_postprocess(postprocess)

    @property
    def name(self) -> str:
        return str(self.generator.name)

    def set_postprocess(self, pp: PostProcessConfig) -> None:
        """Use another post-processing configuration for the captions finished next."""
        self._pp: PostProcessConfig = pp
        self._chain: Pipeline = pipeline_for(pp.steps, pp.overrides, self.name)

    def extension(self, watch: WatchConfig) -> str:
        return watch.extension_for(self.name, self.generator.caption_type)

    # -- 1. plan ------------------------------------------------------------------------
    def open(self, tasks: Sequence[ImageTask]) -> Batch:
        """Items for ``tasks`` with their folders opened (one per folder). A folder that
        cannot be opened (gone, or a symlink now) fails its items."""
        batch = Batch([])
        for task in tasks:
            root = root_of(task.watch)
            try:
                rel = root.rel(task.path)
            except Exception as exc:
                batch.items.append(Item(task, root, "", "", error=exc))
                continue
            rel_dir, _, name = rel.rpartition("/")
            item = Item(task, root, rel_dir, name)
            key = (root.path, rel_dir)
            folder = batch.folders.get(key)
            if folder is None:
                try:
                    folder = root.open_folder(rel_dir)
                except Exception as exc:
                    item.error = exc
                    batch.items.append(item)
                    continue
                batch.folders[key] = folder
            item.folder = folder
            batch.items.append(item)
        return batch

    def plan(self, batch: Batch) -> None:
        """Each item's target; ``skip`` when the outcome needs no model (a caption that
        is not captiond's and must stay), else None. Errors are kept per item."""
        self._targets(batch.items)
        for item in batch.items:
            if item.error is not None or item.target is None:
                continue
            try:
                assert item.folder is not None
                item.existing = item.folder.read_sidecar(item.target.name)
                item.skip = precheck(
                    existing=item.existing,
                    ours=item.target.ours,
                    seen_before=item.target.record is not None,
                    policy=item.task.watch.existing_caption,
                    force=item.task.force,
                )
            except Exception as exc:
                item.error = exc

    def _targets(self, items: Sequence[Item]) -> None:
        live = [i for i in items if i.error is None]
        if not live:
            return
        try:
            records = self.index.get_captions(self.name, [i.path for i in live])
            self._siblings([i for i in live if i.siblings is None], records)
        except Exception as exc:
            for i in live:
                i.error = exc
            return
        for item in live:
            try:
                item.target = self._target(item, records.get(item.path))
            except Exception as exc:
                item.error = exc

    def _siblings(self, items: Sequence[Item], records: dict[str, CaptionRecord]) -> None:
        """Each item's stem siblings (``a.png`` beside ``a.jpg``): from the index, one
        query per folder of the batch. An image the index does not know, or one
        without a sidecar of ours that the index gives no sibling, is probed in its
        folder (a probe per image extension): a sibling written a moment ago may not
        be indexed yet, and the first name in sort order must still take the stem."""
        by_folder: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            if item.task.watch.sidecar_naming != "stem":
                item.siblings = []
            else:
                by_folder.setdefault((str(item.task.watch.path), item.rel_dir), []).append(item)
        for (root, rel_dir), group in by_folder.items():
            names = set(
                self.index.names_by_stem(root, rel_dir, {image_stem(i.name) for i in group})
            )
            for item in group:
                exts = item.task.watch.image_extensions
                indexed = item.name in names
                item.siblings = siblings_of(item.name, names, exts) if indexed else []
                if not indexed or (not item.siblings and item.path not in records):
                    assert item.folder is not None
                    item.siblings = item.folder.stem_siblings(item.name, exts)

    def _target(self, item: Item, record: CaptionRecord | None) -> Target:
        watch = item.task.watch
        assert item.folder is not None
        siblings: list[str] = []
        owner: str | None = None
        if watch.sidecar_naming == "stem":
            siblings = item.siblings or []
            if siblings:
                stem_form = f"{item.folder.path}/{image_stem(item.name)}.{self.extension(watch)}"
                rec = self.index.caption_by_sidecar(stem_form)
                owner = rec.image_path if rec is not None else None
        ext, ctype = self.extension(watch), self.generator.caption_type
        target = sidecar_target(
            item.name,
            ext,
            naming=watch.sidecar_naming,
            record=record,
            siblings=siblings,
            stem_owner=owner,
            folder_path=item.folder.path,
            legacy_ext=ctype if watch.extension_is_default and ext != ctype else None,
        )
        if target.clash_with is not None:
            log.debug(
                "stem_clash",
                image=item.path,
                sidecar=target.name,
                shares_stem_with=target.clash_with,
            )
        return target

    def skipped(self, item: Item) -> Outcome:
        """The outcome of an item whose ``skip`` was decided by :meth:`plan`."""
        assert item.skip is not None and item.target is not None and item.folder is not None
        caption = None if item.existing is None else item.existing.decode("utf-8", "replace")
        return Outcome(item.task, item.skip, caption, f"{item.folder.path}/{item.target.name}")

    # -- 2. prepare (thread-safe) --------------------------------------------------------
    def prepare(self, item: Item) -> None:
        """Read, hash and decode one image, then the generator's ``prepare()``."""
        item.started = time.monotonic()
        task, folder = item.task, item.folder
        assert folder is not None
        faults.hang("read", task.path)
        t0 = stages.now()
        data, st = folder.read_file(item.name)
        t1 = stages.now()
        STAGES.add("read", t1 - t0)
        gen = self.generator
        try:
            image = decode_image(
                data,
                draft_size=gen.draft_size,
                draft_longer_side=gen.draft_longer_side,
                max_pixels=self.max_image_pixels,
            )
        except BadImageError:
            if self.clock() - st.st_mtime < max(task.watch.settle_seconds, 1.0) * 2:
                raise FileChangingError("unreadable image, modified moments ago") from None
            raise
        t2 = stages.now()
        STAGES.add("decode", t2 - t1)
        item.content_hash = digest = content_hash(data)
        t3 = stages.now()
        STAGES.add("hash", t3 - t2)
        item.owner = (st.st_uid, st.st_gid)
        item.size = full_size(image)
        path = Path(task.path)
        context: dict[str, str] = {"name": path.stem, "folder": path.parent.name}
        if task.context:
            context.update(task.context)
        if "tags" in gen.context_keys and "tags" not in context:
            if self.tags is None:
                raise GenerationError(
                    f"the prompt of {self.name} uses {{tags}}; nothing provides them here"
                )
            context["tags"] = self.tags(task, data, digest)
        item.value = gen.prepare(ImageInput(path, image, context))
        STAGES.add("prepare", stages.now() - t3)

    # -- 3. generate ---------------------------------------------------------------------
    def generate(self, values: Sequence[Any]) -> list[str | BaseException]:
        """One caption (or the exception) per prepared value, in order."""
        gen = self.generator
        t0 = stages.now()
        try:
            captions = gen.generate(values)
            STAGES.add("generate", stages.now() - t0)
            if len(captions) != len(values):
                raise GenerationError(
                    f"{self.name} returned {len(captions)} captions for {len(values)} images"
                )
            return list(captions)
        except Exception as exc:
            if len(values) == 1:
                return [exc]
            if is_out_of_memory(exc):
                limit = max(1, min(len(values) // 2, self.batch_limit or len(values)))
                self.batch_limit = limit
                log.warning("out_of_memory_halving_batch", generator=self.name, batch=limit)
                out: list[str | BaseException] = []
                start = 0
                while start < len(values):  # the limit may shrink again on the way
                    step = self.batch_limit or limit
                    out += self.generate(values[start : start + step])
                    start += step
                return out
            log.warning(
                "batch_failed_isolating", generator=self.name, batch=len(values), error=str(exc)
            )
            return [r for v in values for r in self.generate([v])]

    # -- 4. finish -----------------------------------------------------------------------
    def finish(
        self, items: Sequence[Item], results: Sequence[str | BaseException]
    ) -> list[Outcome]:
        """Post-process, decide, write and record the captions of a batch (see the module
        doc for the order). One outcome per item, in order."""
        outcomes: list[Outcome | None] = [None] * len(items)
        texts: dict[int, str] = {}
        t0 = stages.now()
        for i, (item, raw) in enumerate(zip(items, results, strict=True)):
            if isinstance(raw, BaseException):
                outcomes[i] = Outcome(item.task, error=raw)
                continue
            try:
                texts[i] = self._postprocessed(item, raw)
            except Exception as exc:
                outcomes[i] = Outcome(item.task, error=exc)
        t1 = stages.now()
        STAGES.add("postprocess", t1 - t0)
        todo = [items[i] for i in texts]
        for item in todo:  # again: the folder or the records may have changed meanwhile
            item.error = None
        self._targets(todo)
        decisions: dict[int, Decision] = {}
        for i in texts:
            item = items[i]
            try:
                if item.error is not None:
                    raise item.error
                assert item.target is not None and item.folder is not None
                record = item.target.record
                item.existing = item.folder.read_sidecar(item.target.name)
                decision = decide(
                    new_text=texts[i],
                    existing=item.existing,
                    ours=item.target.ours,
                    base_text=record.base_text if record and item.target.ours else None,
                    seen_before=record is not None,
                    policy=item.task.watch.existing_caption,
                    tags=self.generator.caption_type == "tags",
                    separator=self._separator(),
                    force=item.task.force,
                    trigger_word=item.task.watch.trigger_word,
                )
            except Exception as exc:
                outcomes[i] = Outcome(item.task, error=exc)
                continue
            if decision.action in (Action.WRITE, Action.UNCHANGED):
                decisions[i] = decision
            else:
                existing = item.existing
                caption = None if existing is None else existing.decode("utf-8", "replace")
                outcomes[i] = Outcome(
                    item.task,
                    decision.action,
                    caption,
                    self._sidecar(item),
                    clash_with=item.target.clash_with,
                )
        t2 = stages.now()
        STAGES.add("decide", t2 - t1)
        staged: dict[int, Staged] = {}
        records: dict[int, CaptionRecord] = {}
        for i, decision in decisions.items():
            item = items[i]
            assert item.target is not None and item.folder is not None
            try:
                if decision.action is Action.WRITE:
                    data = (decision.text.rstrip("\n") + "\n").encode("utf-8")
                    staged[i] = item.folder.stage(
                        item.target.name, data, owner=item.owner, sync=False
                    )
                    digest = sidecar_hash(data)
                    prev = decision.prev_hash
                else:  # the file already holds exactly this caption: record it as ours
                    digest = sidecar_hash(item.existing or b"")
                    prev = item.target.record.prev_hash if item.target.record else None
                records[i] = CaptionRecord(
                    item.path,
                    self.name,
                    item.content_hash,
                    self._sidecar(item),
                    digest,
                    0.0,
                    prev_hash=prev,
                    base_text=decision.base_text,
                    text=decision.text.rstrip("\n"),
                )
            except Exception as exc:
                if i in staged:
                    staged.pop(i).discard()
                outcomes[i] = Outcome(item.task, error=exc)
        for i, exc in self._sync(staged).items():
            staged.pop(i).discard()
            records.pop(i, None)
            outcomes[i] = Outcome(items[i].task, error=exc)
        t3 = stages.now()
        STAGES.add("stage", t3 - t2)
        if staged:
            faults.point("after_stage")
        try:
            self.index.record_captions(records.values())
            self.index.record_images(
                (items[i].content_hash, *items[i].size) for i in records if items[i].size
            )
        except Exception as exc:
            for s in staged.values():
                s.discard()
            for i in records:
                outcomes[i] = Outcome(items[i].task, error=exc)
            return [o for o in outcomes if o is not None]
        t4 = stages.now()
        STAGES.add("record", t4 - t3)
        if staged:
            faults.point("after_record")
        synced: dict[int, BaseException | None] = {}
        for i, s in staged.items():
            try:
                s.commit()
            except Exception as exc:
                s.discard()
                outcomes[i] = Outcome(items[i].task, error=exc)
                continue
            folder = s.folder
            if id(folder) not in synced:
                try:
                    folder.sync()
                    synced[id(folder)] = None
                except Exception as exc:
                    synced[id(folder)] = exc
        for i, decision in decisions.items():
            if outcomes[i] is not None:
                continue
            item = items[i]
            assert item.folder is not None and item.target is not None
            err = synced.get(id(item.folder)) if i in staged else None
            outcomes[i] = (
                Outcome(item.task, error=err)
                if err is not None
                else Outcome(
                    item.task,
                    decision.action,
                    decision.text,
                    self._sidecar(item),
                    clash_with=item.target.clash_with,
                )
            )
        STAGES.add("rename", stages.now() - t4)
        STAGES.finished(len(items))
        if staged:
            faults.point("after_rename")
        return [o for o in outcomes if o is not None]

    def _sync(self, staged: Mapping[int, Staged]) -> dict[int, BaseException]:
        """fsync the batch's temp files: all at once through ``sync_pool`` when given
        (the filesystem groups concurrent fsyncs into fewer journal commits), else one
        after another. The failures, by item."""
        failed: dict[int, BaseException] = {}

        def one(i: int) -> None:
            try:
                staged[i].sync()
            except Exception as exc:
                failed[i] = exc

        if self.sync_pool is not None and len(staged) > 1:
            list(self.sync_pool.map(one, list(staged)))
        else:
            for i in staged:
                one(i)
        return failed

    def _separator(self) -> str:
        return str(getattr(self.generator.config, "separator", ", "))

    @staticmethod
    def _sidecar(item: Item) -> str:
        assert item.folder is not None and item.target is not None
        return f"{item.folder.path}/{item.target.name}"

    def _postprocessed(self, item: Item, raw: str) -> str:
        gen, pp = self.generator, self._pp
        ctx = PostContext(
            caption_type=gen.caption_type,
            separator=self._separator(),
            trigger_word=item.task.watch.trigger_word,
            case=pp.case,
            underscores_to_spaces=getattr(gen.config, "remove_underscores", True),
            max_words=pp.max_words,
            prompt=getattr(gen, "prompt", "") or "",
        )
        text = self._chain(raw, ctx) if item.task.post_process else raw.strip()
        if not text.strip():
            raise GenerationError(f"{self.name} produced an empty caption")
        return text

    # -- all stages in a row --------------------------------------------------------------
    def run(self, tasks: Sequence[ImageTask]) -> list[Outcome]:
        """Plan, prepare, generate and finish ``tasks`` in this thread, in batches of
        the generator's size as given; one outcome per task, in order of ``tasks``."""
        with self.open(tasks) as batch:
            self.plan(batch)
            by_item: dict[int, Outcome] = {}
            ready: list[Item] = []
            for item in batch.items:
                if item.error is None and item.skip is None:
                    try:
                        self.prepare(item)
                    except Exception as exc:
                        item.error = exc
                if item.error is not None:
                    by_item[id(item)] = Outcome(item.task, error=item.error)
                elif item.skip is not None:
                    by_item[id(item)] = self.skipped(item)
                else:
                    ready.append(item)
            if ready:
                results = self.generate([i.value for i in ready])
                for item, outcome in zip(ready, self.finish(ready, results), strict=True):
                    by_item[id(item)] = outcome
            return [by_item[id(i)] for i in batch.items]

    # -- single images (the API, {tags}) ---------------------------------------------------
    def sidecar_of(self, path: str, watch: WatchConfig) -> SidecarInfo:
        """This generator's sidecar of the image at ``path``: where it goes and what is
        there now (read confined; a symlink or FIFO there exists but is never read)."""
        with self.open([ImageTask(path, watch)]) as batch:
            item = batch.items[0]
            self._targets([item])
            if item.error is not None:
                raise item.error
            assert item.folder is not None and item.target is not None
            name = item.target.name
            st = item.folder.lstat(name)
            data = None
            if st is not None:
                try:
                    data = item.folder.read_sidecar(name)
                except UnsafeSidecarError:
                    data = None
            ours = data is not None and sidecar_hash(data) in item.target.ours
            return SidecarInfo(self._sidecar(item), st is not None, data, ours)


@dataclass(frozen=True, slots=True)
class SidecarInfo:
    """A generator's sidecar of one image: its path, whether something is there, its
    bytes (None when absent or not a plain file), and whether captiond wrote them."""

    path: str
    exists: bool
    data: bytes | None
    ours: bool
