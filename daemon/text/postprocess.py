"""Post-processing: a caption passes through a chain of plain callables.

Each step is ``step(text, ctx) -> text``. The chain's order comes from
``[postprocess].steps``, with per-generator overrides. Tags (caption_type
``tags``) are treated as a separator-joined list; anything else as prose.

:func:`to_reynard` and :func:`from_reynard` convert these settings to and from the
shape of the Reynard document (seeds/001), both ways; pure functions, no API code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


# -- the Reynard document's shape (seeds/001, "Post-processing Options") ---------------
#
# Pure conversions between today's settings ({steps, case, max_words, overrides}, as in
# ``[postprocess]``) and the shape a Reynard frontend reads and writes:
#
#     {"enabled": true,
#      "rules": {"replace_underscores": true, "case_conversion": "none", ...},
#      "pipeline": ["replace_underscores", "trim_whitespace", ...],
#      "overrides": {"joy": {"replace_underscores": false}}}
#
# Rules are booleans, except ``case_conversion`` ("none", "lower", "sentence"), which
# is on when it is not "none". ``pipeline`` orders the rules, on or off (a rule listed
# twice runs twice; rules it leaves out run after it, in REYNARD_RULES order). An
# override changes some rules for one generator; what it does not name follows the
# global rules, in the global order. to_reynard writes each override in full (every
# rule), as captiond's overrides are whole chains: a global rule changed later does not
# change a generator that has its own chain. captiond's own steps are rules under their own
# names (``clean_vlm_output``, ``dedupe_tags``, ``trigger_word``), and two additions
# carry what the document has no place for: a top-level ``max_words``, and a
# ``pipeline`` inside an override whose order differs from the global one.
#
# captiond -> Reynard -> captiond gives back the same settings, except that a case step
# with case "keep" (it does nothing) is dropped and ``case`` becomes "keep" when no chain
# runs the case step: every chain behaves as before. ``"enabled": false`` becomes empty
# chains, overrides included (captiond has no separate switch), so the rules of a
# disabled document are not kept.

REYNARD_RULES: dict[str, str] = {  # Reynard rule -> captiond step
    "replace_underscores": "replace_underscores",
    "trim_whitespace": "trim",
    "remove_duplicate_spaces": "collapse_spaces",
    "normalize_punctuation_spacing": "punctuation_spacing",
    "case_conversion": "case",
    "ensure_terminal_punctuation": "terminal_punctuation",
    "clean_vlm_output": "clean_vlm_output",  # captiond's own: the same name on both sides
    "dedupe_tags": "dedupe_tags",
    "trigger_word": "trigger_word",
}
STEP_RULES = {step: rule for rule, step in REYNARD_RULES.items()}  # captiond -> Reynard
CASE_RULE = "case_conversion"
CASE_TO_REYNARD = {"keep": "none", "lower": "lower", "sentence": "sentence"}
CASE_FROM_REYNARD = {v: k for k, v in CASE_TO_REYNARD.items()}
REYNARD_KEYS = frozenset({"enabled", "rules", "pipeline", "overrides", "max_words"})
CAPTIOND_KEYS = frozenset({"steps", "case", "max_words", "overrides"})


def _field(settings: Any, key: str, default: Any) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(key, default)
    return getattr(settings, key, default)


def _full_order(head: Sequence[str]) -> list[str]:
    """``head`` (rule names, in order) followed by every rule it does not list."""
    return [*head, *(r for r in REYNARD_RULES if r not in head)]


def _rules_of(chain: Sequence[str], case: str) -> dict[str, Any]:
    rules: dict[str, Any] = {r: REYNARD_RULES[r] in chain for r in REYNARD_RULES}
    rules[CASE_RULE] = CASE_TO_REYNARD[case] if "case" in chain else "none"
    return rules


def _is_on(rule: str, value: Any) -> bool:
    return value != "none" if rule == CASE_RULE else bool(value)


def _chain_of(pipeline: Sequence[str], rules: Mapping[str, Any]) -> list[str]:
    return [REYNARD_RULES[r] for r in pipeline if _is_on(r, rules.get(r, False))]


def to_reynard(settings: Any) -> dict[str, Any]:
    """Today's post-processing settings (a ``PostProcessConfig``, or a mapping with
    ``steps``, ``case``, ``max_words``, ``overrides``) in the Reynard document's shape.
    Raises ValueError for an unknown step or case."""
    steps = list(_field(settings, "steps", []))
    case = str(_field(settings, "case", "keep"))
    max_words = int(_field(settings, "max_words", 0))
    overrides = {str(g): list(c) for g, c in dict(_field(settings, "overrides", {})).items()}
    unknown = sorted({s for c in [steps, *overrides.values()] for s in c} - set(STEP_RULES))
    if unknown:
        raise ValueError(f"unknown post-processing steps {unknown}; known: {sorted(STEPS)}")
    if case not in CASE_TO_REYNARD:
        raise ValueError(f"case {case!r} is not one of {sorted(CASE_TO_REYNARD)}")

    def runs(chain: list[str]) -> list[str]:  # without a case step that does nothing
        return [s for s in chain if s != "case" or case != "keep"]

    chain = runs(steps)
    pipeline = _full_order([STEP_RULES[s] for s in chain])
    rules = _rules_of(chain, case)
    doc_overrides: dict[str, dict[str, Any]] = {}
    for generator, own_steps in overrides.items():
        own = runs(own_steps)
        own_rules = _rules_of(own, case)
        entry: dict[str, Any] = dict(own_rules)  # in full: see the note above
        if _chain_of(pipeline, own_rules) != own:  # another order, or a step twice
            entry["pipeline"] = _full_order([STEP_RULES[s] for s in own])
        doc_overrides[generator] = entry
    return {
        "enabled": bool(chain) or any(runs(c) for c in overrides.values()),
        "rules": rules,
        "pipeline": pipeline,
        "overrides": doc_overrides,
        "max_words": max_words,
    }


def _check_rules(where: str, rules: Any, *, allow_pipeline: bool = False) -> dict[str, Any]:
    if not isinstance(rules, Mapping):
        raise ValueError(f"{where} must be an object of rules")
    out: dict[str, Any] = {}
    for rule, value in rules.items():
        if allow_pipeline and rule == "pipeline":
            out[rule] = _check_pipeline(f"{where}.pipeline", value)
        elif rule == CASE_RULE:
            if value not in CASE_FROM_REYNARD:
                raise ValueError(
                    f"{where}.{CASE_RULE}: {value!r} is not one of {sorted(CASE_FROM_REYNARD)}"
                )
            out[rule] = value
        elif rule in REYNARD_RULES:
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{rule} must be true or false, not {value!r}")
            out[rule] = value
        else:
            raise ValueError(f"{where}: unknown rule {rule!r}; known: {sorted(REYNARD_RULES)}")
    return out


def _check_pipeline(where: str, pipeline: Any) -> list[str]:
    if not isinstance(pipeline, list) or not all(isinstance(r, str) for r in pipeline):
        raise ValueError(f"{where} must be a list of rule names")
    unknown = [r for r in pipeline if r not in REYNARD_RULES]
    if unknown:
        raise ValueError(f"{where}: unknown rules {unknown}; known: {sorted(REYNARD_RULES)}")
    return _full_order(pipeline)


def from_reynard(document: Mapping[str, Any], base: Any = None) -> dict[str, Any]:
    """A Reynard post-processing document as today's settings: a dict with ``steps``,
    ``case``, ``max_words`` and ``overrides`` (for ``PostProcessConfig``).

    For a partial update, what the document leaves out comes from ``base`` (today's
    settings, e.g. the current ones): ``rules`` are merged rule by rule, ``pipeline``,
    ``overrides`` and ``max_words`` are taken whole. Without a base: rules off, the
    pipeline in REYNARD_RULES order, no overrides, ``max_words`` 0. ``enabled`` is true
    unless the document says false (captiond stores no switch: a base whose chains are
    all empty is not "disabled"). Raises ValueError, naming the
    key, for unknown rules or keys, wrong types, a case conversion captiond does not
    have ("upper", "title"), and overrides that need two different case conversions.
    """
    if not isinstance(document, Mapping):
        raise ValueError("the post-processing document must be an object")
    extra = sorted(set(document) - REYNARD_KEYS)
    if extra:
        raise ValueError(f"unknown keys {extra}; the document has {sorted(REYNARD_KEYS)}")
    start = to_reynard(base) if base is not None else None
    enabled = document.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError("enabled must be true or false")
    rules = {r: False for r in REYNARD_RULES} | {CASE_RULE: "none"}
    if start:
        rules |= start["rules"]
    rules |= _check_rules("rules", document.get("rules", {}))
    raw_pipeline = document.get("pipeline")
    if raw_pipeline is None:
        pipeline = start["pipeline"] if start else list(REYNARD_RULES)
    else:
        pipeline = _check_pipeline("pipeline", raw_pipeline)
    raw_overrides = document.get("overrides")
    if raw_overrides is None:
        raw_overrides = start["overrides"] if start else {}
    if not isinstance(raw_overrides, Mapping):
        raise ValueError("overrides must be an object: generator -> rules")
    max_words = document.get("max_words", start["max_words"] if start else 0)
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 0:
        raise ValueError("max_words must be a whole number >= 0")

    cases = {rules[CASE_RULE]} - {"none"}
    steps = _chain_of(pipeline, rules)
    overrides: dict[str, list[str]] = {}
    for generator, entry in raw_overrides.items():
        own = _check_rules(f"overrides.{generator}", entry, allow_pipeline=True)
        own_pipeline = own.pop("pipeline", pipeline)
        own_rules = rules | own
        if own_rules[CASE_RULE] != "none":
            cases.add(own_rules[CASE_RULE])
        overrides[str(generator)] = _chain_of(own_pipeline, own_rules)
    if len(cases) > 1:
        raise ValueError(
            f"captiond has one case conversion for all generators; the document asks "
            f"for {sorted(cases)}"
        )
    if not enabled:
        steps, overrides = [], {g: [] for g in overrides}
    return {
        "steps": steps,
        "case": CASE_FROM_REYNARD[cases.pop()] if cases else "keep",
        "max_words": max_words,
        "overrides": overrides,
    }


def settings_shape(document: Mapping[str, Any]) -> str:
    """``"reynard"`` or ``"captiond"``: which shape a settings document is written in
    (for an API that accepts both). Raises ValueError for a mix of the two."""
    keys = set(document)
    reynard = keys & (REYNARD_KEYS - CAPTIOND_KEYS)
    captiond = keys & (CAPTIOND_KEYS - REYNARD_KEYS)
    if reynard and captiond:
        raise ValueError(
            f"a mix of two shapes: {sorted(reynard)} (Reynard) and {sorted(captiond)} "
            "(captiond); use one"
        )
    if reynard:
        return "reynard"
    if captiond:
        return "captiond"
    # only keys both shapes have (overrides, max_words): overrides tell them apart
    overrides = document.get("overrides") or {}
    if any(isinstance(v, Mapping) for v in overrides.values()):
        return "reynard"
    return "captiond"
