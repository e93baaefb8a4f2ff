"""The never-clobber rules for caption sidecars (pure: no I/O).

Where a sidecar goes: :mod:`daemon.pipeline.targets`. Writing it atomically and
confined to its root: :mod:`daemon.confined`.

Ownership rules (``decide``): a sidecar is *ours* when its content hash equals the
hash captiond recorded when it wrote it. Ours may be replaced when the image
changes. A sidecar edited by a person (hash differs) is never touched again
(``caption_edited``). A sidecar captiond did not write is handled by the watch's
existing-caption policy only the first time captiond sees the image; after that it
too counts as a person's caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from daemon.hashing import sidecar_hash


class Action(StrEnum):
    WRITE = "written"
    UNCHANGED = "unchanged"  # the file already holds exactly this caption
    EXISTS = "caption_exists"
    EDITED = "caption_edited"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    text: str = ""
    prev_hash: str | None = None  # hash of what the write replaces (recorded as ours)
    base_text: str | None = None  # a person's caption kept under append/prepend


def merge(existing: str, new: str, policy: str, *, tags: bool, separator: str) -> str:
    """Combine a caption found on disk with a new one for append/prepend."""
    existing, new = existing.strip(), new.strip()
    if not existing:
        return new
    if tags:
        sep = separator.strip() or ","
        old = [t.strip() for t in existing.split(sep) if t.strip()]
        fresh = [t.strip() for t in new.split(sep) if t.strip()]
        first, second = (old, fresh) if policy == "append" else (fresh, old)
        return separator.join(dict.fromkeys([*first, *second]))
    return f"{existing} {new}" if policy == "append" else f"{new} {existing}"


def lead_with(text: str, word: str, *, tags: bool, separator: str) -> str:
    """``text`` with the trigger ``word`` first, once (it may already be in it)."""
    word = word.strip()
    if not word:
        return text
    if tags:
        sep = separator.strip() or ","
        parts = [t.strip() for t in text.split(sep) if t.strip() and t.strip() != word]
        return separator.join([word, *parts])
    rest = text.strip()
    for form in (f"{word}, ", f"{word} "):
        if rest.startswith(form):
            return rest
        rest = rest.replace(f" {form}", " ", 1) if f" {form}" in rest else rest
    if rest == word:
        return rest
    return f"{word}, {rest}" if rest else word


def precheck(
    *,
    existing: bytes | None,
    ours: frozenset[str],
    seen_before: bool,
    policy: str,
    force: bool = False,
) -> Action | None:
    """The outcome when it does not depend on the new caption (so the model can be
    skipped): EXISTS or EDITED; None when a caption may be written."""
    if existing is None or force or sidecar_hash(existing) in ours:
        return None
    if seen_before:
        return Action.EDITED
    return Action.EXISTS if policy == "skip" else None


def decide(
    *,
    new_text: str,
    existing: bytes | None,
    ours: frozenset[str] = frozenset(),
    base_text: str | None = None,
    seen_before: bool,
    policy: str,
    tags: bool,
    separator: str = ", ",
    force: bool = False,
    trigger_word: str = "",
) -> Decision:
    """What to do with a sidecar. Pure: no I/O.

    existing: the file's current bytes, None if there is no file.
    ours: hashes of content at this path that captiond wrote (see CaptionRecord).
    base_text: a person's caption that an earlier append/prepend merged with.
    seen_before: captiond has captioned this image before (under any sidecar path).
    trigger_word: the folder's trigger word, first under every policy (trainers keep
    the first tokens: kohya's ``keep_tokens``).
    """

    def final(base: str | None) -> str:
        if base and policy in ("append", "prepend"):
            merged = merge(base, new_text, policy, tags=tags, separator=separator)
            return lead_with(merged, trigger_word, tags=tags, separator=separator)
        return new_text

    early = precheck(
        existing=existing, ours=ours, seen_before=seen_before, policy=policy, force=force
    )
    if early is not None:
        return Decision(early)
    if existing is None:
        return Decision(Action.WRITE, final(base_text), base_text=base_text)
    existing_hash = sidecar_hash(existing)
    existing_text = existing.decode("utf-8", errors="replace")
    if force:
        return Decision(Action.WRITE, new_text, prev_hash=existing_hash)
    if existing_hash in ours:
        text = final(base_text)
        if text.rstrip("\n") == existing_text.rstrip("\n"):
            return Decision(Action.UNCHANGED, text, base_text=base_text)
        return Decision(Action.WRITE, text, prev_hash=existing_hash, base_text=base_text)
    # First sight of a caption captiond did not write, and the policy allows a write.
    if policy == "overwrite":
        return Decision(Action.WRITE, new_text, prev_hash=existing_hash)
    base = existing_text.strip()
    return Decision(Action.WRITE, final(base), prev_hash=existing_hash, base_text=base)
