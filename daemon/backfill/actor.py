"""The Ray actor: the generator loaded once, the caption pipeline's read, decode and
generate stages on this node, no side effect on the dataset.

:class:`CaptionActor` is a plain class (no Ray import): called on a batch of rows
(``{"job", "root", "rel"}`` columns) it returns, per image, the raw caption with the
content hash, owner and size the driver records, or the error classified as the daemon
classifies it. Per-image errors never escape: one bad image never fails Ray's dataset.
:class:`FedCaptionActor` is what Ray Data runs: its rows are tokens, each exchanged
for a chunk of rows at the driver's feeder (:mod:`.feeder`).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import structlog
from PIL import Image

from daemon.backfill.spec import (
    WAITING,
    PathMap,
    Row,
    error_result,
    local_facts,
    map_path,
    ok_result,
    version_problem,
)
from daemon.conditions import condition_of
from daemon.config import PostProcessConfig, WatchConfig
from daemon.confined import ConfinementError, Root
from daemon.errors import CaptionError, DependencyPendingError, ErrorType
from daemon.hashing import bytes_match
from daemon.pipeline.caption import CaptionPipeline, ImageTask
from daemon.watch.mounts import fs_type, is_network_fs

log = structlog.get_logger(__name__)

START_ATTEMPTS = 3  # loads of the generator in one actor before it gives up
START_BACKOFF_SECONDS = 1.0


class ActorStartError(CaptionError):
    """An actor could not start on its node (message names the node and the cause)."""

    error_type = ErrorType.MODEL_UNAVAILABLE
    retryable = False


class _NoIndex:
    """Actors never plan or finish (the driver does, with the index): using it is a bug."""

    def _refuse(self, *a: Any, **k: Any) -> Any:
        raise RuntimeError("a backfill actor has no index: plan() and finish() run in the driver")

    get_captions = caption_by_sidecar = record_captions = record_images = _refuse


def node_identity() -> tuple[str, set[str], bool]:
    """(label for messages, names this node answers to, whether it is the driver's node
    -- filled in by the caller from the spec)."""
    host = socket.gethostname()
    names = {host}
    label = host
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            names.add(ctx.get_node_id())
            ip = ray.util.get_node_ip_address()
            names.add(ip)
            label = f"{host} ({ip})"
    except Exception:  # not under Ray (unit tests, the inline executor)
        pass
    return label, names, False


def _generator_class(ref: str) -> type:
    module, _, qual = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


class CaptionActor:
    """Loads the generator once; captions rows of the spec's roots (see the module doc).

    ``spec`` (built by the driver, JSON-able): ``generator``, ``cls`` (module:Class),
    ``config``, ``cache_dir``, ``roots`` (each ``{"path", "watch"}`` as the daemon's host
    sees it), ``path_maps``, ``driver_node``, ``max_image_pixels``, ``batch_size``,
    ``cpus``, ``expect`` (the driver's :func:`~daemon.backfill.spec.local_facts`),
    ``start_attempts``; ``test`` holds test-only hooks.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        label, names, _ = node_identity()
        self.node = label
        self.actor_id = f"{label}/{os.getpid()}"
        self.images = 0
        try:
            self._start(spec, names)
        except ActorStartError:
            raise
        except Exception as exc:
            raise ActorStartError(
                f"backfill actor on node {self.node} could not start: {type(exc).__name__}: {exc}"
            ) from exc

    def _start(self, spec: dict[str, Any], names: set[str]) -> None:
        who = f"backfill actor on node {self.node}"
        if problem := version_problem(spec["expect"], local_facts(), who):
            raise ActorStartError(problem)
        on_driver = bool(spec.get("driver_node")) and spec["driver_node"] in names
        maps = [PathMap(src, dst, node) for node, src, dst in spec.get("path_maps", [])]
        self.watches: list[WatchConfig] = []
        self.network: list[bool] = []
        for r in spec["roots"]:
            path = map_path(r["path"], maps, names, driver_node=on_driver)
            self._check_root(path, r["path"])
            self.watches.append(WatchConfig.model_validate(r["watch"] | {"path": path}))
            try:
                self.network.append(is_network_fs(fs_type(path)))
            except OSError:
                self.network.append(False)
        cls = _generator_class(spec["cls"])
        config = cls.config_model(**spec["config"])
        cpus = max(1, int(spec.get("cpus") or 1))
        if "intra_op_threads" in type(config).model_fields and not config.intra_op_threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPUs; onnxruntime does not read it.
            config = config.model_copy(update={"intra_op_threads": cpus})
        cache = spec.get("cache_dir") or ""
        self.generator = cls(config, cache_dir=_usable_dir(cache))
        self.generator.name = spec["generator"]  # a named instance keeps its name
        Image.MAX_IMAGE_PIXELS = spec["max_image_pixels"]
        self.pipeline = CaptionPipeline(
            self.generator,
            _NoIndex(),
            postprocess=PostProcessConfig(),
            max_image_pixels=spec["max_image_pixels"],
            tags=_row_tags,
        )
        self.batch_size = max(1, int(spec.get("batch_size") or 8))
        attempts = max(1, int(spec.get("start_attempts") or START_ATTEMPTS))
        for attempt in range(1, attempts + 1):
            try:
                self.generator.load()
                break
            except Exception as exc:
                log.warning("backfill_actor_load_failed", attempt=attempt, error=str(exc))
                if attempt == attempts:
                    raise ActorStartError(
                        f"backfill actor on node {self.node} could not load {spec['generator']} "
                        f"after {attempts} attempt{'s' if attempts > 1 else ''}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                time.sleep(START_BACKOFF_SECONDS * attempt)

    def _check_root(self, path: str, seen_as: str) -> None:
        """The root must be there and not an empty mount point on this node."""
        where = path if path == seen_as else f"{path} (the daemon's {seen_as})"
        try:
            fd = Root(path).open()
        except (OSError, ConfinementError) as exc:
            raise ActorStartError(
                f"backfill actor on node {self.node}: cannot open the root {where}: {exc}; "
                "mount the share at the same path or give --path-map FROM=TO"
            ) from None
        try:
            with os.scandir(fd) as it:
                empty = next(it, None) is None
        finally:
            os.close(fd)
        if empty:
            raise ActorStartError(
                f"backfill actor on node {self.node}: the root {where} is empty: is the share "
                "mounted there? (--path-map FROM=TO if it is mounted elsewhere)"
            )

    # -- work ------------------------------------------------------------------------
    def caption(self, rows: Iterable[Row]) -> list[dict[str, Any]]:
        """One result per row, in order (see the module doc)."""
        rows = [(int(j), int(r), str(p), *rest) for j, r, p, *rest in rows]
        out: list[dict[str, Any]] = []
        test = self.spec.get("test") or {}
        while test.get("hold_while") and os.path.exists(test["hold_while"]):
            time.sleep(0.05)  # test hook: hold the chunk (and its leases) for a while
        for start in range(0, len(rows), self.batch_size):
            sub = rows[start : start + self.batch_size]
            try:
                out += self._batch(sub)
            except Exception as exc:  # a bug: fail these images, never the dataset
                log.exception("backfill_actor_batch_failed")
                out += [error_result(j, exc, node=self.node) for j, *_ in sub]
            if test.get("kill_after") is not None and len(out) >= test["kill_after"]:
                _maybe_die(test["marker"])
        return out

    def _batch(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        tasks = []
        for job, root, rel, *tags in rows:
            watch = self.watches[root]
            path = f"{str(watch.path).rstrip('/')}/{rel}"
            tasks.append(ImageTask(path, watch, key=(job, root, tags[0] if tags else None)))
        results: dict[int, dict[str, Any]] = {}
        with self.pipeline.open(tasks) as batch:
            ready = []
            for item in batch.items:
                job, root, _ = item.task.key
                if item.error is None:
                    try:
                        self.pipeline.prepare(item)
                    except Exception as exc:
                        item.error = exc
                if item.error is not None:
                    results[job] = self._failed(job, root, item.error)
                else:
                    ready.append(item)
            if ready:
                raws = self.pipeline.generate([i.value for i in ready])
                for item, raw in zip(ready, raws, strict=True):
                    job, root, _ = item.task.key
                    if isinstance(raw, BaseException):
                        results[job] = self._failed(job, root, raw)
                    else:
                        results[job] = ok_result(job, raw, item.content_hash, item.owner, item.size)
        self.images += len(rows)
        return [results[j] for j, *_ in rows]

    def _failed(self, job: int, root: int, exc: BaseException) -> dict[str, Any]:
        if isinstance(exc, DependencyPendingError):
            return error_result(job, exc, condition=WAITING, node=self.node)
        cond = condition_of(exc, network_fs=self.network[root])
        kind = cond[0] if cond else None
        if kind is None and isinstance(exc, FileNotFoundError):
            try:  # the image is gone, or the whole share is (an unmounted root)
                self._check_root(str(self.watches[root].path), str(self.watches[root].path))
            except ActorStartError:
                kind = "vanished"
        return error_result(job, exc, condition=kind, node=self.node)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A Ray Data batch of rows (``job``, ``root``, ``rel`` columns; no ``{tags}``:
        those rows come through the feeder, :class:`FedCaptionActor`)."""
        rows = list(zip(batch["job"], batch["root"], batch["rel"], strict=True))
        results = self.caption(rows)
        return {
            "job": np.array([r["job"] for r in results], dtype=np.int64),
            "result": np.array([json.dumps(r) for r in results], dtype=object),
        }


class FedCaptionActor(CaptionActor):
    """The actor Ray Data runs: each row is a token, exchanged at the driver's feeder
    for a chunk of rows (the same chunk again when Ray retries the token)."""

    def __init__(self, spec: dict[str, Any], feeder: Any) -> None:
        super().__init__(spec)
        self.feeder = feeder

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        tokens, payloads = [], []
        for token in batch["token"]:
            rows = ray.get(self.feeder.take.remote(int(token)))
            results = self.caption(rows)
            tokens.append(int(token))
            payloads.append(
                json.dumps({"actor": self.actor_id, "node": self.node, "results": results})
            )
        return {
            "token": np.array(tokens, dtype=np.int64),
            "payload": np.array(payloads, dtype=object),
        }


def _row_tags(task: ImageTask, data: bytes, digest: str) -> str:
    """A ``{tags}`` prompt's tags from the row: the tagger's caption, if it was made
    of this content (a person's sidecar the tagger left alone has no hash)."""
    tags = task.key[2]
    if tags is None:
        raise DependencyPendingError("no tags came with the row")
    content, text = tags
    if content is not None and not bytes_match(data, content, current=digest):
        raise DependencyPendingError("the tagger's caption is of other content")
    return str(text)


def _usable_dir(path: str) -> Any:
    """The cache directory if it can be used on this node, else the user's default."""
    from pathlib import Path

    from daemon.backfill.spec import default_cache_dir

    for candidate in (path, default_cache_dir()):
        if not candidate:
            continue
        try:
            Path(candidate).mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return Path(candidate)
        except OSError:
            continue
    return None


def _maybe_die(marker: str) -> None:
    """Test hook: SIGKILL this actor once (whoever renames the marker first)."""
    try:
        os.rename(marker, marker + ".taken")
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
