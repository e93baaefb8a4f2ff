"""remote_vlm throughput against an OpenAI-compatible server with a fixed answer time.

Run: ``.venv/bin/python bench/bench_remote_vlm.py [--delay 0.2] [--seconds 2] [--repeat 3]``

Starts ``tests/openai_server.py`` in its own process (answers every chat completion
after ``--delay`` seconds, without decoding the image), loads the real
``RemoteVLMGenerator`` and measures, in the same run:

- the encoding cost per image: ``prepare()`` (RGB, shrink to ``max_image_side`` 1024,
  JPEG quality 90, base64 data URL) of camera-sized images (3000 x 2000, textured so
  that JPEG has work to do), one thread;
  and of 1536 x 1024 images (what JPEG draft decoding leaves of a 3072 x 2048 JPEG);
- images/s of ``generate()`` at concurrency 1, 4 and 16, in batches of what the worker
  claims (``max(worker.batch_size 8, preferred_batch_size)``), over about ``--seconds``
  of ideal time per run; best of ``--repeat`` runs. Ideal: ``concurrency / delay``.

Prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from cpuinfo import cpu_name  # noqa: E402  (bench/ is on sys.path when run)
from PIL import Image  # noqa: E402

from daemon.generators.base import ImageInput  # noqa: E402
from daemon.generators.remote_vlm import RemoteVLMConfig, RemoteVLMGenerator  # noqa: E402

WORKER_BATCH = 8  # worker.batch_size's default


def photo(seed: int, size: tuple[int, int] = (3000, 2000)) -> Image.Image:
    """Gradients plus noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    base = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    noise = rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def start_server(delay: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--delay", str(delay)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--seconds", type=float, default=2.0, help="ideal time per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=8, help="distinct source images")
    args = ap.parse_args()

    proc, url = start_server(args.delay)
    try:
        sources = [photo(i) for i in range(args.distinct)]
        drafts = [photo(100 + i, (1536, 1024)) for i in range(args.distinct)]
        results = []
        encode_ms: list[float] = []
        draft_ms: list[float] = []
        for concurrency in (1, 4, 16):
            gen = RemoteVLMGenerator(
                RemoteVLMConfig(base_url=url, model="test-vlm", concurrency=concurrency)
            )
            gen.load()
            n = max(WORKER_BATCH, round(args.seconds * concurrency / args.delay))
            t0 = time.perf_counter()
            items = [
                gen.prepare(ImageInput(Path(f"{i}.jpg"), sources[i % len(sources)], {}))
                for i in range(n)
            ]
            encode_ms.append((time.perf_counter() - t0) * 1000 / n)
            kb = sum(len(it.data_url) for it in items) / n / 1024
            t0 = time.perf_counter()
            for src in drafts:
                gen.prepare(ImageInput(Path("d.jpg"), src, {}))
            draft_ms.append((time.perf_counter() - t0) * 1000 / len(drafts))
            batch = max(WORKER_BATCH, gen.preferred_batch_size or 0)
            best = 0.0
            for _ in range(args.repeat):
                fresh = [dataclasses.replace(it, answer=None, error=None) for it in items]
                t0 = time.perf_counter()
                for start in range(0, n, batch):
                    gen.generate(fresh[start : start + batch])
                best = max(best, n / (time.perf_counter() - t0))
            gen.unload()
            ideal = concurrency / args.delay
            results.append((concurrency, n, batch, best, ideal, kb))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)

    print(f"Machine: {os.cpu_count()} cores, {cpu_name()}, Python {platform.python_version()}")
    print(f"Load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"Answer time {args.delay * 1000:.0f} ms; best of {args.repeat} runs.\n")
    print("| concurrency | images | batch | images/s | ideal | of ideal |")
    print("|---|---|---|---|---|---|")
    for concurrency, n, batch, best, ideal, _ in results:
        print(f"| {concurrency} | {n} | {batch} | {best:.1f} | {ideal:.1f} | {best / ideal:.2f} |")
    for label, values in (("3000x2000", encode_ms), ("1536x1024", draft_ms)):
        med = sorted(values)[len(values) // 2]
        print(
            f"\nEncoding (prepare: {label} -> 1024 px JPEG q90 + base64), one thread: "
            f"{med:.1f} ms/image (median of {', '.join(f'{e:.1f}' for e in values)})"
        )
    print(f"\n{results[0][5]:.0f} KB per data URL")


if __name__ == "__main__":
    main()
