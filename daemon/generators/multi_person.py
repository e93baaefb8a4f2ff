"""Multi-person captions: YOLO finds the people, then per-person tags or sentences.

Two modes (``[generators.multi_person].mode``):

``lora_tags``
    WD tags of each person's crop (padded), with the *other* people greyed out in
    that crop (by mask with a -seg detector, else by box; the person's own pixels are
    never greyed), then tags of the whole image with every person greyed out:
    ``person1, tag, tag, person2, tag, scene, tag`` on one line.

``fine_tune_caption``
    A vision-language description of each person's crop with everything but that
    person dimmed, and one of the whole image with the people dimmed, kept only when it
    has at least ``scene_min_words`` words::

        sksA: <sentence>
        sksB: <sentence>
        unidentified woman: <sentence>      (third and later people, gender from WD tags)
        Scene: <sentence>

    All crops of all images in a batch go to the describer in one batched call. A
    describer that takes task tokens instead of prompts (Florence-2) gets each
    prompt's fitting task (:data:`ROLE_TASKS`).

Aliases: ``aliases`` (custom, by position; ``""`` keeps the default of that position)
take precedence; the rest are ``person{n}`` (tags) or ``sksA``, ``sksB``, then
``unidentified woman|man|person`` (captions). With no person detected the caption is
the whole image's tags or description, never a "no people" sentence. A failed or empty
description fails the job (retryable ``generation`` error), never a placeholder.

Seams: a :class:`~daemon.generators.detection.Detector`, a :class:`Tagger` and a
:class:`Describer` can be injected; by default they wrap ultralytics YOLO, the WD tagger
(its loading, preprocessing and ``format_tags``) and the VLM generator. Crops and masks
stay in memory. Heavy imports happen in ``load()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import numpy as np
import structlog
from PIL import Image
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from daemon.errors import CaptionError, GenerationError, ModelUnavailableError, is_out_of_memory
from daemon.generators.base import (
    Availability,
    Generator,
    GeneratorConfig,
    ImageInput,
    WeightClass,
)
from daemon.generators.detection import Detector, Person, YOLODetector, select_people
from daemon.generators.remote_vlm import RemoteDescriber, RemoteVLMConfig, http_warning
from daemon.generators.vlm import VLMConfig, shrink
from daemon.generators.vlm_families import CAPTION, DETAILED_CAPTION, task_for
from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig, format_tags
from daemon.text.vlm import clean_vlm_output

# The plan's prompts (seeds/000): one sentence about the person; a short setting.
PERSON_PROMPT = (
    "Describe this person in one clear sentence (15-35 words). "
    "Include: physical appearance, clothing, accessories, pose, and expression. "
    "Be specific and concise. Do not use bullet points."
)
SCENE_PROMPT = (
    "Briefly describe the setting/environment in 5-15 words. "
    "Focus on location type, lighting, and key background elements. "
    "Do not describe people."
)
WHOLE_PROMPT = "Describe this image in one clear sentence (15-35 words)."
# What each prompt asks, as a Florence-2 task (it takes task tokens, not words): a
# person in 15-35 words and the whole image -> a detailed caption (a few sentences, cut
# at max_words); the setting in 5-15 words -> a short caption.
ROLE_TASKS = {"person": DETAILED_CAPTION, "scene": CAPTION, "whole": DETAILED_CAPTION}

log = structlog.get_logger(__name__)

# WD tags that say who a crop shows (exact names, compared lower-case with spaces).
FEMALE_TAGS = frozenset(
    [
        "1girl",
        "2girls",
        "multiple girls",
        "female",
        "woman",
        "girl",
        "female focus",
        "mature female",
        "old woman",
    ]
)
MALE_TAGS = frozenset(
    ["1boy", "2boys", "multiple boys", "male", "man", "boy", "male focus", "mature male", "old man"]
)
UNIDENTIFIED = {
    "female": "unidentified woman",
    "male": "unidentified man",
    "unknown": "unidentified person",
}
Gender = Literal["female", "male", "unknown"]


class LocalDescriberConfig(VLMConfig):
    """``[generators.multi_person.describer]`` with a local VLM (the default)."""

    use: Literal["vlm"] = "vlm"


class RemoteDescriberConfig(RemoteVLMConfig):
    """``[generators.multi_person.describer]`` with ``use = "remote_vlm"``: a model on
    an OpenAI-compatible server; every crop and the scene are asked concurrently."""

    use: Literal["remote_vlm"]


def _describer_kind(value: Any) -> str:
    use = value.get("use", "vlm") if isinstance(value, dict) else getattr(value, "use", "vlm")
    return use if use in ("vlm", "remote_vlm") else "vlm"


DescriberConfig = Annotated[
    Annotated[LocalDescriberConfig, Tag("vlm")]
    | Annotated[RemoteDescriberConfig, Tag("remote_vlm")],
    Discriminator(_describer_kind),
]


class MultiPersonConfig(GeneratorConfig):
    """Settings of ``[generators.multi_person]`` (tables ``.tagger`` and ``.describer``
    hold the WD tagger's and the VLM's own settings)."""

    mode: Literal["lora_tags", "fine_tune_caption"] = "lora_tags"
    # detection
    detector_model: str = "yolo11s-seg.pt"  # a released name (cached) or a .pt/.onnx path
    detector_device: str = "auto"  # auto | cpu | cuda | cuda:1 | 0 ...
    detector_image_size: int = Field(640, ge=32, le=4096)
    detector_person_class: int | None = Field(None, ge=0)  # None = the class named person
    confidence: float = Field(0.5, ge=0.0, le=1.0)
    min_size: int = Field(50, ge=1, le=100_000)  # px, both sides of the box
    max_people: int = Field(10, ge=1, le=100)
    max_image_side: int = Field(2048, ge=64, le=32_768)  # images are shrunk to this before anything
    # crops
    padding: int = Field(10, ge=0, le=10_000)  # px around each person's box
    grey_value: int = Field(128, ge=0, le=255)  # fill for greyed-out people (tags)
    background_dim: float = Field(0.3, ge=0.0, le=1.0)  # rest of a person crop (captions)
    scene_people_dim: float = Field(0.3, ge=0.0, le=1.0)  # people in the scene (captions)
    # aliases and layout
    aliases: list[str] = Field(default_factory=list)  # custom, by position; "" = default
    tag_alias: str = "person{n}"  # lora_tags default alias, n = 1, 2, ...
    caption_aliases: list[str] = Field(default_factory=lambda: ["sksA", "sksB"])
    gender_labels: bool = True  # unidentified woman/man by WD tags (else "person")
    gender_threshold: float = Field(0.35, ge=0.0, le=1.0)
    separator: str = ", "  # lora_tags
    scene: bool = True  # add scene tags / the Scene line
    scene_tag: str = "scene"  # lora_tags marker before the scene tags
    scene_label: str = "Scene"  # fine_tune_caption line prefix
    # descriptions
    person_prompt: str = PERSON_PROMPT
    scene_prompt: str = SCENE_PROMPT
    whole_prompt: str = WHOLE_PROMPT  # nobody detected
    max_words: int = Field(35, ge=0, le=10_000)  # per description, cut at a sentence boundary
    scene_max_words: int = Field(25, ge=0, le=10_000)
    scene_min_words: int = Field(3, ge=0, le=10_000)
    describe_batch_size: int = Field(0, ge=0, le=4096)  # crops per describer call; 0 = all at once
    tag_batch_size: int = Field(32, ge=1, le=4096)  # crops per WD tagger run
    tagger: WDTaggerConfig = Field(default_factory=WDTaggerConfig)
    describer: DescriberConfig = Field(
        default_factory=lambda: LocalDescriberConfig(max_new_tokens=96)
    )

    @field_validator("describer", mode="before")
    @classmethod
    def _describer_use(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("use", "vlm") not in ("vlm", "remote_vlm"):
            raise ValueError(f"describer use = {v['use']!r}: use 'vlm' or 'remote_vlm'")
        if isinstance(v, (VLMConfig, RemoteVLMConfig)) and not isinstance(
            v, (LocalDescriberConfig, RemoteDescriberConfig)
        ):  # a plain generator config object: its settings, as the table would give them
            use = "remote_vlm" if isinstance(v, RemoteVLMConfig) else "vlm"
            return {**v.model_dump(exclude_unset=True), "use": use}
        return v

    @property
    def remove_underscores(self) -> bool:  # read by the post-processing context
        return self.tagger.remove_underscores

    @field_validator("aliases", "caption_aliases")
    @classmethod
    def _one_line(cls, v: list[str]) -> list[str]:
        for alias in v:
            if "\n" in alias or "\r" in alias:
                raise ValueError(f"alias {alias!r} spans lines")
        return [a.strip() for a in v]

    @field_validator("person_prompt", "scene_prompt", "whole_prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty")
        return v.strip()

    @field_validator("tag_alias")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(n=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"tag_alias {v!r} may only use {{n}}") from exc
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MultiPersonConfig:
        if "separator" in self.tagger.model_fields_set:
            raise ValueError("set separator in [generators.multi_person], not in .tagger")
        if self.describer.prompt is not None:
            raise ValueError(
                "describer.prompt is not used here: set person_prompt, scene_prompt, whole_prompt"
            )
        sep = self.separator.strip()
        if self.mode == "lora_tags" and sep:
            for alias in [*self.aliases, self.tag_alias, self.scene_tag]:
                if sep in alias:
                    raise ValueError(f"alias {alias!r} contains the separator {sep!r}")
        return self


# -- pure image operations (all in memory) ------------------------------------------------


def padded_region(
    box: tuple[int, int, int, int], pad: int, width: int, height: int
) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)


def person_mask(person: Person, region: tuple[int, int, int, int]) -> np.ndarray:
    """Where ``person`` is, in ``region`` coordinates (its mask, or its whole box)."""
    rx0, ry0, rx1, ry1 = region
    out = np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
    x0, y0, x1, y1 = person.box
    ix0, iy0, ix1, iy1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
    if ix0 >= ix1 or iy0 >= iy1:
        return out
    if person.mask is None:
        out[iy0 - ry0 : iy1 - ry0, ix0 - rx0 : ix1 - rx0] = True
    else:
        out[iy0 - ry0 : iy1 - ry0, ix0 - rx0 : ix1 - rx0] = person.mask[
            iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0
        ]
    return out


def _paint(
    pixels: np.ndarray, where: np.ndarray, *, fill: int | None, dim: float | None
) -> Image.Image:
    """``pixels`` as an image with the ``where`` pixels set to ``fill`` or multiplied by
    ``dim`` (rounded). Pillow's paste through a mask does the per-pixel work in C, several
    times faster than numpy's boolean indexing on a camera-sized image."""
    out = Image.fromarray(np.ascontiguousarray(pixels))
    if not where.any():
        return out
    bands = len(out.getbands())
    if fill is not None:
        over = Image.new(out.mode, out.size, (fill,) * bands if bands > 1 else fill)
    elif dim is not None:
        lut = np.round(np.arange(256, dtype=np.float32) * np.float32(dim)).astype(np.uint8)
        over = out.point(lut.tolist() * bands)
    else:
        return out
    out.paste(over, mask=Image.fromarray(where))
    return out


def isolate_person(
    image: np.ndarray, people: Sequence[Person], index: int, *, padding: int, fill: int
) -> Image.Image:
    """The padded crop of person ``index`` with the other people's pixels set to
    ``fill`` (grey), except where they overlap this person."""
    h, w = image.shape[:2]
    region = padded_region(people[index].box, padding, w, h)
    rx0, ry0, rx1, ry1 = region
    own = person_mask(people[index], region)
    others = np.zeros_like(own)
    for j, p in enumerate(people):
        if j != index:
            others |= person_mask(p, region)
    return _paint(image[ry0:ry1, rx0:rx1], others & ~own, fill=fill, dim=None)


def spotlight_person(
    image: np.ndarray, people: Sequence[Person], index: int, *, padding: int, dim: float
) -> Image.Image:
    """The padded crop of person ``index``: the person as is, everything else (background
    and other people) multiplied by ``dim``."""
    h, w = image.shape[:2]
    region = padded_region(people[index].box, padding, w, h)
    rx0, ry0, rx1, ry1 = region
    rest = ~person_mask(people[index], region)
    return _paint(image[ry0:ry1, rx0:rx1], rest, fill=None, dim=dim)


def people_union(people: Sequence[Person], width: int, height: int) -> np.ndarray:
    union = np.zeros((height, width), dtype=bool)
    for p in people:
        union |= person_mask(p, (0, 0, width, height))
    return union


def mask_people(
    image: np.ndarray,
    people: Sequence[Person],
    *,
    fill: int | None = None,
    dim: float | None = None,
) -> Image.Image:
    """The whole image with every person set to ``fill`` or multiplied by ``dim``."""
    h, w = image.shape[:2]
    return _paint(image, people_union(people, w, h), fill=fill, dim=dim)


# -- aliases, gender and layout (pure) -----------------------------------------------------


def _norm(tag: str) -> str:
    return " ".join(tag.strip().lower().replace("_", " ").split())


def gender_of(scores: dict[str, float], threshold: float) -> Gender:
    """Gender from WD tag scores (tag name -> probability): the more probable of the
    best female tag (1girl, woman, female, ...) and the best male tag (1boy, man, male,
    ...) when it reaches ``threshold``; a tie or nothing above it is ``unknown``."""
    female = max((p for t, p in scores.items() if _norm(t) in FEMALE_TAGS), default=0.0)
    male = max((p for t, p in scores.items() if _norm(t) in MALE_TAGS), default=0.0)
    if max(female, male) < threshold or female == male:
        return "unknown"
    return "female" if female > male else "male"


def tag_aliases(count: int, custom: Sequence[str], template: str) -> list[str]:
    return [
        custom[i] if i < len(custom) and custom[i] else template.format(n=i + 1)
        for i in range(count)
    ]


def caption_aliases(
    count: int,
    custom: Sequence[str],
    named: Sequence[str],
    genders: Sequence[Gender | None],
) -> list[str]:
    """Custom alias, else the i-th of ``named`` (sksA, sksB), else unidentified
    woman/man/person by ``genders[i]``."""
    out = []
    for i in range(count):
        if i < len(custom) and custom[i]:
            out.append(custom[i])
        elif i < len(named) and named[i]:
            out.append(named[i])
        else:
            g = genders[i] if i < len(genders) else None
            out.append(UNIDENTIFIED[g or "unknown"])
    return out


def needs_gender(index: int, config: MultiPersonConfig) -> bool:
    custom = index < len(config.aliases) and bool(config.aliases[index])
    named = index < len(config.caption_aliases) and bool(config.caption_aliases[index])
    return config.gender_labels and not custom and not named


def tags_line(
    aliases: Sequence[str], person_tags: Sequence[str], scene: str, config: MultiPersonConfig
) -> str:
    parts: list[str] = []
    for alias, tags in zip(aliases, person_tags, strict=True):
        parts.append(alias)
        if tags.strip():
            parts.append(tags.strip())
    if scene.strip():
        parts += [config.scene_tag, scene.strip()]
    return config.separator.join(parts)


def caption_lines(
    aliases: Sequence[str], descriptions: Sequence[str], scene: str, config: MultiPersonConfig
) -> str:
    lines = [f"{a}: {d}" for a, d in zip(aliases, descriptions, strict=True)]
    if scene:
        lines.append(f"{config.scene_label}: {scene}")
    return "\n".join(lines)


def clean_scene(text: str, config: MultiPersonConfig) -> str:
    """The cleaned scene description, or "" when shorter than ``scene_min_words``."""
    scene = clean_vlm_output(text, max_words=config.scene_max_words, prompt=config.scene_prompt)
    return scene if len(scene.split()) >= config.scene_min_words else ""


# -- seams: tagger and describer -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TagResult:
    text: str  # formatted tags (the tagger's settings, our separator)
    gender: Gender = "unknown"


class Tagger(Protocol):
    def tag(self, images: Sequence[Image.Image]) -> list[TagResult]: ...


class Describer(Protocol):
    """One batched call: ``images[i]`` is described following ``prompts[i]``."""

    def describe(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]: ...


class WDPersonTagger:
    """The WD tagger's own loading, preprocessing and formatting, plus the gender read
    from the raw probabilities (so ``undesired_tags`` or thresholds cannot hide it)."""

    def __init__(
        self, config: WDTaggerConfig, *, cache_dir: Path | None = None, gender_threshold: float
    ):
        self.wd = WDTagger(config, cache_dir=cache_dir)
        self.gender_threshold = gender_threshold
        self._gender_idx: dict[int, str] = {}

    @property
    def loaded(self) -> bool:
        return self.wd.loaded

    def load(self) -> None:
        self.wd.load()
        tags = self.wd._tags  # read-only use of the loaded tag list
        assert tags is not None
        self._gender_idx = {
            i: n for i, n in enumerate(tags.names) if _norm(n) in FEMALE_TAGS | MALE_TAGS
        }

    def unload(self) -> None:
        self.wd.unload()

    def tag(self, images: Sequence[Image.Image]) -> list[TagResult]:
        if not images:
            return []
        tags, session = self.wd._tags, self.wd._session
        if tags is None or session is None:
            raise GenerationError("the WD tagger is not loaded")
        x = np.stack([self.wd.prepare(ImageInput(Path("crop"), im)) for im in images])
        try:
            probs = self.wd._run(session, x)
        except MemoryError:
            raise
        except Exception as exc:
            raise GenerationError(f"onnxruntime run failed: {type(exc).__name__}: {exc}") from exc
        out = []
        for row in probs:
            scores = {n: float(row[i]) for i, n in self._gender_idx.items()}
            out.append(
                TagResult(
                    format_tags(row, tags, self.wd.config),
                    gender_of(scores, self.gender_threshold),
                )
            )
        return out


class VLMDescriber:
    """The VLM generator (:mod:`daemon.generators.vlm`) as a describer: each crop is
    shrunk and its prompt rendered the generator's way, then one ``generate()`` call.

    ``prompts`` maps a role (``person``, ``scene``, ``whole``) to its prompt. A family
    that takes task tokens instead of words (Florence-2) gets each role's fitting task
    (:data:`ROLE_TASKS`: a detailed caption of a person's crop or of the whole image,
    a short caption of the scene), unless the prompt already is one of its tasks; the
    mapping is logged once per load."""

    def __init__(
        self,
        config: VLMConfig,
        *,
        cache_dir: Path | None = None,
        prompts: Mapping[str, str] | None = None,
    ):
        from daemon.generators.vlm import VLMGenerator

        self.vlm = VLMGenerator(config, cache_dir=cache_dir)
        self.prompts = dict(prompts or {})
        self._tasks: dict[str, str] = {}  # prompt -> the task token it is sent as

    @property
    def loaded(self) -> bool:
        return self.vlm.loaded

    def load(self) -> None:
        from daemon.generators.vlm import check_prompt_for_family

        self.vlm.load()
        family = self.vlm.family
        self._tasks = {}
        if family is None:
            return
        for role, prompt in self.prompts.items():
            check_prompt_for_family(prompt, family)
            task = task_for(family, prompt, ROLE_TASKS.get(role))
            if task is not None:
                self._tasks.setdefault(prompt.strip(), task)
        mapped = {p: t for p, t in self._tasks.items() if p != t}
        if mapped:
            log.info(
                "describer_prompts_mapped_to_tasks",
                family=family.name,
                tasks={role: self._tasks[p.strip()] for role, p in self.prompts.items()},
                why=f"{family.name} takes a task token, not free text",
            )

    def unload(self) -> None:
        self.vlm.unload()

    def describe(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        from daemon.generators.vlm import VLMItem

        side = self.vlm.max_image_side
        items = []
        for image, prompt in zip(images, prompts, strict=True):
            small = shrink(image, side)
            sent = self._tasks.get(prompt.strip(), prompt.strip())
            items.append(VLMItem(small, self.vlm.render_text(sent), sent, small.size))
        return self.vlm.generate(items)


# -- the generator -----------------------------------------------------------------------------


@dataclass(slots=True)
class PreparedImage:
    path: Path
    image: Image.Image  # RGB, at most max_image_side
    pixels: np.ndarray  # the same, uint8 [H, W, 3]


def _load(part: Any) -> None:
    load = getattr(part, "load", None)
    if callable(load) and not getattr(part, "loaded", False):
        load()


class MultiPersonGenerator(Generator):
    name = "multi_person"
    caption_type = "tags"  # "caption" in fine_tune_caption mode (set per instance)
    description = (
        "Per-person WD tags or VLM sentences with aliases, people found by YOLO "
        "(ultralytics, AGPL-3.0)"
    )
    version = "1"
    weight = WeightClass.LIGHT  # HEAVY in fine_tune_caption mode (a VLM)
    config_model = MultiPersonConfig

    config: MultiPersonConfig

    def __init__(
        self,
        config: MultiPersonConfig | None = None,
        *,
        cache_dir: Path | None = None,
        detector: Detector | None = None,
        tagger: Tagger | None = None,
        describer: Describer | None = None,
    ):
        super().__init__(config, cache_dir=cache_dir)
        if self.fine_tune:
            self.caption_type = "caption"  # type: ignore[misc]
            self.weight = WeightClass.HEAVY  # type: ignore[misc]
        self._injected = (detector is not None, tagger is not None, describer is not None)
        self._detector: Any = detector
        self._tagger: Any = tagger
        self._describer: Any = describer

    @property
    def fine_tune(self) -> bool:
        return self.config.mode == "fine_tune_caption"

    @property
    def _needs_tagger(self) -> bool:
        return not self.fine_tune or self.config.gender_labels

    @classmethod
    def is_available(cls) -> Availability:
        for module, why in (
            ("ultralytics", "pip install ultralytics"),
            ("torch", "pip install torch"),
            ("onnxruntime", "the WD tagger's runtime"),
        ):
            try:
                if importlib.util.find_spec(module) is None:
                    return Availability(False, f"{module} is not installed ({why})")
            except (ImportError, ValueError) as exc:
                return Availability(False, f"{module} cannot be found: {exc}")
        return Availability(True)

    @property
    def draft_size(self) -> int | None:
        return self.config.max_image_side

    @property
    def draft_longer_side(self) -> bool:
        return True  # prepare() shrinks the longer side to max_image_side

    def warnings(self) -> list[str]:
        describer = self.config.describer
        if self.fine_tune and isinstance(describer, RemoteVLMConfig):
            return [f"describer: {w}" for w in http_warning(describer)]
        return []

    def status_details(self) -> dict[str, Any]:
        describer = self._describer
        if isinstance(describer, RemoteDescriber):
            return {"describer": describer.client.status()}
        return {}

    @property
    def loaded(self) -> bool:
        parts = [self._detector]
        if self._needs_tagger:
            parts.append(self._tagger)
        if self.fine_tune:
            parts.append(self._describer)
        return all(p is not None and getattr(p, "loaded", True) for p in parts)

    def load(self) -> None:
        cfg = self.config
        if self._detector is None:
            self._detector = YOLODetector(
                cfg.detector_model,
                cache_dir=self.cache_dir,
                confidence=cfg.confidence,
                image_size=cfg.detector_image_size,
                device=cfg.detector_device,
                person_class_id=cfg.detector_person_class,
            )
        _load(self._detector)
        if self._needs_tagger:
            if self._tagger is None:
                tcfg = cfg.tagger.model_copy(update={"separator": cfg.separator})
                self._tagger = WDPersonTagger(
                    tcfg, cache_dir=self.cache_dir, gender_threshold=cfg.gender_threshold
                )
            _load(self._tagger)
        if self.fine_tune:
            if self._describer is None and isinstance(cfg.describer, RemoteVLMConfig):
                self._describer = RemoteDescriber(cfg.describer)
            if self._describer is None:
                if importlib.util.find_spec("transformers") is None:
                    raise ModelUnavailableError(
                        "fine_tune_caption needs transformers (pip install transformers)"
                    )
                self._describer = VLMDescriber(
                    cfg.describer,
                    cache_dir=self.cache_dir,
                    prompts={
                        "person": cfg.person_prompt,
                        "scene": cfg.scene_prompt,
                        "whole": cfg.whole_prompt,
                    },
                )
            _load(self._describer)

    def unload(self) -> None:
        parts = (self._detector, self._tagger, self._describer)
        for part in parts:
            unload = getattr(part, "unload", None)
            if callable(unload):
                unload()
        # Our own adapters are rebuilt by the next load(); injected ones are kept.
        keep = [p if inj else None for p, inj in zip(parts, self._injected, strict=True)]
        self._detector, self._tagger, self._describer = keep

    def prepare(self, item: ImageInput) -> PreparedImage:
        """RGB (transparency on white), longer side at most ``max_image_side``, no
        thinner than 1:20 (:func:`~daemon.generators.vlm.shrink`)."""
        image = shrink(item.image, self.config.max_image_side)
        return PreparedImage(item.path, image, np.asarray(image, dtype=np.uint8))

    def generate(self, batch: Sequence[PreparedImage]) -> list[str]:
        if not self.loaded:
            raise GenerationError("multi_person is not loaded")
        if not batch:
            return []
        cfg = self.config
        found = self._detector.detect([b.image for b in batch])
        if len(found) != len(batch):
            raise GenerationError(f"detector returned {len(found)} results for {len(batch)}")
        people = [
            select_people(
                f, confidence=cfg.confidence, min_size=cfg.min_size, max_people=cfg.max_people
            )
            for f in found
        ]
        if self.fine_tune:
            return self._captions(batch, people)
        return self._tags(batch, people)

    # -- lora_tags ---------------------------------------------------------------------

    def _tag_all(self, images: list[Image.Image]) -> list[TagResult]:
        out: list[TagResult] = []
        step = self.config.tag_batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            got = self._call(self._tagger.tag, chunk)
            if len(got) != len(chunk):
                raise GenerationError(f"tagger returned {len(got)} results for {len(chunk)}")
            out += got
        return out

    def _tags(self, batch: Sequence[PreparedImage], people: list[list[Person]]) -> list[str]:
        cfg = self.config
        crops: list[Image.Image] = []
        for item, ppl in zip(batch, people, strict=True):
            if not ppl:
                crops.append(item.image)
                continue
            for i in range(len(ppl)):
                crops.append(
                    isolate_person(item.pixels, ppl, i, padding=cfg.padding, fill=cfg.grey_value)
                )
            if cfg.scene:
                crops.append(mask_people(item.pixels, ppl, fill=cfg.grey_value))
        results = iter(self._tag_all(crops))
        out = []
        for ppl in people:
            if not ppl:
                out.append(next(results).text)
                continue
            person_tags = [next(results).text for _ in ppl]
            scene = next(results).text if cfg.scene else ""
            aliases = tag_aliases(len(ppl), cfg.aliases, cfg.tag_alias)
            out.append(tags_line(aliases, person_tags, scene, cfg))
        return out

    # -- fine_tune_caption ----------------------------------------------------------------

    def _describe_all(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        step = self.config.describe_batch_size or max(1, len(images))
        out: list[str] = []
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            got = self._call(self._describer.describe, chunk, prompts[start : start + step])
            if len(got) != len(chunk):
                raise GenerationError(f"describer returned {len(got)} texts for {len(chunk)}")
            out += [str(t) for t in got]
        return out

    def _captions(self, batch: Sequence[PreparedImage], people: list[list[Person]]) -> list[str]:
        cfg = self.config
        images: list[Image.Image] = []
        prompts: list[str] = []
        gender_crops: list[Image.Image] = []
        for item, ppl in zip(batch, people, strict=True):
            if not ppl:
                images.append(item.image)
                prompts.append(cfg.whole_prompt)
                continue
            for i in range(len(ppl)):
                images.append(
                    spotlight_person(
                        item.pixels, ppl, i, padding=cfg.padding, dim=cfg.background_dim
                    )
                )
                prompts.append(cfg.person_prompt)
                if needs_gender(i, cfg):
                    gender_crops.append(
                        isolate_person(
                            item.pixels, ppl, i, padding=cfg.padding, fill=cfg.grey_value
                        )
                    )
            if cfg.scene:
                images.append(mask_people(item.pixels, ppl, dim=cfg.scene_people_dim))
                prompts.append(cfg.scene_prompt)
        genders = iter(r.gender for r in self._tag_all(gender_crops)) if gender_crops else iter(())
        texts = iter(self._describe_all(images, prompts))
        out = []
        for item, ppl in zip(batch, people, strict=True):
            if not ppl:
                whole = clean_vlm_output(
                    next(texts), max_words=cfg.max_words, prompt=cfg.whole_prompt
                )
                if not whole:
                    raise GenerationError(f"{item.path.name}: the image description is empty")
                out.append(whole)
                continue
            descriptions = []
            for i in range(len(ppl)):
                text = clean_vlm_output(
                    next(texts), max_words=cfg.max_words, prompt=cfg.person_prompt
                )
                if not text:
                    raise GenerationError(
                        f"{item.path.name}: the description of person {i + 1} is empty"
                    )
                descriptions.append(text)
            scene = clean_scene(next(texts), cfg) if cfg.scene else ""
            person_genders: list[Gender | None] = [
                next(genders) if needs_gender(i, cfg) else None for i in range(len(ppl))
            ]
            aliases = caption_aliases(len(ppl), cfg.aliases, cfg.caption_aliases, person_genders)
            out.append(caption_lines(aliases, descriptions, scene, cfg))
        return out

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except CaptionError:
            raise
        except Exception as exc:
            if isinstance(exc, MemoryError) or is_out_of_memory(exc):
                raise  # the worker halves the batch
            raise GenerationError(f"{type(exc).__name__}: {exc}") from exc
