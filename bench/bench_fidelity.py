"""WD tagger preprocessing fidelity and its speed: what the model sees, against the
reference preprocessing, on a realistic mix of images, for the old and new decode rules.

Run: ``.venv/bin/python bench/bench_fidelity.py [--rounds 7] [--json FILE]``

Workload (generated once into ``bench/.data/fidelity``): camera JPEGs (12, 18 and 24
MP, landscape and portrait, quality 92), web-sized JPEGs and PNGs, with two kinds of
content: ``tests/textures.camera_photo`` (sensor noise, texture at every scale, fine
lines and gratings, sharp objects) and ``bench_tagging._photo_like`` (smooth gradients
and blobs with mild noise).

Reference (``/work/shared/reference/wd-tagger.md``, the SmilingWolf space): full decode,
alpha onto white, pad to a centred white square, BICUBIC to 448, RGB -> BGR.

Rules, each = ``decode_image`` (JPEG draft) + preprocessing to the 448x448 model input:

- ``before``: the code before issue 10: JPEG drafted down to the model size
  (``draft_gap=1``) and the old preprocessing (``reducing_gap=2`` pre-shrink, border rows
  left white), copied below as :func:`preprocess_before`;
- ``old_draft``: ``draft_gap=1`` with today's :func:`~daemon.generators.wd_tagger.preprocess`
  (isolates the draft rule);
- ``now``: what the daemon does: ``draft_gap=2`` (decode at no less than twice the model
  size) with today's preprocessing;
- ``full``: no draft and one exact BICUBIC pass (``reducing_gap=None``): the
  reference's pixels up to 8-bit rounding, the cost of not drafting or reducing at all.

Fidelity: mean and max absolute difference from the reference over the model input,
in grey levels, and the largest change of any of the 10,861 output probabilities of the
realistic WD-contract model (``tests/wdmodel.py``, random weights) between the rule's
input and the reference input. Speed: ``decode_image`` + preprocessing per image, the
median of ``--rounds`` rounds in which the rules alternate (rotated order each round),
so that drift of this shared machine falls on all rules alike.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_tagging import _photo_like, ensure_data  # noqa: E402
from cpuinfo import cpu_name  # noqa: E402

from daemon.generators.wd_tagger import preprocess  # noqa: E402
from daemon.pipeline.images import decode_image  # noqa: E402
from tests.textures import camera_photo  # noqa: E402
from tests.wdmodel import reference_preprocess  # noqa: E402

DATA = HERE / ".data" / "fidelity"
SIZE = 448

# (name, width, height, format, content)
MIX: list[tuple[str, int, int, str, str]] = [
    ("phone_12mp", 4032, 3024, "JPEG", "textured"),
    ("phone_12mp_portrait", 3024, 4032, "JPEG", "textured"),
    ("camera_12mp", 4000, 3000, "JPEG", "textured"),
    ("camera_18mp", 5184, 3456, "JPEG", "textured"),
    ("camera_24mp", 6000, 4000, "JPEG", "textured"),
    ("camera_6mp", 3000, 2000, "JPEG", "textured"),
    ("phone_12mp_smooth", 4032, 3024, "JPEG", "smooth"),
    ("camera_6mp_smooth", 3000, 2000, "JPEG", "smooth"),
    ("web_1920", 1920, 1080, "JPEG", "textured"),
    ("web_1800", 1800, 1200, "JPEG", "textured"),
    ("web_1024", 1024, 768, "JPEG", "textured"),
    ("render_2400", 2400, 1600, "PNG", "textured"),
    ("gen_1024x1536", 1024, 1536, "PNG", "textured"),
    ("screen_4k", 3840, 2160, "PNG", "smooth"),
]
RULES = ("before", "old_draft", "now", "full")
GAPS = {"before": 1.0, "old_draft": 1.0, "now": 2.0, "full": None}


# -- the preprocessing before issue 10 (baseline only; daemon/generators/wd_tagger.py at
# f61cc4a): the image region resized with reducing_gap=2, border rows left white --------


def _span_before(length: int, side: int, size: int) -> tuple[int, int, float]:
    scale = side / size
    pad = (side - length) // 2
    first = math.ceil(pad / scale - 1e-9)
    offset = max(0.0, first * scale - pad)
    count = max(1, min(size - first, math.floor((length - offset) / scale + 1e-9)))
    return first, count, offset


def preprocess_before(image: Image.Image, size: int) -> np.ndarray:
    img = image
    if img.mode not in ("RGB", "RGBA"):
        has_alpha = img.mode in ("LA", "La", "PA", "RGBa") or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    w, h = img.size
    side = max(w, h)
    left, out_w, x0 = _span_before(w, side, size)
    top, out_h, y0 = _span_before(h, side, size)
    scale = side / size
    if (out_w, out_h) == (w, h) and w == side:
        resized = img
    else:
        box = (x0, y0, min(w, x0 + out_w * scale), min(h, y0 + out_h * scale))
        resized = img.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    if resized.mode == "RGBA":
        canvas.paste(resized.convert("RGB"), (left, top), mask=resized.getchannel("A"))
    else:
        canvas.paste(resized, (left, top))
    return np.asarray(canvas)[:, :, ::-1].astype(np.float32)


# -- data ------------------------------------------------------------------------------


def reference(data: bytes, size: int = SIZE) -> np.ndarray:
    """wd-tagger.md: full decode, then the reference preprocessing."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return reference_preprocess(img, size)


def ensure_mix() -> dict[str, Path]:
    DATA.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, w, h, fmt, content) in enumerate(MIX):
        path = DATA / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if not path.exists():
            img = camera_photo(w, h, seed=i) if content == "textured" else _photo_like(w, h, i)
            kw = {"quality": 92} if fmt == "JPEG" else {"compress_level": 6}
            img.save(path, fmt, **kw)
        paths[name] = path
    return paths


# -- measurements ------------------------------------------------------------------------


def rule_fn(rule: str, data: bytes) -> Callable[[], np.ndarray]:
    gap = GAPS[rule]

    def run() -> np.ndarray:
        if gap is None:
            return preprocess(decode_image(data), SIZE, reducing_gap=None)
        img = decode_image(data, draft_size=SIZE, draft_longer_side=True, draft_gap=gap)
        return preprocess_before(img, SIZE) if rule == "before" else preprocess(img, SIZE)

    return run


@dataclass
class Row:
    name: str
    size: tuple[int, int]
    fmt: str
    content: str
    kbytes: int
    decoded: dict[str, tuple[int, int]]
    mean_diff: dict[str, float]
    max_diff: dict[str, float]
    max_dp: dict[str, float]
    ms: dict[str, float]


def measure(paths: dict[str, Path], rounds: int, session: object | None) -> list[Row]:
    rows = []
    for name, w, h, fmt, content in MIX:
        data = paths[name].read_bytes()
        ref = reference(data)
        fns = {rule: rule_fn(rule, data) for rule in RULES}
        inputs = {rule: fn() for rule, fn in fns.items()}
        decoded = {}
        for rule in RULES:
            gap = GAPS[rule]
            img = (
                decode_image(data)
                if gap is None
                else decode_image(data, draft_size=SIZE, draft_longer_side=True, draft_gap=gap)
            )
            decoded[rule] = img.size
        times: dict[str, list[float]] = {rule: [] for rule in RULES}
        for r in range(rounds):
            order = RULES[r % len(RULES) :] + RULES[: r % len(RULES)]
            for rule in order:
                t0 = time.perf_counter()
                fns[rule]()
                times[rule].append(time.perf_counter() - t0)
        max_dp = {rule: float("nan") for rule in RULES}
        if session is not None:
            feed = session.get_inputs()[0].name  # type: ignore[attr-defined]
            batch = np.stack([ref, *(inputs[rule] for rule in RULES)])
            probs = session.run(None, {feed: batch})[0]  # type: ignore[attr-defined]
            max_dp = {
                rule: float(np.abs(probs[i + 1] - probs[0]).max()) for i, rule in enumerate(RULES)
            }
        rows.append(
            Row(
                name=name,
                size=(w, h),
                fmt=fmt,
                content=content,
                kbytes=len(data) // 1024,
                decoded=decoded,
                mean_diff={r: float(np.abs(inputs[r] - ref).mean()) for r in RULES},
                max_diff={r: float(np.abs(inputs[r] - ref).max()) for r in RULES},
                max_dp=max_dp,
                ms={r: 1000 * statistics.median(times[r]) for r in RULES},
            )
        )
        print(
            f"{name:22s} "
            + "  ".join(f"{r} {rows[-1].mean_diff[r]:.3f}/{rows[-1].ms[r]:.0f}ms" for r in RULES),
            flush=True,
        )
    return rows


def summary(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    groups = {
        "camera JPEG (6-24 MP)": [
            r for r in rows if r.fmt == "JPEG" and r.size[0] * r.size[1] > 5e6
        ],
        "web JPEG (<= 2 MP)": [r for r in rows if r.fmt == "JPEG" and r.size[0] * r.size[1] <= 5e6],
        "PNG": [r for r in rows if r.fmt == "PNG"],
        "all": list(rows),
    }
    out = {}
    for label, group in groups.items():
        if not group:
            continue
        ms = {rule: statistics.fmean(r.ms[rule] for r in group) for rule in RULES}
        out[label] = {
            **{f"ms_{rule}": ms[rule] for rule in RULES},
            **{
                f"mean_diff_{rule}": statistics.fmean(r.mean_diff[rule] for r in group)
                for rule in RULES
            },
            **{f"worst_mean_diff_{rule}": max(r.mean_diff[rule] for r in group) for rule in RULES},
            "now_vs_old_draft": ms["now"] / ms["old_draft"],
            "now_vs_before": ms["now"] / ms["before"],
            "now_vs_full": ms["now"] / ms["full"],
        }
    return out


def markdown(rows: Sequence[Row], summ: dict[str, dict[str, float]]) -> str:
    lines = [
        "| image | size | KB | decoded (before, old_draft / now) | mean diff: before / old_draft"
        " / now / full | max diff now | max dp: before / now | ms: before / old_draft / now"
        " / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dec = f"{r.decoded['old_draft'][0]}x{r.decoded['old_draft'][1]} / " + (
            f"{r.decoded['now'][0]}x{r.decoded['now'][1]}"
        )
        md = " / ".join(f"{r.mean_diff[k]:.3f}" for k in RULES)
        dp = f"{r.max_dp['before']:.4f} / {r.max_dp['now']:.4f}"
        ms = " / ".join(f"{r.ms[k]:.1f}" for k in RULES)
        lines.append(
            f"| {r.name} ({r.fmt}, {r.content}) | {r.size[0]}x{r.size[1]} | {r.kbytes} | {dec}"
            f" | {md} | {r.max_diff['now']:.0f} | {dp} | {ms} |"
        )
    lines += [
        "",
        "| group | ms: before / old_draft / now / full | now vs old_draft | now vs before"
        " | mean diff: before / old_draft / now (worst) |",
        "|---|---|---|---|---|",
    ]
    for label, s in summ.items():
        ms = " / ".join(f"{s['ms_' + k]:.1f}" for k in RULES)
        md = " / ".join(f"{s['mean_diff_' + k]:.3f}" for k in ("before", "old_draft", "now"))
        lines.append(
            f"| {label} | {ms} | {s['now_vs_old_draft']:.2f}x | {s['now_vs_before']:.2f}x"
            f" | {md} ({s['worst_mean_diff_now']:.3f}) |"
        )
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import onnxruntime as ort
    import PIL

    return {
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per image and rule")
    ap.add_argument("--no-model", action="store_true", help="skip the probability shift")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    paths = ensure_mix()
    session = None
    if not args.no_model:
        import onnxruntime as ort

        _, model_dir = ensure_data(0, 0)
        session = ort.InferenceSession(
            str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )
    load_before = os.getloadavg()
    rows = measure(paths, args.rounds, session)
    load_after = os.getloadavg()
    summ = summary(rows)
    print()
    print(f"machine: {machine()}")
    print(f"load average before {load_before}, after {load_after}; rounds {args.rounds}")
    print()
    print(markdown(rows, summ))
    result: dict[str, object] = {
        "machine": machine(),
        "rounds": args.rounds,
        "loadavg_before_after": [load_before, load_after],
        "rows": [r.__dict__ for r in rows],
        "summary": summ,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
