"""Content hashes of images: BLAKE2b with a 32-byte digest, as lowercase hex.

``hash_file`` (the scanner) and ``hash_bytes`` (the worker, on the bytes it captioned)
give the same result for the same content.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20  # 1 MiB
DIGEST_SIZE = 32


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """Hash a file's content, read in 1 MiB chunks. Raises OSError."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
