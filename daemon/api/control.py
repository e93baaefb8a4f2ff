"""The control facade: what the API may do to a running daemon, in one place, without
HTTP.

It is given the daemon's parts (queue, index, worker, models, scans, settings and the
persisted overrides) and calls their public methods only. Everything the API changes
goes through here: explicit caption requests (through the queue and the worker, never
around them), caption files a person writes or removes (through the caption pipeline's
target rule and its confined atomic write), settings changed at run time (persisted in
``Overrides``) and queue control. It returns plain results and raises
:class:`~daemon.api.problems.Problem`; the routes turn both into HTTP.

Threading: handlers run on the server's threads. Changes that touch what the worker
uses are handed to the worker (``Worker.call_soon``: a generator swap runs between
batches) or are a single reference swap (the post-processing pipelines).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from daemon.api.problems import Problem
from daemon.api.requests import CaptionRequest, RequestRegistry
from daemon.api.schemas import (
    BatchItem,
    BatchRequest,
    PostProcessUpdate,
    ReynardPostProcessing,
    validation_details,
)
from daemon.api.security import (
    SINGLE_ROOT,
    Authoriser,
    ImageRef,
    api_path,
    resolve_admin_group,
    resolve_image,
)
from daemon.backfill.status import backfill_status
from daemon.config import (
    DEFAULT_IMAGE_EXTENSIONS,
    PRIORITY_BACKFILL,
    PRIORITY_EXPLICIT,
    PRIORITY_NEW,
    PostProcessConfig,
    Settings,
    WatchConfig,
    discover_generators,
    generator_config,
)
from daemon.confined import ConfinementError, Root
from daemon.errors import UnsafeSidecarError
from daemon.generators.registry import Discovered
from daemon.hashing import content_hash, sidecar_hash
from daemon.overrides import FILE_ONLY_KEYS, Overrides
from daemon.pipeline.caption import SidecarInfo
from daemon.pipeline.targets import sidecar_target
from daemon.queue import CaptionRecord, FileIndex, JobQueue
from daemon.queue.db import PERSON_EDIT
from daemon.queue.index import GalleryFilter
from daemon.report.service import BusyError, ReportService, ScopeError
from daemon.report.stats import Options as ReportOptions
from daemon.residency.manager import ModelManager, ReconfigureError
from daemon.residency.slot import ModelSlot, ModelState
from daemon.scanning.reconcile import Scanner
from daemon.scanning.rules import is_candidate
from daemon.scanning.scheduler import ScanRequest, ScanScheduler
from daemon.text.postprocess import STEPS, from_reynard, settings_shape, to_reynard
from daemon.worker import Worker

log = structlog.get_logger(__name__)

# Recorded as the sidecar hash of a caption a person wrote through the API: it never
# equals a real content hash, so the file is never "ours" and never overwritten.
HUMAN_EDIT = PERSON_EDIT
_EXT_RE = re.compile(r"[\w+-]+(\.[\w+-]+)*")
BATCH_POLL_SECONDS = 0.5
SYNC_SLICE_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class Queued:
    """An explicit request that did not finish within the synchronous wait."""

    request_id: str
    message: str
    error_type: str


class Control:
    def __init__(
        self,
        *,
        settings: Settings,
        queue: JobQueue,
        index: FileIndex,
        worker: Worker,
        models: ModelManager,
        scans: ScanScheduler,
        overrides: Overrides,
        scanner: Scanner | None = None,
        file_settings: Settings | None = None,
        conditions: Callable[[], dict[str, Any]] | None = None,
        reports: ReportService | None = None,
    ) -> None:
        """``file_settings``: the settings as the configuration file gave them, before
        the overrides (what ``reset_overrides`` returns to)."""
        self.settings = settings
        self.file_settings = file_settings or settings.model_copy(deep=True)
        self.queue = queue
        self.index = index
        self.worker = worker
        self.models = models
        self.scans = scans
        self.scanner = scanner or scans.scanner
        self.watches: list[WatchConfig] = list(settings.watch)
        self.overrides = overrides
        self.conditions = conditions
        self.requests = RequestRegistry(queue)
        self.reports = reports or ReportService.for_models(
            settings=settings, index=index, queue=queue, models=models
        )
        self.auth = Authoriser(resolve_admin_group(settings.api.admin_group))
        self.discovered: dict[str, Discovered] = discover_generators(settings)
        self._lock = threading.Lock()  # serialises changes to settings
        worker.on_result = self.requests.on_result
        names = {w.name for w in self.watches}
        overrides.paused_roots = [r for r in overrides.paused_roots if r in names]
        self._apply_pause()

    # -- helpers -----------------------------------------------------------------------

    def watch_named(self, name: str) -> WatchConfig:
        if name == SINGLE_ROOT and len(self.watches) == 1:
            return self.watches[0]
        for w in self.watches:
            if w.name == name:
                return w
        raise Problem("not_found", f"no watched root named {name!r}")

    def image(self, rel: str) -> ImageRef:
        """An image named by a client (``ROOT/sub/file.png``), checked to be inside its root."""
        return resolve_image(self.watches, rel)

    def _rel(self, watch: WatchConfig, path: Path | str) -> str:
        return api_path(watch, path)

    def slot(self, name: str) -> ModelSlot:
        slot = self.models.get(name)
        if slot is None:
            if name in self.discovered:
                raise Problem(
                    "invalid",
                    f"generator {name!r} is available but not in use: add it to a watch's "
                    f'generators (e.g. generators = ["wd_tagger", "{name}"] in a [[watch]] '
                    "table) or to worker.preload in config.toml, then restart captiond",
                    "model_unavailable",
                )
            raise Problem("not_found", f"unknown generator {name!r}", "not_found")
        if slot.generator is None or slot.state is ModelState.UNAVAILABLE:
            raise Problem(
                "unavailable",
                f"generator {name} is unavailable: {slot.reason}",
                "model_unavailable",
            )
        return slot

    def _generator_for(self, watch: WatchConfig, name: str | None) -> ModelSlot:
        name = name or watch.generators[0]
        slot = self.slot(name)
        if name not in watch.generators:
            gen = slot.generator
            assert gen is not None
            ext = watch.extension_for(name, gen.caption_type)
            for other in watch.generators:
                o = self.models.get(other)
                if (
                    o
                    and o.generator
                    and watch.extension_for(other, o.generator.caption_type) == ext
                ):
                    raise Problem(
                        "invalid",
                        f"generator {name} would write the same .{ext} sidecar as {other} in "
                        f"root {watch.name}",
                    )
        return slot

    def backfills(self) -> dict[str, Any]:
        """Backfill runs on a Ray cluster (``captiond backfill``): progress, actors and
        the jobs each holds, newest first."""
        return backfill_status(self.queue)

    def roots(self) -> list[dict[str, Any]]:
        """The watched roots as the daemon resolved them (canonical paths)."""
        return [
            {
                "name": w.name,
                "path": str(w.path),
                "generators": list(w.generators),
                "image_extensions": list(w.image_extensions),
                "paused": w.name in self.overrides.paused_roots or self.overrides.paused,
            }
            for w in self.watches
        ]

    # -- generators --------------------------------------------------------------------

    def generators(self) -> list[dict[str, Any]]:
        out = []
        for name, found in sorted(self.discovered.items()):
            cls = found.cls
            slot = self.models.get(name)
            avail = found.availability()
            status = slot.status() if slot else {}
            gen = slot.generator if slot else None
            config = None
            if gen is not None:
                config = gen.config.model_dump(mode="json")
            elif cls is not None:
                try:
                    config = generator_config(self.settings, name, cls).model_dump(mode="json")
                except ValidationError:
                    config = None
            out.append(
                {
                    "name": name,
                    "caption_type": gen.caption_type if gen else getattr(cls, "caption_type", None),
                    "description": getattr(cls, "description", None),
                    "version": getattr(cls, "version", None),
                    "available": bool(avail.ok) and status.get("available", True),
                    "reason": avail.reason or status.get("reason", ""),
                    "loaded": bool(status.get("loaded", False)),
                    "state": status.get("state", "not_in_use"),
                    "weight": gen.weight.value if gen else (cls.weight.value if cls else None),
                    "in_use": slot is not None,
                    "config_schema": cls.config_model.model_json_schema() if cls else None,
                    "config": config,
                    "overrides": sorted(self.overrides.generators.get(name, {})),
                    "last_error": status.get("last_error"),
                }
            )
        return out

    # -- one caption -------------------------------------------------------------------

    def _existing_conflict(
        self, ref: ImageRef, slot: ModelSlot, redo: bool = False
    ) -> SidecarInfo | None:
        """The sidecar in the way of a new caption (None: none, or ``redo`` and it is
        captiond's own, unedited)."""
        info = self.worker.sidecar_of(str(ref.path), slot.name)
        if not info.exists or (redo and info.ours):
            return None
        return info

    def _paused_for(self, watch: WatchConfig) -> bool:
        return self.worker.paused or watch.name in self.overrides.paused_roots

    def _new_request(
        self, ref: ImageRef, slot: ModelSlot, force: bool, post_process: bool, batch: str | None
    ) -> CaptionRequest:
        gen = slot.generator
        assert gen is not None
        return self.requests.create(
            path=str(ref.path),
            rel=ref.rel,
            generator=slot.name,
            caption_type=gen.caption_type,
            priority=PRIORITY_EXPLICIT + ref.watch.priority,
            force=force,
            post_process=post_process,
            batch=batch,
        )

    def generate(
        self, ref: ImageRef, generator: str | None, *, force: bool, post_process: bool
    ) -> dict[str, Any] | Queued:
        """Caption one image now: its result, or :class:`Queued` when it is not done
        within ``api.sync_wait_seconds`` (or cannot be: paused, model loading)."""
        slot = self._generator_for(ref.watch, generator)
        if not force and (there := self._existing_conflict(ref, slot)) is not None:
            raise Problem(
                "conflict",
                f"{Path(there.path).name} already exists; use force=true to replace it",
                "caption_exists",
                extra={"sidecar": self._rel(ref.watch, there.path), "ours": there.ours},
            )
        req = self._new_request(ref, slot, force, post_process, None)
        self.worker.wake()
        waiting = self.waiting_reason(slot, ref.watch)
        deadline = time.monotonic() + self.settings.api.sync_wait_seconds
        while waiting is None:
            left = deadline - time.monotonic()
            if self.requests.wait(req, min(max(left, 0.0), SYNC_SLICE_SECONDS)):
                return dict(req.result or {})
            if left <= SYNC_SLICE_SECONDS:
                break
            # A load that started meanwhile (a download may take long): answer queued.
            waiting = self.waiting_reason(slot, ref.watch)
        if waiting is None:
            waiting = (
                f"still running after {self.settings.api.sync_wait_seconds:g} s",
                "timeout",
            )
        message, error_type = waiting
        return Queued(req.id, message, error_type)

    def waiting_reason(self, slot: ModelSlot, watch: WatchConfig) -> tuple[str, str] | None:
        """Why an answer now is unlikely (answer queued at once), or None."""
        if self.worker.paused:
            return "the queue is paused (captiond resume)", "paused"
        if watch.name in self.overrides.paused_roots:
            return f"the folder {watch.name} is paused (captiond resume {watch.name})", "paused"
        if self.conditions is not None:
            for scope, c in self.conditions().items():
                if scope in (watch.name, "state"):
                    return (
                        f"{c['message']} (since {c['since_text']}); captiond resumes by itself",
                        c["kind"],
                    )
        state = slot.state
        if state is ModelState.LOADED or state.value == "unloaded":
            return None  # loads on its next job (the loop above notices a long load)
        if state is ModelState.FAILED and slot.last_error is not None:
            err = slot.last_error
            retry = slot.status().get("next_retry_in_seconds")
            when = f"; next try in {retry:g} s" if retry is not None else ""
            return (
                f"model {slot.name} could not be loaded ({err.error_type.value}: {err.message})"
                f"{when}; it is retried automatically",
                err.error_type.value,
            )
        if slot.breaker.state.value == "open":
            return f"model {slot.name} keeps failing: {slot.why_not()}", "model_unavailable"
        return f"model {slot.name} is {state.value}", "model_loading"

    def request_status(self, rid: str) -> dict[str, Any]:
        req = self.requests.get(rid)
        if req is None:
            raise Problem(
                "not_found", f"no caption request {rid!r} (finished ones are kept an hour)"
            )
        return req.to_json()

    def request_queue_status(self) -> dict[str, Any]:
        reqs = self.requests.all()
        counts: dict[str, int] = {}
        for r in reqs:
            counts[r.state] = counts.get(r.state, 0) + 1
        return {
            "requests": [r.to_json() for r in reqs if not r.finished]
            + [r.to_json() for r in reqs if r.finished][-50:],
            "counts": counts,
            "queue": self.queue.totals(),
            "paused": self.worker.paused,
            "paused_roots": list(self.overrides.paused_roots),
        }

    def cancel_request(self, rid: str) -> dict[str, Any]:
        req = self.requests.get(rid)
        if req is None:
            raise Problem("not_found", f"no caption request {rid!r}")
        outcome = self.requests.cancel(req)
        if outcome == "running":
            raise Problem("conflict", "the request is already being captioned", "conflict")
        if outcome == "finished" and req.state != "cancelled":
            raise Problem("conflict", f"the request already finished ({req.state})", "conflict")
        return req.to_json()

    # -- batches -------------------------------------------------------------------------

    def batch(self, body: BatchRequest) -> Iterator[dict[str, Any] | None]:
        """Start a batch: an iterator of events (``start``, ``item_complete``...,
        ``complete``, and ``waiting`` when nothing can progress, with the reason); a
        ``None`` asks the caller to check that the client is still there. Closing the
        iterator early cancels what has not started."""
        limit = self.settings.api.max_batch_items
        if body.folders:
            listed = [i for f in body.folders for i in self.images_in(f, limit + 1)]
            body = body.model_copy(update={"items": [*body.items, *listed], "folders": []})
        if len(body.items) > limit:
            raise Problem("too_large", f"at most {limit} items per batch", "invalid")
        if not body.items:
            raise Problem(
                "invalid", "no images to caption (the folders hold none their rules caption)"
            )
        if body.generator is not None:
            self.slot(body.generator)  # an unknown generator fails the whole request
        return self._batch_stream(body)

    def images_in(self, rel: str, limit: int) -> list[str]:
        """The images a watched folder (``ROOT`` or ``ROOT/sub``) captions, by its rules
        (recursive, include/exclude, hidden, temp names), listed confined to its root,
        as API paths; at most ``limit``."""
        root_name, _, sub = rel.strip("/").partition("/")
        watch = self.watch_named(root_name)
        root = Root(str(watch.path), watch.follow_symlinks)
        out: list[str] = []
        todo = [sub]
        while todo and len(out) < limit:
            rel_dir = todo.pop()
            try:
                with root.folder(rel_dir) as folder, os.scandir(folder.fd) as it:
                    entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
            except (OSError, ConfinementError) as exc:
                if rel_dir == sub:
                    raise Problem("not_found", f"cannot list {rel}: {exc}") from None
                continue
            for name, is_dir in entries:
                path = f"{rel_dir}/{name}" if rel_dir else name
                if is_dir:
                    if watch.recursive and not name.startswith("."):
                        todo.append(path)
                elif is_candidate(watch, watch.path / path):
                    out.append(f"{watch.name}/{path}")
        return out[:limit]

    @staticmethod
    def _item_path(item: str | BatchItem) -> str:
        if isinstance(item, str):
            return item
        folder = item.path.strip("/")
        return f"{folder or SINGLE_ROOT}/{item.name}"

    def _batch_stream(self, body: BatchRequest) -> Iterator[dict[str, Any] | None]:
        batch_id = str(uuid.uuid4())
        force, post_process, redo = body.config.force, body.config.post_process, body.config.redo
        total = len(body.items)
        counts = {"successful": 0, "failed": 0, "skipped": 0}
        pending: dict[str, tuple[int, CaptionRequest, ModelSlot, WatchConfig]] = {}
        seen: dict[tuple[str, str], int] = {}  # (image, generator) -> first item index
        started = time.monotonic()

        def item_event(index: int, result: dict[str, Any]) -> dict[str, Any]:
            if result.get("skipped"):
                counts["skipped"] += 1
            elif result.get("success"):
                counts["successful"] += 1
            else:
                counts["failed"] += 1
            return {"type": "item_complete", "index": index, "item_result": result}

        yield {"type": "start", "total": total, "batch_id": batch_id}
        try:
            for i, item in enumerate(body.items):
                rel = self._item_path(item)
                if i % 64 == 63:
                    yield None  # still there?
                try:
                    ref = resolve_image(self.watches, rel)
                    slot = self._generator_for(ref.watch, body.generator)
                    key = (str(ref.path), slot.name)
                    if (first := seen.get(key)) is not None:
                        # One job per image: a second request would fold into the first.
                        yield item_event(
                            i,
                            {
                                "success": False,
                                "skipped": True,
                                "path": ref.rel,
                                "generator": slot.name,
                                "duplicate_of": first,
                                "error": f"the same image as item {first}",
                                "error_type": "duplicate",
                                "retryable": False,
                            },
                        )
                        continue
                    seen[key] = i
                    if (
                        not force
                        and (there := self._existing_conflict(ref, slot, redo)) is not None
                    ):
                        whose = (
                            "captiond's own" if there.ours else "a caption captiond did not write"
                        )
                        yield item_event(
                            i,
                            {
                                "success": False,
                                "skipped": True,
                                "path": ref.rel,
                                "generator": slot.name,
                                "sidecar": self._rel(ref.watch, there.path),
                                "error": f"{Path(there.path).name} already exists ({whose})",
                                "error_type": "caption_exists",
                                "ours": there.ours,
                                "retryable": False,
                            },
                        )
                        continue
                    req = self._new_request(ref, slot, force, post_process, batch_id)
                except Problem as exc:
                    yield item_event(
                        i,
                        {
                            "success": False,
                            "path": rel,
                            "error": exc.message,
                            "error_type": exc.error_type,
                            "retryable": exc.retryable,
                            "status": exc.status,
                        },
                    )
                    continue
                pending[req.id] = (i, req, slot, ref.watch)
                self.worker.wake()
            told: str | None = None
            while pending:
                reqs = [r for _, r, _, _ in pending.values()]
                done = self.requests.wait_any(reqs, BATCH_POLL_SECONDS)
                for req in done:
                    i, _, _, _ = pending.pop(req.id)
                    yield item_event(i, dict(req.result or {}))
                if not done and pending:
                    _, _, slot, watch = next(iter(pending.values()))
                    why = self.waiting_reason(slot, watch)
                    text = why[0] if why else None
                    if text != told and why is not None:
                        told = text
                        yield {"type": "waiting", "message": why[0], "error_type": why[1]}
                    elif why is None:
                        told = None
                yield None  # notice a client that went away while we wait
            yield {
                "type": "complete",
                "processed": total,
                **counts,
                "processing_time": round(time.monotonic() - started, 3),
            }
        finally:
            # Client gone (GeneratorExit) or an error: cancel what has not started.
            cancelled = sum(
                self.requests.cancel(req) == "cancelled" for _, req, _, _ in pending.values()
            )
            if cancelled:
                log.info("batch_cancelled", batch=batch_id, cancelled=cancelled)

    # -- caption files -------------------------------------------------------------------

    def caption_types(self) -> dict[str, Any]:
        required = set()
        for slot in self.models.slots.values():
            if slot.generator is not None:
                required.add(slot.generator.caption_type)
        for w in self.watches:
            for g in w.generators:
                slot = self.models.get(g)
                ctype = slot.generator.caption_type if slot and slot.generator else g
                required.add(w.extension_for(g, ctype))
        user = sorted(set(self.overrides.caption_types))
        return {"types": sorted(required | set(user)), "user": user, "required": sorted(required)}

    def set_caption_types(self, types: list[str]) -> dict[str, Any]:
        image_exts = set(DEFAULT_IMAGE_EXTENSIONS)
        for w in self.watches:
            image_exts |= set(w.image_extensions)
        cleaned, problems = [], []
        for i, t in enumerate(types):
            e = t.strip().lstrip(".")
            if not e or len(e) > 32 or not _EXT_RE.fullmatch(e) or not e.isascii():
                problems.append({"loc": ["types", str(i)], "msg": "letters, digits, - and _ only"})
            elif e.lower() in image_exts:
                problems.append({"loc": ["types", str(i)], "msg": f".{e} is an image extension"})
            else:
                cleaned.append(e)
        if problems:
            raise Problem("invalid", "invalid caption types", details=problems)
        with self._lock:
            self.overrides.caption_types = sorted(set(cleaned))
            self.overrides.save()
        return self.caption_types()

    def _check_type(self, ctype: str) -> str:
        ctype = ctype.strip().lstrip(".")
        if ctype not in self.caption_types()["types"]:
            raise Problem(
                "invalid",
                f"unknown caption type {ctype!r}; recognised: {self.caption_types()['types']} "
                "(POST /api/caption-types to add one)",
            )
        return ctype

    def _sidecar_for(self, ref: ImageRef, ctype: str) -> tuple[str, list[str]]:
        """The file of caption type ``ctype`` for an image (absolute), and the generators
        writing it: the caption pipeline's own target rule."""
        for g in ref.watch.generators:
            slot = self.models.get(g)
            if slot is None or slot.generator is None:
                continue
            if ref.watch.extension_for(g, slot.generator.caption_type) == ctype:
                path = self.worker.sidecar_of(str(ref.path), g).path
                gens = [
                    o
                    for o in ref.watch.generators
                    if (s := self.models.get(o)) is not None
                    and s.generator is not None
                    and ref.watch.extension_for(o, s.generator.caption_type) == ctype
                ]
                return path, gens
        root = Root(str(ref.watch.path), ref.watch.follow_symlinks)
        rel_dir = root.rel(str(ref.path)).rpartition("/")[0]
        with root.folder(rel_dir) as folder:
            siblings = folder.stem_siblings(ref.path.name, ref.watch.image_extensions)
        target = sidecar_target(
            ref.path.name,
            ctype,
            naming=ref.watch.sidecar_naming,
            record=None,
            siblings=siblings,
            stem_owner=None,
            folder_path=str(ref.path.parent),
        )
        return f"{ref.path.parent}/{target.name}", []

    def write_caption(self, ref: ImageRef, ctype: str, caption: str) -> dict[str, Any]:
        ctype = self._check_type(ctype)
        if "\x00" in caption:
            raise Problem("invalid", "the caption contains a NUL character")
        # On the worker's writer thread: serialised with its read-decide-write of the
        # same sidecar, so neither overwrites the other's file or record.
        with _as_found(ref):
            result = self.worker.run_on_writer(lambda: self._write_caption(ref, ctype, caption))
        self._check_captions(str(ref.path))
        return result

    def _check_captions(self, path: str) -> None:
        """The caption checks of an image whose caption a person just wrote (index only)."""
        try:
            self.reports.check_paths([path])
        except Exception as exc:  # the background pass gets it later
            log.warning("caption_check_failed", path=path, error=str(exc))

    def _folder(self, ref: ImageRef, sidecar: str) -> tuple[Any, str]:
        root = Root(str(ref.watch.path), ref.watch.follow_symlinks)
        rel = root.rel(sidecar)
        rel_dir, _, name = rel.rpartition("/")
        if f"{root.path.rstrip('/')}/{rel_dir}".rstrip("/") != str(ref.path.parent).rstrip("/"):
            raise Problem("forbidden", "the sidecar would not be beside its image")
        return root.open_folder(rel_dir), name

    def _write_caption(self, ref: ImageRef, ctype: str, caption: str) -> dict[str, Any]:
        target, generators = self._sidecar_for(ref, ctype)
        folder, name = self._folder(ref, target)
        with folder:
            st = folder.lstat(name)
            if st is not None and not _regular(st.st_mode):
                raise Problem(
                    "forbidden" if _link(st.st_mode) else "conflict",
                    f"{name} is not a regular file; refusing to follow or replace it",
                )
            data = (caption.rstrip("\n") + "\n").encode("utf-8")
            image_data = None
            records = []
            for g in generators:
                rec = self.index.get_caption(str(ref.path), g)
                if rec is not None:
                    content = rec.content_hash
                else:
                    if image_data is None:
                        image_data, _ = folder.read_file(ref.path.name)
                    content = content_hash(image_data)
                records.append(
                    CaptionRecord(
                        str(ref.path),
                        g,
                        content,
                        target,
                        f"{HUMAN_EDIT}:{sidecar_hash(data)}",
                        0.0,
                        text=caption.rstrip("\n"),
                    )
                )
            staged = folder.stage(name, data)
            try:
                # Recorded as a person's caption: captiond never overwrites it automatically.
                self.index.record_captions(records)
                staged.commit()
            except BaseException:
                staged.discard()
                raise
            folder.sync()
        log.info("caption_put", path=str(ref.path), sidecar=target, generators=generators)
        return {
            "success": True,
            "path": ref.rel,
            "sidecar": self._rel(ref.watch, target),
            "type": ctype,
            "caption": caption.rstrip("\n"),
        }

    def delete_caption(self, ref: ImageRef, ctype: str) -> dict[str, Any]:
        ctype = self._check_type(ctype)
        with _as_found(ref):
            return self.worker.run_on_writer(lambda: self._delete_caption(ref, ctype))

    def _delete_caption(self, ref: ImageRef, ctype: str) -> dict[str, Any]:
        target, _ = self._sidecar_for(ref, ctype)
        folder, name = self._folder(ref, target)
        with folder:
            st = folder.lstat(name)
            if st is None:
                raise Problem("not_found", f"no {ctype} caption for {ref.rel}")
            if not _regular(st.st_mode):
                raise Problem(
                    "forbidden" if _link(st.st_mode) else "conflict",
                    f"{name} is not a regular file; refusing to remove it",
                )
            folder.unlink(name)
            folder.sync()
        log.info("caption_deleted", path=str(ref.path), sidecar=target)
        return {"success": True, "path": ref.rel, "sidecar": self._rel(ref.watch, target)}

    # -- generator configuration ---------------------------------------------------------

    def set_generator_config(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        found = self.discovered.get(name)
        if found is None:
            raise Problem("not_found", f"unknown generator {name!r}", "not_found")
        cls = found.cls
        if cls is None:
            raise Problem(
                "unavailable",
                f"generator {name} is unavailable: {found.error}",
                "model_unavailable",
            )
        with self._lock:
            current = self.settings.generators.get(name, {})
            if "use" in body and body["use"] != current.get("use"):
                raise self._file_only(name, "use")
            merged = current | body
            try:
                config = cls.config_model.model_validate(
                    {k: v for k, v in merged.items() if k != "use"}
                )
            except ValidationError as exc:
                raise Problem(
                    "invalid",
                    f"invalid configuration for {name}: {exc.error_count()} problem(s)",
                    details=validation_details(exc),
                ) from None
            old = self._current_config(name, cls)
            new_json = config.model_dump(mode="json")
            old_json = old.model_dump(mode="json") if old is not None else {}
            for key in FILE_ONLY_KEYS:
                if key in body and key != "use" and new_json.get(key) != old_json.get(key):
                    raise self._file_only(name, key)
            self._check_extensions(name, cls, config)
            applied = self._reconfigure(name, config)
            self.settings.generators[name] = merged
            # Only what was changed through the API is persisted: config.toml keeps the rest.
            changed = {k: v for k, v in body.items() if k not in FILE_ONLY_KEYS}
            self.overrides.generators[name] = self.overrides.generators.get(name, {}) | changed
            self.overrides.save()
        log.info("generator_config_changed", generator=name, keys=sorted(body), applied=applied)
        return {"generator": name, "config": config.model_dump(mode="json"), "applied": applied}

    def reset_overrides(self, generator: str | None, key: str | None) -> dict[str, Any]:
        """Drop settings changed through the API (all; a generator's, or ``postprocess``;
        or one key of them): the configuration file's values apply again, now."""
        if generator not in (None, "postprocess") and generator not in self.discovered:
            raise Problem("not_found", f"unknown generator {generator!r}", "not_found")
        with self._lock:
            dropped = self.overrides.reset(generator, key)
            if key is not None and not dropped:
                raise Problem("not_found", f"{generator}.{key} is not overridden", "not_found")
            self.overrides.save()
            gens = (
                [generator]
                if generator not in (None, "postprocess")
                else [g for g in self.settings.generators if generator is None]
            )
            for name in gens:
                table = self.file_settings.generators.get(name, {}) | self.overrides.generators.get(
                    name, {}
                )
                found = self.discovered.get(name)
                if found is None or found.cls is None:
                    continue
                config = found.cls.config_model.model_validate(
                    {k: v for k, v in table.items() if k != "use"}
                )
                self._reconfigure(name, config)
                self.settings.generators[name] = table
            if generator in (None, "postprocess"):
                pp = PostProcessConfig.model_validate(
                    self.file_settings.postprocess.model_dump() | (self.overrides.postprocess or {})
                )
                self.settings.postprocess = pp
                self.worker.set_postprocess(pp)
            if generator is None:
                self._apply_pause()
        log.info("overrides_reset", dropped=dropped)
        return {"dropped": dropped, "active": self.overrides.active()}

    @staticmethod
    def _file_only(name: str, key: str) -> Problem:
        return Problem(
            "forbidden",
            f"{key} of generator {name} can only be set in the configuration file: it "
            f"chooses code or weights to load; edit [generators.{name}] in config.toml "
            "and restart captiond",
            "forbidden",
        )

    def _current_config(self, name: str, cls: type) -> Any:
        slot = self.models.get(name)
        if slot is not None and slot.config is not None:
            return slot.config
        try:
            return generator_config(self.settings, name, cls)
        except ValidationError:
            return None

    def _check_extensions(self, name: str, cls: type, config: Any) -> None:
        """A new caption type must not make two generators of a folder write one file."""
        new_type = cls(config).caption_type  # constructors only keep the config
        for w in self.watches:
            if name not in w.generators:
                continue
            exts = {}
            for g in w.generators:
                slot = self.models.get(g)
                ctype = (
                    new_type
                    if g == name
                    else (slot.generator.caption_type if slot and slot.generator else g)
                )
                exts.setdefault(w.extension_for(g, ctype), []).append(g)
            for ext, gens in exts.items():
                if len(gens) > 1:
                    raise Problem(
                        "conflict",
                        f"with these settings {name} writes .{ext} sidecars in folder {w.name}, "
                        f"like {', '.join(g for g in gens if g != name)}; give one of them its "
                        "own sidecar_extension in config.toml",
                        "conflict",
                    )

    def _reconfigure(self, name: str, config: Any) -> bool:
        """Give generator ``name`` the new settings between batches: it is loaded again
        on its next job (a new caption type or weight class rebuilds its slot). True
        once done (False: applies after the batch running now)."""
        if self.models.get(name) is None:
            return True  # not in use: the next start builds it with the new config
        done = threading.Event()
        errors: list[BaseException] = []

        def swap() -> None:
            try:
                if self.models.reconfigure(name, config):
                    self.worker.rebuild_pipeline(name)
            except ReconfigureError as exc:
                errors.append(exc)
            finally:
                done.set()

        if not self.worker.alive:
            swap()
        else:
            self.worker.call_soon(swap)
            if not done.wait(10.0):
                return False
        if errors:
            raise Problem("conflict", str(errors[0]), "conflict")
        return True

    # -- post-processing -----------------------------------------------------------------

    def postprocess(self, shape: str = "captiond") -> dict[str, Any]:
        pp = self.settings.postprocess
        if shape == "reynard":
            return to_reynard(pp)
        return {
            "steps": list(pp.steps),
            "case": pp.case,
            "max_words": pp.max_words,
            "overrides": {k: list(v) for k, v in pp.overrides.items()},
            "available_steps": sorted(STEPS),
        }

    def set_postprocess(self, document: dict[str, Any]) -> dict[str, Any]:
        """Change the chain from a partial document in either shape (captiond's or
        Reynard's, told apart by their keys); the answer is in the shape sent."""
        try:
            shape = settings_shape(document)
        except ValueError as exc:
            raise Problem("invalid", str(exc)) from None
        with self._lock:
            current = self.settings.postprocess.model_dump()
            if shape == "reynard":
                try:
                    ReynardPostProcessing.model_validate(document)
                    new = from_reynard(document, base=self.settings.postprocess)
                except ValidationError as exc:
                    raise Problem(
                        "invalid",
                        "invalid post-processing document",
                        details=validation_details(exc),
                    ) from None
                except ValueError as exc:
                    raise Problem("invalid", f"invalid post-processing document: {exc}") from None
                changed = {k: v for k, v in new.items() if current.get(k) != v}
            else:
                try:
                    update = PostProcessUpdate.model_validate(document)
                except ValidationError as exc:
                    raise Problem(
                        "invalid",
                        "invalid post-processing settings",
                        details=validation_details(exc),
                    ) from None
                changed = update.model_dump(exclude_none=True)
            try:
                pp = PostProcessConfig.model_validate(current | changed)
            except ValidationError as exc:
                raise Problem(
                    "invalid", "invalid post-processing settings", details=validation_details(exc)
                ) from None
            self.settings.postprocess = pp
            self.worker.set_postprocess(pp)
            if changed:
                self.overrides.postprocess = (self.overrides.postprocess or {}) | changed
                self.overrides.save()
        return self.postprocess(shape)

    # -- queue control -------------------------------------------------------------------

    def _apply_pause(self) -> None:
        self.worker.paused = self.overrides.paused
        self.worker.paused_roots = frozenset(
            str(self.watch_named(n).path) for n in self.overrides.paused_roots
        )
        self.worker.wake()

    def queue_state(self) -> dict[str, Any]:
        prefixes = {w.name: str(w.path) for w in self.watches}
        by_root = self.queue.counts_under(list(prefixes.values()))
        return {
            "paused": self.worker.paused,
            "paused_roots": list(self.overrides.paused_roots),
            "totals": self.queue.totals(),
            "by_root": {name: by_root.get(p, {}) for name, p in prefixes.items()},
        }

    def pause(self, root: str | None) -> dict[str, Any]:
        with self._lock:
            if root is None:
                self.overrides.paused = True
            else:
                name = self.watch_named(root).name
                if name not in self.overrides.paused_roots:
                    self.overrides.paused_roots.append(name)
            self.overrides.save()
            self._apply_pause()
        log.info("queue_paused", root=root or "all")
        return self.queue_state()

    def resume(self, root: str | None) -> dict[str, Any]:
        with self._lock:
            if root is None:
                self.overrides.paused = False
                self.overrides.paused_roots = []
            else:
                name = self.watch_named(root).name
                self.overrides.paused_roots = [r for r in self.overrides.paused_roots if r != name]
            self.overrides.save()
            self._apply_pause()
        log.info("queue_resumed", root=root or "all")
        return self.queue_state()

    def rescan(self, root: str | None, recaption: bool) -> dict[str, Any]:
        watches = self.watches if root is None else [self.watch_named(root)]
        enqueued = 0
        for w in watches:
            self.scans.request(ScanRequest(w.name, None, PRIORITY_NEW, "api rescan"))
            if recaption:
                enqueued += self._recaption_ours(w)
        if enqueued:
            self.worker.wake()
        return {"roots": [w.name for w in watches], "recaption_enqueued": enqueued}

    def _recaption_ours(self, watch: WatchConfig) -> int:
        """Queue every image whose sidecar captiond wrote and nobody edited since."""
        return self.scanner.recaption_ours(watch, PRIORITY_BACKFILL)

    def retry(self, root: str | None, generator: str | None, states: list[str]) -> int:
        prefix = str(self.watch_named(root).path) if root else None
        self._known_generator(generator)
        n = self.queue.retry(states, generator=generator, prefix=prefix)
        if n:
            self.worker.wake()
        return n

    def purge(self, root: str | None, generator: str | None, states: list[str]) -> int:
        """Delete jobs in ``states``. Images whose unfinished jobs (pending, failed, dead)
        are purged are forgotten by the index too, so the next scan finds them again:
        a purge never makes an image invisible for ever."""
        if not states:
            raise Problem("invalid", "name the states to purge (pending, done, failed, dead)")
        prefix = str(self.watch_named(root).path) if root else None
        self._known_generator(generator)
        paths = self.queue.purge(states, generator=generator, prefix=prefix)
        unfinished = [p for p, state in paths if state != "done"]
        if unfinished:
            roots = {str(w.path): w for w in self.watches}
            self.index.forget_paths(unfinished, roots=list(roots))
        return len(paths)

    # -- the dataset report and caption flags (daemon/report) --------------------------
    def report(self, scopes: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """The dataset report (plain data: the CLI, the HTML report and a UI page render
        it). ``options``: :class:`daemon.report.stats.Options` fields."""
        try:
            opts = ReportOptions(**options)
            return self.reports.report(scopes, opts)
        except ScopeError as exc:
            raise Problem("not_found", str(exc)) from None
        except BusyError as exc:
            raise Problem("unavailable", str(exc), retryable=True) from None
        except (ValueError, TypeError) as exc:
            raise Problem("invalid", str(exc)) from None

    def refresh_report(self, scopes: list[str]) -> dict[str, Any]:
        """Read the sidecars of ``scopes`` back: the texts of captions edited on disk."""
        try:
            return self.reports.refresh(scopes)
        except ScopeError as exc:
            raise Problem("not_found", str(exc)) from None
        except BusyError as exc:
            raise Problem("unavailable", str(exc), retryable=True) from None

    def dismiss_flag(self, path: str, generator: str | None, check: str | None) -> dict[str, Any]:
        """Dismiss an image's open flags (kept as dismissed until the image changes)."""
        ref = resolve_image(self.watches, path, must_exist=False)
        n = self.reports.dismiss(str(ref.path), generator, check)
        if not n:
            raise Problem("not_found", f"no open flag of {ref.rel} matches")
        log.info("flags_dismissed", path=ref.rel, generator=generator, check=check, count=n)
        return {"count": n, "path": ref.rel}

    def _known_generator(self, generator: str | None) -> None:
        if generator is not None and generator not in self.discovered:
            raise Problem("not_found", f"unknown generator {generator!r}", "not_found")

    # -- browsing (the web UI) -----------------------------------------------------------

    def rel_of(self, path: str) -> str | None:
        """The API name of an absolute path under a watched root (None outside)."""
        for w in self.watches:  # roots never overlap
            root = str(w.path).rstrip("/")
            if path.startswith(root + "/"):
                return f"{w.name}/{path[len(root) + 1 :]}"
        return None

    def folder_path(self, rel: str) -> str:
        """The absolute folder a client names as ``ROOT`` or ``ROOT/sub`` (lexical
        checks only: it is a range of paths in the index, never opened)."""
        parts = rel.strip("/").split("/")
        if any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
            raise Problem("invalid", "a folder is named ROOT or ROOT/sub, without '.' or '..'")
        watch = self.watch_named(parts[0])
        return "/".join([str(watch.path).rstrip("/"), *parts[1:]])

    def gallery(
        self, f: GalleryFilter, *, after: str | None, before: str | None, limit: int
    ) -> dict[str, Any]:
        """One page of images matching ``f`` (keyset paging on API paths): ``items``
        (the index's view of each) and the cursors ``prev``/``next`` (None at an end)."""
        a = None if after is None else str(self.image_path(after))
        b = None if before is None else str(self.image_path(before))
        paths = self.index.gallery_paths(f, after=a, before=b, limit=limit + 1)
        more = len(paths) > limit
        if b is not None and a is None:
            paths = paths[-limit:] if more else paths
            has_prev, has_next = more, True
        else:
            paths = paths[:limit]
            has_prev, has_next = a is not None, more
        details = self.index.gallery_items(paths)
        items = []
        for p in paths:
            rel = self.rel_of(p)
            if rel is not None:
                items.append(details[p] | {"rel": rel})
        return {
            "items": items,
            "prev": items[0]["rel"] if items and has_prev else None,
            "next": items[-1]["rel"] if items and has_next else None,
        }

    def neighbours(self, f: GalleryFilter, ref: ImageRef) -> tuple[str | None, str | None]:
        """The images before and after ``ref`` in the gallery's order under ``f``."""
        p = str(ref.path)
        prev = self.index.gallery_paths(f, before=p, limit=1)
        nxt = self.index.gallery_paths(f, after=p, limit=1)
        return (
            self.rel_of(prev[0]) if prev else None,
            self.rel_of(nxt[0]) if nxt else None,
        )

    def image_path(self, rel: str) -> Path:
        """An image's absolute path from its API name, checked lexically only (a
        cursor: the image may be gone)."""
        return resolve_image(self.watches, rel, must_exist=False).path

    def folders(self) -> list[dict[str, Any]]:
        """Every root and folder holding images, depth first, each with the counts of
        what lies in it and below it: images, jobs by state, captions by a person."""
        counts = self.index.folder_counts([str(w.path) for w in self.watches])
        rows = []
        for w in self.watches:
            own = counts.get(str(w.path).rstrip("/"), {})
            total: dict[str, dict[str, int]] = {}
            for d, c in own.items():
                parts = d.split("/") if d else []
                for i in range(len(parts) + 1):
                    acc = total.setdefault("/".join(parts[:i]), {})
                    for k, n in c.items():
                        acc[k] = acc.get(k, 0) + n
            total.setdefault("", {})
            for d in sorted(total, key=lambda d: d.split("/") if d else []):
                rows.append(
                    {
                        "root": w.name,
                        "folder": d,
                        "rel": f"{w.name}/{d}" if d else w.name,
                        "depth": d.count("/") + 1 if d else 0,
                        "counts": total[d],
                    }
                )
        return rows

    def sidecars(self, ref: ImageRef) -> list[dict[str, Any]]:
        """Every sidecar beside an image (its generators' targets and any file named
        ``stem.TYPE`` or ``name.TYPE`` of a recognised caption type), read confined,
        with who wrote it: ``captiond``, ``person`` (through captiond), ``edited`` (on
        disk since captiond wrote it) or ``unknown`` (captiond never wrote it)."""
        watch, image = ref.watch, str(ref.path)
        root = Root(str(watch.path), watch.follow_symlinks)
        rel_dir = root.rel(str(ref.path.parent))
        targets: dict[str, list[str]] = {}  # sidecar name -> generators writing it
        for g in watch.generators:
            with contextlib.suppress(FileNotFoundError, ConfinementError, OSError):
                targets.setdefault(Path(self.worker.sidecar_of(image, g).path).name, []).append(g)
        stem = ref.path.stem
        names = dict.fromkeys(targets)
        for t in self.caption_types()["types"]:
            names.update(dict.fromkeys([f"{stem}.{t}", f"{ref.path.name}.{t}"]))
        records = {
            g: r
            for g in {*watch.generators, *self.models.slots}
            if (r := self.index.get_caption(image, g)) is not None
        }
        out = []
        with _as_found(ref), root.folder(rel_dir) as folder:
            for name in names:
                st = folder.lstat(name)
                gens = targets.get(name, [])
                if st is None and not gens:
                    continue
                entry: dict[str, Any] = {
                    "name": name,
                    "rel": f"{watch.name}/{rel_dir}/{name}" if rel_dir else f"{watch.name}/{name}",
                    "type": name.rsplit(".", 1)[-1],
                    "generators": gens,
                    "exists": st is not None,
                    "text": None,
                    "problem": None,
                    "written_by": None,
                }
                if st is not None:
                    try:
                        data = folder.read_sidecar(name)
                    except UnsafeSidecarError as exc:
                        entry["problem"] = str(exc).rsplit(": ", 1)[-1]
                        data = None
                    if data is not None:
                        entry["text"] = data.decode("utf-8", "replace")
                        entry["written_by"] = _written_by(
                            data, f"{folder.path}/{name}", records.values()
                        )
                out.append(entry)
        return out

    def person_caption_at_risk(self, ref: ImageRef, generator: str) -> str | None:
        """The sidecar a forced caption of ``generator`` would replace when captiond
        did not write what is there (a person's caption), else None."""
        info = self.worker.sidecar_of(str(ref.path), generator)
        return Path(info.path).name if info.exists and not info.ours else None

    def image_history(self, ref: ImageRef) -> dict[str, Any]:
        """An image's jobs (one per generator), its failed attempts, its caption
        records, open flags and its file's size and modification time as indexed."""
        image = str(ref.path)
        jobs = self.queue.jobs_of(image)
        item = self.index.gallery_items([image])[image]
        return {
            "jobs": [
                {
                    "generator": j.generator,
                    "state": str(j.state),
                    "outcome": j.outcome,
                    "attempts": j.attempts,
                    "error_type": j.error_type,
                    "error": j.error_message,
                    "enqueued_at": j.enqueued_at,
                    "updated_at": j.updated_at,
                    "not_before": j.not_before,
                }
                for j in jobs
            ],
            "failed_attempts": self.queue.failed_attempts(image),
            "captions": item["captions"],
            "flags": item["flags"],
            "size": item["size"],
            "mtime_ns": item["mtime_ns"],
        }

    def retry_job(self, ref: ImageRef, generator: str) -> bool:
        """Retry one failed or dead job now."""
        self._known_generator(generator)
        ok = self.queue.retry_job(str(ref.path), generator)
        if ok:
            self.worker.wake()
        return ok

    def recent_errors(self, limit: int = 20) -> list[dict[str, Any]]:
        return [
            {
                "path": j.path,
                "rel": self.rel_of(j.path),
                "generator": j.generator,
                "state": str(j.state),
                "error_type": j.error_type,
                "error": j.error_message,
                "attempts": j.attempts,
                "updated_at": j.updated_at,
            }
            for j in self.queue.recent_errors(limit)
        ]

    def activity(self, minutes: int = 60) -> dict[str, Any]:
        """Captions written per minute over the last ``minutes`` (oldest first), the
        rate, the backlog by priority class and an ETA for it at that rate."""
        now = time.time()
        since = (now // 60 - minutes + 1) * 60  # whole minutes; the last one is running
        per_minute = self.index.written_per_minute(since, minutes)
        elapsed = max(60.0, now - since)
        explicit, new, backfill = self.queue.pending_by_priority(
            [PRIORITY_EXPLICIT - 50, PRIORITY_NEW - 50]
        )
        # The last 10 minutes say more about now; counted from the first of them that
        # wrote anything (a daemon that started 2 minutes ago has 2 minutes of rate).
        last = per_minute[-10:]
        first = next((i for i, n in enumerate(last) if n), None)
        if first is not None:
            window = max(60.0, now - (since + (minutes - len(last) + first) * 60))
            rate = sum(last) / window
        else:
            rate = sum(per_minute) / elapsed
        backlog = explicit + new + backfill
        return {
            "per_minute": per_minute,
            "written_last_hour": sum(per_minute),
            "rate_per_minute": round(rate * 60, 1),
            "backlog": {"explicit": explicit, "new": new, "backfill": backfill},
            "eta_seconds": round(backlog / rate) if rate > 0 and backlog else None,
        }


@contextlib.contextmanager
def _as_found(ref: ImageRef) -> Iterator[None]:
    """The image's folder as the request finds it, after its path was checked: removed
    meanwhile is a 404, swapped for a link out of the root a 403, not a 500."""
    try:
        yield
    except FileNotFoundError:
        raise Problem(
            "not_found", f"{ref.rel} or its folder was removed while the request ran"
        ) from None
    except ConfinementError:
        raise Problem(
            "forbidden", f"{ref.rel}: a folder on its path now leaves its watched root"
        ) from None


def _regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


def _link(mode: int) -> bool:
    return stat.S_ISLNK(mode)


def _written_by(data: bytes, path: str, records: Iterable[CaptionRecord]) -> str:
    digest = sidecar_hash(data)
    for rec in records:
        if rec.sidecar_path != path:
            continue
        if rec.sidecar_hash == f"{HUMAN_EDIT}:{digest}":
            return "person"
        return "captiond" if digest in rec.owned_hashes(path) else "edited"
    return "unknown"
