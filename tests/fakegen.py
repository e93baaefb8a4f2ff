"""Small generators for tests: deterministic, model-free."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from daemon.errors import OutOfMemoryError
from daemon.generators.base import Generator, GeneratorConfig, ImageInput, WeightClass


class _Modelless(Generator):
    """Loaded and unloaded by a flag: there are no weights."""

    def __init__(self, config=None, *, cache_dir=None):
        super().__init__(config, cache_dir=cache_dir)
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False


class EchoConfig(GeneratorConfig):
    word: str = "echo"
    oom_above: int = 0  # raise out-of-memory for batches larger than this (0 = never)
    fail_on: str = ""  # raise for images whose name contains this


class EchoGenerator(_Modelless):
    """Captions each image with its size and dominant channel."""

    name = "echo"
    caption_type = "caption"
    description = "test generator"
    version = "1"
    config_model: ClassVar = EchoConfig
    batches: ClassVar[list[int]] = []

    def prepare(self, item: ImageInput) -> Any:
        return (item.path.name, item.image.size)

    def generate(self, batch: Sequence[Any]) -> list[str]:
        cfg = self.config
        EchoGenerator.batches.append(len(batch))
        if cfg.oom_above and len(batch) > cfg.oom_above:
            raise OutOfMemoryError(f"batch of {len(batch)} does not fit")
        if cfg.fail_on and any(cfg.fail_on in name for name, _ in batch):
            raise RuntimeError("poisoned batch")
        return [f"{cfg.word} {name} {w}x{h}" for name, (w, h) in batch]


def crash_if_marked(name: str) -> None:
    if "CRASH" in name:
        os.abort()


class TagEchoGenerator(EchoGenerator):
    """A prose generator whose prompt uses {tags}: it echoes them."""

    name = "tagecho"
    caption_type = "caption"

    @property
    def context_keys(self) -> frozenset[str]:
        return frozenset({"tags"})

    def prepare(self, item: ImageInput) -> Any:
        return item.context["tags"]

    def generate(self, batch: Sequence[Any]) -> list[str]:
        return [f"an image with {tags}" for tags in batch]


class HeavyTagEchoGenerator(TagEchoGenerator):
    """TagEcho weighed as a heavy model (a child process, loaded only for work)."""

    weight = WeightClass.HEAVY


class BlockConfig(EchoConfig):
    gate: str = ""  # generate() blocks while this file exists
    started: str = ""  # touched when generate() is entered


class BlockingGenerator(EchoGenerator):
    """Light (runs on the daemon's worker thread); its generate() blocks while the
    ``gate`` file exists: a wedged model, controlled from a test in another process."""

    name = "blocking"
    config_model: ClassVar = BlockConfig

    def generate(self, batch: Sequence[Any]) -> list[str]:
        cfg = self.config
        if cfg.started:
            Path(cfg.started).touch()
        while cfg.gate and os.path.exists(cfg.gate):
            time.sleep(0.02)
        return super().generate(batch)


class NullConfig(GeneratorConfig):
    caption: str = "1girl, solo, simple background"


class NullGenerator(_Modelless):
    """A fixed caption without looking at the pixels: what is left of a run is
    captiond's own cost per image (issue 19; bench/bench_overhead.py)."""

    name = "null"
    caption_type = "tags"
    description = "test generator: a fixed caption"
    version = "1"
    config_model: ClassVar = NullConfig

    def prepare(self, item: ImageInput) -> Any:
        return None

    def generate(self, batch: Sequence[Any]) -> list[str]:
        return [self.config.caption] * len(batch)
