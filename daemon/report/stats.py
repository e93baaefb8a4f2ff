"""The dataset report: what is in a dataset, from the index alone.

:func:`build_report` takes the index (caption records with their facts, each content's
size and perceptual hash, flags), the queue (what is pending or failed) and the scopes
asked for (a watched root, or a folder in one), and returns a JSON-able ``dict``. A
caption's facts (words, CLIP limit, tag ids, trigger word...: :mod:`daemon.report.facts`)
are computed once and kept in the index; the report aggregates them (tag counts with
numpy) and reads a caption's text only where they are missing or were computed for
another trigger word, generator format or token counter. It reads no file: a caption a
person edited on disk is counted with the text the index has (see
:mod:`daemon.report.service` for when that text is read back), and the report says how
many texts are unknown or were read back.

Paths in the report are API paths: ``ROOT/sub/file.png`` (the watch's name first).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import heapq
import math
import statistics
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.report import facts as F
from daemon.report import phash as ph
from daemon.report.checks import Context, Source, guess_source
from daemon.report.tokens import LIMIT
from daemon.report.tokens import Counter as TokenCounter

HUMAN_EDIT_PREFIX = F.HUMAN_EDIT_PREFIX  # sidecar_hash of a caption a person wrote via the API
EMPTY_MESSAGE = "produced an empty caption"  # the pipeline's error for an empty caption
PERSON_OUTCOMES = ("caption_exists", "caption_edited")
WORD_EDGES = (0, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300)
MP_EDGES = (0, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
ASPECTS = (  # (label, upper bound of width / height)
    ("1:2 or taller", 0.53),
    ("9:16", 0.6),
    ("2:3", 0.7),
    ("3:4", 0.78),
    ("4:5", 0.9),
    ("1:1", 1.11),
    ("5:4", 1.29),
    ("4:3", 1.42),
    ("3:2", 1.6),
    ("16:9", 1.9),
    ("2:1 or wider", math.inf),
)


@dataclass(frozen=True, slots=True)
class Scope:
    """A watched root, or a folder in it: ``rel_dir`` relative to the root ('' = all)."""

    name: str  # the watch's name
    root: str  # its canonical absolute path
    rel_dir: str = ""
    trigger: str = ""  # the watch's trigger word
    language: str = "en"

    @property
    def prefix(self) -> str:
        return f"{self.root}/{self.rel_dir}" if self.rel_dir else self.root

    @property
    def label(self) -> str:
        return f"{self.name}/{self.rel_dir}" if self.rel_dir else self.name


@dataclass(frozen=True, slots=True)
class Options:
    resolution: int = 1024  # training resolution: buckets hold about resolution² pixels
    bucket_step: int = 64
    min_bucket: int = 0  # 0: min(256, resolution)
    max_bucket: int = 0  # 0: 2 x resolution
    near_distance: int = 4  # pHash bits that may differ between near duplicates
    top: int = 50  # rows of the longer tables
    examples: int = 20  # paths listed per finding
    folders: int = 100  # folders listed in the per-folder table
    trigger: str | None = None  # instead of each watch's trigger word

    def __post_init__(self) -> None:
        if not self.min_bucket:
            object.__setattr__(self, "min_bucket", min(256, self.resolution))
        if not self.max_bucket:
            object.__setattr__(self, "max_bucket", 2 * self.resolution)

    def check(self) -> None:
        if not 64 <= self.resolution <= 16384:
            raise ValueError("resolution must be 64..16384")
        if not 8 <= self.bucket_step <= self.resolution:
            raise ValueError("bucket step must be 8..resolution")
        if not self.bucket_step <= self.min_bucket <= self.resolution <= self.max_bucket:
            raise ValueError("buckets need step <= min_bucket <= resolution <= max_bucket")
        if self.max_bucket > 4 * self.resolution:
            raise ValueError("max_bucket may be at most 4 x resolution")
        if not 0 <= self.near_distance <= ph.MAX_DISTANCE:
            raise ValueError(f"near-duplicate distance must be 0..{ph.MAX_DISTANCE}")
        for name in ("top", "examples", "folders"):
            if not 1 <= getattr(self, name) <= 10_000:
                raise ValueError(f"{name} must be 1..10000")


class ReportIndex(Protocol):
    def files_in(self, root: str, dir: str = "") -> list[tuple[str, str]]: ...
    def report_caption_facts(self, prefix: str) -> list[tuple]: ...
    def caption_records(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple]: ...
    def report_terms(self) -> list[tuple[int, str]]: ...
    def term_ids(self, terms: Iterable[str]) -> dict[str, int]: ...
    def store_facts(self, rows: Iterable[tuple[bytes, tuple]]) -> int: ...
    def snapshot(self) -> contextlib.AbstractContextManager[Any]: ...
    def image_facts(
        self, digests: Iterable[str]
    ) -> dict[str, tuple[int | None, int | None, str | None]]: ...
    def flags_under(self, prefix: str | None = None) -> list[tuple]: ...


class ReportQueue(Protocol):
    def report_jobs(self, prefix: str) -> list[tuple]: ...


@dataclass(slots=True)
class _Image:
    api: str  # ROOT/sub/file.png
    folder: str  # ROOT/sub
    scope: Scope
    captions: list[tuple] = field(default_factory=list)
    jobs: list[tuple] = field(default_factory=list)


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else 0.0


def _hist(values: Iterable[float], edges: Sequence[float], unit: str = "") -> list[dict]:
    """Counts per bin [edges[i], edges[i+1]); the last bin is open."""
    arr = np.fromiter(values, dtype=np.float64)
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), arr, side="right") - 1
    counts = np.bincount(np.clip(idx, 0, len(edges) - 1), minlength=len(edges)).tolist()
    out = []
    for i, lo in enumerate(edges):
        if i + 1 < len(edges):
            label = f"{_num(lo)}-{_num(edges[i + 1])}{unit}"
        else:
            label = f"{_num(lo)}+{unit}"
        out.append(
            {
                "bin": label,
                "from": lo,
                "to": edges[i + 1] if i + 1 < len(edges) else None,
                "count": int(counts[i]),
            }
        )
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _summary(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 2),
        "max": max(values),
    }


def _inside(rel: str, top: str) -> bool:
    """Whether folder ``rel`` is ``top`` or inside it ('' is the whole root)."""
    return not top or rel == top or rel.startswith(top + "/")


def buckets_for(resolution: int, step: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's sd-scripts makes them (``make_bucket_resolutions``):
    for each width from ``min_size`` to ``max_size`` in steps, the tallest height (a
    multiple of ``step``, at most ``max_size``) whose area stays within resolution², and
    the same turned; plus the square."""
    max_area = (resolution // step) * (resolution // step)
    out = {(int(math.sqrt(max_area)) * step,) * 2}
    size = min_size
    while size <= max_size:
        h = min(max_size, (max_area // (size // step)) * step)
        out.add((size, h))
        out.add((h, size))
        size += step
    return sorted(out)


def bucket_of(w: int, h: int, buckets: Sequence[tuple[int, int]], ratios: Sequence[float]) -> int:
    """The bucket with the closest aspect ratio (sd-scripts' ``select_bucket``);
    ``ratios``: the buckets' aspect ratios, sorted ascending."""
    ar = w / h
    i = bisect.bisect_left(ratios, ar)
    if i == 0:
        return 0
    if i == len(ratios):
        return i - 1
    return i if ratios[i] - ar < ar - ratios[i - 1] else i - 1


def build_report(
    index: ReportIndex,
    queue: ReportQueue,
    scopes: Sequence[Scope],
    *,
    sources: dict[str, Source],
    tokens: TokenCounter,
    options: Options = Options(),
    phash_state: dict[str, Any] | None = None,
    clock: Any = time.time,
) -> dict[str, Any]:
    """The report over ``scopes`` (see the module doc). Raises ValueError for bad
    options."""
    options.check()
    with _no_gc():
        return _build(index, queue, scopes, sources, tokens, options, phash_state, clock)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection while a report holds a few hundred thousand small
    objects that make no cycles (each collection would walk them all: a second or more
    of a report over 100,000 images, bench/README.md)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _build(
    index: ReportIndex,
    queue: ReportQueue,
    scopes: Sequence[Scope],
    sources: dict[str, Source],
    tokens: TokenCounter,
    options: Options,
    phash_state: dict[str, Any] | None,
    clock: Any,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timings[name] = round(now - mark, 3)
        mark = now

    # a scope inside another one adds nothing: read each row once
    distinct: list[Scope] = []
    for sc in sorted(set(scopes), key=lambda x: (x.root, x.rel_dir)):
        if not any(o.root == sc.root and _inside(sc.rel_dir, o.rel_dir) for o in distinct):
            distinct.append(sc)
    images: dict[str, _Image] = {}
    flags: list[tuple] = []
    with index.snapshot():  # one state of the index: facts and the terms they name
        for sc in distinct:
            for d, name in index.files_in(sc.root, sc.rel_dir):
                folder = f"{sc.name}/{d}" if d else sc.name
                path = f"{sc.root}/{d}/{name}" if d else f"{sc.root}/{name}"
                images[path] = _Image(f"{folder}/{name}", folder, sc)
        get = images.get
        for sc in distinct:
            for row in index.report_caption_facts(sc.prefix):
                img = get(row[0])
                if img is not None:
                    img.captions.append(row)
            for row in queue.report_jobs(sc.prefix):
                img = get(row[0])
                if img is not None:
                    img.jobs.append(row)
            flags += [f for f in index.flags_under(sc.prefix) if f[0] in images]
        facts = index.image_facts({r[2] for img in images.values() for r in img.captions})
        terms = F.Terms(index.report_terms())
    flags = list(dict.fromkeys(flags))
    lap("read_index")

    sources = dict(sources)
    report: dict[str, Any] = {
        "generated_at": round(clock(), 3),
        "scope": [
            {"root": s.name, "folder": s.rel_dir, "path": s.prefix, "trigger_word": s.trigger}
            for s in scopes
        ],
        "options": asdict(options),
    }
    _resolve(index, images, sources, terms, tokens, options)
    lap("read_captions")
    report["coverage"] = _coverage(images, terms)
    report["texts"] = _texts(images)
    lap("coverage")
    report["tags"], lengths = _tags(images, terms, options)
    lap("tags")
    report["length"] = _length(index, lengths, tokens, options)
    lap("length")
    report["images"] = _images(images, facts, options, phash_state)
    lap("images")
    report["flags"] = _flags(images, flags, options)
    lap("flags")
    report["timings"] = timings
    return report


# -- coverage ----------------------------------------------------------------------------


def _coverage(images: dict[str, _Image], terms: F.Terms) -> dict[str, Any]:
    by_gen: dict[str, dict[str, Any]] = {}
    unpack, HUMAN, READ_BACK = F.HEAD.unpack_from, F.HUMAN, F.READ_BACK
    exts: dict[int, str] = {}
    captioned = person_api = person_kept = person_edited = pending = uncaptioned = empty = 0
    person = 0
    failed: dict[str, dict[str, int]] = {"failed": {}, "dead": {}}
    for img in images.values():
        ours = False
        api = edited = kept = False
        for row in img.captions:
            _k, fl, _w, _c, _at, ext_id = unpack(row[3])
            g = by_gen.get(row[1])
            if g is None:
                g = by_gen[row[1]] = {"images": 0, "sidecar_types": {}}
            g["images"] += 1
            ext = exts.get(ext_id)
            if ext is None:
                ext = exts[ext_id] = terms.by_id[ext_id][4:]
            types = g["sidecar_types"]
            types[ext] = types.get(ext, 0) + 1
            if fl & HUMAN:
                api = True
            else:
                ours = True
                if fl & READ_BACK:
                    edited = True
        state_pending = False
        for _path, _gen, state, outcome, etype, msg in img.jobs:
            if state in ("pending", "leased"):
                state_pending = True
            elif state in ("failed", "dead"):
                key = etype or "unknown"
                failed[state][key] = failed[state].get(key, 0) + 1
                if msg and EMPTY_MESSAGE in msg:
                    empty += 1
            elif state == "done" and outcome == "caption_exists":
                kept = True
            elif state == "done" and outcome == "caption_edited":
                edited = True
        captioned += bool(img.captions)
        person_api += api
        person_kept += kept
        person_edited += edited
        person += api or kept or edited
        pending += state_pending
        uncaptioned += not img.captions and not kept and not edited
        del ours
    return {
        "images": len(images),
        "captioned": captioned,
        "by_generator": dict(sorted(by_gen.items())),
        "by_person": {
            "images": person,
            "written_through_api": person_api,
            "kept_as_found": person_kept,
            "edited_after_captiond": person_edited,
        },
        "pending": pending,
        "failed": {k: dict(sorted(v.items())) for k, v in failed.items()},
        "empty_after_post_processing": empty,
        "no_caption": uncaptioned,
    }


def _texts(images: dict[str, _Image]) -> dict[str, Any]:
    known = unknown = read_back = 0
    unpack, TEXT, READ_BACK = F.HEAD.unpack_from, F.TEXT, F.READ_BACK
    for img in images.values():
        for row in img.captions:
            fl = unpack(row[3])[1]
            if not fl & TEXT:
                unknown += 1
            else:
                known += 1
                if fl & READ_BACK:
                    read_back += 1
    return {
        "known": known,
        "unknown": unknown,
        "read_back_after_edit": read_back,
        "note": "texts as captiond wrote them; a caption edited on disk since is counted "
        "with its old text until `captiond report --refresh` reads the sidecars back "
        "(read_back_after_edit counts those read back); unknown: written before captiond "
        "kept caption texts",
    }


# -- captions read -----------------------------------------------------------------------


def _resolve(
    index: ReportIndex,
    images: dict[str, _Image],
    sources: dict[str, Source],
    terms: F.Terms,
    tokens: TokenCounter,
    options: Options,
) -> None:
    """Gives every caption row (image_path, generator, content_hash, facts) facts of the
    key this report reads with (see :mod:`daemon.report.facts`). Facts kept in the index
    are used as they are; the others are computed from the record (read for them alone)
    and stored. A generator that is not configured is read as its first caption (in the
    report's order) suggests."""
    contexts: dict[Scope, tuple[Context, bool]] = {}
    keys_of: dict[int, dict[str, bytes | None]] = {}  # id(scope) -> generator -> key
    missing: dict[tuple[str, Scope], list[tuple[_Image, int]]] = {}
    pack_key = struct.Struct("<I").pack
    none_id = terms.ids.get(F.NO_TEXT_KEY)
    none_key = None if none_id is None else pack_key(none_id)
    head = F.HEAD_SIZE
    last: Scope | None = None
    keys: dict[str, bytes | None] = {}
    for img in images.values():
        sc = img.scope
        if sc is not last:
            last, keys = sc, keys_of.setdefault(id(sc), {})
        for j, row in enumerate(img.captions):
            blob = row[3]
            ok = blob is not None and len(blob) >= head
            if ok and blob[:4] == none_key:
                continue  # a record without text
            gen = row[1]
            k = keys.get(gen, b"")
            if k == b"":
                src = sources.get(gen)
                if src is None:
                    rec = index.caption_records([(row[0], gen)]).get((row[0], gen))
                    if rec is None or rec[6] is None:  # no text: the next caption decides
                        missing.setdefault((gen, sc), []).append((img, j))
                        continue
                    src = sources[gen] = guess_source(gen, rec[6])
                ctx = _context(contexts, sc, options)[0]
                kid = terms.ids.get(F.key_term(src, ctx, tokens))
                k = keys[gen] = None if kid is None else pack_key(kid)
            if k is None or not ok or blob[:4] != k:
                missing.setdefault((gen, sc), []).append((img, j))
    if not missing:
        return
    recs = index.caption_records(
        (img.captions[j][0], gen) for (gen, _sc), places in missing.items() for img, j in places
    )
    for (gen, sc), places in missing.items():
        with_text: list[tuple] = []
        without: list[tuple] = []
        where_text: list[tuple[_Image, int]] = []
        where_none: list[tuple[_Image, int]] = []
        for img, j in places:
            row = img.captions[j]
            rec = recs.get((row[0], gen))
            if rec is None:  # gone since it was read: counted as a record without text
                rec = (row[0], gen, row[2], "", "", 0.0, None, None)
            if rec[6] is None:
                without.append(rec)
                where_none.append((img, j))
            else:
                with_text.append(rec)
                where_text.append((img, j))
        ctx, store = _context(contexts, sc, options)
        src = sources.get(gen)
        if src is None and with_text:
            src = sources[gen] = guess_source(gen, with_text[0][6])
        for rows, where, s in ((with_text, where_text, src), (without, where_none, None)):
            for (img, j), blob in zip(
                where, F.fill(index, terms, rows, s, ctx, tokens, store=store), strict=True
            ):
                row = img.captions[j]
                img.captions[j] = (row[0], row[1], row[2], blob)


def _context(
    contexts: dict[Scope, tuple[Context, bool]], sc: Scope, options: Options
) -> tuple[Context, bool]:
    """The context a scope's captions are read in, and whether facts read in it may be
    kept (not with a report's own trigger word)."""
    known = contexts.get(sc)
    if known is None:
        trigger = options.trigger if options.trigger is not None else sc.trigger
        store = options.trigger is None or options.trigger == sc.trigger
        known = contexts[sc] = (Context(trigger, sc.language), store)
    return known


# -- tags --------------------------------------------------------------------------------


def _top_ids(
    ids: np.ndarray, counts: np.ndarray, total: int, n: int, tag: Callable[[int], str]
) -> list[dict[str, Any]]:
    """The ``n`` most frequent tags (ties by name) of (tag ids, counts > 0)."""
    if len(ids) > n:
        kth = np.partition(counts, len(counts) - n)[len(counts) - n]
        keep = counts >= kth
        ids, counts = ids[keep], counts[keep]
    rows = sorted(
        ((tag(i), c) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)),
        key=lambda kv: (-kv[1], kv[0]),
    )[:n]
    return [{"tag": t, "count": c, "share": _share(c, total)} for t, c in rows]


def _compose(f: Callable[[int], str], g: Callable[[int], int]) -> Callable[[int], str]:
    return lambda i: f(g(i))


def _nonzero(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


@dataclass(slots=True)
class _Lengths:
    words: list[int] = field(default_factory=list)
    # captions over the limit: (-characters, API path, image path, index in words)
    over: list[tuple[int, str, str, int]] = field(default_factory=list)


def _tags(
    images: dict[str, _Image], terms: F.Terms, options: Options
) -> tuple[dict[str, Any], dict[str, _Lengths]]:
    """The tags section from the captions' facts (tag ids, aggregated with numpy), and
    each generator's lengths for :func:`_length`."""
    unpack, head = F.HEAD.unpack_from, F.HEAD_SIZE
    TEXT, TRIGGER, OVER, TAG_LIST, PEOPLE = F.TEXT, F.TRIGGER, F.OVER, F.TAG_LIST, F.PEOPLE
    n_img = len(images)
    roots: dict[str, int] = {}
    folders: dict[str, int] = {}
    root_of = np.zeros(n_img, dtype=np.int64)
    folder_of = np.zeros(n_img, dtype=np.int64)
    found_of = np.zeros(n_img, dtype=bool)
    tagged_of = np.zeros(n_img, dtype=bool)
    chunks: list[bytes] = []
    owners: list[int] = []
    sizes: list[int] = []
    multi = False
    generators: set[str] = set()
    triggers: dict[str, dict[str, Any]] = {}
    lengths: dict[str, _Lengths] = {}
    for i, img in enumerate(images.values()):
        reads: list[tuple[str, bool]] = []
        n_tags = 0
        for row in img.captions:
            blob = row[3]
            _k, fl, words, chars, _at, _e = unpack(blob)
            if not fl & TEXT:
                continue
            gen = row[1]
            ln = lengths.get(gen)
            if ln is None:
                ln = lengths[gen] = _Lengths()
            if fl & OVER:
                ln.over.append((-chars, img.api, row[0], len(ln.words)))
            ln.words.append(words)
            reads.append((gen, fl & TRIGGER))
            if fl & TAG_LIST and not fl & PEOPLE:
                generators.add(gen)
                n_tags += 1
                chunks.append(blob[head:])
                owners.append(i)
                sizes.append((len(blob) - head) // 4)
        sc = img.scope
        if n_tags:
            multi = multi or n_tags > 1
            tagged_of[i] = True
            r = roots.get(sc.name)
            root_of[i] = roots.setdefault(sc.name, len(roots)) if r is None else r
            f = folders.get(img.folder)
            folder_of[i] = folders.setdefault(img.folder, len(folders)) if f is None else f
        word = options.trigger if options.trigger is not None else sc.trigger
        if not reads or not word.strip():
            continue
        t = triggers.get(sc.name)
        if t is None:
            t = triggers[sc.name] = {
                "word": word.strip(),
                "captioned_images": 0,
                "with_trigger": 0,
                "by_generator": {},
                "missing": [],
            }
        t["captioned_images"] += 1
        found = False
        for gen, hit in reads:
            g = t["by_generator"].get(gen)
            if g is None:
                g = t["by_generator"][gen] = {"captions": 0, "with_trigger": 0}
            g["captions"] += 1
            if hit:
                g["with_trigger"] += 1
                found = True
        if found:
            t["with_trigger"] += 1
            found_of[i] = True
        elif len(t["missing"]) < options.examples:
            t["missing"].append(img.api)

    ids = np.frombuffer(b"".join(chunks), dtype="<u4").astype(np.int64)
    own = np.repeat(np.asarray(owners, dtype=np.int64), np.asarray(sizes, dtype=np.int64))
    if multi:  # an image's tags once, however many tag lists it has
        pairs = np.unique((own << 32) | ids)
        own, ids = pairs >> 32, pairs & 0xFFFFFFFF
    tag = terms.tag
    if len(ids) and int(ids.max()) > 4 * len(terms.by_id) + 1_000_000:  # a report's own ids
        dense, ids = np.unique(ids, return_inverse=True)
        ids = ids.reshape(-1)
        tag = dense.tolist().__getitem__
        tag = _compose(terms.tag, tag)
    size = int(ids.max()) + 1 if len(ids) else 0
    root_pair = root_of[own]
    per_root: dict[str, np.ndarray] = {}
    for name, r in roots.items():
        sel = ids if len(roots) == 1 else ids[root_pair == r]
        per_root[name] = np.bincount(sel, minlength=size)
    overall = sum(per_root.values(), np.zeros(size, dtype=np.int64))
    tagged = int(np.count_nonzero(tagged_of))

    folder_images = np.bincount(folder_of[tagged_of], minlength=len(folders)).tolist()
    folder_names = list(folders)
    listed = sorted(range(len(folders)), key=lambda f: (-folder_images[f], folder_names[f]))
    per_folder = []
    if listed:
        folder_pair = folder_of[own]
        order = np.argsort(folder_pair, kind="stable")
        bounds = np.searchsorted(folder_pair[order], np.arange(len(folders) + 1))
        for f in listed[: options.folders]:
            u, c = np.unique(ids[order[bounds[f] : bounds[f + 1]]], return_counts=True)
            n = folder_images[f]
            per_folder.append(
                {
                    "folder": folder_names[f],
                    "images": n,
                    "distinct": len(u),
                    "top": _top_ids(u, c, n, 10, tag),
                }
            )

    trigger_out = []
    for name, t in sorted(triggers.items()):
        if name in roots:
            r = roots[name]
            mask = found_of[own] & (root_pair == r)
            co_ids, co_counts = _nonzero(np.bincount(ids[mask], minlength=size))
        else:
            co_ids = co_counts = np.zeros(0, dtype=np.int64)
        t["share"] = _share(t["with_trigger"], t["captioned_images"])
        for g in t["by_generator"].values():
            g["share"] = _share(g["with_trigger"], g["captions"])
        t["co_occurring"] = _top_ids(co_ids, co_counts, t["with_trigger"], 15, tag)
        trigger_out.append({"root": name, **t})
    all_ids, all_counts = _nonzero(overall)
    rare_sel = all_counts <= 2
    rare = sorted(
        (
            (tag(i), c)
            for i, c in zip(all_ids[rare_sel].tolist(), all_counts[rare_sel].tolist(), strict=True)
        ),
        key=lambda kv: (kv[1], kv[0]),
    )
    every = sorted(tag(i) for i in all_ids[all_counts == tagged].tolist()) if tagged >= 2 else []
    out = {
        "generators": sorted(generators),
        "tagged_images": tagged,
        "distinct": len(all_ids),
        "top": _top_ids(all_ids, all_counts, tagged, options.top, tag),
        "per_folder": {"folders": len(folders), "list": per_folder},
        "rare": {
            "count": len(rare),
            "list": [{"tag": t, "count": c} for t, c in rare[: options.top * 4]],
        },
        "in_every_image": every,
        "trigger": trigger_out,
    }
    return out, lengths


_NONE = (None,) * 8


# -- length ------------------------------------------------------------------------------


def _length(
    index: ReportIndex,
    lengths: dict[str, _Lengths],
    tokens: TokenCounter,
    options: Options,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "clip": {
            "limit": LIMIT + 2,
            "tokenizer": tokens.name,
            "exact": tokens.exact,
            "note": tokens.note,
        },
        "by_generator": {},
    }
    for gen, ln in sorted(lengths.items()):
        # the longest first, counted exactly (or estimated) for the examples
        shown = heapq.nsmallest(options.examples, ln.over)
        recs = index.caption_records((path, gen) for _c, _a, path, _i in shown)
        counts = tokens.counts([(recs.get((p, gen)) or _NONE)[6] or "" for _c, _a, p, _i in shown])
        words = ln.words
        out["by_generator"][gen] = {
            "words": _summary(words),
            "histogram": _hist(words, WORD_EDGES),
            "over_clip_limit": len(ln.over),
            "over_clip_share": _share(len(ln.over), len(words)),
            "examples": [
                {"path": api, "tokens": n + 2, "words": words[i]}
                for (_c, api, _p, i), n in zip(shown, counts, strict=True)
            ],
        }
    return out


# -- images ------------------------------------------------------------------------------


def _images(
    images: dict[str, _Image],
    facts: dict[str, tuple[int | None, int | None, str | None]],
    options: Options,
    phash_state: dict[str, Any] | None,
) -> dict[str, Any]:
    by_hash: dict[str, list[str]] = {}
    apis: list[str] = []
    ws: list[int] = []
    hs: list[int] = []
    no_hash = 0
    for img in images.values():
        caps = img.captions
        if not caps:
            no_hash += 1
            continue
        digest = caps[0][2]
        if len(caps) > 1:
            for r in caps:
                if r[2] != digest:  # the newest caption's content
                    digest = max(caps, key=lambda r: F.HEAD.unpack_from(r[3])[4])[2]
                    break
        group = by_hash.get(digest)
        if group is None:
            by_hash[digest] = [img.api]
        else:
            group.append(img.api)
        f = facts.get(digest)
        if f is not None and f[0] and f[1]:
            apis.append(img.api)
            ws.append(int(f[0]))
            hs.append(int(f[1]))
    res = options.resolution
    buckets = buckets_for(res, options.bucket_step, options.min_bucket, options.max_bucket)
    buckets.sort(key=lambda b: (b[0] / b[1], b))  # by aspect ratio, for searchsorted
    ratios = np.array([w / h for w, h in buckets])
    w_a = np.array(ws, dtype=np.float64)
    h_a = np.array(hs, dtype=np.float64)
    ar = w_a / h_a if len(ws) else np.zeros(0)
    # the closest ratio (sd-scripts' select_bucket): the neighbour below or above
    hi_i = np.clip(np.searchsorted(ratios, ar, side="left"), 0, len(ratios) - 1)
    lo_i = np.clip(hi_i - 1, 0, len(ratios) - 1)
    pick = np.where(np.abs(ratios[hi_i] - ar) < np.abs(ar - ratios[lo_i]), hi_i, lo_i)
    bucket_counts = np.bincount(pick, minlength=len(buckets)).tolist()
    bw = np.array([b[0] for b in buckets])[pick]
    bh = np.array([b[1] for b in buckets])[pick]
    upscaled = int(np.count_nonzero(np.maximum(bw / w_a, bh / h_a) > 1)) if len(ws) else 0
    small = np.flatnonzero(w_a * h_a < res * res).tolist()
    below = [(apis[i], ws[i], hs[i]) for i in small]
    common: Counter[str] = Counter()
    for (w, h), n in Counter(zip(ws, hs, strict=True)).items():
        common[f"{w}x{h}"] = n
    aspect_idx = np.searchsorted(np.array([hi for _l, hi in ASPECTS]), ar, side="right")
    aspect_counts = np.bincount(aspect_idx, minlength=len(ASPECTS)).tolist()
    sizes = list(zip(apis, ws, hs, strict=True))
    below.sort(key=lambda x: (x[1] * x[2], x[0]))
    dup_groups = sorted(
        (sorted(p) for p in by_hash.values() if len(p) > 1), key=lambda g: (-len(g), g[0])
    )
    near = _near(by_hash, facts, options, phash_state)
    return {
        "with_size": len(sizes),
        "without_size": len(images) - len(sizes),
        "size_note": "Sizes are known for images captioned by this captiond or hashed by its "
        "background pass; images never decoded (pending, failed) have none",
        "megapixels": _hist((w_a * h_a / 1e6).tolist(), MP_EDGES, " MP"),
        "aspect": [
            {"bin": label, "count": n}
            for (label, _hi), n in zip(ASPECTS, aspect_counts, strict=True)
        ],
        "common_sizes": [
            {"size": s, "count": c}
            for s, c in sorted(common.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        ],
        "below_resolution": {
            "resolution": res,
            "count": len(below),
            "share": _share(len(below), len(sizes)),
            "examples": [{"path": a, "size": f"{w}x{h}"} for a, w, h in below[: options.examples]],
        },
        "buckets": {
            "resolution": res,
            "step": options.bucket_step,
            "min": options.min_bucket,
            "max": options.max_bucket,
            "upscaled": upscaled,
            "list": [
                {"bucket": f"{w}x{h}", "aspect": round(w / h, 3), "count": n}
                for (w, h), n in sorted(zip(buckets, bucket_counts, strict=True))
                if n
            ],
        },
        "exact_duplicates": {
            "groups": len(dup_groups),
            "images": sum(len(g) for g in dup_groups),
            "redundant": sum(len(g) - 1 for g in dup_groups),
            "not_hashed": no_hash,
            "list": [
                {"count": len(g), "paths": g[: options.examples]} for g in dup_groups[: options.top]
            ],
        },
        "near_duplicates": near,
    }


def _near(
    by_hash: dict[str, list[str]],
    facts: dict[str, tuple[int | None, int | None, str | None]],
    options: Options,
    phash_state: dict[str, Any] | None,
) -> dict[str, Any]:
    hashes = {}
    unreadable = plain = 0
    for digest in by_hash:
        f = facts.get(digest)
        p = f[2] if f is not None else None
        if p and ph.too_plain(p):
            plain += 1
        elif p:
            hashes[digest] = p
        elif p == ph.UNREADABLE:
            unreadable += 1
    out: dict[str, Any] = {
        "distance": options.near_distance,
        "contents": len(by_hash),
        "hashed": len(hashes) + plain,
        "unreadable": unreadable,
        "too_plain": plain,
        "not_hashed_yet": len(by_hash) - len(hashes) - plain - unreadable,
        "method": "imagehash pHash (64 bits), Hamming distance",
    }
    if phash_state:
        out["background_pass"] = phash_state
    try:
        groups = ph.near_groups(hashes, options.near_distance)
    except ValueError as exc:
        out.update(error=str(exc), groups=None, images=None, list=[])
        return out
    groups = [g for g in groups if len(g[0]) > 1]
    out["groups"] = len(groups)
    out["images"] = sum(sum(len(by_hash[d]) for d in g) for g, _d in groups)
    out["list"] = [
        {
            "contents": len(g),
            "max_distance": d,
            "paths": sorted(p for digest in g for p in by_hash[digest])[: options.examples],
        }
        for g, d in groups[: options.top]
    ]
    return out


# -- flags -------------------------------------------------------------------------------


def _flags(images: dict[str, _Image], flags: list[tuple], options: Options) -> dict[str, Any]:
    by_check: dict[str, dict[str, int]] = {}
    open_list = []
    for path, gen, check, reason, _digest, created, dismissed in sorted(flags):
        c = by_check.setdefault(check, {"open": 0, "dismissed": 0})
        if dismissed is None:
            c["open"] += 1
            open_list.append(
                {
                    "path": images[path].api,
                    "generator": gen,
                    "check": check,
                    "reason": reason,
                    "since": created,
                }
            )
        else:
            c["dismissed"] += 1
    return {
        "open": len(open_list),
        "dismissed": sum(c["dismissed"] for c in by_check.values()),
        "by_check": dict(sorted(by_check.items())),
        "list": open_list[: options.top * 10],
    }
