"""Nothing outside a watched root is ever read or written (issue 10.1), tried as an
attacker who can write in a watched folder would: folders swapped for symlinks, files
linking out, a swap between the API's check and the worker's read, a folder moved to a
hidden name. In both resolution modes: openat2 and the portable O_NOFOLLOW walk."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import confined
from daemon.confined import ConfinementError, Folder, Root, is_temp_name
from tests.daemonproc import DaemonProcess, make_image, wait_for

MODES = ["openat2", "walk"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    if request.param == "walk":
        monkeypatch.setenv("CAPTIOND_CONFINE", "walk")
    monkeypatch.setattr(confined, "_mode", None)
    got = confined.resolver_mode()
    if request.param == "openat2" and got != "openat2":
        pytest.skip("openat2 is not available on this kernel")
    assert got == request.param
    yield got
    monkeypatch.setattr(confined, "_mode", None)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    out = tmp_path / "out"
    make_image(root / "sub" / "a.png", "red")
    make_image(root / "real.png", "green")
    make_image(out / "secret.png", "blue")
    (out / "secret.txt").write_text("outside text\n")
    return root, out


def test_folders_are_never_entered_through_a_symlink(mode, tree) -> None:
    root, out = tree
    os.symlink(out, root / "link")
    r = Root(str(root))
    with pytest.raises(ConfinementError):
        r.folder("link")
    shutil.rmtree(root / "sub")
    os.symlink("../out", root / "sub")  # the attack: a watched folder replaced by a link
    with pytest.raises(ConfinementError):
        r.folder("sub")
    os.symlink("real.png", root / "nested_dir_link")  # a link that is not a folder
    with pytest.raises((ConfinementError, FileNotFoundError)):
        r.folder("nested_dir_link")


@pytest.mark.parametrize("rel", ["..", "../out", "sub/../../out", "/etc", "sub//a", "a\x00b"])
def test_lexical_escapes_are_refused_before_any_system_call(mode, tree, rel) -> None:
    with pytest.raises(ConfinementError):
        Root(str(tree[0])).folder(rel)


def test_file_symlinks_follow_the_policy(mode, tree) -> None:
    root, out = tree
    os.symlink(out / "secret.png", root / "escape.png")  # absolute, outside
    os.symlink("../out/secret.png", root / "escape2.png")  # relative, outside
    os.symlink("real.png", root / "inside.png")
    os.symlink("sub/a.png", root / "deeper.png")
    os.symlink("../real.png", root / "sub" / "up.png")  # leaves sub, stays in root
    inside = Root(str(root), "inside")
    with inside.folder("") as f:
        for name in ("escape.png", "escape2.png"):
            with pytest.raises(ConfinementError, match="outside its root"):
                f.read_file(name)
        assert f.read_file("inside.png")[0] == (root / "real.png").read_bytes()
        assert f.read_file("deeper.png")[0] == (root / "sub" / "a.png").read_bytes()
    with inside.folder("sub") as f:
        assert f.read_file("up.png")[0] == (root / "real.png").read_bytes()
    with Root(str(root), "never").folder("") as f:
        with pytest.raises(ConfinementError, match="never"):
            f.read_file("inside.png")
        assert f.read_file("real.png")[0]  # plain files are fine
    with Root(str(root), "all").folder("") as f:  # documented as unsafe
        assert f.read_file("escape.png")[0] == (out / "secret.png").read_bytes()


def test_sidecars_are_never_followed_and_writes_stay_in_the_folder(mode, tree) -> None:
    root, out = tree
    os.symlink(out / "secret.txt", root / "real.txt")
    with Root(str(root)).folder("") as f:
        with pytest.raises(confined.UnsafeSidecarError):
            f.read_sidecar("real.txt")
        for bad in ("../x.txt", "sub/x.txt", "/tmp/x.txt", ""):
            with pytest.raises(ConfinementError):
                f.stage(bad, b"x")
        staged = f.stage("real.txt", b"new\n")
        staged.commit()  # renameat replaces the link itself, never its target
        f.sync()
    assert (root / "real.txt").read_text() == "new\n" and not (root / "real.txt").is_symlink()
    assert (out / "secret.txt").read_text() == "outside text\n"


def test_a_held_folder_is_the_real_one_even_if_its_path_is_swapped(mode, tree) -> None:
    """Writes go through the folder's descriptor: once opened, swapping the path for a
    link to elsewhere cannot redirect them."""
    root, out = tree
    f = Root(str(root)).open_folder("sub")
    moved = root / "sub_moved"
    os.rename(root / "sub", moved)
    os.symlink(out, root / "sub")
    f.write_atomic("a.txt", b"tags\n")
    f.close()
    assert (moved / "a.txt").read_text() == "tags\n"
    assert not (out / "a.txt").exists()


def test_temp_names_stay_short_whatever_the_sidecar_name(mode, tmp_path) -> None:
    name = "é" * 120 + ".txt"  # 244 bytes: a temp name derived from it would not fit
    with Folder.at(tmp_path) as f:
        staged = f.stage(name, b"x\n")
        assert is_temp_name(staged.tmp) and len(staged.tmp.encode()) < 40
        staged.commit()
        with pytest.raises(confined.NameTooLongError, match="255 bytes"):
            f.stage("é" * 130 + ".txt", b"x\n")
    assert (tmp_path / name).read_text() == "x\n"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_folder_on_the_way_that_is_a_file_or_missing_reads_as_missing(mode, tree) -> None:
    root, _ = tree
    r = Root(str(root))
    with pytest.raises(FileNotFoundError, match="not a folder") as info:
        r.folder("real.png/x")
    assert info.value.errno == errno.ENOENT and "real.png/x" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a folder") as info:
        Root(str(root / "real.png" / "x")).open()  # a root on such a path: named too
    assert f"{root}/real.png/x: a folder on the way" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"No such file.*'gone"):
        r.folder("gone/deeper")
    with pytest.raises(ConfinementError, match="symbolic link"):
        os.symlink("sub", root / "inner")  # a folder link that stays inside: refused too
        r.folder("inner")


@pytest.mark.parametrize(
    ("rel", "why"),
    [("/etc", "not a relative path"), ("a\x00b", "not a relative path"), (".", "'.', '..'")],
)
def test_lexical_refusals_say_why(mode, tree, rel, why) -> None:
    with pytest.raises(ConfinementError, match=why):
        Root(str(tree[0])).folder(rel)


def test_a_root_is_opened_by_its_own_path_only(mode, tmp_path) -> None:
    real = tmp_path / "my data"  # a space in a name is fine
    make_image(real / "sub dir" / "a.png", "red")
    with Root(str(real)).folder("sub dir") as f:
        assert f.names() == {"a.png"}
    os.symlink(real, tmp_path / "alias")
    for path in (tmp_path / "alias", tmp_path / "alias" / "sub dir"):
        with pytest.raises(ConfinementError, match="symbolic link"):
            Root(str(path)).open()


def test_openat2_is_used_whenever_the_kernel_allows_it(monkeypatch) -> None:
    """Probed here independently of captiond: where the system call works, captiond
    must use it (and say so in status), not fall back to the walk."""
    import ctypes

    class How(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("flags", "mode", "resolve")]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    how = How(os.O_RDONLY | os.O_DIRECTORY, 0, 0x04)
    fd = libc.syscall(437, -100, b"/", ctypes.byref(how), ctypes.sizeof(how))
    available = fd >= 0
    if available:
        os.close(fd)
    monkeypatch.delenv("CAPTIOND_CONFINE", raising=False)
    monkeypatch.setattr(confined, "_mode", None)
    assert confined.resolver_mode() == ("openat2" if available else "walk")
    monkeypatch.setattr(confined, "_mode", None)


def test_openat2_errors_keep_their_errno_and_name(mode, tree) -> None:
    """Each failure reads as what it is: a missing folder, then a link, then missing."""
    root, _ = tree
    os.symlink("sub", root / "inner")
    r = Root(str(root))
    for rel, kind in [("gone", FileNotFoundError), ("inner", ConfinementError)] * 2:
        with pytest.raises(kind) as info:
            r.folder(rel)
        assert rel in str(info.value)
        if kind is FileNotFoundError:
            assert info.value.errno == errno.ENOENT and "No such file" in str(info.value)


def test_rel_names_paths_inside_the_root_only(tmp_path) -> None:
    r = Root(str(tmp_path / "data"))
    assert r.rel(str(tmp_path / "data")) == ""
    assert r.rel(str(tmp_path / "data" / "sub" / "a.png")) == "sub/a.png"
    assert Root(str(tmp_path / "data") + "/").rel(str(tmp_path / "data" / "a.png")) == "a.png"
    for outside in (tmp_path / "data2" / "a.png", tmp_path / "a.png", tmp_path):
        with pytest.raises(ConfinementError, match="is not inside the root"):
            r.rel(str(outside))
    with pytest.raises(ConfinementError, match=r"'\.', '\.\.'"):
        r.rel(str(tmp_path / "data") + "/sub/../../etc")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\x00b"])
def test_only_plain_names_are_used_in_a_folder(mode, tree, name) -> None:
    with Root(str(tree[0])).folder("") as f:
        for use in (f.lstat, f.read_sidecar, f.unlink, lambda n: f.stage(n, b"x")):
            with pytest.raises(ConfinementError, match="is not a file name"):
                use(name)


def test_links_are_followed_inside_the_root_in_every_spelling(mode, tree) -> None:
    root, _ = tree
    real = (root / "real.png").read_bytes()
    deep = (root / "sub" / "a.png").read_bytes()
    os.symlink(root / "real.png", root / "absolute.png")
    os.symlink("./real.png", root / "dotted.png")
    os.symlink("sub//a.png", root / "doubled.png")
    (root / "x y" / "z").mkdir(parents=True)
    os.symlink("../../sub/a.png", root / "x y" / "z" / "up.png")
    os.symlink("..", root / "sub" / "to_root.png")
    with Root(str(root)).folder("") as f:
        assert f.read_file("absolute.png")[0] == real
        assert f.read_file("dotted.png")[0] == real
        assert f.read_file("doubled.png")[0] == deep
    with Root(str(root)).folder("x y/z") as f:
        assert f.read_file("up.png")[0] == deep
    with Root(str(root)).folder("sub") as f, pytest.raises(ConfinementError, match="outside"):
        f.read_file("to_root.png")


def test_a_chain_of_links_is_followed_up_to_eight_hops(mode, tree) -> None:
    root, _ = tree
    os.symlink("real.png", root / "l1.png")
    for i in range(2, 10):
        os.symlink(f"l{i - 1}.png", root / f"l{i}.png")
    with Root(str(root)).folder("") as f:
        assert f.read_file("l8.png")[0] == (root / "real.png").read_bytes()
        with pytest.raises(ConfinementError, match=r"root/l\d\.png: too many symbolic links"):
            f.read_file("l9.png")


def test_a_link_replaced_by_a_file_while_it_is_read_is_read_as_the_file(
    mode, tree, monkeypatch
) -> None:
    root, _ = tree
    os.symlink("real.png", root / "swap.png")
    readlink = os.readlink

    def swapped(name, *, dir_fd):
        os.unlink(name, dir_fd=dir_fd)
        (root / "swap.png").write_bytes(b"plain")
        return readlink(name, dir_fd=dir_fd)  # EINVAL: not a link any more

    monkeypatch.setattr(confined.os, "readlink", swapped)
    with Root(str(root)).folder("") as f:
        assert f.read_file("swap.png")[0] == b"plain"


def test_stat_file_sees_what_a_read_would_open(mode, tree) -> None:
    root, out = tree
    os.symlink("sub/a.png", root / "inside.png")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink(out / "secret.png", root / "out.png")
    with Root(str(root)).folder("") as f:
        assert f.stat_file("real.png").st_ino == (root / "real.png").stat().st_ino
        assert f.stat_file("inside.png").st_ino == (root / "sub" / "a.png").stat().st_ino
        assert f.stat_file("dangling.png") is None and f.stat_file("none.png") is None
        with pytest.raises(ConfinementError, match="outside its root"):
            f.stat_file("out.png")


def test_read_file_refuses_what_is_not_a_file_and_notices_a_change(mode, tree, monkeypatch) -> None:
    root, _ = tree
    with Root(str(root)).folder("") as f:
        with pytest.raises(ConfinementError, match="sub is not a regular file"):
            f.read_file("sub")
        data, st = f.read_file("real.png")
        assert st.st_size == len(data) == (root / "real.png").stat().st_size
        read_all = confined._read_all

        def growing(fd, size_hint):
            with open(root / "real.png", "ab") as fh:
                fh.write(b"more")
            return read_all(fd, size_hint)

        monkeypatch.setattr(confined, "_read_all", growing)
        with pytest.raises(confined.FileChangingError, match="changed while it was read"):
            f.read_file("real.png")


def test_read_sidecar_reads_a_file_up_to_1_mib_and_leaves_everything_else_alone(
    mode, tmp_path
) -> None:
    (tmp_path / "big.txt").write_bytes(b"a" * confined.MAX_SIDECAR_BYTES)
    (tmp_path / "huge.txt").write_bytes(b"a" * (confined.MAX_SIDECAR_BYTES + 1))
    (tmp_path / "dir.txt").mkdir()
    os.mkfifo(tmp_path / "fifo.txt")  # opening it must not block
    with Folder.at(tmp_path) as f:
        assert f.read_sidecar("big.txt") == b"a" * confined.MAX_SIDECAR_BYTES
        assert f.read_sidecar("none.txt") is None
        assert f.read_sidecar("n" * 300 + ".txt") is None  # cannot exist: no such file
        with pytest.raises(confined.UnsafeSidecarError, match="larger than 1 MiB"):
            f.read_sidecar("huge.txt")
        for name in ("dir.txt", "fifo.txt"):
            with pytest.raises(confined.UnsafeSidecarError, match="not a regular file"):
                f.read_sidecar(name)
        os.symlink("big.txt", tmp_path / "link.txt")
        with pytest.raises(confined.UnsafeSidecarError, match=r"link\.txt is a symbolic link"):
            f.read_sidecar("link.txt")


def test_stem_siblings_are_the_other_images_with_the_same_stem(tmp_path) -> None:
    for name in ["a.jpg", "a.JPG", "a.png", "a.PNG", "a.txt", "a.b.png", "ab.png", "A.png"]:
        (tmp_path / name).write_bytes(b"x")
    os.link(tmp_path / "a.png", tmp_path / "a.Png")  # one file, two names: no sibling
    (tmp_path / "x.v2.jpg").write_bytes(b"x")
    (tmp_path / "x.v2.png").write_bytes(b"x")
    (tmp_path / "x.png").write_bytes(b"x")
    with Folder.at(tmp_path) as f:
        exts = ["jpg", "png", "webp"]
        assert f.stem_siblings("a.jpg", exts) == ["a.JPG", "a.PNG", "a.png"]
        assert f.stem_siblings("a.png", exts) == ["a.JPG", "a.PNG", "a.jpg"]
        assert f.stem_siblings("x.v2.jpg", exts) == ["x.v2.png"]
        assert f.stem_siblings("ab.png", exts) == []
    with Folder.at(tmp_path) as f:
        os.unlink(tmp_path / "a.Png")
        os.link(tmp_path / "a.png", tmp_path / "a.PNG.tmp")
        os.replace(tmp_path / "a.PNG.tmp", tmp_path / "a.PNG")  # a.PNG is now a.png too
        assert f.stem_siblings("a.png", ["png"]) == []
        assert f.stem_siblings("a.jpg", ["png"]) == ["a.PNG", "a.png"]


def test_names_are_listed_once_unless_asked_afresh(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    with Folder.at(tmp_path) as f:
        assert f.path == str(tmp_path) and f.rel_dir == ""
        assert f.names() == {"a.png"}
        (tmp_path / "b.png").write_bytes(b"x")
        assert f.names() == {"a.png"}
        assert f.names(fresh=True) == {"a.png", "b.png"}


def test_a_closed_folder_is_closed_for_good(tmp_path) -> None:
    f = Folder.at(tmp_path)
    fd = f.fd
    f.close()
    f.close()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        f.lstat("x")
    assert info.value.errno == errno.EBADF


def test_unlink_removes_a_file_of_this_folder_only(mode, tree) -> None:
    root, _ = tree
    (root / "sub" / "a.txt").write_text("x")
    (root / "a.txt").write_text("y")
    with Root(str(root)).folder("sub") as f:
        f.unlink("a.txt")
    assert not (root / "sub" / "a.txt").exists() and (root / "a.txt").exists()


def test_is_temp_name_knows_captionds_temp_files_only() -> None:
    assert confined.is_temp_name(confined.temp_name())
    assert confined.is_temp_name(".a.txt.0f1e2d3c.captiond.tmp")  # before 0.2
    for name in [".captiond-x", "x.tmp", "captiond-1.tmp", "a.captiond.tmp", ".a.txt", "a"]:
        assert not confined.is_temp_name(name), name


def test_a_write_failure_leaves_neither_a_temp_file_nor_a_descriptor(tmp_path, monkeypatch) -> None:
    (tmp_path / "a.txt").write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(confined.os, "fsync", full)
    with Folder.at(tmp_path) as f, pytest.raises(OSError, match="No space left"):
        f.stage("a.txt", b"new\n")
    assert set(os.listdir("/proc/self/fd")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old\n"

    def gone(name, *, dir_fd):  # the folder went away too: the cleanup fails
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)

    monkeypatch.setattr(confined.os, "unlink", gone)
    with Folder.at(tmp_path) as f, pytest.raises(OSError, match="No space left"):
        f.stage("a.txt", b"new\n")  # the write's error, not the cleanup's


def test_a_guessed_temp_name_cannot_redirect_the_write(tmp_path, monkeypatch) -> None:
    """An attacker who could predict the temp name and plant a link there gets an error,
    never a write through the link."""
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / ".captiond-guessed.tmp")
    monkeypatch.setattr(confined, "temp_name", lambda: ".captiond-guessed.tmp")
    with Folder.at(tmp_path) as f, pytest.raises(FileExistsError):
        f.stage("a.txt", b"new\n")
    assert not target.exists() and (tmp_path / ".captiond-guessed.tmp").is_symlink()


def test_a_new_file_gets_the_mode_asked_for_or_0666_minus_the_umask(tmp_path) -> None:
    old = os.umask(0o002)
    try:
        with Folder.at(tmp_path) as f:
            f.write_atomic("a.txt", b"x\n")
            f.write_atomic("b.txt", b"x\n", mode=0o600)
            f.write_atomic("b.txt", b"y\n")  # a replaced file keeps its mode
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files away")
def test_as_root_a_sidecar_belongs_to_the_images_owner(tmp_path) -> None:
    with Folder.at(tmp_path) as f:
        f.write_atomic("a.txt", b"x\n", owner=(1234, 5678))
        staged = f.stage("b.txt", b"y\n", owner=(4321, 8765))
        assert staged.data == b"y\n"
        staged.commit()
    st = (tmp_path / "a.txt").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (tmp_path / "b.txt").stat().st_uid == 4321


def test_names_at_the_filesystems_limit(tmp_path, monkeypatch) -> None:
    with Folder.at(tmp_path) as f:
        assert f.name_max() == os.pathconf(str(tmp_path), "PC_NAME_MAX")
        limit = f.name_max()
        f.write_atomic("n" * limit, b"x\n")  # exactly at the limit: fine
        with pytest.raises(confined.NameTooLongError) as info:
            f.stage("n" * (limit + 5), b"x\n")
        msg = str(info.value)
        assert f"is {limit + 5} bytes; this filesystem allows {limit} bytes" in msg
        assert "sidecar_naming = 'stem'" in msg

    # eCryptfs allows 143 bytes per name: asked of the filesystem, not assumed
    def ecryptfs(fd, what):  # like os.fpathconf: an unknown name is a ValueError
        if what != "PC_NAME_MAX":
            raise ValueError(f"unrecognized configuration name {what!r}")
        return 143

    monkeypatch.setattr(confined.os, "fpathconf", ecryptfs)
    with Folder.at(tmp_path) as f, pytest.raises(confined.NameTooLongError, match="143"):
        assert f.name_max() == 143
        f.stage("n" * 150, b"x\n")

    def unknown(fd, what):
        raise OSError(errno.EINVAL, "no limit known")

    monkeypatch.setattr(confined.os, "fpathconf", unknown)
    with Folder.at(tmp_path) as f:
        assert f.name_max() == 255


def test_a_rename_refused_for_its_length_says_so_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    """A share whose server allows shorter names than it reports refuses at the rename."""

    def refused(*args, **kw):
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    with Folder.at(tmp_path) as f:
        staged = f.stage("n" * 200, b"x\n")
        monkeypatch.setattr(confined.os, "rename", refused)
        with pytest.raises(confined.NameTooLongError, match="is 200 bytes"):
            staged.commit()
        staged.discard()  # twice: harmless
    assert list(tmp_path.iterdir()) == []


def _record(monkeypatch, events: list, allowed: set[int], *names: str) -> None:
    """Record os.<name>(fd, ...) calls; refuse any other descriptor than ``allowed``
    (a stale descriptor number would close or fsync someone else's file)."""
    for name in names:
        real = getattr(os, name)

        def call(fd, *args, _name=name, _real=real, **kw):
            if fd not in allowed:
                raise AssertionError(f"os.{_name} of descriptor {fd!r}")
            events.append((_name, fd))
            return _real(fd, *args, **kw)

        monkeypatch.setattr(confined.os, name, call)


def test_an_unsynced_stage_is_fsynced_and_closed_before_its_rename_once(
    tmp_path, monkeypatch
) -> None:
    """A batch stages with sync=False and fsyncs from threads; whoever commits first,
    the data is on disk before the rename, and its descriptor is closed exactly once."""
    with Folder.at(tmp_path) as f:
        staged = f.stage("a.txt", b"x\n", sync=False)
        fd = staged.fd
        assert fd >= 0 and os.fstat(fd).st_size == 2
        # open until synced: a child started meanwhile (the heavy-model child process)
        # must not inherit it
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        events: list = []
        _record(monkeypatch, events, {fd}, "fsync", "close")
        real_rename = os.rename

        def rename(src: str, dst: str, **kw) -> None:
            events.append(("rename", dst))
            real_rename(src, dst, **kw)

        monkeypatch.setattr(confined.os, "rename", rename)
        staged.commit()
        assert events == [("fsync", fd), ("close", fd), ("rename", "a.txt")]
        staged.sync()  # again: nothing more
        assert len(events) == 3
        monkeypatch.undo()
    assert (tmp_path / "a.txt").read_bytes() == b"x\n"


def test_discarding_an_unsynced_stage_closes_it_once_and_leaves_no_temp(
    tmp_path, monkeypatch
) -> None:
    with Folder.at(tmp_path) as f:
        staged = f.stage("b.txt", b"y\n", sync=False)
        fd = staged.fd
        events: list = []
        _record(monkeypatch, events, {fd}, "fsync", "close")
        staged.discard()
        staged.discard()  # twice: harmless, the descriptor is not closed again
        assert events == [("close", fd)]
        monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_discard_whose_close_fails_still_removes_the_temp(tmp_path, monkeypatch) -> None:
    """close() may report a delayed write error (EIO on NFS): the temp goes all the same."""
    with Folder.at(tmp_path) as f:
        staged = f.stage("c.txt", b"z\n", sync=False)
        real_close = os.close

        def failing(fd: int) -> None:
            real_close(fd)
            if fd == staged.fd:
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(confined.os, "close", failing)
        staged.discard()
        monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -- the daemon, attacked ---------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, wd_model_dir: Path, mode: str):
    procs: list[DaemonProcess] = []

    def make(root: Path, **kw) -> DaemonProcess:
        env = {"CAPTIOND_CONFINE": "walk"} if mode == "walk" else {}
        run = tmp_path / f"run{len(procs)}"
        run.mkdir()
        d = DaemonProcess(run, [root], wd_model_dir, env=env, **kw)
        procs.append(d)
        return d

    yield make
    for d in procs:
        d.stop()


@pytest.mark.slow
def test_a_subfolder_swapped_for_a_link_out_is_never_read_or_written(daemon, tree) -> None:
    root, out = tree
    make_image(out / "g.png", "blue")
    d = daemon(root).start()
    wait_for(lambda: (root / "sub" / "a.txt").exists())
    wait_for(d.idle)
    shutil.rmtree(root / "sub")
    os.symlink("../out", root / "sub")
    make_image(root / "later.png", "red")  # something real happens too
    wait_for(lambda: (root / "later.txt").exists())
    # a rescan and an explicit request through the link: refused, nothing written outside
    from daemon.client import request

    assert request(d.socket, "POST", "/api/queue/rescan", b"{}")[0] == 200
    code, _ = request(d.socket, "POST", "/api/generate-caption/_/sub/g.png")
    assert code in (403, 404)
    wait_for(d.idle)
    assert sorted(p.name for p in out.iterdir()) == ["g.png", "secret.png", "secret.txt"]
    assert not [e for e in d.events("caption_written") if "/sub/" in e["path"]][1:]


@pytest.mark.slow
def test_files_linking_out_are_not_captioned_unless_all_is_chosen(daemon, tree) -> None:
    root, out = tree
    os.symlink(out / "secret.png", root / "escape.png")
    os.symlink("real.png", root / "inside.png")
    os.symlink(out / "secret.txt", root / "notes.png")  # a text file, named like an image
    d = daemon(root).start()
    wait_for(lambda: (root / "inside.txt").exists() and (root / "real.txt").exists())
    wait_for(d.idle)
    assert not (root / "escape.txt").exists() and not (root / "notes.txt").exists()
    assert "green background" in (root / "inside.txt").read_text()
    d.stop()
    d2 = daemon(root, watch={"follow_symlinks": "all"}).start()
    wait_for(lambda: (root / "escape.txt").exists())
    assert "blue background" in (root / "escape.txt").read_text()
    d2.stop()


@pytest.mark.slow
def test_a_swap_between_the_api_check_and_the_read_is_refused(daemon, tree) -> None:
    """The request is accepted (the file is a plain image then); the file is replaced by
    a link to an outside image while the queue is paused; the job must not caption it."""
    from daemon.client import request

    root, out = tree
    d = daemon(root).start()
    wait_for(d.idle)
    assert request(d.socket, "POST", "/api/queue/pause", b"{}")[0] == 200
    code, body = request(d.socket, "POST", "/api/generate-caption/_/real.png?force=true")
    assert code == 202, body
    os.remove(root / "real.png")
    os.symlink(out / "secret.png", root / "real.png")
    before = (root / "real.txt").read_text() if (root / "real.txt").exists() else None
    assert request(d.socket, "POST", "/api/queue/resume", b"{}")[0] == 200
    rid = body["request_id"]
    wait_for(
        lambda: (
            request(d.socket, "GET", f"/api/caption-request-status/{rid}")[1]["state"]
            in ("failed", "completed")
        ),
        timeout=30,
    )
    result = request(d.socket, "GET", f"/api/caption-request-status/{rid}")[1]
    assert result["state"] == "failed" and "outside its root" in result["result"]["error"]
    after = (root / "real.txt").read_text() if (root / "real.txt").exists() else None
    assert after == before and "blue" not in (after or "")


@pytest.mark.slow
def test_a_folder_moved_to_a_hidden_name_is_not_captioned(daemon, tree) -> None:
    root, _ = tree
    d = daemon(root).start()
    wait_for(lambda: (root / "sub" / "a.txt").exists())
    wait_for(d.idle)
    make_image(root / "sub" / "b.png", "blue")
    os.rename(root / "sub", root / ".sub_moved")
    make_image(root / "after.png", "red")
    wait_for(lambda: (root / "after.txt").exists())
    wait_for(d.idle)
    assert not (root / ".sub_moved" / "b.txt").exists()
    assert d.status()["files_indexed"] == 2  # real.png, after.png


@pytest.mark.slow
def test_status_says_which_confinement_is_in_use(daemon, tree, mode) -> None:
    d = daemon(tree[0]).start()
    assert d.status()["confinement"] == mode
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(d.config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_the_resolver_in_use_is_the_one_reported(mode, tree, monkeypatch) -> None:
    """status says ``openat2`` or ``walk``; that is what opens the root and its folders."""
    calls = []
    openat2 = confined._openat2

    def spy(*args):
        calls.append(args[1])
        return openat2(*args)

    monkeypatch.setattr(confined, "_openat2", spy)
    with Root(str(tree[0])).folder("sub") as f:
        assert f.names() == {"a.png"}
    assert calls == ([str(tree[0]), "sub"] if mode == "openat2" else [])


def test_a_file_that_keeps_changing_between_link_and_file_is_given_up(
    mode, tree, monkeypatch
) -> None:
    """Each time the open sees a link and the readlink a plain file: tried again, but
    only MAX_LINK_HOPS times, never for ever."""
    root, _ = tree
    os.symlink("real.png", root / "flip.png")
    tries = []

    def not_a_link(name, *, dir_fd):
        tries.append(name)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(confined.os, "readlink", not_a_link)
    with (
        Root(str(root)).folder("") as f,
        pytest.raises(ConfinementError, match=r"flip\.png: too many symbolic links"),
    ):
        f.open_file("flip.png")
    assert len(tries) == confined.MAX_LINK_HOPS


def test_a_file_read_in_short_pieces_is_read_whole(mode, tree, monkeypatch) -> None:
    """A network filesystem may return fewer bytes than asked: read on to the end."""
    root, _ = tree
    data = os.urandom(300_000)
    (root / "big.png").write_bytes(data)
    read = os.read
    monkeypatch.setattr(confined.os, "read", lambda fd, n: read(fd, min(n, 70_000)))
    with Root(str(root)).folder("") as f:
        assert f.read_file("big.png")[0] == data


def test_absolute_links_inside_the_root_are_resolved_by_name(mode, tmp_path) -> None:
    """An absolute link is followed when it names a file in the root: with spaces in
    its folders, with ``..`` in it, in a root whose name ends in a space or an X."""
    for root in (tmp_path / "set X", tmp_path / "set ", tmp_path / "setX"):
        make_image(root / "x y" / "z" / "deep.png", "red")
        make_image(root / "real.png", "green")
        os.symlink(f"{root}/x y/z/deep.png", root / "abs_deep.png")
        os.symlink(f"{root}/x y/../real.png", root / "abs_up.png")
        r = Root(str(root))
        assert r.rel(f"{root}/x y/z/deep.png") == "x y/z/deep.png"
        with r.folder("") as f:
            assert f.read_file("abs_deep.png")[0] == (root / "x y/z/deep.png").read_bytes()
            assert f.read_file("abs_up.png")[0] == (root / "real.png").read_bytes()


def test_a_relative_link_in_a_folder_with_a_space_climbs_from_that_folder(mode, tmp_path) -> None:
    root = tmp_path / "root"
    make_image(root / "x y" / "w.png", "red")
    (root / "x y" / "z").mkdir()
    os.symlink("../w.png", root / "x y" / "z" / "up.png")
    with Root(str(root)).folder("x y/z") as f:
        assert f.read_file("up.png")[0] == (root / "x y" / "w.png").read_bytes()


def test_a_closed_folder_closes_nothing_more(tmp_path, monkeypatch) -> None:
    f = Folder.at(tmp_path)
    f.close()
    closed = []
    monkeypatch.setattr(confined.os, "close", closed.append)
    f.close()
    assert closed == []


def test_stem_siblings_are_all_found_whatever_is_missing_or_too_long(tmp_path) -> None:
    """A probe for an extension that is not there, or whose name is too long for the
    filesystem, does not end the search: a missed sibling would share a sidecar."""
    stem = "x" * 251  # x.png is 255 bytes, x.webp 256: longer than a name may be
    for name in (f"{stem}.png", f"{stem}.jpg", "a.png", "a.jpg", ".png", ".png.jpg"):
        (tmp_path / name).write_bytes(b"x")
    with Folder.at(tmp_path) as f:
        assert f.stem_siblings(f"{stem}.png", ["webp", "jpg"]) == [f"{stem}.jpg"]
        assert f.stem_siblings("a.png", ["webp", "gif", "jpg"]) == ["a.jpg"]
        assert f.stem_siblings(".png", ["jpg"]) == [".png.jpg"]  # a leading dot is no stem


def test_a_missing_or_unreadable_lower_case_name_does_not_hide_the_upper_case_one(
    tmp_path, monkeypatch
) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.JPG").write_bytes(b"x")
    with Folder.at(tmp_path) as f:
        assert f.stem_siblings("a.png", ["jpg"]) == ["a.JPG"]  # a.jpg is not there
        lstat = f.lstat

        def flaky(name):
            if name == "a.jpg":
                raise OSError(errno.EIO, "Input/output error")
            return lstat(name)

        monkeypatch.setattr(f, "lstat", flaky)
        assert f.stem_siblings("a.png", ["jpg"]) == ["a.JPG"]
