"""A heavy model inside the daemon, end to end: a tiny random LLaVA (tests/vlmmodels.py)
as [generators.vlm], run in its own model process (residency.isolate_heavy), loaded
lazily by the first job, its caption written, unloaded when idle for keep_alive; the
daemon's memory is back where it was (VmRSS within 10%), because the model, torch and
transformers lived and died in the child."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess, make_image, rss_kib, wait_for
from tests.deps import require

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEEP_ALIVE = 1.0


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("torch", "the vlm extra")
    require("transformers", "the vlm extra")
    from tests.vlmmodels import build_llava

    return build_llava(tmp_path_factory.mktemp("llava"))


def expected(model: Path, image: Path) -> str:
    from PIL import Image

    from daemon.generators.base import ImageInput
    from daemon.generators.vlm import VLMConfig, VLMGenerator

    gen = VLMGenerator(VLMConfig(model=str(model), max_new_tokens=8, min_new_tokens=8))
    gen.load()
    try:
        with Image.open(image) as img:
            item = ImageInput(image, img.convert("RGB"), {"name": image.stem, "folder": "data"})
            return gen.generate([gen.prepare(item)])[0] + "\n"
    finally:
        gen.unload()


def test_heavy_model_in_a_child_lazy_load_caption_unload_memory_back(
    tmp_path: Path, wd_model_dir: Path, tiny_llava: Path
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        watch={"generators": ["vlm"]},
        sections={
            "generators.vlm": {
                "model": str(tiny_llava),
                "max_new_tokens": 8,
                "min_new_tokens": 8,
                "device": "cpu",
            },
            "residency": {"keep_alive": KEEP_ALIVE},
            "postprocess": {"steps": []},  # the model's own words, to compare below
            "worker": {"batch_size": 2, "preload": [], "load_retry_seconds": 0.5},
        },
    ).start()
    try:
        wait_for(d.idle)
        pid = d.proc.pid
        vlm = d.status()["generators"]["vlm"]
        assert (vlm["state"], vlm["loads"], vlm["weight"], vlm["isolated"]) == (
            "unloaded",
            0,
            "heavy",
            True,
        )
        before = rss_kib(pid)

        make_image(root / "a.png", "red")  # the first job loads the model (lazily)
        make_image(root / "b.png", "blue")
        wait_for(lambda: len(list(root.glob("*.txt"))) == 2, timeout=120)
        loaded = d.events("model_loaded")
        assert [e["generator"] for e in loaded] == ["vlm"]
        child = loaded[0]["pid"]
        assert child and child != pid  # in its own process
        for name in ("a", "b"):  # what the same model says here, in this process
            assert (root / f"{name}.txt").read_text() == expected(tiny_llava, root / f"{name}.png")
        assert d.status()["queue"]["outcomes"]["vlm"] == {"written": 2}

        # idle for keep_alive: unloaded, and its process is gone
        wait_for(lambda: d.status()["generators"]["vlm"]["state"] == "unloaded", timeout=30)
        vlm = d.status()["generators"]["vlm"]
        assert (vlm["loads"], vlm["unloads"], vlm["last_unload"]) == (1, 1, "idle")
        wait_for(lambda: not os.path.exists(f"/proc/{child}"))
        after = rss_kib(pid)
        assert abs(after - before) <= 0.10 * before, (before, after)
        assert "torch" not in (Path(f"/proc/{pid}/maps").read_text())  # never in the daemon
    finally:
        d.stop()
