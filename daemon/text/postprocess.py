"""Post-processing: a caption passes through a chain of plain callables.

Each step is ``step(text, ctx) -> text``. The chain's order comes from
``[postprocess].steps``, with per-generator overrides. Tags (caption_type
``tags``) are treated as a separator-joined list; anything else as prose.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.text.tags import KAOMOJI
from daemon.text.vlm import clean_vlm_output


@dataclass(frozen=True, slots=True)
class PostContext:
    caption_type: str = "tags"
    separator: str = ", "
    trigger_word: str = ""
    case: str = "keep"  # keep | lower | sentence
    # False when the generator was told to keep underscores (WD: remove_underscores=false)
    underscores_to_spaces: bool = True
    max_words: int = 0  # clean_vlm_output truncates prose at a sentence boundary (0 = off)
    prompt: str = ""  # the generator's prompt, so clean_vlm_output can strip an echo

    @property
    def is_tags(self) -> bool:
        return self.caption_type == "tags"


Step = Callable[[str, PostContext], str]


def _split_tags(text: str, ctx: PostContext) -> list[str]:
    sep = ctx.separator.strip() or ","
    return [t.strip() for t in text.split(sep) if t.strip()]


def _join_tags(tags: Sequence[str], ctx: PostContext) -> str:
    return ctx.separator.join(tags)


def replace_underscores(text: str, ctx: PostContext) -> str:
    if not ctx.underscores_to_spaces:
        return text

    def fix(token: str) -> str:
        # Kaomoji keep theirs, also when brackets are escaped: \(o\)_\(o\)
        if token in KAOMOJI or token.replace("\\", "") in KAOMOJI:
            return token
        return token.replace("_", " ")

    if ctx.is_tags:
        return _join_tags([fix(t) for t in _split_tags(text, ctx)], ctx)
    return " ".join(fix(word) for word in text.split(" "))


def trim(text: str, ctx: PostContext) -> str:
    if ctx.is_tags:
        return _join_tags(_split_tags(text, ctx), ctx)
    return text.strip()


_WS = re.compile(r"\s+")
_BLANKS = re.compile(r"[^\S\n]+")


def collapse_spaces(text: str, ctx: PostContext) -> str:
    """One space between words. Prose keeps its line breaks (one caption per line, as
    multi_person writes them); empty lines go."""
    if ctx.is_tags:
        return _WS.sub(" ", text)
    lines = (_BLANKS.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


_SPACE_BEFORE = re.compile(r"\s+([,;:!?]|\.(?!\d))")
_NO_SPACE_AFTER = re.compile(r"(?<=[^\d\s])([,;])(?=[^\s\d])")


def punctuation_spacing(text: str, ctx: PostContext) -> str:
    """No space before , . ; : ! ?; one space after , and ; (numbers like 1,000 kept)."""
    if ctx.is_tags:
        return text  # tag text may legitimately hold punctuation (kaomoji, titles)
    return _NO_SPACE_AFTER.sub(r"\1 ", _SPACE_BEFORE.sub(r"\1", text))


def case(text: str, ctx: PostContext) -> str:
    if ctx.case == "lower":
        return text.lower()
    if ctx.case == "sentence" and text:
        return text[0].upper() + text[1:]
    return text


def terminal_punctuation(text: str, ctx: PostContext) -> str:
    """Prose ends with a full stop; a tag list ends without a dangling separator."""
    text = text.rstrip()
    if ctx.is_tags:
        return text.rstrip(ctx.separator.strip() or ",").rstrip()
    if text and text[-1] not in ".!?…\"')":
        text += "."
    return text


def trigger_word(text: str, ctx: PostContext) -> str:
    """Put the watch's trigger word first, once."""
    word = ctx.trigger_word.strip()
    if not word:
        return text
    if ctx.is_tags:
        tags = [t for t in _split_tags(text, ctx) if t != word]
        return _join_tags([word, *tags], ctx)
    if text == word or text.startswith(word + ","):
        return text
    return f"{word}, {text}" if text else word


def dedupe_tags(text: str, ctx: PostContext) -> str:
    if not ctx.is_tags:
        return text
    return _join_tags(list(dict.fromkeys(_split_tags(text, ctx))), ctx)


STEPS: dict[str, Step] = {
    "replace_underscores": replace_underscores,
    "trim": trim,
    "collapse_spaces": collapse_spaces,
    "punctuation_spacing": punctuation_spacing,
    "case": case,
    "terminal_punctuation": terminal_punctuation,
    "trigger_word": trigger_word,
    "dedupe_tags": dedupe_tags,
    "clean_vlm_output": clean_vlm_output,
}


class Pipeline:
    def __init__(self, names: Sequence[str]):
        unknown = [n for n in names if n not in STEPS]
        if unknown:
            raise ValueError(f"unknown post-processing steps {unknown}; known: {sorted(STEPS)}")
        self.names = tuple(names)
        self._steps = [STEPS[n] for n in names]

    def __call__(self, text: str, ctx: PostContext) -> str:
        for step in self._steps:
            text = step(text, ctx)
        return text


def pipeline_for(steps: Sequence[str], overrides: dict[str, list[str]], generator: str) -> Pipeline:
    return Pipeline(overrides.get(generator, steps))
