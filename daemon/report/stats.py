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

import math
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from daemon.report import phash as ph
from daemon.report.checks import Context, Source, guess_source, normal_tag, read_caption
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
    def report_images(
        self, prefix: str
    ) -> list[tuple[str, int | None, int | None, str | None]]: ...
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
    counts = [0] * len(edges)
    for v in values:
        i = len(edges) - 1
        for j in range(1, len(edges)):
            if v < edges[j]:
                i = j - 1
                break
        counts[i] += 1
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
                "count": counts[i],
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
    """The bucket with the closest aspect ratio (sd-scripts' ``select_bucket``)."""
    ar = w / h
    best, err = 0, math.inf
    for i, r in enumerate(ratios):
        e = abs(r - ar)
        if e < err:
            best, err = i, e
    return best


def _trigger_in(text: str, kind: str, trigger: str) -> bool:
    t = trigger.strip()
    if not t:
        return False
    if kind == "tags":
        want = normal_tag(t)
        return any(normal_tag(x) == want for x in re.split(r"[,\n]", text))
    return re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", text, re.IGNORECASE) is not None


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
    images: dict[str, _Image] = {}
    for sc in scopes:
        for d, name in index.files_in(sc.root, sc.rel_dir):
            path = f"{sc.root}/{d}/{name}" if d else f"{sc.root}/{name}"
            if path not in images:
                folder = f"{sc.name}/{d}" if d else sc.name
                images[path] = _Image(f"{folder}/{name}", folder, sc)
    facts: dict[str, tuple[int | None, int | None, str | None]] = {}
    flags: list[tuple] = []
    seen_prefixes: set[str] = set()
    for sc in scopes:
        if sc.prefix in seen_prefixes:
            continue
        seen_prefixes.add(sc.prefix)
        for row in index.report_captions(sc.prefix):
            img = images.get(row[0])
            if img is not None and row not in img.captions:
                img.captions.append(row)
        for row in queue.report_jobs(sc.prefix):
            img = images.get(row[0])
            if img is not None and row not in img.jobs:
                img.jobs.append(row)
        for digest, w, h, phash in index.report_images(sc.prefix):
            facts[digest] = (w, h, phash)
        flags += [f for f in index.flags_under(sc.prefix) if f[0] in images]
    flags = list(dict.fromkeys(flags))

    def source(name: str, text: str) -> Source:
        return sources.get(name) or guess_source(name, text)

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
    readings = _readings(images, source, options)
    report["tags"] = _tags(images, readings, options)
    report["length"] = _length(images, readings, tokens, options)
    report["images"] = _images(images, facts, options, phash_state)
    report["flags"] = _flags(images, flags, options)
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


def _readings(images: dict[str, _Image], source: Any, options: Options) -> dict[str, list[_Read]]:
    out: dict[str, list[_Read]] = {}
    for path, img in images.items():
        trigger = options.trigger if options.trigger is not None else img.scope.trigger
        ctx = Context(trigger=trigger, language=img.scope.language)
        rs = []
        for row in img.captions:
            text = row[6]
            if text is None:
                continue
            src = source(row[1], text)
            r = read_caption(src, text, row[2], ctx)
            rs.append(_Read(row[1], src.kind, text, r.tags, src.people != ""))
        out[path] = rs
    return out


# -- tags --------------------------------------------------------------------------------


def _top(counter: Counter[str], total: int, n: int) -> list[dict[str, Any]]:
    rows = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"tag": t, "count": c, "share": _share(c, total)} for t, c in rows]


def _tags(images: dict[str, _Image], readings: dict[str, list[_Read]], options: Options) -> dict:
    overall: Counter[str] = Counter()
    per_folder: dict[str, Counter[str]] = {}
    folder_images: Counter[str] = Counter()
    tagged = 0
    generators: set[str] = set()
    triggers: dict[str, dict[str, Any]] = {}
    for path, rs in readings.items():
        img = images[path]
        tag_reads = [r for r in rs if r.kind == "tags" and not r.people_source]
        tags: set[str] = set().union(*(r.tags for r in tag_reads))
        generators.update(r.generator for r in tag_reads)
        if tag_reads:
            tagged += 1
            overall.update(tags)
            per_folder.setdefault(img.folder, Counter()).update(tags)
            folder_images[img.folder] += 1
        word = options.trigger if options.trigger is not None else img.scope.trigger
        if not word.strip() or not rs:
            continue
        t = triggers.setdefault(
            img.scope.name,
            {
                "word": word.strip(),
                "captioned_images": 0,
                "with_trigger": 0,
                "by_generator": {},
                "missing": [],
                "_co": Counter(),
            },
        )
        t["captioned_images"] += 1
        found = False
        for r in rs:
            g = t["by_generator"].setdefault(r.generator, {"captions": 0, "with_trigger": 0})
            g["captions"] += 1
            if _trigger_in(r.text, r.kind, word):
                g["with_trigger"] += 1
                found = True
        if found:
            t["with_trigger"] += 1
            t["_co"].update(tags)
        elif len(t["missing"]) < options.examples:
            t["missing"].append(img.api)
    trigger_out = []
    for name, t in sorted(triggers.items()):
        co = t.pop("_co")
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
        for r in rs:
            per_gen.setdefault(r.generator, []).append((images[path].api, r.text))
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
        words = [len(t.split()) for _p, t in items]
        texts = [t for _p, t in items]
        over = tokens.over(texts)
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
    sizes: list[tuple[str, int, int]] = []
    no_hash = 0
    for img in images.values():
        digest = img.current_hash()
        if digest is None:
            no_hash += 1
            continue
        by_hash.setdefault(digest, []).append(img.api)
        f = facts.get(digest)
        if f is not None and f[0] and f[1]:
            sizes.append((img.api, int(f[0]), int(f[1])))
    res = options.resolution
    area = res * res
    buckets = buckets_for(res, options.bucket_step, options.min_bucket, options.max_bucket)
    ratios = [w / h for w, h in buckets]
    bucket_counts = [0] * len(buckets)
    upscaled = 0
    below: list[tuple[str, int, int]] = []
    common: Counter[str] = Counter()
    aspect_counts = [0] * len(ASPECTS)
    for api, w, h in sizes:
        bi = bucket_of(w, h, buckets, ratios)
        bucket_counts[bi] += 1
        bw, bh = buckets[bi]
        if max(bw / w, bh / h) > 1:
            upscaled += 1
        if w * h < area:
            below.append((api, w, h))
        common[f"{w}x{h}"] += 1
        ar = w / h
        for i, (_label, hi) in enumerate(ASPECTS):
            if ar < hi:
                aspect_counts[i] += 1
                break
    below.sort(key=lambda x: (x[1] * x[2], x[0]))
    dup_groups = sorted(
        (sorted(p) for p in by_hash.values() if len(p) > 1), key=lambda g: (-len(g), g[0])
    )
    near = _near(by_hash, facts, options, phash_state)
    return {
        "with_size": len(sizes),
        "without_size": len(images) - len(sizes),
        "size_note": "sizes are known for images captioned by this captiond or hashed by its "
        "background pass; images never decoded (pending, failed) have none",
        "megapixels": _hist((w * h / 1e6 for _a, w, h in sizes), MP_EDGES, " MP"),
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
                for (w, h), n in zip(buckets, bucket_counts, strict=True)
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
