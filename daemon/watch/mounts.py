"""Which filesystem a path lives on, and how many inotify watches the user may hold.

Parsing is done by pure functions that take the file's text, so tests can feed a
fake ``/proc/self/mountinfo``; the thin wrappers read the real files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO_PATH = Path("/proc/self/mountinfo")
MAX_USER_WATCHES_PATH = Path("/proc/sys/fs/inotify/max_user_watches")

# Filesystems where inotify misses changes made elsewhere (another machine, the
# VM host, the Windows side) or that are served over a network: watch them by polling.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "orangefs",
        "ocfs2",
        "gfs2",
        "9p",
        "afs",
        "openafs",
        "coda",
        "davfs",
        "sshfs",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "drvfs",
        "fuse",  # FUSE without a subtype: unknown backend, assume remote
    }
)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo`` (see proc(5))."""

    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


def unescape(field: str) -> str:
    r"""Undo the kernel's octal escapes (``\040`` space, ``\011`` tab, ``\012``, ``\134``)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text; malformed lines are skipped.

    Line format: ``id parent major:minor root mount_point options [optional...] - fstype
    source super_options``. The optional fields (``shared:1``, ``master:2``...) vary in
    number and end at a lone ``-``.
    """
    entries: list[MountEntry] = []
    for line in text.split("\n"):  # not splitlines(): \x1c etc. are legal in paths
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        entries.append(
            MountEntry(
                mount_id=mount_id,
                parent_id=parent_id,
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=fields[5],
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
                super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
            )
        )
    return entries


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def mount_for(path: Path, mountinfo: str | None = None) -> MountEntry | None:
    """The mount holding ``path``: the longest mount point containing the resolved path.

    Of several mounts on the same point, the last listed (the one on top) wins.
    ``path`` need not exist yet; symlinks in its existing part are resolved.
    """
    if mountinfo is None:
        mountinfo = read_mountinfo()
    target = os.path.normpath(str(Path(path).resolve(strict=False)))
    best: MountEntry | None = None
    for entry in parse_mountinfo(mountinfo):
        if _contains(entry.mount_point, target) and (
            best is None or len(entry.mount_point) >= len(best.mount_point)
        ):
            best = entry
    return best


def fs_type(path: Path, mountinfo: str | None = None) -> str:
    """Filesystem type of the mount holding ``path`` (``ext4``, ``nfs4``...); ``""`` if unknown."""
    entry = mount_for(path, mountinfo)
    return entry.fstype if entry is not None else ""


def is_network_fs(fstype: str) -> bool:
    """True for network/shared filesystems where inotify cannot be trusted.

    Covers NFS, SMB/CIFS, cluster filesystems, 9p/virtiofs/vboxsf shares and every
    ``fuse.*`` subtype (sshfs, rclone, s3fs...). ``fuseblk`` (ntfs-3g, exfat on a local
    disk) is local.
    """
    t = fstype.strip().lower()
    return t in NETWORK_FS_TYPES or t.startswith(("fuse.", "nfs"))


def read_mountinfo(path: Path = MOUNTINFO_PATH) -> str:
    """The text of ``/proc/self/mountinfo``; ``""`` if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return ""


def parse_watch_limit(text: str) -> int | None:
    """The integer in ``max_user_watches``; None if it is not a positive number."""
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


def inotify_watch_limit(path: Path = MAX_USER_WATCHES_PATH) -> int | None:
    """``fs.inotify.max_user_watches``; None when unknown (not Linux, no /proc)."""
    try:
        return parse_watch_limit(path.read_text())
    except OSError:
        return None
