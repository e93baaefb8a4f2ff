import os
import stat
from pathlib import Path

import pytest

from daemon.hashing import hash_bytes
from daemon.sidecar import (
    Action,
    candidate_paths,
    decide,
    merge,
    remove_stale_temps,
    stem_siblings,
    write_atomic,
)


def d(**kw):
    base = dict(
        new_text="new",
        existing=None,
        recorded_hash=None,
        seen_before=False,
        policy="skip",
        tags=True,
    )
    return decide(**(base | kw))


def test_no_file_is_written():
    assert d().action is Action.WRITE


def test_foreign_caption_policy_first_sight():
    assert d(existing=b"mine\n").action is Action.EXISTS
    assert d(existing=b"mine\n", policy="overwrite").text == "new"
    assert d(existing=b"a, b\n", policy="append").text == "a, b, new"
    assert d(existing=b"a, b\n", policy="prepend").text == "new, a, b"
    assert d(existing=b"a man", policy="append", tags=False).text == "a man new"


def test_foreign_caption_after_captiond_saw_the_image_is_never_touched():
    for policy in ("skip", "overwrite", "append", "prepend"):
        assert d(existing=b"theirs\n", seen_before=True, policy=policy).action is Action.EDITED


def test_our_unedited_caption_is_replaced():
    ours = b"old, tags\n"
    r = d(existing=ours, recorded_hash=hash_bytes(ours), seen_before=True)
    assert r.action is Action.WRITE and r.text == "new"


def test_our_caption_edited_by_a_person_is_left_alone():
    r = d(
        existing=b"old, tags, fixed by hand\n",
        recorded_hash=hash_bytes(b"old, tags\n"),
        seen_before=True,
        policy="overwrite",
    )
    assert r.action is Action.EDITED


def test_identical_content_counts_as_ours():
    # e.g. a crash between the atomic replace and recording it
    assert d(existing=b"new\n", seen_before=True).action is Action.UNCHANGED


def test_force_overwrites():
    assert d(existing=b"x\n", seen_before=True, force=True).action is Action.WRITE


def test_merge_dedupes_tags():
    assert merge("a, b", "b, c", "append", tags=True, separator=", ") == "a, b, c"


def test_candidate_paths_and_siblings(tmp_path):
    img = tmp_path / "a.jpg"
    img.touch()
    assert candidate_paths(img, "txt") == (tmp_path / "a.txt", tmp_path / "a.jpg.txt")
    assert stem_siblings(img, ["jpg", "png"]) == []
    (tmp_path / "a.PNG").touch()
    (tmp_path / "a.txt").touch()
    assert stem_siblings(img, ["jpg", "png"]) == [tmp_path / "a.PNG"]


def test_write_atomic(tmp_path):
    target = tmp_path / "a.txt"
    digest = write_atomic(target, "tag1, tag2")
    assert target.read_bytes() == b"tag1, tag2\n"
    assert digest == hash_bytes(b"tag1, tag2\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_atomic_keeps_mode_of_replaced_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("x")
    os.chmod(target, 0o640)
    write_atomic(target, "y")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_write_atomic_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old\n")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_remove_stale_temps(tmp_path):
    (tmp_path / ".a.txt.1234abcd.captiond.tmp").write_text("half")
    (tmp_path / "a.txt").write_text("keep")
    (tmp_path / ".hidden").write_text("keep")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.txt"]


def test_unreadable_folder_is_not_an_error(tmp_path: Path):
    assert remove_stale_temps(tmp_path / "missing") == 0
