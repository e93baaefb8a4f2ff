"""multi_person with real ultralytics: YOLO built offline from yolov8n.yaml and
yolov8n-seg.yaml (random weights, COCO names), the real loading and result parsing,
and smoke runs on the photos the ultralytics wheel ships (bus.jpg, zidane.jpg)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.deps import require
from tests.yolomodels import asset, build_yolo, offline_env

offline_env()  # YOLO_OFFLINE=1, YOLO_AUTOINSTALL=0, a temporary YOLO_CONFIG_DIR

require("ultralytics", "the people extra")
torch = require("torch", "the people extra")

from daemon.errors import ModelDownloadError, ModelUnavailableError  # noqa: E402
from daemon.generators.base import ImageInput  # noqa: E402
from daemon.generators.detection import Person, YOLODetector, parse_result  # noqa: E402
from daemon.generators.multi_person import (  # noqa: E402
    MultiPersonConfig,
    MultiPersonGenerator,
    VLMDescriber,
)
from daemon.generators.vlm import VLMConfig  # noqa: E402
from daemon.generators.wd_tagger import WDTaggerConfig  # noqa: E402

# One worker builds the tiny models once (pytest-xdist, --dist loadgroup).
pytestmark = pytest.mark.xdist_group("yolo_models")


@pytest.fixture(scope="module")
def yolo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("yolo")
    build_yolo(folder, "yolov8n.yaml")
    build_yolo(folder, "yolov8n-seg.yaml")
    return folder


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(asset(n)).convert("RGB") for n in ("bus.jpg", "zidane.jpg")]


@pytest.mark.parametrize(("arch", "segments"), [("yolov8n", False), ("yolov8n-seg", True)])
def test_yolo_loads_and_parses_offline(
    yolo_dir: Path, photos: list[Image.Image], arch: str, segments: bool
) -> None:
    det = YOLODetector(str(yolo_dir / f"{arch}.pt"), confidence=0.0, image_size=320)
    det.load()
    assert det.loaded and det.segments is segments and det._person == 0
    found = det.detect(photos)
    assert len(found) == 2
    for image, people in zip(photos, found, strict=True):
        assert people, "random weights at confidence 0 still give boxes"
        for p in people:
            x0, y0, x1, y1 = p.box
            assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
            assert 0.0 <= p.score <= 1.0
            if segments:
                assert p.mask is not None and p.mask.shape == (y1 - y0, x1 - x0)
                assert p.mask.dtype == bool
            else:
                assert p.mask is None


def test_loading_turns_off_ultralytics_telemetry(yolo_dir: Path) -> None:
    from ultralytics.utils.events import events

    events.enabled = True  # as on a machine online with ultralytics' defaults
    try:
        YOLODetector(str(yolo_dir / "yolov8n.pt"), image_size=320).load()
        assert events.enabled is False
    finally:
        events.enabled = False


def test_parse_result_on_known_tensors() -> None:
    from ultralytics.engine.results import Results

    img = np.zeros((100, 200, 3), dtype=np.uint8)
    boxes = torch.tensor(
        [
            [10.4, 20.0, 50.6, 80.0, 0.9, 0.0],  # person
            [60.0, 10.0, 90.0, 90.0, 0.8, 2.0],  # car: dropped
            [-5.0, 30.0, 250.0, 120.0, 0.7, 0.0],  # person beyond the edges: clipped
        ]
    )
    masks = torch.zeros((3, 100, 200))
    masks[0, 30:40, 20:30] = 1.0
    masks[2, 50:60, 0:200] = 1.0
    result = Results(img, "x.jpg", {0: "person", 2: "car"}, boxes=boxes, masks=masks)
    people = parse_result(result, 0)
    assert [(p.box, round(p.score, 2)) for p in people] == [
        ((10, 20, 51, 80), 0.9),
        ((0, 30, 200, 100), 0.7),
    ]
    first = people[0].mask
    assert first is not None and first.shape == (60, 41)
    assert first.sum() == 100 and first[10:20, 10:20].all()
    assert people[1].mask is not None and people[1].mask.sum() == 10 * 200
    plain = parse_result(Results(img, "x.jpg", {0: "person"}, boxes=boxes[:1]), 0)
    assert plain == [Person((10, 20, 51, 80), pytest.approx(0.9))]
    assert plain[0].mask is None


def test_person_class_from_names_or_config(tmp_path: Path) -> None:
    path = build_yolo(tmp_path, "yolov8n.yaml", names={0: "cat", 1: "dog", 2: "Person"})
    det = YOLODetector(str(path))
    det.load()
    assert det._person == 2
    nobody = build_yolo(tmp_path / "n", "yolov8n.yaml", names={0: "cat", 1: "dog"})
    with pytest.raises(ModelUnavailableError, match="no 'person' class"):
        YOLODetector(str(nobody)).load()
    det = YOLODetector(str(nobody), person_class_id=1)
    det.load()
    assert det._person == 1


def test_model_names_and_files(tmp_path: Path, yolo_dir: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        YOLODetector(str(tmp_path / "missing.pt")).load()
    with pytest.raises(ModelUnavailableError, match="without weights"):
        YOLODetector("yolov8n.yaml").load()
    with pytest.raises(ModelUnavailableError, match="released"):
        YOLODetector("my-model.pt").load()
    start = time.monotonic()
    with pytest.raises(ModelDownloadError, match="YOLO_OFFLINE"):
        YOLODetector("yolo11s-seg.pt", cache_dir=tmp_path).load()
    assert time.monotonic() - start < 5  # no network attempt
    # a released name is looked up in <cache_dir>/ultralytics/, never the working dir
    cached = tmp_path / "ultralytics"
    cached.mkdir()
    shutil.copy(yolo_dir / "yolov8n-seg.pt", cached / "yolov8n-seg.pt")
    det = YOLODetector("yolov8n-seg.pt", cache_dir=tmp_path)
    det.load()
    assert det.segments and det.resolve() == cached / "yolov8n-seg.pt"


def _smoke_config(yolo_dir: Path, wd_model_dir: Path, **cfg: object) -> MultiPersonConfig:
    return MultiPersonConfig(
        detector_model=str(yolo_dir / "yolov8n-seg.pt"),
        detector_image_size=320,
        confidence=0.0,  # random weights: everything is a low-confidence "person"
        min_size=50,
        max_people=3,
        tagger=WDTaggerConfig(model=str(wd_model_dir)),
        **cfg,
    )


def test_smoke_lora_tags_on_bundled_photos(
    yolo_dir: Path, wd_model_dir: Path, photos: list[Image.Image]
) -> None:
    gen = MultiPersonGenerator(_smoke_config(yolo_dir, wd_model_dir))
    gen.load()
    assert gen.loaded
    items = [gen.prepare(ImageInput(Path(f"{i}.jpg"), im)) for i, im in enumerate(photos)]
    out = gen.generate(items)
    assert len(out) == 2
    for caption in out:
        parts = caption.split(", ")
        assert parts[0] == "person1" and "person3" in parts and "scene" in parts
        assert parts.index("person1") < parts.index("person2") < parts.index("person3")
    assert gen.generate(items) == out  # deterministic
    gen.unload()
    assert not gen.loaded


def test_smoke_fine_tune_with_tiny_vlm(
    yolo_dir: Path,
    wd_model_dir: Path,
    photos: list[Image.Image],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require("transformers", "the vlm extra")
    from tests.vlmmodels import build_llava

    folder = build_llava(tmp_path_factory.mktemp("llava"))
    cfg = _smoke_config(
        yolo_dir,
        wd_model_dir,
        mode="fine_tune_caption",
        describer=VLMConfig(model=str(folder), max_new_tokens=12, min_new_tokens=12),
    )
    gen = MultiPersonGenerator(cfg)
    gen.load()
    assert isinstance(gen._describer, VLMDescriber)
    calls: list[int] = []
    describe = gen._describer.vlm.generate
    gen._describer.vlm.generate = lambda items: calls.append(len(items)) or describe(items)
    items = [gen.prepare(ImageInput(Path(f"{i}.jpg"), im)) for i, im in enumerate(photos)]
    out = gen.generate(items)
    assert calls == [2 * (3 + 1)]  # 3 people + the scene per photo, one call
    for caption in out:
        lines = caption.splitlines()
        assert [line.split(":")[0] for line in lines[:3]] == [
            "sksA",
            "sksB",
            "unidentified person",  # the tiny tagger knows no 1girl/1boy
        ]
        for line in lines[:3]:
            text = line.split(": ", 1)[1]
            assert text[0].isupper() and text.endswith(".") and len(text.split()) <= 35
        assert len(lines) == 3 or lines[3].startswith("Scene: ")


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1), (3, 2000), (1, 1)])
def test_extreme_aspect_ratios_are_captioned(
    yolo_dir: Path, wd_model_dir: Path, size: tuple[int, int]
) -> None:
    cfg = _smoke_config(yolo_dir, wd_model_dir).model_copy(update={"min_size": 1})
    gen = MultiPersonGenerator(cfg)
    assert gen.draft_size == 2048 and gen.draft_longer_side
    gen.load()
    item = gen.prepare(ImageInput(Path("strip.png"), Image.new("RGB", size, (0, 0, 0))))
    w, h = item.image.size
    assert max(w, h) <= 20 * min(w, h) and max(w, h) <= 2048
    caption = gen.generate([item])[0]
    assert caption.startswith("person1, ") or caption.endswith("background, no humans")


def test_florence2_describer_works_with_the_default_prompts(
    yolo_dir: Path,
    wd_model_dir: Path,
    photos: list[Image.Image],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Issue 10, item 6: Florence-2 takes task tokens, not the plan's sentences. Each
    prompt is sent as its role's task: a detailed caption of a person's crop or of the
    whole image, a short caption of the scene."""
    pytest.importorskip("transformers")
    import structlog

    try:
        from tests.vlmmodels import build_florence2
    except ImportError:
        pytest.skip("tests/vlmmodels.py (the VLM generator's test models) is not here")
    folder = build_florence2(tmp_path_factory.mktemp("florence2"))
    cfg = _smoke_config(
        yolo_dir,
        wd_model_dir,
        mode="fine_tune_caption",
        describer=VLMConfig(model=str(folder), max_new_tokens=12, min_new_tokens=12),
    )
    gen = MultiPersonGenerator(cfg)
    with structlog.testing.capture_logs() as logs:
        gen.load()
    mapped = [e for e in logs if e["event"] == "describer_prompts_mapped_to_tasks"]
    assert len(mapped) == 1 and mapped[0]["family"] == "florence2"
    assert mapped[0]["tasks"] == {
        "person": "<DETAILED_CAPTION>",
        "scene": "<CAPTION>",
        "whole": "<DETAILED_CAPTION>",
    }
    assert isinstance(gen._describer, VLMDescriber)
    sent: list[tuple[str, str]] = []
    describe = gen._describer.vlm.generate

    def spy(items: list) -> list[str]:
        sent.extend((i.prompt, i.text) for i in items)
        return describe(items)

    gen._describer.vlm.generate = spy
    items = [gen.prepare(ImageInput(Path(f"{i}.jpg"), im)) for i, im in enumerate(photos)]
    out = gen.generate(items)
    task = [("<DETAILED_CAPTION>",) * 2] * 3 + [("<CAPTION>",) * 2]
    assert sent == task * 2  # 3 people + the scene per photo
    for caption in out:
        lines = caption.splitlines()
        assert [line.split(":")[0] for line in lines[:3]] == [
            "sksA",
            "sksB",
            "unidentified person",
        ]
        for line in lines[:3]:
            text = line.split(": ", 1)[1]
            assert text and not re.search(r"<[A-Z_]+>|</?s>|<pad>", text), text
    sent.clear()
    assert gen._describer.describe([photos[0]], [cfg.whole_prompt])[0].strip()
    assert sent == [("<DETAILED_CAPTION>",) * 2]


def test_detector_download_that_cannot_connect_is_a_network_error(
    yolo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ultralytics

    from daemon.errors import ErrorType, NetworkError, classify

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Download failure for https://github.com/...: retry limit reached")

    monkeypatch.setattr(ultralytics, "YOLO", unreachable)
    with pytest.raises(NetworkError) as info:
        YOLODetector(str(yolo_dir / "yolov8n.pt")).load()
    c = classify(info.value)
    assert (c.error_type, c.retryable) == (ErrorType.NETWORK, True)
