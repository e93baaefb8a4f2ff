"""multi_person: pure image operations, aliases, gender, and the whole pipeline with an
injected detector (known boxes and masks), the real WD tagger on the tiny model, and a
fake describer that says which colour it was shown."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from daemon.errors import GenerationError, classify
from daemon.generators.base import ImageInput
from daemon.generators.detection import Person, select_people
from daemon.generators.multi_person import (
    MultiPersonConfig,
    MultiPersonGenerator,
    caption_aliases,
    gender_of,
    isolate_person,
    mask_people,
    person_mask,
    spotlight_person,
    tag_aliases,
)
from daemon.generators.wd_tagger import WDTaggerConfig
from daemon.text.postprocess import Pipeline, PostContext

try:
    from tests import wdmodel
except ImportError:  # tests/ is not a package
    import wdmodel  # type: ignore[no-redef]

os.environ["HF_HUB_OFFLINE"] = "1"

RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
TAIL = "simple background, no humans"  # the tiny model's always-on tags
TAGS = {
    "red": f"red background, {TAIL}",
    "green": f"green background, {TAIL}",
    "blue": f"blue background, {TAIL}",
    "black": f"black background, {TAIL}",
}
# Five people, largest first: (colour, box). Square boxes and images, because the WD
# preprocessing pads to a white square and the tiny model reads the mean colour. No box
# is within 10 px (the default padding) of another.
FIVE = [
    ("red", (20, 20, 140, 140)),  # 120 x 120
    ("green", (170, 20, 280, 130)),  # 110
    ("blue", (310, 20, 410, 120)),  # 100
    ("yellow", (20, 260, 110, 350)),  # 90
    ("cyan", (150, 260, 230, 340)),  # 80
]


def scene(people: Sequence[tuple[str, tuple[int, int, int, int]]], size=(480, 480)):
    """A black image with one coloured rectangle per person; the boxes as Persons."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    persons = []
    for colour, (x0, y0, x1, y1) in people:
        arr[y0:y1, x0:x1] = RGB[colour]
        persons.append(Person((x0, y0, x1, y1), 0.9))
    return Image.fromarray(arr), persons


class FixedDetector:
    """Returns the given people for the n-th image of each call (shuffled order)."""

    def __init__(self, per_image: list[list[Person]]):
        self.per_image = per_image
        self.calls: list[int] = []

    def detect(self, images: Sequence[Image.Image]) -> list[list[Person]]:
        self.calls.append(len(images))
        assert len(images) == len(self.per_image)
        return [list(reversed(p)) for p in self.per_image]  # order is not the detector's job


def colour_of(img: Image.Image) -> str:
    """The colour of the crop's untouched (full-intensity) pixels."""
    arr = np.asarray(img.convert("RGB")).reshape(-1, 3)
    full = arr[arr.max(axis=1) == 255]
    if not len(full):
        return "nothing"
    values, counts = np.unique(full, axis=0, return_counts=True)
    top = tuple(int(v) for v in values[np.argmax(counts)])
    return next((n for n, c in RGB.items() if c == top), str(top))


class FakeDescriber:
    """Describes a person crop by the colour it sees; records every call."""

    def __init__(self, scene_text="A dark empty room with nothing else.", person_text=None):
        self.calls: list[tuple[list[Image.Image], list[str]]] = []
        self.scene_text = scene_text
        self.person_text = person_text
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def describe(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        self.calls.append((list(images), list(prompts)))
        cfg = MultiPersonConfig()
        out = []
        for img, prompt in zip(images, prompts, strict=True):
            if prompt == cfg.scene_prompt:
                out.append(self.scene_text)
            elif prompt == cfg.whole_prompt:
                out.append("The image shows a plain black picture without anyone in it")
            else:
                out.append(
                    self.person_text
                    or f"The image shows a person dressed in {colour_of(img)} standing still"
                )
        return out


@pytest.fixture(scope="module")
def gender_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny WD model plus 1girl (fires on red crops) and 1boy (on blue crops)."""
    extra = [
        ("1girl", wdmodel.GENERAL, (-10, -10, 10), -5.0),
        ("1boy", wdmodel.GENERAL, (10, -10, -10), -5.0),
    ]
    saved = wdmodel.TINY_TAGS
    wdmodel.TINY_TAGS = [*saved, *extra]
    try:
        return wdmodel.build_wd_model(tmp_path_factory.mktemp("wd_gender"))
    finally:
        wdmodel.TINY_TAGS = saved


def make(
    model_dir: Path,
    per_image: list[list[Person]],
    describer: Any = None,
    **cfg: Any,
) -> tuple[MultiPersonGenerator, FixedDetector]:
    detector = FixedDetector(per_image)
    config = MultiPersonConfig(tagger=WDTaggerConfig(model=str(model_dir)), **cfg)
    gen = MultiPersonGenerator(config, detector=detector, describer=describer)
    gen.load()
    return gen, detector


def run(gen: MultiPersonGenerator, images: Sequence[Image.Image]) -> list[str]:
    items = [gen.prepare(ImageInput(Path(f"img{i}.png"), im)) for i, im in enumerate(images)]
    return gen.generate(items)


# -- detection rules -------------------------------------------------------------------------


def test_select_people_thresholds_and_stable_order() -> None:
    people = [
        Person((0, 100, 60, 160), 0.9),  # 60x60, lower
        Person((100, 0, 160, 60), 0.9),  # 60x60, higher: before the one above
        Person((0, 0, 40, 40), 0.9),  # smaller
        Person((200, 0, 300, 100), 0.4),  # below confidence
        Person((300, 0, 330, 200), 0.9),  # 30 px wide: below min_size
        Person((400, 0, 500, 100), 0.9, np.zeros((100, 100), bool)),  # empty mask
        Person((0, 200, 100, 300), 0.9),  # largest
    ]
    got = select_people(people, confidence=0.5, min_size=35, max_people=10)
    assert [p.box for p in got] == [
        (0, 200, 100, 300),
        (100, 0, 160, 60),
        (0, 100, 60, 160),
        (0, 0, 40, 40),
    ]
    got = select_people(people, confidence=0.5, min_size=35, max_people=2)
    assert [p.box for p in got] == [(0, 200, 100, 300), (100, 0, 160, 60)]
    # the same people in any order give the same result
    assert select_people(people[::-1], confidence=0.5, min_size=35, max_people=10) == (
        select_people(people, confidence=0.5, min_size=35, max_people=10)
    )


# -- pixels ------------------------------------------------------------------------------


def test_isolate_greys_other_people_by_box_but_never_the_person() -> None:
    arr = np.full((100, 200, 3), 10, dtype=np.uint8)
    a = Person((20, 20, 80, 80))
    b = Person((60, 30, 150, 90))  # overlaps a at x 60..80
    arr[20:80, 20:80] = RGB["red"]
    arr[30:90, 80:150] = RGB["blue"]
    crop = np.asarray(isolate_person(arr, [a, b], 0, padding=10, fill=128))
    assert crop.shape == (80, 80, 3)  # (10..90) x (10..90)
    # a's own box is untouched, also where b's box overlaps it
    assert (crop[10:70, 10:70] == RGB["red"]).all()
    # b's box outside a's: grey; the background: untouched
    assert (crop[20:80, 70:80] == 128).all()
    assert (crop[0:10, :] == 10).all()
    assert (crop[70:80, 0:50] == 10).all()


def test_isolate_and_spotlight_follow_masks() -> None:
    arr = np.full((60, 60, 3), 200, dtype=np.uint8)
    ma = np.zeros((40, 40), bool)
    ma[:, :20] = True  # a is the left half of its box
    mb = np.zeros((40, 40), bool)
    mb[:, 20:] = True  # b is the right half of the same box
    a = Person((10, 10, 50, 50), mask=ma)
    b = Person((10, 10, 50, 50), mask=mb)
    assert person_mask(a, (0, 0, 60, 60)).sum() == 40 * 20
    crop = np.asarray(isolate_person(arr, [a, b], 0, padding=0, fill=7))
    assert (crop[:, :20] == 200).all() and (crop[:, 20:] == 7).all()
    lit = np.asarray(spotlight_person(arr, [a, b], 1, padding=5, dim=0.3))
    assert lit.shape == (50, 50, 3)
    assert (lit[5:45, 25:45] == 200).all()  # b itself: opaque
    assert (lit[5:45, 5:25] == 60).all()  # a (outside b's mask): dimmed to 30 %
    assert (lit[0:5] == 60).all()  # background: dimmed
    scene_arr = np.asarray(mask_people(arr, [a, b], dim=0.3))
    assert (scene_arr[10:50, 10:50] == 60).all() and (scene_arr[:10] == 200).all()
    greyed = np.asarray(mask_people(arr, [a], fill=128))
    assert (greyed[10:50, 10:30] == 128).all() and (greyed[10:50, 30:50] == 200).all()


# -- aliases and gender ---------------------------------------------------------------------


def test_tag_aliases_custom_partial_none() -> None:
    assert tag_aliases(3, [], "person{n}") == ["person1", "person2", "person3"]
    assert tag_aliases(3, ["alice"], "person{n}") == ["alice", "person2", "person3"]
    assert tag_aliases(3, ["", "bob"], "person{n}") == ["person1", "bob", "person3"]
    assert tag_aliases(2, ["a", "b", "c"], "person{n}") == ["a", "b"]


def test_caption_aliases_and_gender_labels() -> None:
    named = ["sksA", "sksB"]
    g = ["female", "male", "female", "male", "unknown"]
    assert caption_aliases(5, [], named, [None, None, "female", "male", "unknown"]) == [
        "sksA",
        "sksB",
        "unidentified woman",
        "unidentified man",
        "unidentified person",
    ]
    assert caption_aliases(3, ["alice", "", "carol"], named, g) == ["alice", "sksB", "carol"]
    assert caption_aliases(1, [], named, []) == ["sksA"]


@pytest.mark.parametrize(
    ("scores", "want"),
    [
        ({"1girl": 0.9}, "female"),
        ({"1boy": 0.9, "1girl": 0.2}, "male"),
        ({"female": 0.8}, "female"),  # "female" contains "male": no substring matching
        ({"woman": 0.8}, "female"),  # "woman" contains "man"
        ({"magical_girl": 0.9, "1boy": 0.5}, "male"),  # only exact tags count
        ({"1girl": 0.3}, "unknown"),  # below the threshold
        ({"1girl": 0.6, "1boy": 0.6}, "unknown"),  # a tie
        ({"male_focus": 0.7, "long_hair": 0.9}, "male"),
    ],
)
def test_gender_of(scores: dict[str, float], want: str) -> None:
    assert gender_of(scores, 0.35) == want


# -- lora_tags with the real WD tagger on the tiny model ----------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5])
def test_lora_tags_exact_output(wd_model_dir: Path, count: int) -> None:
    image, people = scene(FIVE[:count])
    gen, det = make(wd_model_dir, [people])
    got = run(gen, [image])
    colours = [c for c, _ in FIVE[:count]]
    tags = {**TAGS, "yellow": TAIL, "cyan": TAIL}  # too little colour in their crops
    if count == 0:
        want = TAGS["black"]  # the whole image's tags, no alias, no "no people" sentence
    else:
        parts = [f"person{i + 1}, {tags[c]}" for i, c in enumerate(colours)]
        want = ", ".join([*parts, f"scene, {TAGS['black']}"])
    assert got == [want]
    assert det.calls == [1]


def test_lora_tags_aliases_separator_and_no_scene(wd_model_dir: Path) -> None:
    image, people = scene(FIVE[:3])
    gen, _ = make(wd_model_dir, [people], aliases=["alice", "", "carol"], separator=" | ")
    assert run(gen, [image]) == [
        " | ".join(
            [
                "alice",
                "red background | simple background | no humans",
                "person2",
                "green background | simple background | no humans",
                "carol",
                "blue background | simple background | no humans",
                "scene",
                "black background | simple background | no humans",
            ]
        )
    ]
    gen, _ = make(wd_model_dir, [people[:1]], scene=False, tag_alias="char{n}")
    assert run(gen, [image]) == [f"char1, {TAGS['red']}"]


def test_lora_tags_other_people_do_not_leak(wd_model_dir: Path) -> None:
    # a big blue person right next to a red one; the red crop's padding covers part of
    # the blue person, which reaches the tagger grey, not blue
    image, people = scene([("blue", (200, 40, 460, 440)), ("red", (60, 140, 180, 260))])
    gen, _ = make(wd_model_dir, [people], padding=60, scene=False)
    seen: list[Image.Image] = []
    tag = gen._tagger.tag
    gen._tagger.tag = lambda images: seen.extend(images) or tag(images)
    (got,) = run(gen, [image])
    assert "blue background" not in got.split("person2")[1]
    red_crop = np.asarray(seen[1]).reshape(-1, 3)
    assert len(red_crop) == 240 * 240
    assert not (red_crop == RGB["blue"]).all(axis=1).any()
    assert (red_crop == 128).all(axis=1).sum() == 40 * 240  # x 200..240 of blue: grey
    raw = np.asarray(image)[80:320, 0:240].reshape(-1, 3)
    assert (raw == RGB["blue"]).all(axis=1).sum() == 40 * 240  # what would have leaked


def test_batch_of_images_one_detector_and_one_tagger_pass(wd_model_dir: Path) -> None:
    img1, p1 = scene(FIVE[:2])
    img2, p2 = scene([])
    img3, p3 = scene(FIVE[2:3])
    gen, det = make(wd_model_dir, [p1, p2, p3])
    calls = []
    tag = gen._tagger.tag
    gen._tagger.tag = lambda images: calls.append(len(images)) or tag(images)
    out = run(gen, [img1, img2, img3])
    assert det.calls == [3]
    assert calls == [2 + 1 + 1 + 1 + 1]  # 2 people + scene, whole image, 1 person + scene
    assert out[1] == TAGS["black"]
    assert out[2] == f"person1, {TAGS['blue']}, scene, {TAGS['black']}"


# -- fine_tune_caption with a fake describer -------------------------------------------------


def desc(colour: str) -> str:
    return f"A person dressed in {colour} standing still."


SCENE = "Scene: A dark empty room with nothing else."


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5])
def test_fine_tune_exact_output(gender_model_dir: Path, count: int) -> None:
    image, people = scene(FIVE[:count])
    describer = FakeDescriber()
    gen, _ = make(gender_model_dir, [people], describer, mode="fine_tune_caption")
    assert gen.caption_type == "caption"
    got = run(gen, [image])
    want = {
        0: "A plain black picture without anyone in it.",
        1: f"sksA: {desc('red')}\n{SCENE}",
        2: f"sksA: {desc('red')}\nsksB: {desc('green')}\n{SCENE}",
        3: f"sksA: {desc('red')}\nsksB: {desc('green')}\nunidentified man: {desc('blue')}\n{SCENE}",
        5: f"sksA: {desc('red')}\nsksB: {desc('green')}\nunidentified man: {desc('blue')}\n"
        f"unidentified person: {desc('yellow')}\nunidentified person: {desc('cyan')}\n{SCENE}",
    }[count]
    assert got == [want]
    assert len(describer.calls) == 1  # all crops in one call
    assert len(describer.calls[0][0]) == (count + 1 if count else 1)


def test_fine_tune_gender_woman_and_custom_aliases(gender_model_dir: Path) -> None:
    people = [("green", FIVE[0][1]), ("cyan", FIVE[1][1]), ("red", FIVE[2][1])]
    image, persons = scene(people)
    gen, _ = make(gender_model_dir, [persons], FakeDescriber(), mode="fine_tune_caption")
    assert run(gen, [image])[0].splitlines()[2] == f"unidentified woman: {desc('red')}"
    gen, _ = make(
        gender_model_dir,
        [persons],
        FakeDescriber(),
        mode="fine_tune_caption",
        aliases=["", "bob", "carol"],
    )
    lines = run(gen, [image])[0].splitlines()
    assert [line.split(":")[0] for line in lines] == ["sksA", "bob", "carol", "Scene"]
    gen, _ = make(
        gender_model_dir, [persons], FakeDescriber(), mode="fine_tune_caption", gender_labels=False
    )
    assert run(gen, [image])[0].splitlines()[2].startswith("unidentified person: ")


def test_fine_tune_pixels_sent_to_the_describer(gender_model_dir: Path) -> None:
    image, people = scene(FIVE[:2])
    describer = FakeDescriber()
    gen, _ = make(gender_model_dir, [people], describer, mode="fine_tune_caption", padding=10)
    run(gen, [image])
    (images, prompts) = describer.calls[0]
    cfg = MultiPersonConfig()
    assert prompts == [cfg.person_prompt, cfg.person_prompt, cfg.scene_prompt]
    first = np.asarray(images[0])
    assert first.shape == (140, 140, 3)  # red box (120 x 120) plus 10 px padding
    assert (first[10:130, 10:130] == RGB["red"]).all()  # the person: opaque
    assert (first[:10] == 0).all()  # black background dimmed stays black
    second = np.asarray(images[1])
    # green person's crop: x 160..290 covers nothing of red (ends at 140); opaque green
    assert (second[10:120, 10:120] == RGB["green"]).all()
    whole = np.asarray(images[2])
    assert whole.shape == (480, 480, 3)
    assert (whole[20:140, 20:140] == (76, 0, 0)).all()  # red dimmed to 30 %
    assert (whole[20:130, 170:280] == (0, 76, 0)).all()


def test_fine_tune_spotlight_dims_other_person_in_crop(gender_model_dir: Path) -> None:
    # yellow right next to red: in red's padded crop yellow is dimmed, red is not
    image, people = scene([("red", (50, 50, 150, 250)), ("yellow", (155, 60, 200, 200))])
    describer = FakeDescriber()
    gen, _ = make(gender_model_dir, [people], describer, mode="fine_tune_caption", padding=20)
    run(gen, [image])
    crop = np.asarray(describer.calls[0][0][0])
    assert (crop[20:220, 20:120] == RGB["red"]).all()
    assert (crop[30:170, 125:140] == (76, 76, 0)).all()  # yellow, dimmed to 30 %


@pytest.mark.parametrize(
    ("scene_text", "line"),
    [
        ("A dark room.", "Scene: A dark room."),  # 3 words: kept
        ("Dark room.", None),  # 2 words: dropped
        ("", None),
    ],
)
def test_scene_rule(gender_model_dir: Path, scene_text: str, line: str | None) -> None:
    image, people = scene(FIVE[:1])
    gen, _ = make(
        gender_model_dir, [people], FakeDescriber(scene_text=scene_text), mode="fine_tune_caption"
    )
    lines = run(gen, [image])[0].splitlines()
    assert lines[0] == f"sksA: {desc('red')}"
    assert lines[1:] == ([line] if line else [])


def test_word_limit_cuts_at_a_sentence_boundary(gender_model_dir: Path) -> None:
    first = "She wears a long red coat with silver buttons and a wide black belt at the waist."
    second = "Her left hand rests on a wooden railing while she looks toward the bright window."
    third = "Light falls across her face."
    image, people = scene(FIVE[:1])
    describer = FakeDescriber(person_text=f"{first} {second} {third}")
    gen, _ = make(gender_model_dir, [people], describer, mode="fine_tune_caption", scene=False)
    assert len(f"{first} {second}".split()) == 32
    assert run(gen, [image]) == [f"sksA: {first} {second}"]
    gen, _ = make(
        gender_model_dir, [people], describer, mode="fine_tune_caption", scene=False, max_words=10
    )
    out = run(gen, [image])[0]
    assert out == "sksA: She wears a long red coat with silver buttons and."


def test_one_describer_call_for_a_batch_and_chunking(gender_model_dir: Path) -> None:
    img1, p1 = scene(FIVE[:2])
    img2, p2 = scene(FIVE[:3])
    img3, p3 = scene([])
    describer = FakeDescriber()
    gen, det = make(gender_model_dir, [p1, p2, p3], describer, mode="fine_tune_caption")
    out = run(gen, [img1, img2, img3])
    assert det.calls == [3]
    assert [len(images) for images, _ in describer.calls] == [(2 + 1) + (3 + 1) + 1]
    assert out[0].count("\n") == 2 and out[1].count("\n") == 3
    assert out[2] == "A plain black picture without anyone in it."
    one_by_one = FakeDescriber()
    gen, _ = make(
        gender_model_dir, [p1, p2, p3], one_by_one, mode="fine_tune_caption", describe_batch_size=1
    )
    assert run(gen, [img1, img2, img3]) == out
    assert len(one_by_one.calls) == 8


class Broken(FakeDescriber):
    def __init__(self, exc: BaseException | None = None, text: str | None = None):
        super().__init__()
        self.exc, self.text = exc, text

    def describe(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        if self.exc is not None:
            raise self.exc
        return [self.text or "" for _ in images]


def test_failed_description_fails_the_job_never_a_placeholder(gender_model_dir: Path) -> None:
    image, people = scene(FIVE[:2])
    gen, _ = make(
        gender_model_dir, [people], Broken(RuntimeError("cuda")), mode="fine_tune_caption"
    )
    with pytest.raises(GenerationError) as info:
        run(gen, [image])
    c = classify(info.value)
    assert c.error_type == "generation" and c.retryable
    gen, _ = make(gender_model_dir, [people], Broken(text="   "), mode="fine_tune_caption")
    with pytest.raises(GenerationError, match="person 1 is empty"):
        run(gen, [image])
    gen, _ = make(gender_model_dir, [people], Broken(MemoryError()), mode="fine_tune_caption")
    with pytest.raises(MemoryError):  # the worker halves the batch
        run(gen, [image])


def test_multiline_caption_survives_a_line_keeping_chain(gender_model_dir: Path) -> None:
    image, people = scene(FIVE[:2])
    gen, _ = make(gender_model_dir, [people], FakeDescriber(), mode="fine_tune_caption")
    (raw,) = run(gen, [image])
    ctx = PostContext(caption_type=gen.caption_type, trigger_word="")
    assert Pipeline(["trim", "terminal_punctuation"])(raw, ctx) == raw


# -- configuration -------------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="separator"):
        MultiPersonConfig(aliases=["a, b"])
    MultiPersonConfig(mode="fine_tune_caption", aliases=["a, b"])  # fine in caption lines
    with pytest.raises(ValidationError, match="spans lines"):
        MultiPersonConfig(aliases=["a\nb"])
    with pytest.raises(ValidationError, match="person_prompt"):
        MultiPersonConfig(describer={"prompt": "x"})
    with pytest.raises(ValidationError, match="separator"):
        MultiPersonConfig(tagger={"separator": " "})
    with pytest.raises(ValidationError, match="extra"):
        MultiPersonConfig(nonsense=1)
    with pytest.raises(ValidationError, match="tag_alias"):
        MultiPersonConfig(tag_alias="p{i}")
    cfg = MultiPersonConfig(tagger={"remove_underscores": False})
    assert cfg.remove_underscores is False  # what the worker's post-processing reads


def test_registered_and_mode_sets_type(gender_model_dir: Path) -> None:
    from daemon.generators.registry import discover

    found = discover()["multi_person"]
    assert found.cls is MultiPersonGenerator, found.error
    assert MultiPersonGenerator().caption_type == "tags"
    ft = MultiPersonGenerator(MultiPersonConfig(mode="fine_tune_caption"))
    assert (ft.caption_type, ft.weight.value) == ("caption", "heavy")
    assert not ft.loaded


def test_dimming_rounds_like_float_arithmetic_on_every_value() -> None:
    """The lookup table behind the dimming gives what float32 multiply-and-round gives,
    for every byte value, and leaves pixels outside the people untouched."""
    arr = np.arange(256 * 3, dtype=np.uint32).reshape(16, 16, 3).astype(np.uint8)
    arr = np.concatenate([arr, np.full((4, 16, 3), 77, np.uint8)])  # a strip with no one
    everyone = Person((0, 0, 16, 16))
    for factor in (0.0, 0.3, 0.35, 0.5, 1.0):
        got = np.asarray(mask_people(arr, [everyone], dim=factor))
        expected = np.round(arr[:16].astype(np.float32) * factor).astype(np.uint8)
        assert (got[:16] == expected).all(), factor
        assert (got[16:] == 77).all()
