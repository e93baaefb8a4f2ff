"""VLM generation throughput: one batched generate() vs one image at a time.

Run: ``.venv/bin/python bench/bench_vlm_batch.py [--images 16] [--batch 8] [--tokens 32]``

Builds a random LLaVA of realistic shape for a small CPU (Llama text model hidden 512,
6 layers, 32k vocabulary; CLIP vision tower hidden 256, 4 layers, 224 px, patch 32 ->
49 image tokens; about 50 M parameters) with ``tests/vlmmodels.py``, loads it through
the real ``VLMGenerator`` and times ``prepare()`` + ``generate()`` over the same images
with prompts of different lengths (so left padding is exercised), at a fixed output
length (``min_new_tokens = max_new_tokens``). Greedy, float32, CPU. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpuinfo import cpu_name  # noqa: E402  (bench/ is on sys.path when run)
from PIL import Image  # noqa: E402

from daemon.generators.base import ImageInput  # noqa: E402
from daemon.generators.vlm import VLMConfig, VLMGenerator  # noqa: E402
from tests.vlmmodels import build_llava  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import torch

    folder = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    t0 = time.perf_counter()
    build_llava(
        folder,
        hidden=512,
        layers=6,
        heads=8,
        vision_hidden=256,
        vision_layers=4,
        image_size=224,
        patch=32,
        vocab_size=32000,
    )
    build_s = time.perf_counter() - t0
    gen = VLMGenerator(
        VLMConfig(
            model=str(folder),
            prompt="Describe {name} in one detailed paragraph.",
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
        )
    )
    gen.load()
    params = sum(p.numel() for p in gen._model.parameters())
    inputs = []
    for i in range(args.images):
        img = Image.new("RGB", (640 + 16 * i, 480), (17 * i % 256, 90, 200))
        name = " ".join(["the cat"] * (1 + i % 5))
        inputs.append(ImageInput(Path(f"/b/{i}.jpg"), img, {"name": name, "folder": "b"}))
    items = [gen.prepare(x) for x in inputs]
    gen.generate(items[: args.batch])  # warm-up

    def run(batch: int) -> tuple[float, list[str]]:
        best = float("inf")
        out: list[str] = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = []
            for start in range(0, len(items), batch):
                out += gen.generate(items[start : start + batch])
            best = min(best, time.perf_counter() - t)
        return best, out

    t1, single = run(1)
    tb, batched = run(args.batch)
    result = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "params_m": round(params / 1e6, 1),
        "build_s": round(build_s, 1),
        "images": len(items),
        "new_tokens": args.tokens,
        "single_images_per_s": round(len(items) / t1, 3),
        f"batch{args.batch}_images_per_s": round(len(items) / tb, 3),
        "ratio": round(t1 / tb, 2),
        "batched_equals_single": batched == single,
    }
    print(json.dumps(result, indent=2))
    gen.unload()


if __name__ == "__main__":
    main()
