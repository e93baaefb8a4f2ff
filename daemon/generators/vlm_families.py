"""Per-family settings of the VLM generator: pure data, no heavy imports.

A family says how a checkpoint is prompted (chat template or Florence-2 task token),
how images are passed to its processor (flat list, or one list per sample), how its
output is turned into text, and which ``model_type`` values in ``config.json`` it
covers (for ``family = "auto"``).

Florence-2 is prompted with a task token, not with words; a free-text prompt is sent
as the fitting caption task instead (:func:`task_for`), so that the same settings work
whichever describer is picked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Florence-2's tasks whose answer is text (the others give boxes, polygons or OCR regions).
CAPTION = "<CAPTION>"  # one short sentence
DETAILED_CAPTION = "<DETAILED_CAPTION>"  # a few sentences
MORE_DETAILED_CAPTION = "<MORE_DETAILED_CAPTION>"  # a paragraph
FLORENCE_TASKS = (CAPTION, DETAILED_CAPTION, MORE_DETAILED_CAPTION)
_TASK_TOKEN = re.compile(r"<[A-Z]+(?:_[A-Z]+)*>")
MOONDREAM_LENGTHS = ("short", "normal", "long")


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    default_prompt: str
    model_types: tuple[str, ...] = ()
    chat: bool = True  # build the text with the processor's chat template
    nested_images: bool = False  # processor(images=[[img], [img], ...]) (Idefics3, SmolVLM)
    task_prompts: tuple[str, ...] = ()  # Florence-2: the prompt is one of these tokens
    free_text_task: str | None = None  # ... and free text is sent as this one
    remote_code: bool = False  # the architecture lives in the model repo (trust_remote_code)
    system_prompt: str | None = None  # default system message for chat families
    max_image_side: int = 1024  # prepare() shrinks the longer side to this (0 = never)


CHAT_PROMPT = "Describe this image in one detailed paragraph."

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "florence2",
            default_prompt=DETAILED_CAPTION,
            model_types=("florence2",),
            chat=False,
            task_prompts=FLORENCE_TASKS,
            free_text_task=DETAILED_CAPTION,
            max_image_side=768,  # the processor resizes to 768x768
        ),
        Family(
            "smolvlm",
            default_prompt=CHAT_PROMPT,
            model_types=("idefics3", "smolvlm"),
            nested_images=True,
            max_image_side=1536,  # SmolVLM's longest_edge (4 x 384)
        ),
        Family("qwen2_5_vl", default_prompt=CHAT_PROMPT, model_types=("qwen2_5_vl", "qwen2_vl")),
        Family(
            "llava",
            default_prompt=CHAT_PROMPT,
            model_types=("llava", "llava_next", "llava_onevision"),
        ),
        # JoyCaption's -hf-llava checkpoints: the llava architecture with its own prompting.
        Family(
            "joycaption",
            default_prompt="Write a long descriptive caption for this image in a formal tone.",
            system_prompt="You are a helpful image captioner.",
        ),
        Family(
            "moondream2",
            default_prompt="normal",  # short | normal | long caption, or any question
            model_types=("moondream1", "moondream", "moondream2", "moondream3"),
            chat=False,
            remote_code=True,
        ),
    )
}
ALIASES = {"idefics3": "smolvlm", "qwen2_vl": "qwen2_5_vl", "moondream": "moondream2"}
FAMILY_NAMES = (*FAMILIES, *ALIASES)


def family_named(name: str) -> Family:
    return FAMILIES[ALIASES.get(name, name)]


def detect_family(model_type: str | None, model: str = "") -> Family | None:
    """The family of a checkpoint from ``config.json``'s ``model_type`` (and its name:
    JoyCaption and Moondream are recognised by the repository/folder name)."""
    lowered = model.lower()
    if "moondream" in lowered:
        return FAMILIES["moondream2"]
    mt = (model_type or "").lower()
    for fam in FAMILIES.values():
        if mt and mt in fam.model_types:
            if fam.name == "llava" and "joycaption" in lowered:
                return FAMILIES["joycaption"]
            return fam
    return None


def is_task_token(prompt: str) -> bool:
    """Whether ``prompt`` is written as a task token (``<OD>``, ``<CAPTION>``, ...)."""
    return _TASK_TOKEN.fullmatch(prompt.strip()) is not None


def task_for(family: Family, prompt: str, free_text: str | None = None) -> str | None:
    """The task token ``family`` is given for ``prompt``: the prompt itself when it
    is one of the family's tasks, else ``free_text`` (the caller's fitting task for
    what the prompt asks) or the family's own free-text task. None for a family that
    takes the prompt as it is, and for a task token the family does not caption with
    (``<OD>``: the caller refuses it)."""
    if not family.task_prompts:
        return None
    text = prompt.strip()
    if text in family.task_prompts:
        return text
    if is_task_token(text):
        return None
    return free_text or family.free_text_task
