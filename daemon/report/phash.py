"""Perceptual hashes for near duplicates: imagehash's pHash, once per content hash,
kept in the index (``images.phash``).

The hashes are made by a background pass (:func:`hash_pass`) over the captioned
contents that have none, not in the caption pipeline: the pipeline's decode is the hot
path (another image per second matters there), while this pass reads each content once,
at low priority, with JPEGs decoded at 1/8 scale where they stay over 64 px (pHash looks
at 32 x 32 pixels). The same pass fills in the image's full size where the index lacks it.
Reads are confined to the image's watch root (:mod:`daemon.confined`).

Near duplicates (:func:`near_groups`) are found by multi-index hashing: with at most
``d`` differing bits, two 64-bit hashes split into ``d + 1`` blocks agree on at least
one block whole, so only hashes sharing a block are compared.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from daemon.config import WatchConfig
from daemon.confined import Root
from daemon.errors import BadImageError
from daemon.hashing import bytes_match, content_hash
from daemon.pipeline.images import FULL_SIZE, decode_image

log = structlog.get_logger(__name__)

DRAFT = 64  # JPEGs decode at a scale that keeps both sides >= this
MAX_DISTANCE = 16  # the largest near-duplicate distance a report may ask for
UNREADABLE = ""  # stored for a content that could not be decoded (never retried)


class PhashIndex(Protocol):
    def phash_todo(self) -> dict[str, list[str]]: ...
    def record_phashes(self, rows: Iterable[tuple[str, int | None, int | None, str]]) -> None: ...


def available() -> bool:
    """Whether imagehash (the ``report`` extra) is installed."""
    try:
        import imagehash  # noqa: F401
    except ImportError:
        return False
    return True


def too_plain(phash: str) -> bool:
    """A pHash of an image with almost no structure (a flat colour, a faint gradient):
    all such images hash alike, so they are not compared as near duplicates."""
    try:
        bits = int(phash, 16).bit_count()
    except ValueError:
        return False
    return bits <= 2 or bits >= 62


def phash_image(image: Any) -> str:
    """pHash of a decoded image: 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image))


def phash_bytes(data: bytes, *, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """(pHash, full size) of an image file's bytes; BadImageError when it cannot be
    decoded."""
    image = decode_image(data, draft_size=DRAFT, max_pixels=max_pixels)
    return phash_image(image), image.info.get(FULL_SIZE, image.size)


@dataclass(slots=True)
class PassStats:
    contents: int = 0  # contents without a hash when the pass began
    hashed: int = 0
    unreadable: int = 0  # could not be decoded: '' stored
    skipped: int = 0  # no path readable now (gone, changed, outside every root)
    seconds: float = 0.0
    stopped: bool = False


@dataclass(slots=True)
class HashPass:
    """One pass over the contents without a perceptual hash (see the module doc).

    ``watch_for(path)``: the watch an image belongs to (None: not watched any more).
    ``stop``: set to end the pass between two images. ``skip``: contents that could not
    be read in an earlier pass of this process (gone, changed): not tried again."""

    index: PhashIndex
    watch_for: Callable[[str], WatchConfig | None]
    max_pixels: int = 178_956_970
    batch: int = 64
    stop: threading.Event = field(default_factory=threading.Event)
    skip: set[str] = field(default_factory=set)

    _todo: list[tuple[str, list[str]]] = field(default_factory=list)

    def load(self) -> int:
        """Read which contents need a hash (one query); returns how many."""
        todo = [(d, p) for d, p in self.index.phash_todo().items() if d not in self.skip]
        todo.reverse()  # step() pops from the end: content-hash order
        self._todo = todo
        return len(todo)

    @property
    def remaining(self) -> int:
        return len(self._todo)

    def step(self, n: int) -> PassStats:
        """Hash up to ``n`` of the loaded contents and store them (one transaction)."""
        started = time.monotonic()
        stats = PassStats()
        rows: list[tuple[str, int | None, int | None, str]] = []
        while self._todo and len(rows) + stats.skipped < n and not self.stop.is_set():
            digest, paths = self._todo.pop()
            row = self._one(digest, paths)
            if row is None:
                self.skip.add(digest)
                stats.skipped += 1
                continue
            rows.append(row)
            if row[3] == UNREADABLE:
                stats.unreadable += 1
            else:
                stats.hashed += 1
        self.index.record_phashes(rows)
        stats.stopped = self.stop.is_set()
        stats.seconds = time.monotonic() - started
        return stats

    def run(self, limit: int | None = None) -> PassStats:
        """A whole pass (or its first ``limit`` contents) in this thread."""
        started = time.monotonic()
        total = PassStats(contents=self.load())
        if limit is not None:
            del self._todo[: max(0, len(self._todo) - limit)]
        while self._todo and not self.stop.is_set():
            s = self.step(self.batch)
            total.hashed += s.hashed
            total.unreadable += s.unreadable
            total.skipped += s.skipped
        total.stopped = self.stop.is_set()
        total.seconds = time.monotonic() - started
        return total

    def _one(self, digest: str, paths: list[str]) -> tuple[str, int | None, int | None, str] | None:
        for path in paths:
            watch = self.watch_for(path)
            if watch is None:
                continue
            root = Root(str(watch.path), watch.follow_symlinks)
            try:
                rel_dir, _, name = root.rel(path).rpartition("/")
                with root.folder(rel_dir) as folder:
                    data, _st = folder.read_file(name)
            except (OSError, ValueError, BadImageError) as exc:
                log.debug("phash_read_failed", path=path, error=str(exc))
                continue
            except Exception as exc:  # confinement refused it, the file changed...
                log.debug("phash_read_refused", path=path, error=str(exc))
                continue
            if not bytes_match(data, digest, current=content_hash(data)):
                continue  # changed since it was captioned: its new content comes later
            try:
                ph, (w, h) = phash_bytes(data, max_pixels=self.max_pixels)
            except BadImageError:
                return (digest, None, None, UNREADABLE)
            return (digest, int(w), int(h), ph)
        return None


def lower_priority() -> None:
    """Run this thread at the lowest CPU priority (Linux: niceness is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


# -- near duplicates --------------------------------------------------------------------------


def _blocks(distance: int) -> list[tuple[int, int]]:
    """(shift, width) of ``distance + 1`` blocks covering 64 bits."""
    n = distance + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _parse(hashes: dict[str, str]) -> tuple[list[str], np.ndarray]:
    """The keys whose hash is a hexadecimal number, and the numbers."""
    keys = list(hashes)
    values = list(hashes.values())
    if all(type(h) is str and len(h) == 16 for h in values):  # the common case, at once
        try:
            raw = bytes.fromhex("".join(values))
        except ValueError:
            raw = b""
        if len(raw) == 8 * len(values):
            return keys, np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    out_keys, out = [], []
    for k, h in hashes.items():
        try:
            out.append(int(h, 16))
        except (TypeError, ValueError):
            continue
        out_keys.append(k)
    return out_keys, np.array(out, dtype=np.uint64)


def near_groups(
    hashes: dict[str, str], max_distance: int, *, pair_budget: int = 50_000_000
) -> list[tuple[list[str], int]]:
    """Groups of keys whose pHashes are within ``max_distance`` bits of another member
    (single linkage), each with the largest distance inside that linked two members;
    largest groups first. Keys with an empty or invalid hash are left out."""
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise ValueError(f"the near-duplicate distance must be 0..{MAX_DISTANCE}")
    keys, arr = _parse(hashes)
    if len(keys) < 2:
        return []
    uniq, inverse = np.unique(arr, return_inverse=True)
    uf = _Union(len(uniq))
    worst = np.zeros(len(uniq), dtype=np.int64)
    pairs_done = 0
    found_pairs = None
    if max_distance > 0 and len(uniq) > 1:
        found_a, found_b, found_d = [], [], []
        for shift, width in _blocks(max_distance):
            block = (uniq >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(block, kind="stable")
            sb = block[order]
            k = 1
            while k < len(sb):  # members of a block value are contiguous once sorted
                same = sb[:-k] == sb[k:]
                if not same.any():
                    break
                a, b = order[:-k][same], order[k:][same]
                pairs_done += len(a)
                if pairs_done > pair_budget:
                    raise ValueError(
                        "too many similar images to compare at this distance: ask for a "
                        "smaller near-duplicate distance"
                    )
                dist = np.bitwise_count(uniq[a] ^ uniq[b]).astype(np.int64)
                close = dist <= max_distance
                found_a.append(a[close])
                found_b.append(b[close])
                found_d.append(dist[close])
                k += 1
        if found_a:
            a = np.concatenate(found_a)
            b = np.concatenate(found_b)
            d = np.concatenate(found_d)
            np.maximum.at(worst, a, d)
            np.maximum.at(worst, b, d)
            found_pairs = np.concatenate([a, b])
            for x, y in set(zip(a.tolist(), b.tolist(), strict=True)):
                uf.join(x, y)
    # only contents linked to another, or sharing their hash, can be in a group
    linked = np.bincount(inverse, minlength=len(uniq)) > 1
    if found_pairs is not None:
        linked[found_pairs] = True
    members: dict[int, list[int]] = {}
    for i in np.flatnonzero(linked[inverse]).tolist():
        members.setdefault(uf.find(int(inverse[i])), []).append(i)
    groups = []
    for root, idx in members.items():
        if len(idx) < 2:
            continue
        us = {int(inverse[i]) for i in idx}
        d = max((int(worst[u]) for u in us), default=0)
        groups.append((sorted(keys[i] for i in idx), d))
        del root
    groups.sort(key=lambda g: (-len(g[0]), g[0][0]))
    return groups
