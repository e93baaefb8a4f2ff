"""Memory given back after unloading a model: in-process vs a child process.

Run: ``.venv/bin/python bench/bench_unload.py [--width 3200 --layers 10 --cycles 3]``

The model is a plain torch ``nn.Module`` of fp32 Linear layers (10 x 3200x3200 =
102 M parameters, 410 MB), saved once to ``bench/.data/`` and loaded the way real
generators load weights: ``import torch`` inside ``load()``, the module built on the
meta device, ``torch.load`` + ``load_state_dict(assign=True)``, one forward pass in
``generate()``. It goes through the daemon's own ``ModelManager`` (a heavy
generator), so the unload path measured is the daemon's (``gc.collect()`` and
``malloc_trim`` after an in-process unload; child exit when isolated).

Each case runs in a fresh interpreter that first imports ``daemon.app`` (the daemon's
own baseline). RSS (``VmRSS``) of the daemon process before the first load, loaded,
after unload, for ``--cycles`` load/unload cycles; for the child process case also
the child's RSS while loaded. Target: after unload within 10% of before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from cpuinfo import cpu_name  # noqa: E402  (bench/ is on sys.path when run)

from daemon.generators.base import Generator, GeneratorConfig, WeightClass  # noqa: E402

DATA = HERE / ".data"


class BlobConfig(GeneratorConfig):
    weights: str = ""
    width: int = 3200
    layers: int = 10


def _build(width: int, layers: int) -> Any:
    from torch import nn

    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


class TorchBlob(Generator):
    """A heavy generator whose "model" is a few hundred MB of fp32 weights."""

    name = "torch_blob"
    caption_type = "caption"
    description = "bench: torch Linear stack"
    version = "1"
    weight = WeightClass.HEAVY
    config_model: ClassVar = BlobConfig

    def __init__(self, config=None, *, cache_dir=None):
        super().__init__(config, cache_dir=cache_dir)
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
        with torch.device("meta"):
            model = _build(self.config.width, self.config.layers)
        state = torch.load(self.config.weights, weights_only=True)
        model.load_state_dict(state, assign=True)
        self._model = model.eval()

    def unload(self) -> None:
        self._model = None

    def prepare(self, item: Any) -> Any:
        return item.image.size

    def generate(self, batch: Sequence[Any]) -> list[str]:
        import torch

        x = torch.ones(len(batch), self.config.width)
        with torch.inference_mode():
            y = self._model(x)
        return [f"{float(v):.3f}" for v in y.sum(dim=1)]


def rss(pid: int | None = None) -> float:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def weights_file(width: int, layers: int) -> Path:
    path = DATA / f"blob-{layers}x{width}.pt"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys, torch; sys.path[:0] = sys.argv[1:3]; import bench_unload as b; "
            f"torch.save(b._build({width}, {layers}).state_dict(), sys.argv[3])"
        )
        subprocess.run([sys.executable, "-c", code, str(HERE), str(ROOT), str(path)], check=True)
    return path


def run_case(isolate: bool, weights: Path, width: int, layers: int, cycles: int) -> dict:
    """In this (fresh) process: the daemon's manager loads and unloads the model."""
    import structlog
    from PIL import Image

    import daemon.app  # noqa: F401  - the daemon's own imports are the baseline
    from daemon.config import ResidencyConfig
    from daemon.generators.base import ImageInput
    from daemon.generators.registry import Discovered
    from daemon.residency.manager import ModelManager

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    cfg = BlobConfig(weights=str(weights), width=width, layers=layers)
    m = ModelManager.build(
        ["torch_blob"],
        {"torch_blob": Discovered("torch_blob", TorchBlob)},
        lambda name, cls: cfg,
        residency=ResidencyConfig(isolate_heavy=isolate),
    )
    slot = m.get("torch_blob")
    assert slot is not None and slot.generator is not None
    item = ImageInput(Path("x.png"), Image.new("RGB", (8, 8)))
    out: dict[str, Any] = {"before": rss(), "cycles": []}
    for _ in range(cycles):
        t = time.perf_counter()
        assert slot.ensure_loaded(wait=True), slot.status()
        load_s = time.perf_counter() - t
        slot.generator.generate([slot.generator.prepare(item)] * 4)
        loaded = rss()
        child = rss(slot.raw.pid) if isolate else None
        t = time.perf_counter()
        m.unload("torch_blob")
        unload_s = time.perf_counter() - t
        time.sleep(0.5)
        out["cycles"].append(
            {
                "loaded": loaded,
                "child_loaded": child,
                "after": rss(),
                "load_s": load_s,
                "unload_s": unload_s,
            }
        )
    return out


def machine() -> str:
    model = cpu_name()
    import torch

    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return (
        f"{os.cpu_count()} cores, {model}, {int(mem) // 1024} MB RAM, no GPU used, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def table(name: str, r: dict) -> list[str]:
    before = r["before"]
    rows = []
    for i, c in enumerate(r["cycles"], 1):
        child = "" if c["child_loaded"] is None else f"{c['child_loaded']:.0f}"
        over = 100.0 * (c["after"] - before) / before
        rows.append(
            f"| {name} | {i} | {before:.0f} | {c['loaded']:.0f} | {child} | {c['after']:.0f} "
            f"| {over:+.0f}% | {c['load_s']:.1f} | {c['unload_s']:.2f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=3200)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--case", choices=["inproc", "child"])
    args = ap.parse_args()
    weights = weights_file(args.width, args.layers)
    if args.case:
        r = run_case(args.case == "child", weights, args.width, args.layers, args.cycles)
        print(json.dumps(r))
        return
    size_mb = weights.stat().st_size / 1e6
    results = {}
    for case in ("inproc", "child"):
        cmd = [sys.executable, __file__, "--case", case, "--width", str(args.width)]
        cmd += ["--layers", str(args.layers), "--cycles", str(args.cycles)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[case] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"Machine: {machine()}")
    print(f"Model: {args.layers} x Linear({args.width}, {args.width}) fp32, {size_mb:.0f} MB")
    print()
    print(
        "| case | cycle | daemon RSS before (MB) | loaded | child RSS loaded | after unload "
        "| after vs before | load s | unload s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for line in table("in-process", results["inproc"]) + table("child process", results["child"]):
        print(line)


if __name__ == "__main__":
    main()
