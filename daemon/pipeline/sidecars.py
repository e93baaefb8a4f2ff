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
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from daemon.errors import UnsafeSidecarError
from daemon.hashing import sidecar_hash

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
    prev_hash: str | None = None  # hash of what the write replaces (recorded as ours)
    base_text: str | None = None  # a person's caption kept under append/prepend


def candidate_paths(image: Path, ext: str) -> tuple[Path, Path]:
    """(stem form, name form): ``a.jpg`` -> (``a.txt``, ``a.jpg.txt``)."""
    return image.with_name(f"{image.stem}.{ext}"), image.with_name(f"{image.name}.{ext}")


def stem_siblings(image: Path, image_extensions: list[str]) -> list[Path]:
    """Other images in the same folder with the same stem (``a.png`` beside ``a.jpg``)."""
    found = []
    for ext in image_extensions:
        for variant in sorted({ext.lower(), ext.upper()}):
            other = image.with_name(f"{image.stem}.{variant}")
            if other.name == image.name or not other.exists():
                continue
            # On a case-insensitive filesystem (SMB, casefolded ext4) a.JPG is a.jpg.
            with contextlib.suppress(OSError):
                if os.path.samefile(other, image):
                    continue
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


def precheck(
    *,
    existing: bytes | None,
    ours: frozenset[str],
    seen_before: bool,
    policy: str,
    force: bool = False,
) -> Action | None:
    """The outcome when it does not depend on the new caption (so the model can be
    skipped): EXISTS or EDITED; None when a caption may be written."""
    if existing is None or force or sidecar_hash(existing) in ours:
        return None
    if seen_before:
        return Action.EDITED
    return Action.EXISTS if policy == "skip" else None


def decide(
    *,
    new_text: str,
    existing: bytes | None,
    ours: frozenset[str] = frozenset(),
    base_text: str | None = None,
    seen_before: bool,
    policy: str,
    tags: bool,
    separator: str = ", ",
    force: bool = False,
) -> Decision:
    """What to do with a sidecar. Pure: no I/O.

    existing: the file's current bytes, None if there is no file.
    ours: hashes of content at this path that captiond wrote (see CaptionRecord).
    base_text: a person's caption that an earlier append/prepend merged with.
    seen_before: captiond has captioned this image before (under any sidecar path).
    """

    def final(base: str | None) -> str:
        if base and policy in ("append", "prepend"):
            return merge(base, new_text, policy, tags=tags, separator=separator)
        return new_text

    early = precheck(
        existing=existing, ours=ours, seen_before=seen_before, policy=policy, force=force
    )
    if early is not None:
        return Decision(early)
    if existing is None:
        return Decision(Action.WRITE, final(base_text), base_text=base_text)
    existing_hash = sidecar_hash(existing)
    existing_text = existing.decode("utf-8", errors="replace")
    if force:
        return Decision(Action.WRITE, new_text, prev_hash=existing_hash)
    if existing_hash in ours:
        text = final(base_text)
        if text.rstrip("\n") == existing_text.rstrip("\n"):
            return Decision(Action.UNCHANGED, text, base_text=base_text)
        return Decision(Action.WRITE, text, prev_hash=existing_hash, base_text=base_text)
    # First sight of a caption captiond did not write, and the policy allows a write.
    if policy == "overwrite":
        return Decision(Action.WRITE, new_text, prev_hash=existing_hash)
    base = existing_text.strip()
    return Decision(Action.WRITE, final(base), prev_hash=existing_hash, base_text=base)


MAX_SIDECAR_BYTES = 1 << 20


def read_existing(path: Path) -> bytes | None:
    """A sidecar's bytes; None when there is none. Symlinks, FIFOs, devices and files
    over 1 MiB raise UnsafeSidecarError: never followed, blocked on or read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeSidecarError(f"{path} is a symbolic link: left alone") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeSidecarError(f"{path} is not a regular file: left alone")
        if st.st_size > MAX_SIDECAR_BYTES:
            raise UnsafeSidecarError(f"{path} is larger than 1 MiB: left alone")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Staged:
    """A sidecar written and fsynced under a temp name, not yet in place."""

    tmp: Path
    target: Path
    digest: str

    def commit(self) -> None:
        """Rename into place and fsync the folder."""
        os.replace(self.tmp, self.target)
        dir_fd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def stage(path: Path, text: str, *, owner_of: Path | None = None) -> Staged:
    """Write ``text`` (plus one trailing newline) to a temp file beside ``path`` and fsync.

    A new file gets 0666 minus the umask; a replaced file keeps its mode. When running
    as root the file is given to the owner of ``owner_of`` (the image).
    """
    data = (text.rstrip("\n") + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        st = os.lstat(path)
        mode: int | None = st.st_mode & 0o7777 if stat.S_ISREG(st.st_mode) else None
    except FileNotFoundError:
        mode = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            if owner_of is not None and os.geteuid() == 0:
                st = owner_of.stat()
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Staged(tmp, path, sidecar_hash(data))


def write_atomic(path: Path, text: str, *, owner_of: Path | None = None) -> str:
    """Write a sidecar atomically (temp file, fsync, rename, fsync folder); its hash."""
    staged = stage(path, text, owner_of=owner_of)
    try:
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return staged.digest
