"""WD tagger v3 (SmilingWolf ``wd-*-tagger-v3``): booru tags from an ONNX model.

Model contract (read from the session, never assumed): input NHWC float32 BGR 0-255,
square H = W (448 for v3), dynamic or fixed batch; output ``[batch, T]`` probabilities
(sigmoid is inside the graph). ``selected_tags.csv`` gives the T tag names and their
categories (9 rating, 0 general, 4 character; other categories are never output).

Preprocessing gives the reference space's pixels (alpha onto white, centred white
square pad, BICUBIC to the model size, RGB -> BGR) without building the padded square
(:func:`preprocess`). JPEGs are drafted by the decoder to no less than twice the model
size (:attr:`WDTagger.draft_size`, ``decode_image``'s ``draft_gap``). Formatting is the
pure function :func:`format_tags`.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from daemon.errors import (
    GenerationError,
    ModelLoadingError,
    ModelUnavailableError,
)
from daemon.generators.base import (
    Availability,
    Generator,
    GeneratorConfig,
    ImageInput,
    WeightClass,
)
from daemon.generators.hub import hub_errors, hub_failure, looks_like_path
from daemon.text.tags import KAOMOJI

MODEL_FILENAME = "model.onnx"
TAGS_FILENAME = "selected_tags.csv"
DEFAULT_SIZE = 448

CATEGORY_RATING = 9
CATEGORY_GENERAL = 0
CATEGORY_CHARACTER = 4

# Default provider preference; only those onnxruntime reports as available are used.
# TensorRT is left out of the default (minutes of engine building on first use, and
# onnxruntime-gpu lists it even without TensorRT installed): name it in ``providers``.
DEFAULT_PROVIDER_ORDER = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)
_PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class WDTaggerConfig(GeneratorConfig):
    """Settings of ``[generators.wd_tagger]``.

    Tag lists (``undesired_tags``, ``always_first_tags``, ``tag_replacement`` sources)
    match a tag whether written with spaces or underscores, case-insensitively.
    ``tag_replacement`` is a list of ``[from, to]`` pairs; ``to`` is written as given
    (only bracket escaping applies to it). Thresholds keep tags with ``p >= threshold``.
    ``max_tags`` caps the whole caption; when over, tags are kept in this priority:
    rating, present always-first tags, characters, general (most probable first).
    """

    model: str = "SmilingWolf/wd-eva02-large-tagger-v3"
    revision: str | None = None
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    general_mcut: bool = False
    character_mcut: bool = False  # threshold = max(0.15, mcut), as in the reference space
    undesired_tags: list[str] = Field(default_factory=list)
    remove_underscores: bool = True  # kaomoji (KAOMOJI) keep theirs
    rating: Literal["none", "first", "last"] = "none"
    character_tags_first: bool = True
    always_first_tags: list[str] = Field(default_factory=list)
    tag_replacement: list[tuple[str, str]] = Field(default_factory=list)
    separator: str = ", "
    max_tags: int = Field(0, ge=0, le=100_000)  # 0 = no limit
    escape_brackets: bool = False  # "(" -> "\(" and ")" -> "\)" for prompt syntax
    providers: list[str] | None = None  # ordered preference; None = DEFAULT_PROVIDER_ORDER
    intra_op_threads: int = Field(0, ge=0, le=1024)  # 0 = onnxruntime's default

    @field_validator("tag_replacement")
    @classmethod
    def _pairs(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for src, dst in v:
            if not src.strip() or not dst.strip():
                raise ValueError("tag_replacement pairs need a non-empty [from, to]")
        return v

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [_PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in v]
        bad = [p for p in out if not re.fullmatch(r"[A-Za-z0-9]{1,40}ExecutionProvider", p)]
        if bad or not out:
            short = ", ".join(sorted(_PROVIDER_ALIASES))
            raise ValueError(
                f"unknown onnxruntime providers {bad or out}: name them like "
                f"'CUDAExecutionProvider' or by a short name ({short})"
            )
        return out


@dataclass(frozen=True, slots=True)
class TagSet:
    """Tag names in model-output order and the output indices of each category."""

    names: tuple[str, ...]
    rating: np.ndarray
    general: np.ndarray
    character: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, int]]) -> TagSet:
        cats = np.array([c for _, c in rows], dtype=np.int64)
        return cls(
            names=tuple(n for n, _ in rows),
            rating=np.flatnonzero(cats == CATEGORY_RATING),
            general=np.flatnonzero(cats == CATEGORY_GENERAL),
            character=np.flatnonzero(cats == CATEGORY_CHARACTER),
        )

    def __len__(self) -> int:
        return len(self.names)


def read_tags_csv(path: Path) -> TagSet:
    """Parse ``selected_tags.csv`` (columns ``name`` and ``category``)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "name" not in fields or "category" not in fields:
                raise ModelUnavailableError(f"{path.name} lacks a 'name' or 'category' column")
            rows = [(row["name"], int(row["category"])) for row in reader]
    except ModelUnavailableError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as exc:
        raise ModelUnavailableError(f"cannot read {path.name}: {exc}") from exc
    if not rows:
        raise ModelUnavailableError(f"{path.name} has no tags")
    return TagSet.from_rows(rows)


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut threshold: the midpoint of the largest gap between sorted scores."""
    if probs.size < 2:
        return 0.0
    s = np.sort(probs)[::-1]
    t = int(np.argmax(s[:-1] - s[1:]))
    return float((s[t] + s[t + 1]) / 2)


def _key(tag: str) -> str:
    return " ".join(tag.strip().lower().replace("_", " ").split())


def format_tags(probs: np.ndarray, tags: TagSet, config: WDTaggerConfig) -> str:
    """Turn one row of probabilities into the caption text (pure; no model needed)."""
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    if probs.size != len(tags):
        raise ValueError(f"{probs.size} probabilities for {len(tags)} tags")
    undesired = {_key(t) for t in config.undesired_tags}
    replacements = {_key(src): dst for src, dst in config.tag_replacement}

    def selected(idx: np.ndarray, threshold: float) -> list[int]:
        p = probs[idx]
        keep = idx[p >= threshold]
        order = np.argsort(-probs[keep], kind="stable")
        return [int(i) for i in keep[order] if _key(tags.names[i]) not in undesired]

    general: list[int] = []
    if tags.general.size:
        thr = config.general_threshold
        if config.general_mcut:
            thr = mcut_threshold(probs[tags.general])
        general = selected(tags.general, thr)
    characters: list[int] = []
    if tags.character.size:
        thr = config.character_threshold
        if config.character_mcut:
            thr = max(0.15, mcut_threshold(probs[tags.character]))
        characters = selected(tags.character, thr)
    rating: int | None = None
    if config.rating != "none" and tags.rating.size:
        r = int(tags.rating[int(np.argmax(probs[tags.rating]))])
        if _key(tags.names[r]) not in undesired:
            rating = r

    body = characters + general if config.character_tags_first else general + characters
    first: list[int] = []
    for want in config.always_first_tags:
        k = _key(want)
        for i in body:
            if i not in first and _key(tags.names[i]) == k:
                first.append(i)
    ordered = first + [i for i in body if i not in first]
    if rating is not None:
        ordered = [rating, *ordered] if config.rating == "first" else [*ordered, rating]

    if config.max_tags and len(ordered) > config.max_tags:
        priority = ([rating] if rating is not None else []) + first + characters + general
        kept = set(list(dict.fromkeys(priority))[: config.max_tags])
        ordered = [i for i in ordered if i in kept]

    out: list[str] = []
    seen: set[str] = set()
    for i in ordered:
        text = _display(tags.names[i], config, replacements)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return config.separator.join(out)


def _display(name: str, config: WDTaggerConfig, replacements: dict[str, str]) -> str:
    replaced = replacements.get(_key(name))
    if replaced is not None:
        text = replaced
    elif config.remove_underscores and name not in KAOMOJI:
        text = name.replace("_", " ")
    else:
        text = name
    if config.escape_brackets:
        text = text.replace("(", "\\(").replace(")", "\\)")
    return text


def _hub_download(
    repo_id: str, filename: str, revision: str | None, cache_dir: Path | None
) -> Path:
    """hf_hub_download with failures mapped by type to captiond's errors
    (:func:`~daemon.generators.hub.hub_failure`): not cached while offline ->
    ModelDownloadError, the hub unreachable -> NetworkError, no such repository or
    file -> ModelUnavailableError."""
    errs = hub_errors(repo_id)
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
        )
    except Exception as exc:
        failure = hub_failure(exc, errs)
        if failure is None:
            raise
        where = f"{filename} of {repo_id}{'@' + revision if revision else ''}"
        raise failure.error(where) from exc


class WDTagger(Generator):
    name = "wd_tagger"
    caption_type = "tags"
    description = "Booru-style tags from SmilingWolf's WD v3 taggers (ONNX Runtime)"
    version = "1"
    weight = WeightClass.LIGHT
    config_model = WDTaggerConfig

    config: WDTaggerConfig

    def __init__(self, config: WDTaggerConfig | None = None, *, cache_dir: Path | None = None):
        super().__init__(config, cache_dir=cache_dir)
        self._session: Any = None
        self._tags: TagSet | None = None
        self._input_name = ""
        self._output_name = ""
        self._size = DEFAULT_SIZE
        self._fixed_batch: int | None = None  # None = dynamic batch axis
        self._model_dir: Path | None = None

    @classmethod
    def is_available(cls) -> Availability:
        try:
            if importlib.util.find_spec("onnxruntime") is None:
                return Availability(False, "onnxruntime is not installed")
        except (ImportError, ValueError) as exc:
            return Availability(False, f"onnxruntime cannot be found: {exc}")
        return Availability(True)

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def draft_size(self) -> int:
        return self._size if self.loaded else DEFAULT_SIZE

    @property
    def draft_longer_side(self) -> bool:
        return True  # padded to a white square, then resized: the longer side sets the scale

    @property
    def model_info(self) -> dict[str, Any]:
        """What was loaded, for status output (empty before load())."""
        if not self.loaded or self._tags is None:
            return {}
        return {
            "model": self.config.model,
            "revision": self.config.revision,
            "files": str(self._model_dir),
            "providers": list(self._session.get_providers()),
            "input_name": self._input_name,
            "size": self._size,
            "batch": "dynamic" if self._fixed_batch is None else self._fixed_batch,
            "tags": len(self._tags),
        }

    # -- loading --------------------------------------------------------------------

    def fetch(self) -> str:
        return str(self._resolve_files()[0].parent)

    def _resolve_files(self) -> tuple[Path, Path]:
        model = self.config.model.strip()
        local = Path(model).expanduser()
        if local.is_dir():
            files = (local / MODEL_FILENAME, local / TAGS_FILENAME)
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise ModelUnavailableError(f"model folder {local} lacks {', '.join(missing)}")
            return files
        if looks_like_path(model) or local.exists():
            raise ModelUnavailableError(f"model folder {local} does not exist")
        cache = self.cache_dir / "hf" if self.cache_dir is not None else None
        rev = self.config.revision
        return (
            _hub_download(model, MODEL_FILENAME, rev, cache),
            _hub_download(model, TAGS_FILENAME, rev, cache),
        )

    def _providers(self, available: Sequence[str]) -> list[str]:
        wanted = self.config.providers or list(DEFAULT_PROVIDER_ORDER)
        chosen = [p for p in dict.fromkeys(wanted) if p in available]
        if not chosen:
            raise ModelUnavailableError(
                f"none of the providers {wanted} is available; onnxruntime has {list(available)}"
            )
        return chosen

    def load(self) -> None:
        if self.loaded:
            return
        # Files first: a daemon whose model cannot be fetched never pays for onnxruntime.
        model_path, tags_path = self._resolve_files()
        tags = read_tags_csv(tags_path)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelUnavailableError("onnxruntime is not installed") from exc
        providers = self._providers(ort.get_available_providers())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        # Idle intra-op threads must not spin: on a CPU they would steal the cores that
        # decode the next batch (measured: +10% end to end on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.config.intra_op_threads:
            opts.intra_op_num_threads = self.config.intra_op_threads
        try:
            session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except MemoryError:
            raise
        except Exception as exc:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            raise ModelLoadingError(
                f"onnxruntime cannot load {model_path}: {type(exc).__name__}"
            ) from exc

        inp = session.get_inputs()[0]
        out = session.get_outputs()[0]
        shape = list(inp.shape)
        if inp.type != "tensor(float)" or len(shape) != 4 or shape[3] != 3:
            raise ModelUnavailableError(
                f"{model_path.name} expects {inp.type} {shape}, not float32 NHWC [N, H, W, 3]"
            )
        h, w = shape[1], shape[2]
        if isinstance(h, int) and isinstance(w, int):
            if h != w:
                raise ModelUnavailableError(f"{model_path.name} input is not square: {h}x{w}")
            size = h
        else:
            size = DEFAULT_SIZE
        batch = shape[0]
        fixed = batch if isinstance(batch, int) and batch > 0 else None
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int) and width != len(tags):
            raise ModelUnavailableError(
                f"{tags_path.name} lists {len(tags)} tags but the model outputs {width}"
            )

        self._tags = tags
        self._input_name = inp.name
        self._output_name = out.name
        self._size = size
        self._fixed_batch = fixed
        self._model_dir = model_path.parent
        self._session = session

    def unload(self) -> None:
        self._session = None
        self._tags = None

    # -- inference ------------------------------------------------------------------

    def prepare(self, item: ImageInput) -> np.ndarray:
        """Reference preprocessing; returns float32 BGR 0-255 ``[size, size, 3]``."""
        if not self.loaded:
            raise RuntimeError("wd_tagger: prepare() called before load()")
        return preprocess(item.image, self._size)

    def generate(self, batch: Sequence[np.ndarray]) -> list[str]:
        session, tags = self._session, self._tags
        if session is None or tags is None:
            raise GenerationError("wd_tagger is not loaded")
        if not batch:
            return []
        x = np.stack([np.asarray(b, dtype=np.float32) for b in batch])
        try:
            probs = self._run(session, x)
        except MemoryError:
            raise
        except Exception as exc:
            raise GenerationError(f"onnxruntime run failed: {type(exc).__name__}: {exc}") from exc
        return [format_tags(row, tags, self.config) for row in probs]

    def _run(self, session: Any, x: np.ndarray) -> np.ndarray:
        feed = self._input_name
        if self._fixed_batch is None:
            return np.asarray(session.run([self._output_name], {feed: x})[0])
        n, step = len(x), self._fixed_batch
        rows = []
        for start in range(0, n, step):
            chunk = x[start : start + step]
            real = len(chunk)
            if real < step:  # a fixed batch > 1: pad the last chunk
                pad = np.zeros((step - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            rows.append(np.asarray(session.run([self._output_name], {feed: chunk})[0])[:real])
        return np.concatenate(rows)


# An image more than 2 x REDUCING_GAP times the model size is first shrunk by an
# integer box filter (Pillow's reduce()) to no less than REDUCING_GAP times it, then
# resampled BICUBIC, as Pillow's thumbnail() does and as the decoder's JPEG draft does
# (decode_image's draft_gap): drafted JPEGs arrive below that, so only large PNGs, WebPs
# and TIFFs take this path. None = one exact BICUBIC pass.
REDUCING_GAP: float | None = 2.0

# Pillow's BICUBIC: the kernel reaches 2 pixels either side, widened by the scale when
# shrinking.
_BICUBIC_SUPPORT = 2.0


def _windows(side: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The source pixels ``[start, end)`` that Pillow's BICUBIC reads for each output
    pixel when it resamples ``side`` pixels to ``size`` (its own arithmetic, from
    ``precompute_coeffs`` in Resample.c)."""
    scale = side / size
    support = _BICUBIC_SUPPORT * max(scale, 1.0)
    centre = (np.arange(size, dtype=np.float64) + 0.5) * scale
    start = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    end = np.minimum((centre + support + 0.5).astype(np.int64), side)
    return start, end


def _runs(mask: np.ndarray) -> tuple[int, int]:
    """``[first, last + 1)`` of the True entries of a 1-D mask that holds one run."""
    idx = np.flatnonzero(mask)
    return (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)


def _composite_on_white(image: Image.Image) -> Image.Image:
    img = image
    if img.mode not in ("RGB", "RGBA"):
        has_alpha = img.mode in ("LA", "La", "PA", "RGBa") or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img.convert("RGB"), mask=img.getchannel("A"))
        img = flat
    return img


def preprocess(
    image: Image.Image, size: int, reducing_gap: float | None = REDUCING_GAP
) -> np.ndarray:
    """The reference preprocessing, pixel for pixel, without the padded square.

    Alpha onto white, centred white square pad (``(side - w) // 2``), BICUBIC to
    ``size``, RGB -> BGR float32 ``[size, size, 3]``. Pillow's BICUBIC is separable and
    each output pixel reads a known window of source pixels, so the output is built in
    up to three parts along the padded axis: output pixels whose window lies inside the
    image are resampled from the image itself (a ``box`` resize: no copy, the same
    source-to-output mapping as the square); the few whose window straddles an image
    edge are resampled from a thin strip of the image with the white padding they see
    in the square; the rest are pure padding. With ``reducing_gap=None`` the result
    equals pad-then-resize for any size and aspect ratio, 1x20000 included (up to 8-bit
    rounding between Pillow's two passes), and never pays for the padding of a large
    image. With the default :data:`REDUCING_GAP`, an image more than 4x the model size
    (a large PNG; drafted JPEGs arrive smaller) is first box-reduced inside Pillow to no
    less than 2x it: 0.13-0.19 grey levels from the reference on textured images, and
    1.7-3.7x faster than one BICUBIC pass (2400x1600 to 4000x3000 PNGs).
    """
    img = _composite_on_white(image)
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    pad_x, pad_y = (side - w) // 2, (side - h) // 2
    if side == size:  # the reference pads and does not resample
        canvas.paste(img, (pad_x, pad_y))
        return np.asarray(canvas)[:, :, ::-1].astype(np.float32)

    scale = side / size
    start, end = _windows(side, size)
    # The padded axis (at most one): y for a wide image, x for a tall one.
    tall = h > w
    length, pad = (w, pad_x) if tall else (h, pad_y)
    touched = _runs((end > pad) & (start < pad + length))
    inside = _runs((start >= pad) & (end <= pad + length))

    def place(src: Image.Image, lo: int, hi: int, origin: int, gap: float | None = None) -> None:
        """Resample output pixels ``[lo, hi)`` of the padded axis from ``src``, whose
        first pixel along that axis sits at ``origin`` in the padded square."""
        if hi <= lo:
            return
        a, b = max(0.0, lo * scale - origin), hi * scale - origin
        extent = src.width if tall else src.height
        b = min(float(extent), b)
        box = (a, 0.0, b, float(src.height)) if tall else (0.0, a, float(src.width), b)
        dims = (hi - lo, size) if tall else (size, hi - lo)
        part = src.resize(dims, Image.Resampling.BICUBIC, box=box, reducing_gap=gap)
        canvas.paste(part, (lo, 0) if tall else (0, lo))

    def strip(lo: int, hi: int) -> None:
        """Output pixels ``[lo, hi)`` from a copy of the image rows (or columns) their
        windows read, with the white padding around them."""
        if hi <= lo:
            return
        s0, s1 = int(start[lo]), int(end[hi - 1])
        i0, i1 = max(s0, pad), min(s1, pad + length)
        dims = (s1 - s0, side) if tall else (side, s1 - s0)
        band = Image.new("RGB", dims, (255, 255, 255))
        if i1 > i0:
            crop = (i0 - pad, 0, i1 - pad, h) if tall else (0, i0 - pad, w, i1 - pad)
            band.paste(img.crop(crop), (i0 - s0, 0) if tall else (0, i0 - s0))
        place(band, lo, hi, s0)

    first, last = touched
    if inside[1] > inside[0]:
        strip(first, inside[0])
        place(img, inside[0], inside[1], pad, reducing_gap)
        strip(inside[1], last)
    else:  # thinner than the kernel: every touched pixel straddles an edge
        strip(first, last)
    return np.asarray(canvas)[:, :, ::-1].astype(np.float32)
