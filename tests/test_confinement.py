"""Nothing outside a watched root is ever read or written (issue 10.1), tried as an
attacker who can write in a watched folder would: folders swapped for symlinks, files
linking out, a swap between the API's check and the worker's read, a folder moved to a
hidden name. In both resolution modes: openat2 and the portable O_NOFOLLOW walk."""

from __future__ import annotations

import os
import shutil
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
