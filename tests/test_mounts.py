from __future__ import annotations

from pathlib import Path

import pytest

from daemon.watch.mounts import (
    fs_type,
    inotify_watch_limit,
    is_network_fs,
    mount_for,
    parse_mountinfo,
    parse_watch_limit,
    unescape,
)

MOUNTINFO = "\n".join(
    [
        # no optional fields
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
        # one optional field
        "30 22 0:26 / /proc rw,nosuid shared:13 - proc proc rw",
        # two optional fields
        "40 22 0:50 /export /mnt/nas rw,relatime shared:7 master:2 - nfs4 srv:/export rw,vers=4.2",
        # a mount point whose name is a prefix of another, not a parent of it
        "41 22 8:2 / /mnt/nas2 rw - xfs /dev/sdb1 rw",
        # spaces, a tab and a backslash in the mount point, escaped by the kernel
        r"42 22 0:51 / /mnt/My\040Photos\011x\134y rw - cifs //srv/photos rw",
        # fuse subtype below the nfs mount
        "43 40 0:52 / /mnt/nas/cloud rw,nosuid - fuse.rclone gdrive: rw",
        # garbage lines are skipped
        "not a mountinfo line",
        "",
    ]
)


def test_parse_optional_fields_and_separator() -> None:
    entries = {e.mount_point: e for e in parse_mountinfo(MOUNTINFO)}
    assert set(entries) == {
        "/",
        "/proc",
        "/mnt/nas",
        "/mnt/nas2",
        "/mnt/My Photos\tx\\y",
        "/mnt/nas/cloud",
    }
    nas = entries["/mnt/nas"]
    assert (nas.mount_id, nas.parent_id, nas.root) == (40, 22, "/export")
    assert (nas.fstype, nas.source, nas.super_options) == ("nfs4", "srv:/export", "rw,vers=4.2")
    assert entries["/proc"].fstype == "proc"
    assert entries["/"].fstype == "ext4"


def test_unescape_octal() -> None:
    assert unescape(r"/a\040b\012c\134d") == "/a b\nc\\d"
    assert unescape("/plain") == "/plain"


def test_fs_type_longest_containing_mount() -> None:
    assert fs_type(Path("/mnt/nas/photos/2024"), MOUNTINFO) == "nfs4"
    assert fs_type(Path("/mnt/nas"), MOUNTINFO) == "nfs4"
    assert fs_type(Path("/mnt/nas2/x"), MOUNTINFO) == "xfs"  # not inside /mnt/nas
    assert fs_type(Path("/mnt/nas/cloud/a.jpg"), MOUNTINFO) == "fuse.rclone"
    assert fs_type(Path("/mnt/My Photos\tx\\y/a"), MOUNTINFO) == "cifs"
    assert fs_type(Path("/home/user"), MOUNTINFO) == "ext4"


def test_fs_type_resolves_symlinks(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("/mnt/nas/photos")  # need not exist
    info = MOUNTINFO + f"\n50 22 0:60 / {tmp_path} rw - tmpfs tmpfs rw"
    assert fs_type(link / "a.jpg", info) == "nfs4"
    assert fs_type(tmp_path / "real", info) == "tmpfs"


def test_overmounted_point_last_entry_wins() -> None:
    info = MOUNTINFO + "\n60 22 0:70 / /mnt/nas rw - tmpfs tmpfs rw"
    entry = mount_for(Path("/mnt/nas/x"), info)
    assert entry is not None and entry.fstype == "tmpfs"


def test_fs_type_unknown_and_real_proc(tmp_path: Path) -> None:
    assert fs_type(Path("/x"), "") == ""
    assert fs_type(tmp_path) != ""  # reads the real /proc/self/mountinfo


NETWORK = "nfs nfs4 cifs smb3 smbfs fuse.sshfs fuse.rclone ceph glusterfs 9p afs davfs"


@pytest.mark.parametrize("fstype", [*NETWORK.split(), "fuse.s3fs", "virtiofs", "NFS4"])
def test_network_fs(fstype: str) -> None:
    assert is_network_fs(fstype)


@pytest.mark.parametrize(
    "fstype", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "fuseblk", "overlay", ""]
)
def test_local_fs(fstype: str) -> None:
    assert not is_network_fs(fstype)


def test_watch_limit(tmp_path: Path) -> None:
    assert parse_watch_limit("524288\n") == 524288
    assert parse_watch_limit("nope") is None
    assert parse_watch_limit("0") is None
    f = tmp_path / "max_user_watches"
    f.write_text("8192\n")
    assert inotify_watch_limit(f) == 8192
    assert inotify_watch_limit(tmp_path / "missing") is None
    real = inotify_watch_limit()
    assert real is None or real > 0
