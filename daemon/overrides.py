"""Settings changed through the API, persisted in the state directory as an overlay on
``config.toml``.

One JSON file (``[api].settings_file``, default ``<state_dir>/runtime-settings.json``)
holds only what was changed through the API: recognised caption types, generator keys,
post-processing keys, paused roots. It is applied over the configuration file at every
start (:func:`apply_overrides`, which logs each overridden key), so a change survives a
restart, while keys nobody changed through the API keep following ``config.toml``.
``captiond config reset`` drops overrides. Written atomically; an unreadable file is
moved aside with a warning, never silently overwritten.
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
from pydantic import ValidationError

from daemon.config import PostProcessConfig, Settings, discover_generators
from daemon.confined import Folder

log = structlog.get_logger(__name__)

DEFAULT_CAPTION_TYPES = ["caption", "florence", "tags", "txt", "wd"]

# Settings that choose code, weights or where requests go (a model folder or repository
# may carry Python code or pickles; .pt detectors are torch pickles; a remote server
# receives the images): config.toml only, never the API, which admin-group members and
# TCP token holders may use.
FILE_ONLY_KEYS = (
    "model",
    "revision",
    "trust_remote_code",
    "detector_model",
    "tagger",
    "describer",
    "use",
    "base_url",
    "api_key_file",
    "api_key_env",
)


@dataclass
class Overrides:
    caption_types: list[str] = field(default_factory=lambda: list(DEFAULT_CAPTION_TYPES))
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)
    postprocess: dict[str, Any] | None = None
    paused: bool = False
    paused_roots: list[str] = field(default_factory=list)

    path: Path | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> Overrides:
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
            "generators": {k: dict(v) for k, v in self.generators.items() if v},
            "postprocess": self.postprocess or None,
            "paused": self.paused,
            "paused_roots": list(self.paused_roots),
        }

    def active(self) -> dict[str, list[str]]:
        """What overrides the configuration file: section -> keys."""
        out = {f"generators.{g}": sorted(t) for g, t in self.generators.items() if t}
        if self.postprocess:
            out["postprocess"] = sorted(self.postprocess)
        if sorted(self.caption_types) != sorted(DEFAULT_CAPTION_TYPES):
            out["caption_types"] = sorted(self.caption_types)
        if self.paused:
            out["paused"] = ["all"]
        if self.paused_roots:
            out["paused_roots"] = list(self.paused_roots)
        return out

    def reset(self, generator: str | None = None, key: str | None = None) -> list[str]:
        """Drop overrides: all (no argument), one generator's, or one key of it. Returns
        what was dropped (``generators.NAME.KEY``...)."""
        dropped: list[str] = []
        if generator is None:
            dropped = [f"{s}.{k}" for s, keys in self.active().items() for k in keys]
            self.generators.clear()
            self.postprocess = None
            self.caption_types = list(DEFAULT_CAPTION_TYPES)
            self.paused, self.paused_roots = False, []
            return dropped
        if generator == "postprocess":
            table = self.postprocess or {}
        else:
            table = self.generators.get(generator, {})
        keys = [key] if key is not None else sorted(table)
        section = "postprocess" if generator == "postprocess" else f"generators.{generator}"
        for k in keys:
            if k in table:
                del table[k]
                dropped.append(f"{section}.{k}")
        return dropped

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()
            with Folder.at(self.path.parent) as folder:
                folder.write_atomic(self.path.name, data, mode=0o640)


def apply_overrides(settings: Settings, overrides: Overrides) -> list[str]:
    """Put persisted API changes over the configuration file, before the parts are
    built, and log each overridden key with the file it comes from. Entries that no
    longer validate are skipped with a warning (returned)."""
    warnings = []
    known = discover_generators(settings)
    where = str(overrides.path)
    for name, table in overrides.generators.items():
        if not table:
            continue
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
        log.info(
            "settings_overridden", section=f"generators.{name}", keys=sorted(table), file=where
        )
    if overrides.postprocess:
        try:
            merged_pp = settings.postprocess.model_dump() | overrides.postprocess
            settings.postprocess = PostProcessConfig.model_validate(merged_pp)
            log.info(
                "settings_overridden",
                section="postprocess",
                keys=sorted(overrides.postprocess),
                file=where,
            )
        except ValidationError as exc:
            warnings.append(f"runtime post-processing settings ignored: {exc}")
    for w in warnings:
        log.warning("runtime_settings_skipped", reason=w)
    return warnings
