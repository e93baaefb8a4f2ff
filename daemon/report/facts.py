"""What the dataset report needs of one caption, computed once from its text and kept in
the index (``captions.facts``), so that a report only aggregates (issue 14; bench/README.md,
Dataset report).

A caption's facts: whether its text is known, the words, the characters, whether the
trigger word is in it, whether CLIP would cut it, whether its source is a tag list and
one of people (multi_person), the ids of its tags (the trigger word taken out), and of
the record itself what the coverage needs (when it was written, the sidecar's type,
whether a person wrote it through the API, whether its text was read back after an
edit), all packed in a small blob::

    <key id u32> <flags u8> <words u32> <characters u32> <written_at f64>
    <sidecar type id u32> <tag id u32>...

A report reads them with the image path, generator and content hash from the covering
index ``captions_report``, never a row of the table with its text.

Tags and keys are stored as numbers in ``report_terms`` (an id is never reused). The
key names everything besides the text that the facts depend on: this module's
:data:`VERSION`, the generator's format (:meth:`Source.fingerprint`), the trigger word,
the language and the token counter. A report uses a blob only when its key is the key
it would compute with; anything else (no blob, a blob of another key, of an older
captiond, or unreadable) is computed again from the text. The index makes a blob NULL
whenever the text changes (trigger ``captions_facts_unknown``; a record written again
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

VERSION = 2  # of the format and of what is in it (1: a development version)
HEAD = struct.Struct("<IBIIdI")  # key id, flags, words, characters, written_at, sidecar type
HEAD_SIZE = HEAD.size
TEXT, TRIGGER, OVER, TAG_LIST, PEOPLE, HUMAN, READ_BACK = 1, 2, 4, 8, 16, 32, 64
HUMAN_EDIT_PREFIX = "human-edit"  # sidecar_hash of a caption a person wrote via the API
NO_TEXT_KEY = f"key:no text, version {VERSION}"  # a record without text (kept before texts were)


class FactsIndex(Protocol):
    def term_ids(self, terms: Iterable[str]) -> dict[str, int]: ...
    def store_facts(self, rows: Iterable[tuple[bytes, tuple]]) -> int: ...


def key_term(src: Source, ctx: Context, tokens: TokenCounter) -> str:
    """The key of facts computed from a text read as ``src`` in ``ctx``."""
    return "key:" + repr((VERSION, src.fingerprint(), ctx.trigger, ctx.language, tokens.key))


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


def record_flags(sidecar_hash: str, text_hash: str | None) -> int:
    flags = HUMAN if sidecar_hash.startswith(HUMAN_EDIT_PREFIX) else 0
    if text_hash is not None and text_hash != sidecar_hash:
        flags |= READ_BACK
    return flags


def sidecar_type(sidecar_path: str) -> str:
    return "ext:" + sidecar_path.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def pack(
    key: int, flags: int, words: int, chars: int, at: float, ext: int, tag_ids: Iterable[int]
) -> bytes:
    ids = sorted(tag_ids)
    return HEAD.pack(key, flags, words, chars, at, ext) + struct.pack(f"<{len(ids)}I", *ids)


class Terms:
    """The report's view of ``report_terms``: id -> term and back, as read in one
    snapshot, plus the terms it added. Once the index cannot be written (busy,
    read-only), new terms get ids of this report's own from then on (one id a term,
    within a report), and no facts are stored."""

    def __init__(self, rows: Iterable[tuple[int, str]]) -> None:
        self.by_id: dict[int, str] = dict(rows)
        self.ids: dict[str, int] = {t: i for i, t in self.by_id.items()}
        self.offline = False  # some ids are this report's own

    def tag(self, tid: int) -> str:
        return self.by_id[tid][4:]

    def add(self, index: FactsIndex | None, terms: Iterable[str]) -> bool:
        """Ids for ``terms``; True when all ids are the index's own (facts may be
        stored)."""
        new = [t for t in dict.fromkeys(terms) if t not in self.ids]
        got: dict[str, int] | None = None
        if new and not self.offline and index is not None:
            with contextlib.suppress(sqlite3.Error):
                got = index.term_ids(new)
        if new and got is None:
            self.offline = True
            nxt = max(self.by_id, default=0) + (1 << 20)  # above the index's own ids
            got = {t: nxt + i for i, t in enumerate(new)}
        for t, i in (got or {}).items():
            self.ids[t] = i
            self.by_id[i] = t
        return not self.offline


def fill(
    index: FactsIndex | None,
    terms: Terms,
    rows: Sequence[tuple],
    src: Source | None,
    ctx: Context,
    tokens: TokenCounter,
    *,
    store: bool = True,
) -> list[bytes]:
    """The facts of caption ``rows`` (the layout of ``FileIndex.report_captions``:
    image_path, generator, content_hash, sidecar_path, sidecar_hash, written_at, text,
    text_hash), all of one source (None: no row has a text) and context; stored in the
    index when ``store`` and it can be written (only where the record is still the one
    they were computed from)."""
    if not rows:
        return []
    with_text = [r for r in rows if r[6] is not None]
    computed = iter(
        compute([(r[6], r[2]) for r in with_text], src, ctx, tokens)
        if with_text and src is not None
        else []
    )
    key = key_term(src, ctx, tokens) if src is not None else NO_TEXT_KEY
    exts = {sidecar_type(r[3]) for r in rows}
    facts = [next(computed) if r[6] is not None and src is not None else None for r in rows]
    tags = {tag for f in facts if f is not None for tag in f[3]}
    # terms are kept even when the facts are not (a report's own trigger word)
    ok = terms.add(index, [key, NO_TEXT_KEY, *sorted(exts), *map(tag_term, sorted(tags))])
    ids = terms.ids
    kid, none_id = ids[key], ids[NO_TEXT_KEY]
    tag_id = {t: ids["tag:" + t] for t in tags}.__getitem__
    blobs = []
    for r, f in zip(rows, facts, strict=True):
        flags = record_flags(r[4], r[7])
        ext = ids[sidecar_type(r[3])]
        if f is None:
            blobs.append(pack(none_id, flags, 0, 0, r[5], ext, ()))
        else:
            blobs.append(pack(kid, flags | f[0], f[1], f[2], r[5], ext, map(tag_id, f[3])))
    if store and ok and index is not None:
        # busy or read-only: the next report or pass computes them again
        with contextlib.suppress(sqlite3.Error):
            index.store_facts(zip(blobs, rows, strict=True))
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
        by_gen: dict[str, list[tuple]] = {}
        for row in rows:
            by_gen.setdefault(row[1], []).append(row)
        terms = Terms(index.report_terms())
        for gen, items in by_gen.items():
            text = next((r[6] for r in items if r[6] is not None), None)
            src = source_for(gen, text) if text is not None else None
            fill(index, terms, items, src, ctx, tokens)
        done += len(rows)
        if len(rows) < chunk:
            break
    return done
