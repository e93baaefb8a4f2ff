"""Content hashes, as lowercase hex.

- Images: XXH3-128 (32 hex digits). A change detector, not a security check: at about
  15 GB/s it costs nothing beside decoding, where BLAKE2b (0.4 GB/s here) took about 8%
  of the decode threads' time on camera JPEGs and large PNGs.
- Sidecars: BLAKE2b-256 (64 hex digits), as since the first release, so that a sidecar
  recorded back then is still recognised as captiond's own (its hash decides whether a
  person edited it). Sidecars are small; the speed does not matter there.

Image hashes recorded before the switch are BLAKE2b (64 digits): :func:`file_hashes`
and :func:`bytes_match` check a recorded hash with the algorithm it was made with, so
an upgrade re-captions nothing by itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import xxhash

CHUNK = 1 << 20  # 1 MiB
DIGEST_SIZE = 32  # BLAKE2b
LEGACY_CONTENT_HEX = 2 * DIGEST_SIZE  # image hashes recorded by captiond 0.1 (BLAKE2b)

Bytes = bytes | bytearray | memoryview
FileRef = str | os.PathLike[str] | int  # a path, or a descriptor open for reading


class _Hash(Protocol):
    def update(self, data: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


def content_hash(data: Bytes) -> str:
    """The content hash of an image's bytes."""
    return xxhash.xxh3_128_hexdigest(data)


def content_hash_file(path: FileRef) -> str:
    """:func:`content_hash` of a file, read in 1 MiB chunks. Raises OSError."""
    return _hash_file(path, xxhash.xxh3_128)


def sidecar_hash(data: Bytes) -> str:
    """The hash recorded for a sidecar captiond wrote."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def file_hashes(path: FileRef, recorded: Iterable[str], *, current: str | None = None) -> set[str]:
    """``path``'s content hash in each algorithm that made one of ``recorded`` (read once
    per algorithm; ``current`` is its :func:`content_hash` when the caller has it), so
    a hash recorded by an older captiond can be checked. Raises OSError."""
    algorithms = {len(r) == LEGACY_CONTENT_HEX for r in recorded}
    out = set()
    if True in algorithms:
        out.add(_hash_file(path, lambda: hashlib.blake2b(digest_size=DIGEST_SIZE)))
    if False in algorithms:
        out.add(current or content_hash_file(path))
    return out


def file_matches(path: FileRef, recorded: str, *, current: str | None = None) -> bool:
    """Whether ``path``'s content is the content ``recorded`` was made from."""
    return recorded in file_hashes(path, [recorded], current=current)


def bytes_match(data: Bytes, recorded: str, *, current: str | None = None) -> bool:
    """:func:`file_matches` for bytes in memory."""
    if len(recorded) == LEGACY_CONTENT_HEX:
        return sidecar_hash(data) == recorded  # the same BLAKE2b-256
    return (current or content_hash(data)) == recorded


def _hash_file(path: FileRef, new: Callable[[], _Hash]) -> str:
    h = new()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    if isinstance(path, int):  # an open descriptor (a confined open): from the start
        os.lseek(path, 0, os.SEEK_SET)
    with open(path, "rb", buffering=0, closefd=not isinstance(path, int)) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
