"""Thumbnails made on demand and kept in a size-bounded cache (least recently used
first out).

An image is read confined beneath its root (:mod:`daemon.confined`, the same reads as
the worker's) and decoded with the worker's own decoder (:func:`decode_image`: the
pixel limit checked on the header, JPEGs decoded by libjpeg at 1/2, 1/4 or 1/8 scale
when that still covers the thumbnail), then scaled and saved as a JPEG under
``<cache_dir>/thumbnails/``. A cache file's name is a hash of the image's path, size,
modification time and the thumbnail's size, so a changed image gets a new thumbnail
and the name is also the ``ETag``. An image that cannot be decoded gets a placeholder
(remembered the same way: it is not decoded again until it changes), never an error.

The cache keeps an index of its files in memory (loaded from the folder at start,
oldest access first) and removes the least recently used files whenever the total
exceeds ``max_bytes``. At most ``workers`` thumbnails are made at once; two requests
for the same one wait for one making.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
from PIL import Image

from daemon.api.security import ImageRef
from daemon.confined import ConfinementError, Root
from daemon.errors import CaptionError
from daemon.pipeline.images import decode_image

log = structlog.get_logger(__name__)

SIZES = {"s": 320, "m": 1280}  # gallery cells, the image page
VERSION = "1"  # part of every key: bump to make every thumbnail anew
MAX_SOURCE_BYTES = 512 << 20  # a larger file gets the placeholder unread
BROKEN = b""  # a cache file with no bytes: the image could not be decoded
JPEG_QUALITY = 82
BACKGROUND = (238, 238, 238)  # transparency is shown on this grey


@dataclass(frozen=True, slots=True)
class Thumb:
    data: bytes  # JPEG; empty for a placeholder
    etag: str
    placeholder: str | None  # why there is no thumbnail (a placeholder is shown)


class ThumbnailCache:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        max_pixels: int,
        workers: int = 2,
    ) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._making = threading.BoundedSemaphore(workers)
        self._inflight: dict[str, threading.Event] = {}
        self._files: OrderedDict[str, int] = OrderedDict()  # key -> bytes, oldest first
        self.total = 0
        self.made = self.hits = self.evicted = 0
        self._load()

    def _load(self) -> None:
        found = []
        for sub in self.dir.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        found.append((st.st_mtime, entry.name, st.st_size))
        for _, key, size in sorted(found):
            self._files[key] = size
            self.total += size
        self._evict()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / key

    @staticmethod
    def key(ref: ImageRef, size: int, st: os.stat_result) -> str:
        raw = f"{VERSION}\0{ref.path}\0{st.st_size}\0{st.st_mtime_ns}\0{size}"
        return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    # -- reading --------------------------------------------------------------------
    def get(self, ref: ImageRef, size: int) -> Thumb:
        """The thumbnail of ``ref`` fitting ``size`` x ``size`` (made if needed).
        Raises ConfinementError for a path that leaves its root, FileNotFoundError
        when the image is gone; every other failure is a placeholder."""
        root = Root(str(ref.watch.path), ref.watch.follow_symlinks)
        rel_dir = root.rel(str(ref.path.parent))
        with root.folder(rel_dir) as folder:
            st = folder.stat_file(ref.path.name)
            if st is None:
                raise FileNotFoundError(str(ref.path))
            if not stat.S_ISREG(st.st_mode):
                raise ConfinementError(f"{ref.rel} is not a regular file")
            key = self.key(ref, size, st)
            if (hit := self._read(key)) is not None:
                return hit
            with self._claim(key) as mine:
                if not mine and (hit := self._read(key)) is not None:
                    return hit  # made by the request we waited for
                with self._making:
                    data, why = self._make(folder, ref.path.name, st, size)
                self._store(key, data)
                self.made += 1
                return Thumb(data, key, why)

    def _read(self, key: str) -> Thumb | None:
        with self._lock:
            if key not in self._files:
                return None
            self._files.move_to_end(key)
        try:
            data = self._path(key).read_bytes()
        except OSError:
            with self._lock:
                self.total -= self._files.pop(key, 0)
            return None
        with contextlib.suppress(OSError):
            os.utime(self._path(key))  # recency survives a restart
        self.hits += 1
        return Thumb(data, key, "cannot be decoded" if data == BROKEN else None)

    @contextlib.contextmanager
    def _claim(self, key: str):
        """True for the one request that makes ``key``; others wait for it, then
        get False."""
        with self._lock:
            event = self._inflight.get(key)
            if event is None:
                event = self._inflight[key] = threading.Event()
                mine = True
            else:
                mine = False
        if not mine:
            event.wait(60)
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            event.set()

    def _make(self, folder, name: str, st: os.stat_result, size: int) -> tuple[bytes, str | None]:
        if st.st_size > MAX_SOURCE_BYTES:
            return BROKEN, "too large to show"
        try:
            data, _ = folder.read_file(name)
            return render(data, size, self.max_pixels), None
        except CaptionError as exc:  # bad image, changing file, confinement
            if isinstance(exc, ConfinementError):
                raise
            log.info("thumbnail_placeholder", path=f"{folder.path}/{name}", error=str(exc))
            return BROKEN, "cannot be decoded"
        except MemoryError:
            return BROKEN, "too large to show"

    def _store(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{key}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full cache disk: serve it anyway, uncached
            log.warning("thumbnail_cache_write_failed", error=str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._lock:
            self.total += len(data) - self._files.pop(key, 0)
            self._files[key] = len(data)
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used files until the total fits (lock held)."""
        while self.total > self.max_bytes and self._files:
            key, size = self._files.popitem(last=False)
            self.total -= size
            self.evicted += 1
            with contextlib.suppress(OSError):
                self._path(key).unlink()

    def status(self) -> dict[str, int]:
        with self._lock:
            return {
                "files": len(self._files),
                "bytes": self.total,
                "max_bytes": self.max_bytes,
                "made": self.made,
                "hits": self.hits,
                "evicted": self.evicted,
            }


def render(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG of ``data`` fitting ``size`` x ``size`` (never enlarged), EXIF-rotated,
    transparency on light grey. BadImageError for what cannot be decoded."""
    img = decode_image(data, draft_size=size, draft_longer_side=True, max_pixels=max_pixels)
    img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, BACKGROUND)
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()
