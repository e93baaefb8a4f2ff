"""What the dataset report needs of one caption, computed once from its text and kept in
the index (``captions.facts``), so that a report only aggregates (issue 14; bench/README.md,
Dataset report).

A caption's facts: whether its text is known, the words, the characters, whether the
trigger word is in it, whether CLIP would cut it, whether its source is a tag list and
one of people (multi_person), and the ids of its tags (the trigger word taken out), all
packed in a small blob::

    <key id u32> <flags u8> <words u32> <characters u32> <tag id u32>...

Tags and keys are stored as numbers in ``report_terms`` (an id is never reused). The
key names everything besides the text that the facts depend on: this module's
:data:`VERSION`, the generator's format (:meth:`Source.fingerprint`), the trigger word,
the language and the token counter. A report uses a blob only when its key is the key
it would compute with; anything else (no blob, a blob of another key, of an older
captiond, or unreadable) is computed again from the text. The index makes a blob NULL
whenever the text changes (trigger ``captions_facts_stale``; a record written again
starts NULL), whoever changes it.

The background pass (:class:`daemon.report.service.Maintainer`) computes the facts of
new captions; a report computes what is missing and stores it when it can.
"""

from __future__ import annotations

import contextlib
import sqlite3
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from daemon.report.checks import TAGS, Context, Source, normal_tag, read_caption, trigger_re
from daemon.report.tokens import Counter as TokenCounter

VERSION = 1
HEAD = struct.Struct("<IBII")  # key id, flags, words, characters
HEAD_SIZE = HEAD.size
TEXT, TRIGGER, OVER, TAG_LIST, PEOPLE = 1, 2, 4, 8, 16
NO_TEXT = HEAD.pack(0, 0, 0, 0)  # the record has no text (written before texts were kept)


class FactsIndex(Protocol):
    def term_ids(self, terms: Iterable[str]) -> dict[str, int]: ...
    def store_facts(self, rows: Iterable[tuple[bytes, str, str, str | None]]) -> int: ...


def key_term(src: Source, ctx: Context, tokens: TokenCounter) -> str:
    return "key:" + repr((VERSION, src.fingerprint(), ctx.trigger, ctx.language, tokens.name))


def tag_term(tag: str) -> str:
    return "tag:" + tag


def compute(
    texts: Sequence[tuple[str, str]], src: Source, ctx: Context, tokens: TokenCounter
) -> list[tuple[int, int, int, set[str]]]:
    """(flags, words, characters, tags) of each (text, content hash), as the report reads
    a caption of ``src`` in ``ctx`` (the trigger word is not among the tags)."""
    t = ctx.trigger.strip()
    want = normal_tag(t) if t else ""
    trig = trigger_re(t) if t else None
    over, words = tokens.over_words([text for text, _h in texts])
    tag_of = TAGS.__getitem__
    out = []
    for (text, digest), o, w in zip(texts, over, words, strict=True):
        flags = TEXT | (OVER if o else 0)
        if src.kind == "tags" and not src.people:
            tags = set(map(tag_of, text.replace("\n", ",").split(",")))
            tags.discard("")
            if want and want in tags:
                flags |= TRIGGER
                tags.discard(want)
            flags |= TAG_LIST
        elif src.kind == "prose" and not src.people:
            tags = set()
            if trig is not None and trig.search(text) is not None:
                flags |= TRIGGER
        else:
            r = read_caption(src, text, digest, ctx)
            tags = set()  # a report counts the tags of plain tag lists only
            flags |= PEOPLE | (TAG_LIST if src.kind == "tags" else 0)
            flags |= TRIGGER if r.trigger else 0
        out.append((flags, w, len(text), tags))
    return out


def pack(key: int, flags: int, words: int, chars: int, tag_ids: Iterable[int]) -> bytes:
    ids = sorted(tag_ids)
    return HEAD.pack(key, flags, words, chars) + struct.pack(f"<{len(ids)}I", *ids)


class Terms:
    """The report's view of ``report_terms``: id -> term and back, as read in one
    snapshot, plus the terms it added. When the index cannot be written (busy, read-only),
    new terms get ids of this report's own, and nothing is stored."""

    def __init__(self, rows: Iterable[tuple[int, str]]) -> None:
        self.by_id: dict[int, str] = dict(rows)
        self.ids: dict[str, int] = {t: i for i, t in self.by_id.items()}

    def tag(self, tid: int) -> str:
        return self.by_id[tid][4:]

    def add(self, index: FactsIndex | None, terms: Iterable[str]) -> bool:
        """Ids for ``terms``; True when they are the index's own (facts may be stored)."""
        new = [t for t in dict.fromkeys(terms) if t not in self.ids]
        if not new:
            return True
        got: dict[str, int] | None = None
        if index is not None:
            try:
                got = index.term_ids(new)
            except sqlite3.Error:
                got = None
        stored = got is not None
        if got is None:
            nxt = max(self.by_id, default=0) + (1 << 20)  # above the index's own ids
            got = {t: nxt + i for i, t in enumerate(new)}
        for t, i in got.items():
            self.ids[t] = i
            self.by_id[i] = t
        return stored


def fill(
    index: FactsIndex | None,
    terms: Terms,
    items: Sequence[tuple[str, str, str, str]],
    src: Source,
    ctx: Context,
    tokens: TokenCounter,
    *,
    store: bool = True,
) -> list[bytes]:
    """The facts of ``items`` (image path, generator, content hash, text), all of one
    source and context; stored in the index when ``store`` and it can be written (only
    where the text is still the one they were computed from)."""
    if not items:
        return []
    computed = compute([(text, digest) for _p, _g, digest, text in items], src, ctx, tokens)
    key = key_term(src, ctx, tokens)
    tags = {tag for _f, _w, _c, ts in computed for tag in ts}
    ok = terms.add(index if store else None, [key, *map(tag_term, sorted(tags))])
    kid, ids = terms.ids[key], terms.ids
    blobs = [pack(kid, flags, w, c, (ids["tag:" + t] for t in ts)) for flags, w, c, ts in computed]
    if store and ok and index is not None:
        rows = [(b, p, g, text) for b, (p, g, _d, text) in zip(blobs, items, strict=True)]
        # busy or read-only: the next report or pass computes them again
        with contextlib.suppress(sqlite3.Error):
            index.store_facts(rows)
    return blobs


def fill_missing(
    index: Any,
    prefix: str,
    source_for: Callable[[str, str], Source],
    ctx: Context,
    tokens: TokenCounter,
    *,
    chunk: int = 5000,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """The background pass: compute and store the facts of every caption record under
    ``prefix`` that has none. Returns the records done."""
    done = 0
    after = ("", "")
    while not stop():
        rows = index.captions_without_facts(prefix, after, chunk)
        if not rows:
            break
        after = (rows[-1][0], rows[-1][1])
        no_text = [(NO_TEXT, p, g, None) for p, g, _d, t in rows if t is None]
        if no_text:
            index.store_facts(no_text)
        by_gen: dict[str, list[tuple[str, str, str, str]]] = {}
        for row in rows:
            if row[3] is not None:
                by_gen.setdefault(row[1], []).append(row)
        terms = Terms(index.report_terms())
        for gen, items in by_gen.items():
            fill(index, terms, items, source_for(gen, items[0][3]), ctx, tokens)
        done += len(rows)
        if len(rows) < chunk:
            break
    return done
