"""The control facade: what the API may do to a running daemon, in one place.

Everything the HTTP handlers change goes through here: explicit caption requests
(through the queue and the worker, never around them), caption files a person writes
or removes, settings changed at run time (persisted in ``RuntimeSettings``), and queue
control. Handlers only parse and authorise.

Threading: handlers run on the server's threads. Changes that touch what the worker
uses are handed to the worker (``Worker.call_soon``: a generator swap runs between
batches) or are a single reference swap (the post-processing pipelines).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import ValidationError

from daemon.api.http import HTTPError, Response
from daemon.api.requests import CaptionRequest, RequestRegistry
from daemon.api.schemas import (
    APIError,
    BatchItem,
    BatchRequest,
    PostProcessUpdate,
    validation_details,
)
from daemon.api.security import (
    SINGLE_ROOT,
    Authoriser,
    ImageRef,
    api_path,
    check_sidecar_path,
    resolve_admin_group,
    resolve_image,
)
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
from daemon.generators.base import WeightClass
from daemon.generators.registry import Discovered
from daemon.hashing import content_hash_file, sidecar_hash
from daemon.overrides import RuntimeSettings
from daemon.pipeline.sidecars import candidate_paths, stage, stem_siblings
from daemon.residency.slot import ModelSlot, ModelState
from daemon.scanning.scheduler import ScanRequest
from daemon.text.postprocess import STEPS

if TYPE_CHECKING:
    from daemon.app import Daemon

log = structlog.get_logger(__name__)

# Recorded as the sidecar hash of a caption a person wrote through the API: it never
# equals a real content hash, so the file is never "ours" and never overwritten.
HUMAN_EDIT = "human-edit"
_EXT_RE = re.compile(r"[\w+-]+(\.[\w+-]+)*")
BATCH_POLL_SECONDS = 0.5
SYNC_SLICE_SECONDS = 0.25
# Settings that choose code or weights to load (a model folder or repository may carry
# Python code or pickles; .pt detectors are torch pickles): config.toml only, never the
# API, which admin-group members and TCP token holders may use.
FILE_ONLY_KEYS = (
    "model",
    "revision",
    "trust_remote_code",
    "detector_model",
    "tagger",
    "describer",
    "use",
    "base_url",  # where requests (and the API key) go
    "api_key_file",
    "api_key_env",
)

# error_type -> HTTP status of a failed explicit request
_STATUS = {
    "caption_exists": 409,
    "caption_edited": 409,
    "bad_image": 422,
    "model_unavailable": 503,
    "cancelled": 409,
    "unexpected": 500,
    "worker_crash": 500,
}


def apply_runtime_settings(settings: Settings, runtime: RuntimeSettings) -> list[str]:
    """Put persisted API changes over the configuration file, before the parts are
    built. Entries that no longer validate are skipped with a warning (returned)."""
    warnings = []
    known = discover_generators(settings)
    for name, table in runtime.generators.items():
        found = known.get(name)
        locked = sorted(k for k in table if k in FILE_ONLY_KEYS)
        if locked:  # written by an older version: the configuration file decides these
            warnings.append(
                f"runtime settings for generator {name}: {', '.join(locked)} ignored "
                "(set only in config.toml)"
            )
            table = {k: v for k, v in table.items() if k not in FILE_ONLY_KEYS}
        merged = settings.generators.get(name, {}) | table
        if found is not None and found.cls is not None:
            try:
                found.cls.config_model.model_validate(
                    {k: v for k, v in merged.items() if k != "use"}
                )
            except ValidationError as exc:
                warnings.append(f"runtime settings for generator {name} ignored: {exc}")
                continue
        settings.generators[name] = merged
    if runtime.postprocess is not None:
        try:
            settings.postprocess = PostProcessConfig.model_validate(runtime.postprocess)
        except ValidationError as exc:
            warnings.append(f"runtime post-processing settings ignored: {exc}")
    for w in warnings:
        log.warning("runtime_settings_skipped", reason=w)
    return warnings


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Control:
    def __init__(self, daemon: Daemon, runtime: RuntimeSettings) -> None:
        self.daemon = daemon
        self.settings: Settings = daemon.settings
        self.queue = daemon.queue
        self.index = daemon.index
        self.worker = daemon.worker
        self.models = daemon.models
        self.scans = daemon.scans
        self.watches: list[WatchConfig] = list(self.settings.watch)
        self.runtime = runtime
        self.requests = RequestRegistry(self.queue)
        self.auth = Authoriser(resolve_admin_group(self.settings.api.admin_group))
        self.discovered: dict[str, Discovered] = discover_generators(self.settings)
        self._lock = threading.Lock()  # serialises changes to settings
        self.worker.on_result = self.requests.on_result
        names = {w.name for w in self.watches}
        self.runtime.paused_roots = [r for r in runtime.paused_roots if r in names]
        self._apply_pause()

    # -- helpers -----------------------------------------------------------------------

    def _watch(self, name: str) -> WatchConfig:
        if name == SINGLE_ROOT and len(self.watches) == 1:
            return self.watches[0]
        for w in self.watches:
            if w.name == name:
                return w
        raise APIError(404, f"no watched root named {name!r}")

    def _rel(self, watch: WatchConfig, path: Path | str) -> str:
        return api_path(watch, path)

    def _slot(self, name: str) -> ModelSlot:
        slot = self.models.get(name)
        if slot is None:
            if name in self.discovered:
                raise APIError(
                    422,
                    f"generator {name!r} is not enabled in this daemon: add it to a "
                    "watch's generators or to worker.preload",
                    "model_unavailable",
                )
            raise APIError(404, f"unknown generator {name!r}", "not_found")
        if slot.generator is None or slot.state is ModelState.UNAVAILABLE:
            raise APIError(
                503, f"generator {name} is unavailable: {slot.reason}", "model_unavailable"
            )
        return slot

    def _generator_for(self, watch: WatchConfig, name: str | None) -> ModelSlot:
        name = name or watch.generators[0]
        slot = self._slot(name)
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
                    raise APIError(
                        422,
                        f"generator {name} would write the same .{ext} sidecar as {other} in "
                        f"root {watch.name}",
                    )
        return slot

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
                    "caption_type": getattr(cls, "caption_type", None),
                    "description": getattr(cls, "description", None),
                    "version": getattr(cls, "version", None),
                    "available": bool(avail.ok) and status.get("available", True),
                    "reason": avail.reason or status.get("reason", ""),
                    "loaded": bool(status.get("loaded", False)),
                    "state": status.get("state", "not_in_use"),
                    "weight": cls.weight.value if cls is not None else None,
                    "in_use": slot is not None,
                    "config_schema": cls.config_model.model_json_schema() if cls else None,
                    "config": config,
                    "last_error": status.get("last_error"),
                }
            )
        return out

    # -- one caption -------------------------------------------------------------------

    def _existing_conflict(self, ref: ImageRef, slot: ModelSlot) -> Path | None:
        gen = slot.generator
        assert gen is not None
        target = self.worker.sidecar_target(str(ref.path), gen)
        return target if os.path.lexists(target) else None

    def _paused_for(self, watch: WatchConfig) -> bool:
        return self.worker.paused or watch.name in self.runtime.paused_roots

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
    ) -> Response:
        slot = self._generator_for(ref.watch, generator)
        if not force and (target := self._existing_conflict(ref, slot)) is not None:
            raise APIError(
                409,
                f"{target.name} already exists; use force=true to replace it",
                "caption_exists",
                extra={"sidecar": self._rel(ref.watch, target)},
            )
        req = self._new_request(ref, slot, force, post_process, None)
        self.worker.wake()
        waiting = self._waiting_reason(slot, ref.watch)
        deadline = time.monotonic() + self.settings.api.sync_wait_seconds
        while waiting is None:
            left = deadline - time.monotonic()
            if self.requests.wait(req, min(max(left, 0.0), SYNC_SLICE_SECONDS)):
                return self._result_response(req)
            if left <= SYNC_SLICE_SECONDS:
                break
            # A load that started meanwhile (a download may take long): answer queued.
            waiting = self._waiting_reason(slot, ref.watch)
        if waiting is None:
            waiting = (
                f"still running after {self.settings.api.sync_wait_seconds:g} s",
                "timeout",
            )
        message, error_type = waiting
        body = {
            "success": False,
            "queued": True,
            "request_id": req.id,
            "message": f"{message}; the request is queued (ID {req.id}): follow it with "
            f"GET /api/caption-request-status/{req.id}",
            "error": f"Request queued (ID: {req.id})",
            "error_type": error_type,
            "retryable": True,
        }
        return Response(202, body, {"Location": f"/api/caption-request-status/{req.id}"})

    def _waiting_reason(self, slot: ModelSlot, watch: WatchConfig) -> tuple[str, str] | None:
        """Why an answer now is unlikely (answer queued at once), or None."""
        if self._paused_for(watch):
            return "the queue is paused", "paused"
        state = slot.state
        if state is ModelState.LOADED or state.value == "unloaded":
            return None  # loads on its next job (the loop above notices a long load)
        if state is ModelState.FAILED and slot.last_error is not None:
            err = slot.last_error
            return (
                f"model {slot.name} could not be loaded ({err.error_type.value}: {err.message}); "
                "it is retried automatically",
                err.error_type.value,
            )
        return f"model {slot.name} is {state.value}", "model_loading"

    def _result_response(self, req: CaptionRequest) -> Response:
        result = dict(req.result or {})
        if result.get("success"):
            return Response(200, result)
        error_type = result.get("error_type", "unexpected")
        status = _STATUS.get(error_type, 503 if result.get("retryable") else 422)
        return Response(status, result)

    def request_status(self, rid: str) -> dict[str, Any]:
        req = self.requests.get(rid)
        if req is None:
            raise APIError(404, f"no caption request {rid!r} (finished ones are kept an hour)")
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
            "queue": self.daemon._queue_totals(),
            "paused": self.worker.paused,
            "paused_roots": list(self.runtime.paused_roots),
        }

    def cancel_request(self, rid: str) -> dict[str, Any]:
        req = self.requests.get(rid)
        if req is None:
            raise APIError(404, f"no caption request {rid!r}")
        outcome = self.requests.cancel(req)
        if outcome == "running":
            raise APIError(409, "the request is already being captioned", "conflict")
        if outcome == "finished" and req.state != "cancelled":
            raise APIError(409, f"the request already finished ({req.state})", "conflict")
        return req.to_json()

    # -- batches -------------------------------------------------------------------------

    def batch(self, body: BatchRequest) -> Response:
        if len(body.items) > self.settings.api.max_batch_items:
            raise APIError(
                413, f"at most {self.settings.api.max_batch_items} items per batch", "invalid"
            )
        if body.generator is not None:
            self._slot(body.generator)  # an unknown generator fails the whole request
        return Response(
            200,
            stream=self._batch_stream(body),
            content_type="text/plain; charset=utf-8",
        )

    @staticmethod
    def _item_path(item: str | BatchItem) -> str:
        if isinstance(item, str):
            return item
        folder = item.path.strip("/")
        return f"{folder or SINGLE_ROOT}/{item.name}"

    def _batch_stream(self, body: BatchRequest) -> Iterator[bytes | None]:
        batch_id = str(uuid.uuid4())
        force, post_process = body.config.force, body.config.post_process
        total = len(body.items)
        counts = {"successful": 0, "failed": 0, "skipped": 0}
        pending: dict[str, tuple[int, CaptionRequest]] = {}
        seen: dict[tuple[str, str], int] = {}  # (image, generator) -> first item index
        started = time.monotonic()

        def item_event(index: int, result: dict[str, Any]) -> bytes:
            if result.get("skipped"):
                counts["skipped"] += 1
            elif result.get("success"):
                counts["successful"] += 1
            else:
                counts["failed"] += 1
            return _event({"type": "item_complete", "index": index, "item_result": result})

        yield _event({"type": "start", "total": total, "batch_id": batch_id})
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
                    if not force and (target := self._existing_conflict(ref, slot)) is not None:
                        yield item_event(
                            i,
                            {
                                "success": False,
                                "skipped": True,
                                "path": ref.rel,
                                "generator": slot.name,
                                "sidecar": self._rel(ref.watch, target),
                                "error": f"{target.name} already exists",
                                "error_type": "caption_exists",
                                "retryable": False,
                            },
                        )
                        continue
                    req = self._new_request(ref, slot, force, post_process, batch_id)
                except HTTPError as exc:
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
                pending[req.id] = (i, req)
                self.worker.wake()
            while pending:
                done = self.requests.wait_any([r for _, r in pending.values()], BATCH_POLL_SECONDS)
                for req in done:
                    i, _ = pending.pop(req.id)
                    yield item_event(i, dict(req.result or {}))
                yield None  # notice a client that went away while we wait
            yield _event(
                {
                    "type": "complete",
                    "processed": total,
                    **counts,
                    "processing_time": round(time.monotonic() - started, 3),
                }
            )
        finally:
            # Client gone (GeneratorExit) or an error: cancel what has not started.
            cancelled = sum(self.requests.cancel(req) == "cancelled" for _, req in pending.values())
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
        user = sorted(set(self.runtime.caption_types))
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
            raise APIError(422, "invalid caption types", details=problems)
        with self._lock:
            self.runtime.caption_types = sorted(set(cleaned))
            self.runtime.save()
        return self.caption_types()

    def _check_type(self, ctype: str) -> str:
        ctype = ctype.strip().lstrip(".")
        if ctype not in self.caption_types()["types"]:
            raise APIError(
                422,
                f"unknown caption type {ctype!r}; recognised: {self.caption_types()['types']} "
                "(POST /api/caption-types to add one)",
            )
        return ctype

    def _sidecar_for(self, ref: ImageRef, ctype: str) -> tuple[Path, list[str]]:
        """The file of caption type ``ctype`` for an image, and the generators writing it."""
        targets: dict[Path, list[str]] = {}
        for g in ref.watch.generators:
            slot = self.models.get(g)
            if slot is None or slot.generator is None:
                continue
            if ref.watch.extension_for(g, slot.generator.caption_type) == ctype:
                t = self.worker.sidecar_target(str(ref.path), slot.generator)
                targets.setdefault(t, []).append(g)
        if targets:
            target = next(iter(targets))
            return target, targets[target]
        stem_form, name_form = candidate_paths(ref.path, ctype)
        if ref.watch.sidecar_naming == "name" or stem_siblings(
            ref.path, ref.watch.image_extensions
        ):
            return name_form, []
        return stem_form, []

    def write_caption(self, ref: ImageRef, ctype: str, caption: str) -> dict[str, Any]:
        ctype = self._check_type(ctype)
        if "\x00" in caption:
            raise APIError(422, "the caption contains a NUL character")
        # On the worker's writer thread: serialised with its read-decide-write of the
        # same sidecar, so neither overwrites the other's file or record.
        return self.worker.run_on_writer(lambda: self._write_caption(ref, ctype, caption))

    def _write_caption(self, ref: ImageRef, ctype: str, caption: str) -> dict[str, Any]:
        target, generators = self._sidecar_for(ref, ctype)
        check_sidecar_path(ref, target)
        staged = stage(target, caption, owner_of=ref.path)
        try:
            # Recorded as a person's caption: captiond never overwrites it automatically.
            image_hash = None
            for g in generators:
                rec = self.index.get_caption(str(ref.path), g)
                if rec is not None:
                    content = rec.content_hash
                else:
                    image_hash = image_hash or content_hash_file(ref.path)
                    content = image_hash
                self.index.record_caption(
                    str(ref.path), g, content, str(target), f"{HUMAN_EDIT}:{staged.digest}"
                )
            staged.commit()
        except BaseException:
            staged.discard()
            raise
        log.info("caption_put", path=str(ref.path), sidecar=str(target), generators=generators)
        return {
            "success": True,
            "path": ref.rel,
            "sidecar": self._rel(ref.watch, target),
            "type": ctype,
            "caption": caption.rstrip("\n"),
        }

    def delete_caption(self, ref: ImageRef, ctype: str) -> dict[str, Any]:
        ctype = self._check_type(ctype)
        return self.worker.run_on_writer(lambda: self._delete_caption(ref, ctype))

    def _delete_caption(self, ref: ImageRef, ctype: str) -> dict[str, Any]:
        target, _ = self._sidecar_for(ref, ctype)
        check_sidecar_path(ref, target)
        try:
            os.unlink(target)
        except FileNotFoundError:
            raise APIError(404, f"no {ctype} caption for {ref.rel}") from None
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("caption_deleted", path=str(ref.path), sidecar=str(target))
        return {"success": True, "path": ref.rel, "sidecar": self._rel(ref.watch, target)}

    # -- generator configuration ---------------------------------------------------------

    def set_generator_config(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        found = self.discovered.get(name)
        if found is None:
            raise APIError(404, f"unknown generator {name!r}", "not_found")
        cls = found.cls
        if cls is None:
            raise APIError(
                503, f"generator {name} is unavailable: {found.error}", "model_unavailable"
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
                raise APIError(
                    422,
                    f"invalid configuration for {name}: {exc.error_count()} problem(s)",
                    details=validation_details(exc),
                ) from None
            old = self._current_config(name, cls)
            new_json = config.model_dump(mode="json")
            old_json = old.model_dump(mode="json") if old is not None else {}
            for key in FILE_ONLY_KEYS:
                if key in body and key != "use" and new_json.get(key) != old_json.get(key):
                    raise self._file_only(name, key)
            self._check_same_kind(name, cls, config, old, body)
            self.settings.generators[name] = merged
            # Only what the API may change is persisted: config.toml keeps the rest.
            self.runtime.generators[name] = {
                k: v for k, v in merged.items() if k not in FILE_ONLY_KEYS
            }
            self.runtime.save()
        applied = self._reset_generator(name, cls, config)
        log.info("generator_config_changed", generator=name, applied=applied)
        return {"generator": name, "config": config.model_dump(mode="json"), "applied": applied}

    @staticmethod
    def _file_only(name: str, key: str) -> APIError:
        return APIError(
            403,
            f"{key} of generator {name} can only be set in the configuration file: it "
            f"chooses code or weights to load; edit [generators.{name}] in config.toml "
            "and restart captiond",
            "forbidden",
        )

    def _current_config(self, name: str, cls: type) -> Any:
        slot = self.models.get(name)
        raw = getattr(slot, "raw", None) if slot is not None else None
        if raw is not None and getattr(raw, "config", None) is not None:
            return raw.config
        try:
            return generator_config(self.settings, name, cls)
        except ValidationError:
            return None

    def _check_same_kind(
        self, name: str, cls: type, config: Any, old: Any, body: dict[str, Any]
    ) -> None:
        """409 when the new settings give the generator another caption type or weight
        class: the slot, its residency policy and sidecar names were built for the old."""
        slot = self.models.get(name)
        raw = getattr(slot, "raw", None) if slot is not None else None
        if raw is None:
            if old is None:
                return
            raw = cls(old)
        new = cls(config)  # constructors only keep the config: nothing is loaded
        before = (raw.caption_type, WeightClass(raw.weight))
        after = (new.caption_type, WeightClass(new.weight))
        if before == after:
            return
        keys = ", ".join(sorted(body)) or "these settings"
        raise APIError(
            409,
            f"restart required: changing {keys} changes the caption type/weight of {name} "
            f"({before[0]}/{before[1].value} -> {after[0]}/{after[1].value}); set it in "
            "config.toml and restart captiond",
            "conflict",
        )

    def _reset_generator(self, name: str, cls: type, config: Any) -> bool:
        """Give the slot's generator the new config between batches, unloaded: it is
        loaded again on its next job. True once swapped (False: applies after the batch
        running now)."""
        slot = self.models.get(name)
        if slot is None or slot.generator is None:
            return True  # not in use: the next start builds it with the new config
        done = threading.Event()

        def swap() -> None:
            # Unloaded first (after any running generate()), so the next load() reads the
            # new settings; a failed load is retried at once (the config may be the fix).
            # A ModelSlot.reconfigure() in daemon/models.py would be the better home.
            slot.unload()
            raw = getattr(slot, "raw", None) or slot.generator
            raw.config = config
            shadow = getattr(raw, "_shadow", None)  # a child-process proxy's local copy
            if shadow is not None:
                shadow.config = config
            if slot.state is ModelState.FAILED:
                slot.next_retry_at = 0.0
            done.set()

        if not self.worker.alive:
            swap()
            return True
        self.worker.call_soon(swap)
        return done.wait(10.0)

    # -- post-processing -----------------------------------------------------------------

    def postprocess(self) -> dict[str, Any]:
        pp = self.settings.postprocess
        return {
            "steps": list(pp.steps),
            "case": pp.case,
            "overrides": {k: list(v) for k, v in pp.overrides.items()},
            "available_steps": sorted(STEPS),
        }

    def set_postprocess(self, update: PostProcessUpdate) -> dict[str, Any]:
        with self._lock:
            merged = self.settings.postprocess.model_dump() | update.model_dump(exclude_none=True)
            try:
                pp = PostProcessConfig.model_validate(merged)
            except ValidationError as exc:
                raise APIError(
                    422, "invalid post-processing settings", details=validation_details(exc)
                ) from None
            self.settings.postprocess = pp
            self.worker.set_postprocess(pp)
            self.runtime.postprocess = pp.model_dump()
            self.runtime.save()
        return self.postprocess()

    # -- queue control -------------------------------------------------------------------

    def _apply_pause(self) -> None:
        self.worker.paused = self.runtime.paused
        self.worker.paused_roots = frozenset(
            str(self._watch(n).path) for n in self.runtime.paused_roots
        )
        self.worker.wake()

    def queue_state(self) -> dict[str, Any]:
        by_root = {}
        for w in self.watches:
            root = str(w.path).rstrip("/")
            rows = self.queue.db.conn.execute(
                "SELECT state, count(*) FROM jobs WHERE path >= ? AND path < ? GROUP BY state",
                (root + "/", root + "0"),
            ).fetchall()
            by_root[w.name] = dict(rows)
        return {
            "paused": self.worker.paused,
            "paused_roots": list(self.runtime.paused_roots),
            "totals": self.daemon._queue_totals(),
            "by_root": by_root,
        }

    def pause(self, root: str | None) -> dict[str, Any]:
        with self._lock:
            if root is None:
                self.runtime.paused = True
            else:
                name = self._watch(root).name
                if name not in self.runtime.paused_roots:
                    self.runtime.paused_roots.append(name)
            self.runtime.save()
            self._apply_pause()
        log.info("queue_paused", root=root or "all")
        return self.queue_state()

    def resume(self, root: str | None) -> dict[str, Any]:
        with self._lock:
            if root is None:
                self.runtime.paused = False
                self.runtime.paused_roots = []
            else:
                name = self._watch(root).name
                self.runtime.paused_roots = [r for r in self.runtime.paused_roots if r != name]
            self.runtime.save()
            self._apply_pause()
        log.info("queue_resumed", root=root or "all")
        return self.queue_state()

    def rescan(self, root: str | None, recaption: bool) -> dict[str, Any]:
        watches = self.watches if root is None else [self._watch(root)]
        enqueued = 0
        for w in watches:
            self.scans.request(ScanRequest(w.name, None, PRIORITY_NEW, "api rescan"))
            if recaption:
                enqueued += self._recaption_ours(w)
        if enqueued:
            self.worker.wake()
        return {"roots": [w.name for w in watches], "recaption_enqueued": enqueued}

    def _recaption_ours(self, watch: WatchConfig) -> int:
        """Queue every image whose sidecar captiond wrote and nobody edited since. The
        worker checks again before it writes (an edit made meanwhile is left alone)."""
        root = str(watch.path).rstrip("/")
        rows = self.index.db.conn.execute(
            "SELECT image_path, generator, sidecar_path, sidecar_hash, prev_hash "
            "FROM captions WHERE image_path >= ? AND image_path < ?",
            (root + "/", root + "0"),
        ).fetchall()
        items = []
        for image, gen, sidecar, digest, prev in rows:
            if gen not in watch.generators or not os.path.isfile(image):
                continue
            try:
                current = sidecar_hash(Path(sidecar).read_bytes())
            except OSError:
                continue
            if current in (digest, prev):
                items.append((image, gen, PRIORITY_BACKFILL + watch.priority))
        return self.queue.enqueue_many(items)

    def retry(self, root: str | None, generator: str | None, states: list[str]) -> int:
        prefix = str(self._watch(root).path) if root else None
        n = self.queue.retry(states, generator=generator, prefix=prefix)
        if n:
            self.worker.wake()
        return n

    def purge(self, root: str | None, generator: str | None, states: list[str]) -> int:
        prefix = str(self._watch(root).path) if root else None
        return self.queue.purge(states, generator=generator, prefix=prefix)
