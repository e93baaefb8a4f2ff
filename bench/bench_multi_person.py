"""multi_person fine_tune_caption: all crops in one batched VLM call vs one call per crop.

Run: ``.venv/bin/python bench/bench_multi_person.py [--repeat 10] [--tokens 32 48]
[--people 1 2 4]``

The same generator, model, prompts and output length (``min_new_tokens =
max_new_tokens``) both ways; only ``describe_batch_size`` differs (0 = every crop of the
image plus its scene in one ``generate()``, 1 = the plan's one call per crop). People
are injected (a fixed detector) so only the describer is timed; the WD tagger is off
(``gender_labels = false``, at most 4 people need no gender anyway: sksA, sksB and
two more would, so the tagger runs identically both ways and is excluded here).

The describer is a random-weight LLaVA built offline by ``tests/vlmmodels.py``, sized
so that one crop costs tens of milliseconds on a small CPU (CLIP 224 px / 16 px
patches = 196 image tokens, 4-layer 256-wide Llama). Random weights: the text is
gibberish, the timing is real.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from daemon.generators.base import ImageInput  # noqa: E402
from daemon.generators.detection import Person  # noqa: E402
from daemon.generators.multi_person import MultiPersonConfig, MultiPersonGenerator  # noqa: E402
from daemon.generators.vlm import VLMConfig  # noqa: E402
from tests.vlmmodels import build_llava  # noqa: E402

BOXES = [(40, 40, 300, 600), (340, 60, 580, 600), (620, 80, 840, 600), (880, 100, 1060, 600)]


class Fixed:
    def __init__(self, people: list[Person]):
        self.people = people

    def detect(self, images):
        return [list(self.people) for _ in images]


def image() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (720, 1100, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def generator(folder: Path, people: int, batch_size: int, tokens: int) -> MultiPersonGenerator:
    cfg = MultiPersonConfig(
        mode="fine_tune_caption",
        gender_labels=False,
        describe_batch_size=batch_size,
        describer=VLMConfig(
            model=str(folder), max_new_tokens=tokens, min_new_tokens=tokens, device="cpu"
        ),
    )
    gen = MultiPersonGenerator(cfg, detector=Fixed([Person(b, 0.9) for b in BOXES[:people]]))
    gen.load()
    return gen


def timed(gen: MultiPersonGenerator, item) -> float:
    t0 = time.perf_counter()
    gen.generate([item])
    return time.perf_counter() - t0


def run(folder: Path, people: int, tokens: int, repeat: int) -> dict:
    """Both ways loaded side by side and timed in alternating pairs (A B, then B A), so
    that the host's drift (this is a shared VM) hits both alike; the speedup is the
    median of the per-pair ratios."""
    batched = generator(folder, people, 0, tokens)
    per_crop = generator(folder, people, 1, tokens)
    item = batched.prepare(ImageInput(Path("x.jpg"), image()))
    for gen in (batched, per_crop):
        gen.generate([item])  # warm-up
    pairs: list[tuple[float, float]] = []
    for i in range(repeat):
        if i % 2:
            p = timed(per_crop, item)
            b = timed(batched, item)
        else:
            b = timed(batched, item)
            p = timed(per_crop, item)
        pairs.append((b, p))
    batched.unload()
    per_crop.unload()
    b_times = [b for b, _ in pairs]
    p_times = [p for _, p in pairs]
    return {
        "people": people,
        "crops": people + 1,
        "batched_s_median": round(statistics.median(b_times), 3),
        "per_crop_s_median": round(statistics.median(p_times), 3),
        "speedup_median_of_pairs": round(statistics.median(p / b for b, p in pairs), 2),
        "speedup_best_vs_best": round(min(p_times) / min(b_times), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10, help="timed pairs per row")
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[32, 48],
        help="output lengths (new tokens per crop); 48 ~ the 35-word cap of a description",
    )
    ap.add_argument("--people", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_llava(
            Path(tmp) / "llava",
            hidden=256,
            layers=4,
            heads=8,
            vision_hidden=128,
            vision_layers=4,
            image_size=224,
            patch=16,
        )
        for tokens in args.tokens:
            for people in args.people:
                row = {"tokens": tokens, **run(folder, people, tokens, args.repeat)}
                print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                f"torch {torch.__version__}, threads {torch.get_num_threads()}",
                "pairs": args.repeat,
                "load_avg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
