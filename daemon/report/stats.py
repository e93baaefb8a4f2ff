"""The dataset report: what is in a dataset, from the index alone.

:func:`build_report` takes the index (caption records with their text, each content's
size and perceptual hash, flags), the queue (what is pending or failed) and the scopes
asked for (a watched root, or a folder in one), and returns a JSON-able ``dict``. It
reads no file: a caption a person edited on disk is counted with the text the index
has (see :mod:`daemon.report.service` for when that text is read back), and the report
says how many texts are unknown or were read back.

Paths in the report are API paths: ``ROOT/sub/file.png`` (the watch's name first).
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from daemon.report import phash as ph
from daemon.report.checks import (
    TAGS,
    Context,
    Source,
    guess_source,
    normal_tag,
    read_caption,
    trigger_re,
)
from daemon.report.tokens import LIMIT
from daemon.report.tokens import Counter as TokenCounter

HUMAN_EDIT_PREFIX = "human-edit"  # sidecar_hash of a caption a person wrote via the API
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
    def report_captions(self, prefix: str) -> list[tuple]: ...
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

    def current_hash(self) -> str | None:
        if not self.captions:
            return None
        return max(self.captions, key=lambda r: r[5])[2]


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
    for sc in distinct:
        for d, name in index.files_in(sc.root, sc.rel_dir):
            folder = f"{sc.name}/{d}" if d else sc.name
            path = f"{sc.root}/{d}/{name}" if d else f"{sc.root}/{name}"
            images[path] = _Image(f"{folder}/{name}", folder, sc)
    flags: list[tuple] = []
    get = images.get
    for sc in distinct:
        for row in index.report_captions(sc.prefix):
            img = get(row[0])
            if img is not None:
                img.captions.append(row)
        for row in queue.report_jobs(sc.prefix):
            img = get(row[0])
            if img is not None:
                img.jobs.append(row)
        flags += [f for f in index.flags_under(sc.prefix) if f[0] in images]
    facts = index.image_facts({r[2] for img in images.values() for r in img.captions})
    flags = list(dict.fromkeys(flags))
    lap("read_index")

    sources = dict(sources)

    def source(name: str, text: str) -> Source:
        """A generator that is not configured is read as its first caption suggests."""
        src = sources.get(name)
        if src is None:
            src = sources[name] = guess_source(name, text)
        return src

    report: dict[str, Any] = {
        "generated_at": round(clock(), 3),
        "scope": [
            {"root": s.name, "folder": s.rel_dir, "path": s.prefix, "trigger_word": s.trigger}
            for s in scopes
        ],
        "options": asdict(options),
    }
    report["coverage"] = _coverage(images)
    report["texts"] = _texts(images)
    lap("coverage")
    readings = _readings(images, source, options)
    lap("read_captions")
    report["tags"] = _tags(images, readings, options)
    lap("tags")
    report["length"] = _length(images, readings, tokens, options)
    lap("length")
    report["images"] = _images(images, facts, options, phash_state)
    lap("images")
    report["flags"] = _flags(images, flags, options)
    lap("flags")
    report["timings"] = timings
    return report


# -- coverage ----------------------------------------------------------------------------


def _coverage(images: dict[str, _Image]) -> dict[str, Any]:
    by_gen: dict[str, dict[str, Any]] = {}
    captioned = person_api = person_kept = person_edited = pending = uncaptioned = empty = 0
    person = 0
    failed: dict[str, dict[str, int]] = {"failed": {}, "dead": {}}
    for img in images.values():
        ours = False
        api = edited = kept = False
        for row in img.captions:
            gen, sidecar, shash, text_hash = row[1], row[3], row[4], row[7]
            g = by_gen.setdefault(gen, {"images": 0, "sidecar_types": {}})
            g["images"] += 1
            ext = sidecar.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
            g["sidecar_types"][ext] = g["sidecar_types"].get(ext, 0) + 1
            if shash.startswith(HUMAN_EDIT_PREFIX):
                api = True
            else:
                ours = True
                if text_hash is not None and text_hash != shash:
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
    for img in images.values():
        for row in img.captions:
            if row[6] is None:
                unknown += 1
            else:
                known += 1
                if row[7] is not None and row[7] != row[4]:
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


@dataclass(slots=True)
class _Read:
    generator: str
    kind: str
    text: str
    tags: set[str]
    people_source: bool
    trigger: bool


def _readings(images: dict[str, _Image], source: Any, options: Options) -> dict[str, list[_Read]]:
    """Each image's captions as the report needs them: a tag set for plain tag lists,
    whether the trigger word is there. Captions of other formats (prose, multi_person)
    go through :func:`read_caption`; plain tag lists and prose take short cuts."""
    out: dict[str, list[_Read]] = {}
    contexts: dict[Scope, tuple[Context, str, Any]] = {}
    tag_of = TAGS.__getitem__
    for path, img in images.items():
        known = contexts.get(img.scope)
        if known is None:
            trigger = options.trigger if options.trigger is not None else img.scope.trigger
            ctx = Context(trigger=trigger, language=img.scope.language)
            t = trigger.strip()
            known = contexts[img.scope] = (ctx, normal_tag(t) if t else "",
                                           trigger_re(t) if t else None)  # fmt: skip
        ctx, want, trig_re = known
        rs = []
        for row in img.captions:
            text = row[6]
            if text is None:
                continue
            src = source(row[1], text)
            if src.kind == "tags" and not src.people:
                tags = set(map(tag_of, text.replace("\n", ",").split(",")))
                tags.discard("")
                found = bool(want) and want in tags
                if found:
                    tags.discard(want)
                rs.append(_Read(row[1], "tags", text, tags, False, found))
            elif src.kind == "prose" and not src.people:
                found = trig_re is not None and trig_re.search(text) is not None
                rs.append(_Read(row[1], "prose", text, _NO_TAGS, False, found))
            else:
                r = read_caption(src, text, row[2], ctx)
                rs.append(_Read(row[1], src.kind, text, r.tags, True, r.trigger))
        out[path] = rs
    return out


_NO_TAGS: set[str] = set()


# -- tags --------------------------------------------------------------------------------


def _top(counter: Counter[str], total: int, n: int) -> list[dict[str, Any]]:
    rows = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"tag": t, "count": c, "share": _share(c, total)} for t, c in rows]


def _tags(images: dict[str, _Image], readings: dict[str, list[_Read]], options: Options) -> dict:
    per_root: dict[str, Counter[str]] = {}
    per_folder: dict[str, Counter[str]] = {}
    folder_images: Counter[str] = Counter()
    tagged = 0
    generators: set[str] = set()
    triggers: dict[str, dict[str, Any]] = {}
    without: dict[str, Counter[str]] = {}  # tags of images without the trigger, per root
    for path, rs in readings.items():
        img = images[path]
        tag_reads = [r for r in rs if r.kind == "tags" and not r.people_source]
        if len(tag_reads) == 1:
            tags = tag_reads[0].tags
        else:
            tags = set().union(*(r.tags for r in tag_reads))
        if tag_reads:
            generators.update(r.generator for r in tag_reads)
            tagged += 1
            root = img.scope.name
            (per_root.get(root) or per_root.setdefault(root, Counter())).update(tags)
            f = img.folder
            (per_folder.get(f) or per_folder.setdefault(f, Counter())).update(tags)
            folder_images[f] += 1
        word = options.trigger if options.trigger is not None else img.scope.trigger
        if not rs or not word.strip():
            continue
        t = triggers.get(img.scope.name)
        if t is None:
            t = triggers[img.scope.name] = {
                "word": word.strip(),
                "captioned_images": 0,
                "with_trigger": 0,
                "by_generator": {},
                "missing": [],
            }
        t["captioned_images"] += 1
        found = False
        for r in rs:
            g = t["by_generator"].get(r.generator)
            if g is None:
                g = t["by_generator"][r.generator] = {"captions": 0, "with_trigger": 0}
            g["captions"] += 1
            if r.trigger:
                g["with_trigger"] += 1
                found = True
        if found:
            t["with_trigger"] += 1
        else:
            without.setdefault(img.scope.name, Counter()).update(tags)
            if len(t["missing"]) < options.examples:
                t["missing"].append(img.api)
    overall: Counter[str] = Counter()
    for c in per_root.values():
        overall.update(c)
    trigger_out = []
    for name, t in sorted(triggers.items()):
        co = Counter(per_root.get(name, Counter()))
        co.subtract(without.get(name, Counter()))
        co = +co  # drop zeros
        t["share"] = _share(t["with_trigger"], t["captioned_images"])
        for g in t["by_generator"].values():
            g["share"] = _share(g["with_trigger"], g["captions"])
        t["co_occurring"] = _top(co, t["with_trigger"], 15)
        trigger_out.append({"root": name, **t})
    rare = sorted(((t, c) for t, c in overall.items() if c <= 2), key=lambda kv: (kv[1], kv[0]))
    folders = sorted(folder_images.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "generators": sorted(generators),
        "tagged_images": tagged,
        "distinct": len(overall),
        "top": _top(overall, tagged, options.top),
        "per_folder": {
            "folders": len(folders),
            "list": [
                {
                    "folder": f,
                    "images": n,
                    "distinct": len(per_folder[f]),
                    "top": _top(per_folder[f], n, 10),
                }
                for f, n in folders[: options.folders]
            ],
        },
        "rare": {
            "count": len(rare),
            "list": [{"tag": t, "count": c} for t, c in rare[: options.top * 4]],
        },
        "in_every_image": sorted(t for t, c in overall.items() if c == tagged)
        if tagged >= 2
        else [],
        "trigger": trigger_out,
    }


# -- length ------------------------------------------------------------------------------


def _length(
    images: dict[str, _Image],
    readings: dict[str, list[_Read]],
    tokens: TokenCounter,
    options: Options,
) -> dict[str, Any]:
    per_gen: dict[str, list[tuple[str, str]]] = {}
    for path, rs in readings.items():
        api = images[path].api
        for r in rs:
            items = per_gen.get(r.generator)
            if items is None:
                items = per_gen[r.generator] = []
            items.append((api, r.text))
    out: dict[str, Any] = {
        "clip": {
            "limit": LIMIT + 2,
            "tokenizer": tokens.name,
            "exact": tokens.exact,
            "note": tokens.note,
        },
        "by_generator": {},
    }
    for gen, items in sorted(per_gen.items()):
        texts = [t for _p, t in items]
        over, words = tokens.over_words(texts)
        long = [i for i, o in enumerate(over) if o]
        # the longest first, counted exactly (or estimated) for the examples
        long.sort(key=lambda i: (-len(texts[i]), items[i][0]))
        shown = long[: options.examples]
        counts = tokens.counts([texts[i] for i in shown])
        out["by_generator"][gen] = {
            "words": _summary(words),
            "histogram": _hist(words, WORD_EDGES),
            "over_clip_limit": len(long),
            "over_clip_share": _share(len(long), len(items)),
            "examples": [
                {"path": items[i][0], "tokens": n + 2, "words": words[i]}
                for i, n in zip(shown, counts, strict=True)
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
        if len(caps) > 1 and any(r[2] != digest for r in caps):
            digest = max(caps, key=lambda r: r[5])[2]  # the newest caption's content
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
