"""Test generators for residency: importable by module path, so that a child process
started with the "spawn" context can instantiate them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from daemon.generators.base import ImageInput, WeightClass
from tests.fakegen import EchoGenerator, crash_if_marked


class HeavyEcho(EchoGenerator):
    """EchoGenerator that counts its loads and can be slow or refuse to load."""

    name = "heavy_echo"
    weight = WeightClass.HEAVY
    loads: ClassVar[int] = 0
    load_delay: ClassVar[float] = 0.0
    fail_loads: ClassVar[bool] = False
    _count_lock = threading.Lock()

    def load(self) -> None:
        with self._count_lock:
            type(self).loads += 1
        time.sleep(self.load_delay)
        if type(self).fail_loads:
            raise RuntimeError("weights are corrupt")
        super().load()


class CrashingGenerator(EchoGenerator):
    """Heavy; aborts its process (os.abort) when it captions an image named *CRASH*."""

    name = "crashy"
    weight = WeightClass.HEAVY

    def prepare(self, item: ImageInput) -> Any:
        return (item.path.name, item.image.size, os.getpid())

    def generate(self, batch: Sequence[Any]) -> list[str]:
        for name, _, _ in batch:
            crash_if_marked(name)
        return [f"{self.config.word} {name} pid{pid}" for name, _, pid in batch]


class BigGenerator(EchoGenerator):
    """Heavy; holds 64 MB while loaded (its footprint is measured at load)."""

    name = "big"
    weight = WeightClass.HEAVY

    def load(self) -> None:
        self._blob = bytearray(64 * 1024 * 1024)
        self._blob[::4096] = b"\x01" * len(self._blob[::4096])  # touch every page
        super().load()

    def unload(self) -> None:
        self._blob = None
        super().unload()


class ProgressGenerator(EchoGenerator):
    """Heavy; its load() "downloads" 10 MB through huggingface_hub's progress bar and
    holds at 40% until ``release`` is set."""

    name = "downloading"
    weight = WeightClass.HEAVY
    release = threading.Event()

    def load(self) -> None:
        from huggingface_hub.utils import tqdm

        bar = tqdm(total=10_000_000, unit="B", unit_scale=True, desc="model.safetensors")
        for _ in range(4):
            bar.update(1_000_000)
            time.sleep(0.15)
        self.release.wait(20)
        bar.update(6_000_000)
        bar.close()
        super().load()
