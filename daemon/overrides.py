"""Settings changed through the API, persisted in the state directory.

One JSON file (``[api].settings_file``, default ``<state_dir>/runtime-settings.json``)
holds what the API changed: recognised caption types, generator config overrides,
the post-processing chain, paused roots. It is applied over ``config.toml`` at start,
so a change survives a restart; delete the file to return to the configuration file.
Written atomically (temp file, fsync, rename). An unreadable file is moved aside with
a warning, never silently overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_CAPTION_TYPES = ["caption", "florence", "tags", "txt", "wd"]


@dataclass
class RuntimeSettings:
    caption_types: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTION_TYPES))
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)
    postprocess: dict[str, Any] | None = None
    paused: bool = False
    paused_roots: list[str] = field(default_factory=list)

    path: Path | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> RuntimeSettings:
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path=path)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            out = cls(
                caption_types=[str(t) for t in data.get("caption_types", DEFAULT_CAPTION_TYPES)],
                generators={str(k): dict(v) for k, v in (data.get("generators") or {}).items()},
                postprocess=data.get("postprocess"),
                paused=bool(data.get("paused", False)),
                paused_roots=[str(r) for r in data.get("paused_roots", [])],
                path=path,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            aside = path.with_name(f"{path.name}.invalid-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.warning(
                "runtime_settings_invalid", path=str(path), moved_to=str(aside), error=str(exc)
            )
            return cls(path=path)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "caption_types": list(self.caption_types),
            "generators": {k: dict(v) for k, v in self.generators.items()},
            "postprocess": self.postprocess,
            "paused": self.paused,
            "paused_roots": list(self.paused_roots),
        }

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            data = (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
