"""Cleaning of vision-language model output, usable as a post-processing step.

``clean_vlm_output(text, ctx)`` strips a prompt echo and chat role markers
("ASSISTANT:", "Answer:", "A:", "Description:"), removes boilerplate openings ("The
image shows", "In this image we can see", "The person is", ...: every prefix the
multi-person plan in seeds/000 lists among them), case-insensitively, collapses
whitespace, capitalises the first letter, truncates to a word budget at a sentence
boundary and ends the caption with a full stop. Pure functions, no dependencies.
"""

from __future__ import annotations

import re
from typing import Any

_WS = re.compile(r"\s+")

# Chat residue at the start: special tokens, an echoed user turn, role markers.
_SPECIAL_TOKEN = re.compile(r"^\s*(?:<\|?[\w-]+\|?>|</?s>)\s*")
_USER_TURN = re.compile(
    r"^\s*(?:user|human|q)\s*:.*?(?:\b(?:assistant|gpt)\s*:\s*|\ba\s*:\s+)",
    re.IGNORECASE | re.DOTALL,
)
# "A: " is the answer half of a "Q: ... A: ..." exchange (with a space: "A:B" is text).
_ROLE = re.compile(
    r"^\s*(?:(?:assistant|gpt|bot|answer|caption|description|output|response)\s*:\s*"
    r"|a\s*:\s+)",
    re.IGNORECASE,
)

_NOUN = r"(?:image|picture|photo|photograph|illustration|drawing|artwork|painting|scene|frame)"
_VERB = (
    r"(?:shows|depicts|features|captures|displays|presents|portrays|illustrates|"
    r"contains|showcases|is\s+showing|is\s+of)"
)
_SEE = r"(?:we|you|i|one)\s+(?:can\s+)?(?:see|observe|notice)"
_BOILERPLATE = [
    # "The image shows", "This picture depicts", "In this photo, we can see"
    re.compile(rf"^(?:in\s+)?(?:this|the)\s+{_NOUN}\s+{_VERB}\s*:?\s*", re.IGNORECASE),
    # "This is a picture of", "This is an image showing", "It is a photo of"
    re.compile(
        rf"^(?:this|it|here)\s+is\s+(?:a|an)\s+(?:close-up\s+)?{_NOUN}\s+"
        r"(?:of|showing|depicting|featuring|that\s+shows)\s+",
        re.IGNORECASE,
    ),
    # "In the image, we can see", "In this image there is", "Within the picture,"
    re.compile(
        rf"^(?:in|within|on)\s+(?:this|the)\s+{_NOUN}\s*,?\s*"
        rf"(?:{_SEE}|there\s+(?:is|are))?\s*,?\s*",
        re.IGNORECASE,
    ),
    # "We can see", "I can see", "I see"
    re.compile(rf"^(?:{_SEE}|i\s+see)\s+", re.IGNORECASE),
    # "The person is", "This person is", "The person in the photo is" (person crops)
    re.compile(
        rf"^(?:the|this)\s+person\s+(?:in\s+(?:the|this)\s+{_NOUN}\s+)?is\s+", re.IGNORECASE
    ),
]

_SENTENCE = re.compile(r".*?[.!?…]+[\"')\]”’]*(?=\s|$)|.+$", re.DOTALL)
_TERMINAL = ".!?…"
_CLOSERS = "\"')]”’"


def _strip_echo(text: str, prompt: str) -> str:
    prompt = _WS.sub(" ", prompt).strip()
    for _ in range(4):  # markers and echoes may be stacked: "<s> USER: ... ASSISTANT: ..."
        before = text
        text = _SPECIAL_TOKEN.sub("", text)
        if prompt and text.lower().startswith(prompt.lower()):
            text = text[len(prompt) :].lstrip(" :\n")
        text = _USER_TURN.sub("", text)
        text = _ROLE.sub("", text)
        if text == before:
            break
    return text.strip()


def _strip_boilerplate(text: str) -> str:
    for _ in range(3):  # "In this image, the picture shows ..." is rare but cheap to allow
        before = text
        for pattern in _BOILERPLATE:
            stripped = pattern.sub("", text, count=1)
            if stripped != text and stripped.strip():
                text = stripped.lstrip(" ,:;-")
                break
        if text == before:
            break
    return text


def _capitalise(text: str) -> str:
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1 :]
        if ch not in _CLOSERS + "\"'(“‘[":
            return text
    return text


def _end_sentence(text: str) -> str:
    text = text.rstrip().rstrip(",;:-–— ").rstrip()
    if not text:
        return text
    core = text.rstrip(_CLOSERS)
    if core and core[-1] in _TERMINAL:
        return text
    return text + "."


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! ? (plus closing quotes/brackets) followed by a space or
    the end; "3.5" and "e.g.x" do not split. A trailing fragment is its own item."""
    return [m.group().strip() for m in _SENTENCE.finditer(text.strip()) if m.group().strip()]


def truncate_words(text: str, max_words: int) -> str:
    """At most ``max_words`` words: whole sentences when at least one fits, else the
    first ``max_words`` words ending with a full stop. ``max_words <= 0``: unchanged."""
    words = text.split()
    if max_words <= 0 or len(words) <= max_words:
        return text
    kept: list[str] = []
    count = 0
    for sentence in split_sentences(text):
        n = len(sentence.split())
        if count + n > max_words:
            break
        kept.append(sentence)
        count += n
    if kept:
        return " ".join(kept)
    return _end_sentence(" ".join(words[:max_words]))


def clean_vlm_output(text: str, ctx: Any = None, *, max_words: int = 0, prompt: str = "") -> str:
    """Post-processing step for prose from a vision-language model.

    ``max_words`` and ``prompt`` come from the arguments, else from ``ctx.max_words``
    and ``ctx.prompt`` when the context has them (0 / "" = no limit / no echo check).
    Tag lists (``ctx.is_tags``) pass through unchanged, so the step is safe in a
    shared chain.
    """
    if getattr(ctx, "is_tags", False):
        return text
    max_words = max_words or int(getattr(ctx, "max_words", 0) or 0)
    prompt = prompt or str(getattr(ctx, "prompt", "") or "")
    text = _WS.sub(" ", text or "").strip()
    if not text:
        return ""
    text = _strip_echo(text, prompt)
    text = _strip_boilerplate(text)
    text = _WS.sub(" ", text).strip()
    if not text:
        return ""
    text = _capitalise(text)
    text = truncate_words(text, max_words)
    return _end_sentence(text)
