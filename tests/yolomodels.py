"""Offline YOLO models for tests: random weights, real architecture and file format.

``build_yolo(dest, "yolov8n-seg.yaml")`` builds the architecture from ultralytics'
bundled yaml (no download), sets the COCO class names (0 = person) and saves a ``.pt``
that ``YOLO(path)`` loads back like a released checkpoint. Random weights find
arbitrary boxes at very low confidence only: enough to exercise loading and result
parsing, not to assert detections. Recipes: /work/shared/reference/offline-models.md.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def offline_env() -> None:
    """No DNS probes, no pip installs, a writable settings folder (before importing
    ultralytics)."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def coco_names() -> dict[int, str]:
    offline_env()
    from ultralytics.utils import ROOT, YAML

    names = YAML.load(ROOT / "cfg" / "datasets" / "coco8.yaml")["names"]
    return {int(k): str(v) for k, v in names.items()}


def build_yolo(
    dest: Path, arch: str = "yolov8n.yaml", *, names: dict[int, str] | None = None, seed: int = 0
) -> Path:
    """Save a random-weight ``arch`` model with ``names`` (default COCO) into ``dest``;
    returns the ``.pt`` path (named after the yaml). Seeded: the same weights, and so
    the same detections, on every run."""
    offline_env()
    import torch
    from ultralytics import YOLO

    torch.manual_seed(seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = YOLO(arch)
    model.model.names = dict(names if names is not None else coco_names())
    path = dest / (Path(arch).stem + ".pt")
    model.save(str(path))
    return path


def asset(name: str) -> Path:
    """A photo that the ultralytics wheel ships (``bus.jpg``, ``zidane.jpg``)."""
    offline_env()
    from ultralytics.utils import ASSETS

    return Path(ASSETS) / name
