"""Caption sidecar files: naming, the never-clobber rules, atomic writes.

Naming: ``<stem>.<ext>`` (what trainers read) or ``<name>.<ext>``. When two images
share a stem (``a.jpg``, ``a.png``) the one captiond already wrote ``a.<ext>`` for
keeps it; every other one gets ``<name>.<ext>`` (``a.png.txt``), so neither can
overwrite the other's caption.

Ownership rules (``decide``): a sidecar is *ours* when its content hash equals the
hash captiond recorded when it wrote it. Ours may be replaced when the image
changes. A sidecar edited by a person (hash differs) is never touched again
(``caption_edited``). A sidecar captiond did not write is handled by the watch's
existing-caption policy only the first time captiond sees the image; after that it
too counts as a person's caption.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from daemon.hashing import hash_bytes

TEMP_SUFFIX = ".captiond.tmp"


class Action(StrEnum):
    WRITE = "written"
    UNCHANGED = "unchanged"  # the file already holds exactly this caption
    EXISTS = "caption_exists"
    EDITED = "caption_edited"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    text: str = ""


def candidate_paths(image: Path, ext: str) -> tuple[Path, Path]:
    """(stem form, name form): ``a.jpg`` -> (``a.txt``, ``a.jpg.txt``)."""
    return image.with_name(f"{image.stem}.{ext}"), image.with_name(f"{image.name}.{ext}")


def stem_siblings(image: Path, image_extensions: list[str]) -> list[Path]:
    """Other images in the same folder with the same stem (``a.png`` beside ``a.jpg``)."""
    found = []
    for ext in image_extensions:
        for variant in {ext.lower(), ext.upper()}:
            other = image.with_name(f"{image.stem}.{variant}")
            if other.name != image.name and other.exists():
                found.append(other)
    return found


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


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


def decide(
    *,
    new_text: str,
    existing: bytes | None,
    recorded_hash: str | None,
    seen_before: bool,
    policy: str,
    tags: bool,
    separator: str = ", ",
    force: bool = False,
) -> Decision:
    """What to do with a sidecar. Pure: no I/O.

    existing: the file's current bytes, None if there is no file.
    recorded_hash: hash captiond recorded for this sidecar path, None if it never wrote it.
    seen_before: captiond has captioned this image before (under any sidecar path).
    """
    if existing is None:
        return Decision(Action.WRITE, new_text)
    existing_text = existing.decode("utf-8", errors="replace")
    if existing_text.rstrip("\n") == new_text.rstrip("\n"):
        # Also covers a crash between the atomic write and recording it.
        return Decision(Action.UNCHANGED, new_text)
    if force:
        return Decision(Action.WRITE, new_text)
    if recorded_hash is not None:
        if hash_bytes(existing) == recorded_hash:
            return Decision(Action.WRITE, new_text)
        return Decision(Action.EDITED)
    if seen_before:
        return Decision(Action.EDITED)
    if policy == "skip":
        return Decision(Action.EXISTS)
    if policy == "overwrite":
        return Decision(Action.WRITE, new_text)
    merged = merge(existing_text, new_text, policy, tags=tags, separator=separator)
    return Decision(Action.WRITE, merged)


def read_existing(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_atomic(path: Path, text: str, *, owner_of: Path | None = None) -> str:
    """Write ``text`` (plus one trailing newline) atomically; return its content hash.

    Temp file in the same folder, fsync, ``os.replace``, fsync of the folder. The new
    file keeps the mode of the file it replaces (else 0666 & ~umask), and when running
    as root it is given to the owner of ``owner_of`` (the image).
    """
    data = (text.rstrip("\n") + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if owner_of is not None and os.geteuid() == 0:
                st = owner_of.stat()
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hash_bytes(data)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files a crash left behind in one folder; return how many."""
    removed = 0
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for entry in it:
            if is_temp_name(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed
