"""Tiny ONNX models with the WD tagger v3 contract, built offline in milliseconds.

``build_wd_model(dest)`` writes ``model.onnx`` and ``selected_tags.csv``. The default
graph is ``input [N, S, S, 3] (BGR 0-255) -> ReduceMean(H, W) -> /255 -> MatMul -> Add
-> Sigmoid -> output [N, T]`` with hand-set weights, so the tags follow the image's mean
colour and tests can assert exact captions through the real code:

============  =================================================================
mean colour   tags with p >= 0.35 / 0.85 (p ~ 0.993 unless stated)
============  =================================================================
red           red_background
green         green_background
blue          blue_background
white         white_background
black         black_background
yellow        ^_^ (kaomoji)
magenta       (o)_(o) (kaomoji with brackets); rating questionable
cyan          ganyu_(genshin_impact) (character)
always        simple_background 0.6, no_humans 0.4, solo 0.2 (general);
              hatsune_miku 0.5 (character); ratings general 0.88, sensitive 0.3,
              explicit 0.047, questionable ~0 (except magenta)
============  =================================================================

``realistic=True`` builds a model with the same I/O contract and the full v3 tag
count (10,861) whose compute (four strided 3x3 convolutions + global pool, about
1.5 GFLOP per 448x448 image) takes tens of milliseconds per image on a small CPU.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

RATING, GENERAL, CHARACTER = 9, 0, 4


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# (name, category, (w_b, w_g, w_r), bias): logit = w . mean_bgr / 255 + bias
TINY_TAGS: list[tuple[str, int, tuple[float, float, float], float]] = [
    ("general", RATING, (0, 0, 0), 2.0),
    ("sensitive", RATING, (0, 0, 0), _logit(0.3)),
    ("questionable", RATING, (10, -10, 10), -13.0),
    ("explicit", RATING, (0, 0, 0), -3.0),
    ("red_background", GENERAL, (-10, -10, 10), -5.0),
    ("green_background", GENERAL, (-10, 10, -10), -5.0),
    ("blue_background", GENERAL, (10, -10, -10), -5.0),
    ("white_background", GENERAL, (10, 10, 10), -25.0),
    ("black_background", GENERAL, (-10, -10, -10), 5.0),
    ("^_^", GENERAL, (-10, 10, 10), -15.0),
    ("simple_background", GENERAL, (0, 0, 0), _logit(0.6)),
    ("no_humans", GENERAL, (0, 0, 0), _logit(0.4)),
    ("solo", GENERAL, (0, 0, 0), _logit(0.2)),
    ("(o)_(o)", GENERAL, (10, -10, 10), -15.0),
    ("ganyu_(genshin_impact)", CHARACTER, (10, 10, -10), -15.0),
    ("hatsune_miku", CHARACTER, (0, 0, 0), 0.0),
]

FULL_COUNTS = (4, 8106, 2751)  # ratings, general, characters in the real v3 list


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(rows):
            w.writerow([1000 + i, name, cat, 10_000 - i])


def _realistic_rows() -> list[tuple[str, int]]:
    ratings = [(n, c) for n, c, _, _ in TINY_TAGS if c == RATING]
    general = [(n, c) for n, c, _, _ in TINY_TAGS if c == GENERAL]
    chars = [(n, c) for n, c, _, _ in TINY_TAGS if c == CHARACTER]
    general += [(f"general_tag_{i:05d}", GENERAL) for i in range(FULL_COUNTS[1] - len(general))]
    chars += [
        (f"character_{i:04d}_(series)", CHARACTER) for i in range(FULL_COUNTS[2] - len(chars))
    ]
    return ratings + general + chars


def build_wd_model(
    dest: Path,
    *,
    batch_dynamic: bool = True,
    size: int = 448,
    input_name: str = "input_1",
    realistic: bool = False,
) -> Path:
    """Write ``model.onnx`` + ``selected_tags.csv`` into ``dest``; return ``dest``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    batch: str | int = "batch" if batch_dynamic else 1
    consts: list[onnx.TensorProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    nodes: list[onnx.NodeProto] = []
    if realistic:
        rows = _realistic_rows()
        t = len(rows)
        rng = np.random.default_rng(0)
        nodes.append(helper.make_node("Transpose", [input_name], ["nchw"], perm=[0, 3, 1, 2]))
        nodes.append(helper.make_node("Div", ["nchw", const("c255", np.array(255.0))], ["x0"]))
        prev, cin = "x0", 3
        for i, cout in enumerate((32, 64, 128, 256)):
            fan_in = cin * 9
            w = rng.normal(0, math.sqrt(2 / fan_in), (cout, cin, 3, 3))
            nodes.append(
                helper.make_node(
                    "Conv",
                    [prev, const(f"w{i}", w), const(f"b{i}", np.zeros(cout))],
                    [f"c{i}"],
                    kernel_shape=[3, 3],
                    strides=[2, 2],
                    pads=[1, 1, 1, 1],
                )
            )
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
            prev, cin = f"r{i}", cout
        nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"]))
        nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], axis=1))
        head_w = rng.normal(0, 1.0 / math.sqrt(cin), (cin, t))
        head_b = rng.normal(-4.0, 1.0, (t,))
    else:
        rows = [(n, c) for n, c, _, _ in TINY_TAGS]
        t = len(rows)
        nodes.append(
            helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0)
        )
        nodes.append(helper.make_node("Div", ["mean", const("c255", np.array(255.0))], ["feat"]))
        head_w = np.array([w for _, _, w, _ in TINY_TAGS], dtype=np.float32).T  # [3, T]
        head_b = np.array([b for _, _, _, b in TINY_TAGS], dtype=np.float32)

    nodes.append(helper.make_node("MatMul", ["feat", const("head_w", head_w)], ["logits0"]))
    nodes.append(helper.make_node("Add", ["logits0", const("head_b", head_b)], ["logits"]))
    nodes.append(helper.make_node("Sigmoid", ["logits"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "wd_tagger_test_model",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, t])],
        initializer=consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(dest / "model.onnx"))
    _write_csv(dest / "selected_tags.csv", rows)
    return dest


def reference_preprocess(img: Image.Image, size: int = 448) -> np.ndarray:
    """The reference space (wd-tagger.md): alpha onto white, pad to a centred white
    square, BICUBIC to the model size when it differs, RGB -> BGR."""
    rgba = img.convert("RGBA")
    flat = Image.new("RGBA", img.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    side = max(img.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(flat.convert("RGB"), ((side - img.width) // 2, (side - img.height) // 2))
    if side != size:
        padded = padded.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(padded, np.float32)[:, :, ::-1]
