"""Person detection for the multi-person captioner: the detector seam and a YOLO one.

A detector turns a batch of RGB images into one list of :class:`Person` per image.
:class:`YOLODetector` runs ultralytics YOLO (v8/v11/... detect or -seg models) in one
batched ``predict`` call; tests inject their own detector with known boxes and masks.
:func:`select_people` applies the thresholds and the stable order (largest first, then
top to bottom, then left to right) whatever the detector.

ultralytics is AGPL-3.0. Importing this module is cheap: ultralytics and torch are
imported in :meth:`YOLODetector.load`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from PIL import Image

from daemon.errors import (
    GenerationError,
    ModelDownloadError,
    ModelLoadingError,
    ModelUnavailableError,
    NetworkError,
    is_out_of_memory,
)
from daemon.generators.hub import connection_errors

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Person:
    """One detected person.

    ``box`` is ``(x0, y0, x1, y1)`` in image pixels, ``x1``/``y1`` exclusive, inside the
    image. ``mask`` (segmentation models only) is a bool array of the box's shape
    ``[y1 - y0, x1 - x0]``, True on the person; ``None`` means "the whole box".
    """

    box: tuple[int, int, int, int]
    score: float = 1.0
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return self.width * self.height


class Detector(Protocol):
    """The seam: images in, people out (unfiltered and unordered is fine)."""

    def detect(self, images: Sequence[Image.Image]) -> list[list[Person]]: ...


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Float ``xyxy`` to whole pixels covering it, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ix0 = min(max(int(np.floor(x0)), 0), width)
    iy0 = min(max(int(np.floor(y0)), 0), height)
    ix1 = min(max(int(np.ceil(x1)), ix0), width)
    iy1 = min(max(int(np.ceil(y1)), iy0), height)
    return ix0, iy0, ix1, iy1


def select_people(
    people: Sequence[Person], *, confidence: float, min_size: int, max_people: int
) -> list[Person]:
    """Keep people with ``score >= confidence`` whose box is at least ``min_size`` px on
    both sides (and whose mask, if any, is not empty); order them by box area, largest
    first, then top to bottom, then left to right; keep the first ``max_people``."""
    kept = [
        p
        for p in people
        if p.score >= confidence
        and p.width >= max(1, min_size)
        and p.height >= max(1, min_size)
        and (p.mask is None or bool(p.mask.any()))
    ]
    kept.sort(key=lambda p: (-p.area, p.box[1], p.box[0], -p.score))
    return kept[:max_people] if max_people > 0 else kept


# -- YOLO -------------------------------------------------------------------------------


def _no_telemetry() -> None:
    """Turn off ultralytics' usage analytics (its ``sync`` setting, on by default) for
    this process only: a daemon does not report to a third party, and the user's
    settings file is not rewritten. The object moved between ultralytics versions."""
    for module in ("ultralytics.utils.events", "ultralytics.hub.utils"):
        try:
            events = getattr(importlib.import_module(module), "events", None)
        except ImportError:
            continue
        if events is not None and hasattr(events, "enabled"):
            events.enabled = False
            return
    log.warning("ultralytics_telemetry_unknown", hint="set sync=False in its settings")


def ultralytics_available() -> tuple[bool, str]:
    for module in ("ultralytics", "torch"):
        try:
            if importlib.util.find_spec(module) is None:
                return False, f"{module} is not installed (pip install ultralytics)"
        except (ImportError, ValueError) as exc:
            return False, f"{module} cannot be found: {exc}"
    return True, ""


def _is_path(model: str) -> bool:
    return "/" in model or "\\" in model or model.startswith("~")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def person_class(names: Any) -> int:
    """The class id named ``person`` in a model's ``names`` (dict or list)."""
    items = names.items() if isinstance(names, dict) else enumerate(names or ())
    for idx, name in items:
        if str(name).strip().lower() == "person":
            return int(idx)
    raise ModelUnavailableError(
        "the detector model has no 'person' class; set detector_person_class to its id"
    )


def parse_result(result: Any, person_cls: int) -> list[Person]:
    """One ultralytics ``Results`` to people: boxes of class ``person_cls``, with masks
    cut to their boxes when the model segments (``retina_masks=True``: masks are at the
    original image size)."""
    height, width = (int(v) for v in result.orig_shape[:2])
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.detach().float().cpu().numpy()
    cls = boxes.cls.detach().cpu().numpy().astype(np.int64)
    conf = boxes.conf.detach().float().cpu().numpy()
    masks = None
    if getattr(result, "masks", None) is not None:
        masks = result.masks.data.detach().cpu().numpy() > 0.5
        if masks.shape[1:] != (height, width):
            raise GenerationError(
                f"detector masks are {masks.shape[1:]}, not the image's {(height, width)}"
            )
    people: list[Person] = []
    for i in range(len(xyxy)):
        if cls[i] != person_cls:
            continue
        box = clip_box(xyxy[i], width, height)
        mask = None
        if masks is not None:
            x0, y0, x1, y1 = box
            mask = np.ascontiguousarray(masks[i, y0:y1, x0:x1])
        people.append(Person(box, float(conf[i]), mask))
    return people


class YOLODetector:
    """ultralytics YOLO, person class only, batched over images.

    ``model``: a local ``.pt``/``.onnx`` path, or a released name such as
    ``yolo11s-seg.pt`` fetched once into ``<cache_dir>/ultralytics/`` (never into the
    working directory). ``YOLO_OFFLINE=1`` is honoured: an uncached name then fails at
    once as a retryable ``model_download`` error, with no network attempt.
    """

    def __init__(
        self,
        model: str,
        *,
        cache_dir: Path | None = None,
        confidence: float = 0.5,
        image_size: int = 640,
        device: str = "auto",
        person_class_id: int | None = None,
        max_det: int = 100,
    ):
        self.model_name = model.strip()
        self.cache_dir = cache_dir
        self.confidence = confidence
        self.image_size = image_size
        self.device = device
        self.person_class_id = person_class_id
        self.max_det = max_det
        self._yolo: Any = None
        self._person = 0
        self.segments = False

    @property
    def loaded(self) -> bool:
        return self._yolo is not None

    def _weights_dir(self) -> Path | None:
        return self.cache_dir / "ultralytics" if self.cache_dir is not None else None

    def resolve(self) -> Path:
        """The weights file to load (a name becomes a path in the cache folder)."""
        name = self.model_name
        if not name:
            raise ModelUnavailableError("detector_model is empty")
        local = Path(name).expanduser()
        if name.endswith((".yaml", ".yml")):
            raise ModelUnavailableError(
                f"detector_model {name!r} is an architecture without weights; give a "
                "trained .pt/.onnx file or a released name such as yolo11s-seg.pt"
            )
        if local.is_file():
            return local
        if _is_path(name) or local.is_dir():
            raise ModelUnavailableError(f"detector model file {local} does not exist")
        from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

        if name not in GITHUB_ASSETS_NAMES:
            raise ModelUnavailableError(
                f"detector_model {name!r} is neither a file nor a released ultralytics "
                "model name (e.g. yolo11s-seg.pt, yolov8m.pt)"
            )
        folder = self._weights_dir()
        target = (folder / name) if folder is not None else Path(name)
        if target.is_file():
            return target
        if _env_on("YOLO_OFFLINE") or _env_on("HF_HUB_OFFLINE"):
            raise ModelDownloadError(
                f"{name} is not in {target.parent} and downloads are disabled "
                "(YOLO_OFFLINE); copy the file there or set detector_model to a local file"
            )
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ModelDownloadError(f"cannot create {folder}: {exc}") from exc
        return target

    def load(self) -> None:
        if self.loaded:
            return
        ok, reason = ultralytics_available()
        if not ok:
            raise ModelUnavailableError(reason)
        if self._weights_dir() is not None:
            # Settings file and never the user's home or the working directory; no
            # automatic pip installs from inside a daemon.
            os.environ.setdefault("YOLO_CONFIG_DIR", str(self._weights_dir()))
        os.environ.setdefault("YOLO_AUTOINSTALL", "0")
        try:
            from ultralytics import YOLO
        except ImportError as exc:
            raise ModelUnavailableError(f"cannot import ultralytics: {exc}") from exc
        _no_telemetry()
        path = self.resolve()
        try:
            yolo = YOLO(str(path))
        except connection_errors() as exc:  # the release download could not connect
            raise NetworkError(
                f"downloading {self.model_name} failed: the remote was not reached "
                f"({type(exc).__name__}); retrying later"
            ) from exc
        except FileNotFoundError as exc:
            raise ModelUnavailableError(f"detector model {path} not found") from exc
        except Exception as exc:
            if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                raise
            raise ModelLoadingError(
                f"ultralytics cannot load {path}: {type(exc).__name__}: {exc}"
            ) from exc
        if yolo.task not in ("detect", "segment"):
            raise ModelUnavailableError(
                f"{self.model_name} is a {yolo.task!r} model; person detection needs a "
                "detect or segment model"
            )
        pid = self.person_class_id
        self._person = pid if pid is not None else person_class(yolo.names)
        self.segments = yolo.task == "segment"
        self._yolo = yolo

    def unload(self) -> None:
        self._yolo = None

    def detect(self, images: Sequence[Image.Image]) -> list[list[Person]]:
        yolo = self._yolo
        if yolo is None:
            raise GenerationError("the person detector is not loaded")
        if not images:
            return []
        try:
            results = yolo.predict(
                list(images),
                classes=[self._person],
                conf=self.confidence,
                imgsz=self.image_size,
                device=None if self.device == "auto" else self.device,
                max_det=self.max_det,
                retina_masks=True,  # masks at the original image size
                verbose=False,
            )
        except Exception as exc:
            if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                raise
            raise GenerationError(f"person detection failed: {type(exc).__name__}: {exc}") from exc
        if len(results) != len(images):
            raise GenerationError(f"detector returned {len(results)} results for {len(images)}")
        return [parse_result(r, self._person) for r in results]
