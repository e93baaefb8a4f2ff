import os
import stat

import pytest

from daemon.confined import Folder, is_temp_name
from daemon.hashing import sidecar_hash
from daemon.pipeline.sidecars import Action, decide, merge, precheck
from daemon.pipeline.targets import siblings_of, stem_and_name_forms


def write_atomic(target, text: str) -> str:
    data = (text.rstrip("\n") + "\n").encode()
    with Folder.at(target.parent) as folder:
        folder.write_atomic(target.name, data)
    return sidecar_hash(data)


def stage(target, text: str):
    folder = Folder.at(target.parent)
    return folder.stage(target.name, (text + "\n").encode())


def d(**kw):
    base = dict(new_text="new", existing=None, seen_before=False, policy="skip", tags=True)
    return decide(**(base | kw))


def h(data: bytes) -> frozenset[str]:
    return frozenset({sidecar_hash(data)})


def test_no_file_is_written():
    assert d().action is Action.WRITE


def test_foreign_caption_policy_first_sight():
    assert d(existing=b"mine\n").action is Action.EXISTS
    r = d(existing=b"mine\n", policy="overwrite")
    assert (r.text, r.prev_hash, r.base_text) == ("new", sidecar_hash(b"mine\n"), None)
    r = d(existing=b"a, b\n", policy="append")
    assert (r.text, r.base_text) == ("a, b, new", "a, b")
    assert d(existing=b"a, b\n", policy="prepend").text == "new, a, b"
    assert d(existing=b"a man", policy="append", tags=False).text == "a man new"


def test_foreign_caption_after_captiond_saw_the_image_is_never_touched():
    for policy in ("skip", "overwrite", "append", "prepend"):
        assert d(existing=b"theirs\n", seen_before=True, policy=policy).action is Action.EDITED


def test_our_unedited_caption_is_replaced():
    ours = b"old, tags\n"
    r = d(existing=ours, ours=h(ours), seen_before=True)
    assert r.action is Action.WRITE and r.text == "new" and r.prev_hash == sidecar_hash(ours)


def test_our_caption_edited_by_a_person_is_left_alone():
    r = d(
        existing=b"old, tags, fixed by hand\n",
        ours=h(b"old, tags\n"),
        seen_before=True,
        policy="overwrite",
    )
    assert r.action is Action.EDITED


def test_identical_content_of_ours_is_unchanged_but_foreign_is_not_adopted():
    assert d(existing=b"new\n", ours=h(b"new\n"), seen_before=True).action is Action.UNCHANGED
    assert d(existing=b"new\n", seen_before=True).action is Action.EDITED


def test_append_keeps_the_persons_text_when_the_image_changes():
    # first sight: a person's caption, append policy
    first = d(existing=b"my own words\n", policy="append", tags=False, new_text="a red car.")
    assert first.text == "my own words a red car."
    written = (first.text + "\n").encode()
    # the image changes: ours is replaced, the person's words stay in front
    again = d(
        existing=written,
        ours=h(written),
        base_text=first.base_text,
        seen_before=True,
        policy="append",
        tags=False,
        new_text="a blue car.",
    )
    assert again.action is Action.WRITE
    assert again.text == "my own words a blue car."
    assert again.base_text == "my own words"


def test_crash_between_record_and_rename_keeps_the_old_file_ours():
    # the record already names the new hash, the disk still has the old (prev) content
    old = b"old, tags\n"
    r = d(
        existing=old, ours=frozenset({sidecar_hash(b"new\n"), sidecar_hash(old)}), seen_before=True
    )
    assert r.action is Action.WRITE


def test_precheck_skips_the_model_only_when_the_outcome_is_certain():
    assert precheck(existing=None, ours=frozenset(), seen_before=True, policy="skip") is None
    assert precheck(existing=b"x", ours=frozenset(), seen_before=False, policy="skip") is (
        Action.EXISTS
    )
    assert precheck(existing=b"x", ours=frozenset(), seen_before=True, policy="append") is (
        Action.EDITED
    )
    assert precheck(existing=b"x", ours=h(b"x"), seen_before=True, policy="skip") is None
    assert precheck(existing=b"x", ours=frozenset(), seen_before=False, policy="append") is None


def test_force_overwrites():
    assert d(existing=b"x\n", seen_before=True, force=True).action is Action.WRITE


def test_merge_dedupes_tags():
    assert merge("a, b", "b, c", "append", tags=True, separator=", ") == "a, b, c"


def test_candidate_paths_and_siblings(tmp_path):
    assert stem_and_name_forms("a.jpg", "txt") == ("a.txt", "a.jpg.txt")
    assert siblings_of("a.jpg", ["a.jpg"], ["jpg", "png"]) == []
    names = ["a.jpg", "a.PNG", "a.txt", "a.b.png"]
    assert siblings_of("a.jpg", names, ["jpg", "png"]) == ["a.PNG"]


def test_write_atomic(tmp_path):
    target = tmp_path / "a.txt"
    digest = write_atomic(target, "tag1, tag2")
    assert target.read_bytes() == b"tag1, tag2\n"
    assert digest == sidecar_hash(b"tag1, tag2\n")
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

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_stage_then_discard_leaves_nothing(tmp_path):
    staged = stage(tmp_path / "a.txt", "x")
    assert (tmp_path / staged.tmp).exists() and not (tmp_path / "a.txt").exists()
    assert is_temp_name(staged.tmp) and len(staged.tmp) < 32  # short, whatever the name
    staged.discard()
    staged.folder.close()
    assert list(tmp_path.iterdir()) == []


def test_new_sidecar_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize("policy", ["append", "prepend", "overwrite", "skip"])
def test_the_trigger_word_comes_first_under_every_policy(policy):
    """kohya's keep_tokens keeps the first tokens: the trigger word must lead, also
    when a person's caption is merged in front of the new one."""
    existing = b"custom_tag, red theme\n"
    r = d(
        new_text="sks_person, blue, sky",
        existing=existing,
        policy=policy,
        trigger_word="sks_person",
    )
    if policy == "skip":
        assert r.action is Action.EXISTS
        return
    assert r.text.split(", ")[0] == "sks_person" and r.text.count("sks_person") == 1
    prose = d(
        new_text="sks, a red car.",
        existing=b"my own words",
        policy=policy,
        tags=False,
        trigger_word="sks",
    )
    assert prose.text.startswith("sks, ") and prose.text.count("sks") == 1


def test_an_image_keeps_a_sidecar_it_got_under_the_old_default_extension():
    from daemon.pipeline.targets import sidecar_target
    from daemon.queue.index import CaptionRecord

    rec = CaptionRecord("/d/a.png", "wd_tagger", "h", "/d/a.tags", "s", 0.0)
    kw = dict(naming="stem", siblings=[], stem_owner=None, folder_path="/d")
    assert sidecar_target("a.png", "txt", record=rec, legacy_ext="tags", **kw).name == "a.tags"
    assert sidecar_target("a.png", "txt", record=rec, **kw).name == "a.txt"  # chosen anew
    assert sidecar_target("b.png", "txt", record=None, legacy_ext="tags", **kw).name == "b.txt"
