"""Reads and writes confined beneath a watched root, checked at the moment of use.

A path that passed a check up front can be swapped before it is opened (a file
replaced by a symlink, a folder replaced by a link to elsewhere), so every open here
resolves the path beneath the root's directory in the same system calls that use it:

- The root is opened by its canonical path with no symlink allowed on the way
  (``openat2`` with ``RESOLVE_NO_SYMLINKS``, or an ``O_NOFOLLOW`` walk from ``/``).
- Folders below it are opened relative to that descriptor, never through a symlink
  (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``, or an ``O_NOFOLLOW`` walk). The scanner
  never descends into symlinked folders, so a job's path never legitimately has one.
- The last component (the image) is opened with ``O_NOFOLLOW``. When it is a symlink
  the root's policy decides: ``inside`` (default) follows it only when its target,
  resolved lexically from the link's folder, stays inside the same root (and is then
  opened the same confined way); ``never`` refuses every link; ``all`` follows any
  link (documented as unsafe: whoever can write in the folder can make captiond read
  any file it may read).
- Sidecars are never followed through a symlink, whatever the policy.
- Writes go through a held folder descriptor: a temp file created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, fsynced, renamed with ``renameat`` within the same
  descriptor, then the folder is fsynced (once per folder per batch by the caller).
  Later swaps of an ancestor path no longer matter: the descriptor names the inode.

``openat2`` (Linux 5.6+) is used where the kernel allows it; otherwise (ENOSYS, or
EPERM from a container's seccomp profile) the portable walk. :func:`resolver_mode`
says which, for ``captiond status``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from daemon.errors import CaptionError, ErrorType, FileChangingError, UnsafeSidecarError

SymlinkPolicy = Literal["inside", "never", "all"]

TEMP_PREFIX = ".captiond-"
TEMP_SUFFIX = ".tmp"
LEGACY_TEMP_SUFFIX = ".captiond.tmp"  # ``.<sidecar>.<hex>.captiond.tmp`` before 0.2
MAX_SIDECAR_BYTES = 1 << 20
MAX_LINK_HOPS = 8

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must never block an open
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100
_SYS_OPENAT2 = 547 if platform.machine() == "alpha" else 437


class ConfinementError(CaptionError):
    """The path would leave its root (a symlink out, a folder replaced by a link) or
    names something captiond never opens. Not retried: the same path gives the same
    answer until someone changes the folder, and then a scan queues it afresh."""

    error_type = ErrorType.IO
    retryable = False


class NameTooLongError(CaptionError):
    """A sidecar name longer than the filesystem allows (usually 255 bytes)."""

    error_type = ErrorType.IO
    retryable = False


def is_temp_name(name: str) -> bool:
    """captiond's own temporary files (current and legacy names)."""
    if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
        return True
    return name.startswith(".") and name.endswith(LEGACY_TEMP_SUFFIX)


def temp_name() -> str:
    """A short temp name that does not grow with the sidecar's name (NAME_MAX)."""
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"


# -- openat2 --------------------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_mode: str | None = None


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    assert _libc is not None
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def resolver_mode() -> str:
    """``openat2`` where the kernel allows it, else ``walk`` (decided once)."""
    global _libc, _mode
    if _mode is None:
        mode = "walk"
        if os.environ.get("CAPTIOND_CONFINE") != "walk":  # tests force the fallback
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.syscall.restype = ctypes.c_long
                _libc = libc
                os.close(_openat2(_AT_FDCWD, "/", _DIR, _RESOLVE_NO_SYMLINKS))
                mode = "openat2"
            except (OSError, AttributeError):
                _libc = None
        _mode = mode
    return _mode


def _components(rel: str) -> list[str]:
    """The parts of a relative path; anything that could climb or is ambiguous is refused."""
    if not rel:
        return []
    if "\x00" in rel or rel.startswith("/"):
        raise ConfinementError(f"{rel!r} is not a relative path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ConfinementError(f"{rel!r}: '.', '..' and empty path segments are refused")
    return parts


def _refused(exc: OSError, what: str) -> OSError | ConfinementError:
    """ELOOP / EXDEV from a resolve that met a symlink are confinement refusals."""
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return ConfinementError(f"{what}: a symbolic link on the way is refused")
    if exc.errno == errno.ENOTDIR:
        return FileNotFoundError(errno.ENOENT, f"{what}: a folder on the way is not a folder")
    return exc


# -- a root ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Root:
    """A watched root, by its canonical absolute path (no symlink in it)."""

    path: str
    symlinks: SymlinkPolicy = "inside"

    def rel(self, abs_path: str) -> str:
        """``abs_path`` relative to the root (lexically); ConfinementError if outside."""
        base = self.path.rstrip("/")
        if abs_path == base:
            return ""
        if not abs_path.startswith(base + "/"):
            raise ConfinementError(f"{abs_path} is not inside the root {self.path}")
        rel = abs_path[len(base) + 1 :]
        _components(rel)
        return rel

    def open(self) -> int:
        """A descriptor of the root folder, opened with no symlink on its path."""
        if resolver_mode() == "openat2":
            try:
                return _openat2(_AT_FDCWD, self.path, _DIR, _RESOLVE_NO_SYMLINKS)
            except OSError as exc:
                raise _refused(exc, self.path) from None
        fd = os.open("/", _DIR)
        try:
            return _walk(fd, [p for p in self.path.split("/") if p], self.path)
        finally:
            os.close(fd)

    def open_dir(self, root_fd: int, rel_dir: str) -> int:
        """A descriptor of ``rel_dir`` beneath the root: no symlink, no ``..``."""
        parts = _components(rel_dir)
        if not parts:
            return os.dup(root_fd)
        if resolver_mode() == "openat2":
            try:
                return _openat2(
                    root_fd,
                    rel_dir,
                    _DIR,
                    _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
                )
            except OSError as exc:
                raise _refused(exc, f"{self.path}/{rel_dir}") from None
        return _walk(root_fd, parts, f"{self.path}/{rel_dir}")

    def open_folder(self, rel_dir: str) -> Folder:
        """A :class:`Folder` for ``rel_dir`` (the caller closes it; also a context manager)."""
        root_fd = self.open()
        try:
            return Folder(self, rel_dir, self.open_dir(root_fd, rel_dir))
        finally:
            os.close(root_fd)

    def folder(self, rel_dir: str) -> Folder:
        """``with root.folder("sub") as f: ...``."""
        return self.open_folder(rel_dir)


def _walk(fd: int, parts: list[str], what: str) -> int:
    """Open ``parts`` one by one from ``fd`` (which stays open), refusing symlinks."""
    cur = os.dup(fd)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=cur)
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_link(cur, part):
                    # O_NOFOLLOW | O_DIRECTORY on a symlink reads ENOTDIR on Linux
                    raise ConfinementError(
                        f"{what}: a symbolic link on the way is refused"
                    ) from None
                raise _refused(exc, what) from None
            os.close(cur)
            cur = nxt
    except BaseException:
        os.close(cur)
        raise
    return cur


# -- a folder beneath a root --------------------------------------------------------------


@dataclass(slots=True)
class Staged:
    """A file written under a temp name in a folder, not yet in place. Its data is
    fsynced (:meth:`sync`) before it may be renamed (:meth:`commit`)."""

    folder: Folder
    tmp: str
    name: str
    data: bytes
    fd: int = -1  # open until synced (a stage with ``sync=False``)

    def sync(self) -> None:
        """fsync the temp file's data (idempotent). Several staged files of a batch can
        be synced at once from threads: the filesystem then groups them into fewer
        journal commits (bench/README.md, Per-image overhead)."""
        if self.fd < 0:
            return
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1

    def commit(self) -> None:
        """Rename into place (``renameat`` within the folder's descriptor). The caller
        fsyncs the folder (:meth:`Folder.sync`), once per folder per batch."""
        self.sync()  # never a rename before the data is on disk
        try:
            os.rename(self.tmp, self.name, src_dir_fd=self.folder.fd, dst_dir_fd=self.folder.fd)
        except OSError as exc:
            self.discard()
            if exc.errno == errno.ENAMETOOLONG:
                raise self.folder.too_long(self.name) from None
            raise

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.folder.fd)


class Folder:
    """An open folder beneath a root (one batch's use): listing, confined reads, staged
    writes. Not thread-safe; cheap to open (one or two system calls)."""

    def __init__(self, root: Root, rel_dir: str, fd: int):
        self.root = root
        self.rel_dir = rel_dir
        self.fd = fd
        self._names: set[str] | None = None
        self._name_max: int | None = None

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> Folder:
        """A folder opened by its path as the operating system resolves it: for
        captiond's own files (the state directory), not for anything under a root."""
        real = os.path.abspath(path)
        return cls(Root(real), "", os.open(real, _DIR))

    @property
    def path(self) -> str:
        base = self.root.path.rstrip("/")
        return f"{base}/{self.rel_dir}" if self.rel_dir else base

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------
    def names(self, *, fresh: bool = False) -> set[str]:
        """The folder's entries, listed once (again with ``fresh``)."""
        if self._names is None or fresh:
            self._names = set(os.listdir(self.fd))
        return self._names

    def stem_siblings(self, name: str, image_extensions: Iterable[str]) -> list[str]:
        """Other images here with the stem of ``name`` (``a.png`` beside ``a.jpg``),
        probed by name (lower and upper case extensions; a case-insensitive filesystem's
        alias of ``name`` itself is not a sibling), in sort order."""
        stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
        own = self.lstat(name)
        found = []
        for ext in dict.fromkeys(image_extensions):
            for variant in dict.fromkeys((ext.lower(), ext.upper())):
                other = f"{stem}.{variant}"
                if other == name:
                    continue
                try:
                    st = self.lstat(other)
                except OSError:
                    continue
                if st is None or (
                    own is not None and (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
                ):
                    continue
                found.append(other)
        return sorted(found)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(_leaf(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open_file(self, name: str, *, hops: int = 0) -> int:
        """Open ``name`` for reading, following a symlink only as the policy allows."""
        try:
            return os.open(_leaf(name), _READ | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        where = f"{self.path}/{name}"
        policy = self.root.symlinks
        if policy == "never":
            raise ConfinementError(f"{where} is a symbolic link (follow_symlinks = never)")
        if policy == "all":
            return os.open(name, _READ, dir_fd=self.fd)
        if hops >= MAX_LINK_HOPS:
            raise ConfinementError(f"{where}: too many symbolic links")
        try:
            target = os.readlink(name, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # replaced by a plain file meanwhile: again
                return self.open_file(name, hops=hops + 1)
            raise
        rel = _resolve_link(self.root, self.rel_dir, target)
        if rel is None:
            raise ConfinementError(f"{where} links to {target}, outside its root")
        rel_dir, _, leaf = rel.rpartition("/")
        with self.root.folder(rel_dir) as other:
            return other.open_file(leaf, hops=hops + 1)

    def stat_file(self, name: str) -> os.stat_result | None:
        """The stat of ``name`` as :meth:`open_file` would open it (a link resolved by
        the policy); None when it is gone. ConfinementError for a link refused."""
        st = self.lstat(name)
        if st is None or not stat.S_ISLNK(st.st_mode):
            return st
        try:
            fd = self.open_file(name)
        except FileNotFoundError:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def read_file(self, name: str) -> tuple[bytes, os.stat_result]:
        """The whole content of a regular file and its stat; FileChangingError when it
        changed while it was read."""
        fd = self.open_file(name)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise ConfinementError(f"{self.path}/{name} is not a regular file")
            data = _read_all(fd, before.st_size)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
            data
        ) != after.st_size:
            raise FileChangingError("the file changed while it was read")
        return data, after

    def read_sidecar(self, name: str) -> bytes | None:
        """A sidecar's bytes; None when there is none. Symlinks, FIFOs, devices and files
        over 1 MiB raise UnsafeSidecarError: never followed, blocked on or read whole."""
        try:
            fd = os.open(_leaf(name), _READ | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeSidecarError(
                    f"{self.path}/{name} is a symbolic link: left alone"
                ) from None
            if exc.errno == errno.ENAMETOOLONG:
                return None  # a name the filesystem cannot hold cannot exist either
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeSidecarError(f"{self.path}/{name} is not a regular file: left alone")
            if st.st_size > MAX_SIDECAR_BYTES:
                raise UnsafeSidecarError(f"{self.path}/{name} is larger than 1 MiB: left alone")
            return _read_all(fd, st.st_size)
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------------------
    def name_max(self) -> int:
        if self._name_max is None:
            try:
                self._name_max = int(os.fpathconf(self.fd, "PC_NAME_MAX"))
            except (OSError, ValueError):
                self._name_max = 255
        return self._name_max

    def too_long(self, name: str) -> NameTooLongError:
        n = len(os.fsencode(name))
        return NameTooLongError(
            f"the sidecar name {name[:40]}... is {n} bytes; this filesystem allows "
            f"{self.name_max()} bytes per name (rename the image, or use "
            "sidecar_naming = 'stem')"
        )

    def stage(
        self,
        name: str,
        data: bytes,
        *,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
        sync: bool = True,
    ) -> Staged:
        """Write ``data`` to a temp file in this folder and fsync it (with ``sync=False``
        the file stays open for :meth:`Staged.sync` later). A new file gets ``mode``
        (default 0666 minus the umask); a replaced file keeps its mode. ``owner``
        (uid, gid) is applied when running as root (the image's owner)."""
        if len(os.fsencode(_leaf(name))) > self.name_max():
            raise self.too_long(name)
        existing = self.lstat(name)
        if existing and stat.S_ISREG(existing.st_mode):
            mode = existing.st_mode & 0o7777
        tmp = temp_name()
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
            dir_fd=self.fd,
        )  # fmt: skip
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mode is not None:
                os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        if sync:
            os.close(fd)
            fd = -1
        return Staged(self, tmp, name, data, fd)

    def unlink(self, name: str) -> None:
        os.unlink(_leaf(name), dir_fd=self.fd)

    def sync(self) -> None:
        """fsync the folder: the renames done in it are durable."""
        os.fsync(self.fd)

    def write_atomic(
        self,
        name: str,
        data: bytes,
        *,
        owner: tuple[int, int] | None = None,
        mode: int | None = None,
    ) -> None:
        """Stage, rename into place and fsync the folder: one file, atomically."""
        staged = self.stage(name, data, owner=owner, mode=mode)
        staged.commit()
        self.sync()


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _leaf(name: str) -> str:
    if not name or "/" in name or "\x00" in name or name in (".", ".."):
        raise ConfinementError(f"{name!r} is not a file name")
    return name


def _read_all(fd: int, size_hint: int) -> bytes:
    chunks = []
    want = max(size_hint, 1 << 16)
    while chunk := os.read(fd, want):
        chunks.append(chunk)
        want = 1 << 20
    return b"".join(chunks)


def _resolve_link(root: Root, rel_dir: str, target: str) -> str | None:
    """A link's target as a path relative to the root, resolved lexically from the
    link's folder; None when it leaves the root."""
    if target.startswith("/"):
        base = root.path.rstrip("/")
        if not target.startswith(base + "/"):
            return None
        parts = target[len(base) + 1 :].split("/")
    else:
        parts = (rel_dir.split("/") if rel_dir else []) + target.split("/")
    out: list[str] = []
    for p in parts:
        if p in ("", "."):
            continue
        if p == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(p)
    return "/".join(out) if out else None
