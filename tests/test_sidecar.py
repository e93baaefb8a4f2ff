import os
import stat

import pytest

from daemon.confined import Folder, is_temp_name
from daemon.hashing import sidecar_hash
from daemon.pipeline.sidecars import Action, Decision, decide, lead_with, merge, precheck
from daemon.pipeline.targets import Target, siblings_of, sidecar_target, stem_and_name_forms
from daemon.queue.index import CaptionRecord


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


# -- every decision in full: what is written, what it replaces, whose words it keeps ----
#
# ``prev_hash`` is what makes a kill between recording and renaming safe (the file on
# disk is still recognised as captiond's), ``base_text`` is a person's caption that
# append/prepend keeps in front of every later caption, ``text`` is what is written.

OURS_OLD = b"old, tags\n"


@pytest.mark.parametrize(
    ("case", "kw", "expected"),
    [
        ("no file", {}, Decision(Action.WRITE, "new")),
        (
            "no file, append with nothing to keep",
            {"policy": "append"},
            Decision(Action.WRITE, "new"),
        ),
        (
            "no file, a person's words kept from an earlier append",
            {"policy": "append", "base_text": "mine"},
            Decision(Action.WRITE, "mine, new", base_text="mine"),
        ),
        (
            "no file, the policy no longer merges: the kept words are not used",
            {"policy": "overwrite", "base_text": "mine"},
            Decision(Action.WRITE, "new", base_text="mine"),
        ),
        (
            "ours, the image changed",
            {"existing": OURS_OLD, "ours": h(OURS_OLD), "seen_before": True},
            Decision(Action.WRITE, "new", prev_hash=sidecar_hash(OURS_OLD)),
        ),
        (
            "ours, the same caption again",
            {"existing": b"new\n", "ours": h(b"new\n"), "seen_before": True},
            Decision(Action.UNCHANGED, "new"),
        ),
        (
            "ours, merged with a person's words, the same again",
            {
                "existing": b"mine, new\n",
                "ours": h(b"mine, new\n"),
                "base_text": "mine",
                "seen_before": True,
                "policy": "append",
            },
            Decision(Action.UNCHANGED, "mine, new", base_text="mine"),
        ),
        (
            "ours, merged with a person's words, the image changed",
            {
                "existing": b"mine, old\n",
                "ours": h(b"mine, old\n"),
                "base_text": "mine",
                "seen_before": True,
                "policy": "prepend",
            },
            Decision(
                Action.WRITE, "new, mine", prev_hash=sidecar_hash(b"mine, old\n"), base_text="mine"
            ),
        ),
        (
            "forced over a person's caption",
            {"existing": b"theirs\n", "seen_before": True, "force": True},
            Decision(Action.WRITE, "new", prev_hash=sidecar_hash(b"theirs\n")),
        ),
        (
            "forced: a person's words kept earlier are not merged in",
            {
                "existing": b"theirs\n",
                "seen_before": True,
                "force": True,
                "policy": "append",
                "base_text": "mine",
            },
            Decision(Action.WRITE, "new", prev_hash=sidecar_hash(b"theirs\n")),
        ),
        (
            "first sight of a foreign caption, overwrite",
            {"existing": b"theirs\n", "policy": "overwrite"},
            Decision(Action.WRITE, "new", prev_hash=sidecar_hash(b"theirs\n")),
        ),
        (
            "first sight of a foreign caption, append",
            {"existing": b"theirs\n", "policy": "append"},
            Decision(
                Action.WRITE, "theirs, new", prev_hash=sidecar_hash(b"theirs\n"), base_text="theirs"
            ),
        ),
        (
            "first sight of a foreign caption, skip",
            {"existing": b"theirs\n"},
            Decision(Action.EXISTS),
        ),
        (
            "a foreign caption after captiond saw the image",
            {"existing": b"theirs\n", "seen_before": True, "policy": "overwrite"},
            Decision(Action.EDITED),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_decision_in_full(case: str, kw: dict, expected: Decision) -> None:
    assert d(**kw) == expected


def test_a_foreign_caption_that_is_not_utf8_is_merged_not_refused() -> None:
    latin1 = "café, crème".encode("latin-1")  # a person's caption in another encoding
    r = d(existing=latin1, policy="append")
    assert r.action is Action.WRITE and r.prev_hash == sidecar_hash(latin1)
    assert r.text == "caf\ufffd, cr\ufffdme, new" and r.base_text == "caf\ufffd, cr\ufffdme"


def test_ours_is_unchanged_only_when_the_text_is_the_same_but_for_the_final_newline() -> None:
    ours = b"a, b\n"
    assert d(new_text="a, b\n", existing=ours, ours=h(ours), seen_before=True).action is (
        Action.UNCHANGED
    )
    for new in ("a, b ", "\na, b", "a, b, c", "a, X"):
        r = d(new_text=new, existing=ours, ours=h(ours), seen_before=True)
        assert r.action is Action.WRITE, new
    ours_x = b"tags, X\n"
    assert d(new_text="tags, X", existing=ours_x, ours=h(ours_x), seen_before=True).action is (
        Action.UNCHANGED
    )


def test_merged_tags_with_the_folders_own_separator_and_trigger_word() -> None:
    r = d(
        new_text="b,sks,c",
        existing=b"a,b\n",
        policy="append",
        separator=",",
        trigger_word="sks",
    )
    assert r.text == "sks,a,b,c"


def test_a_whitespace_separator_still_tells_a_persons_comma_tags_apart() -> None:
    """Tags written with a space between them: a person's comma-separated caption is
    still split on commas, so that duplicates go and the trigger word leads."""
    assert merge("1girl, solo", "solo, smile", "append", tags=True, separator=" ") == (
        "1girl solo smile"
    )
    assert lead_with("solo, sks, smile", "sks", tags=True, separator=" ") == "sks solo smile"


def test_prose_merges_and_the_trigger_word_moves_to_the_front() -> None:
    assert merge("my words", "a red car.", "prepend", tags=False, separator=", ") == (
        "a red car. my words"
    )
    assert merge("  ", "a red car.", "append", tags=False, separator=", ") == "a red car."
    assert lead_with("a photo of sks, smiling", "sks", tags=False, separator=", ") == (
        "sks, a photo of smiling"
    )
    assert lead_with("a photo of sks smiling", "sks", tags=False, separator=", ") == (
        "sks, a photo of smiling"
    )
    assert lead_with("sks a photo", "sks", tags=False, separator=", ") == "sks a photo"
    assert lead_with("sks", "sks", tags=False, separator=", ") == "sks"
    assert lead_with("  ", "sks", tags=False, separator=", ") == "sks"
    assert lead_with("a photo", " ", tags=False, separator=", ") == "a photo"


# -- where a sidecar goes, and what of it is captiond's ---------------------------------


def rec(sidecar: str, h: str = "h1", prev: str | None = "h0") -> CaptionRecord:
    return CaptionRecord("/d/a.png", "wd_tagger", "c", sidecar, h, 0.0, prev_hash=prev)


def target(image: str = "a.png", ext: str = "txt", **kw) -> Target:
    args = {"naming": "stem", "record": None, "siblings": [], "stem_owner": None}
    return sidecar_target(image, ext, **(args | kw | {"folder_path": kw.get("folder_path", "/d")}))


def test_names_use_the_last_extension_only() -> None:
    assert stem_and_name_forms("photo.v2.jpg", "txt") == ("photo.v2.txt", "photo.v2.jpg.txt")
    assert target("photo.v2.jpg").name == "photo.v2.txt"
    assert siblings_of("x.v2.jpg", ["x.v2.jpg", "x.v2.png", "x.png", "x.v2.b.png"], ["png"]) == [
        "x.v2.png"
    ]


def test_the_sidecar_extension_may_not_name_the_image_itself() -> None:
    with pytest.raises(ValueError, match=r"\.txt would name the image itself"):
        target("notes.txt")


def test_a_recorded_sidecar_is_kept_with_the_hashes_captiond_may_replace() -> None:
    t = target(record=rec("/d/a.txt"))
    assert t == Target("a.txt", rec("/d/a.txt"), frozenset({"h1", "h0"}))
    # an image that got the name form in a clash keeps it after the clash ends
    t = target(record=rec("/d/a.png.txt"), legacy_ext="tags")
    assert (t.name, t.ours, t.clash_with) == ("a.png.txt", frozenset({"h1", "h0"}), None)
    # a record of a sidecar elsewhere: the file here is not captiond's
    t = target(record=rec("/d/old/a.txt"))
    assert (t.name, t.record, t.ours) == ("a.txt", rec("/d/old/a.txt"), frozenset())


def test_a_folder_name_ending_in_a_space_or_a_slash_is_the_same_folder() -> None:
    r = CaptionRecord("/d/set /a.png", "wd_tagger", "c", "/d/set /a.txt", "h1", 0.0)
    assert target(record=r, folder_path="/d/set ").ours == {"h1"}
    assert target(record=rec("/d/a.txt"), folder_path="/d/").ours == {"h1", "h0"}


def test_name_naming_always_uses_the_name_form() -> None:
    t = target(naming="name", siblings=["a.jpg"])
    assert (t.name, t.clash_with) == ("a.png.txt", None)


@pytest.mark.parametrize(
    ("image", "siblings", "owner", "expected"),
    [
        # nobody owns the stem form: the first name in sort order takes it
        ("a.jpg", ["a.png", "a.webp"], None, ("a.txt", None)),
        ("a.png", ["a.jpg", "a.webp"], None, ("a.png.txt", "a.jpg")),
        ("a.webp", ["a.jpg", "a.png"], None, ("a.webp.txt", "a.jpg")),
        # the image captiond recorded as the stem form's writer keeps it
        ("a.png", ["a.jpg"], "/d/a.png", ("a.txt", None)),
        ("a.jpg", ["a.png"], "/d/a.png", ("a.jpg.txt", "a.png")),
    ],
)
def test_images_sharing_a_stem_never_share_a_sidecar(image, siblings, owner, expected) -> None:
    t = target(image, siblings=siblings, stem_owner=owner)
    assert (t.name, t.clash_with) == expected
    assert t.record is None and t.ours == frozenset()


def test_a_clash_keeps_the_record_and_what_captiond_may_replace() -> None:
    r = CaptionRecord("/d/a.png", "wd_tagger", "c", "/d/b.txt", "h1", 0.0)
    t = target("a.png", siblings=["a.jpg"], stem_owner="/d/a.jpg", record=r)
    assert t == Target("a.png.txt", r, frozenset(), clash_with="a.jpg")
    r = CaptionRecord("/d/a.png", "wd_tagger", "c", "/d/x/a.png.txt", "h1", 0.0)
    assert target("a.png", siblings=["a.jpg"], record=r).record is r


def test_ours_with_other_trailing_whitespace_is_rewritten() -> None:
    """Only the final newline is ignored: a sidecar of ours that ends in a space (or a
    tab, or a blank line) is not the new caption, so it is replaced."""
    for ours in (b"a, b \n", b"a, b\t\n", b"a, b\n\n \n"):
        r = d(new_text="a, b", existing=ours, ours=h(ours), seen_before=True)
        assert (r.action, r.prev_hash) == (Action.WRITE, sidecar_hash(ours)), ours


def test_the_trigger_word_is_moved_to_the_front_once_in_prose() -> None:
    """Its first use is moved; a later use in the sentence is the caption's own."""
    assert lead_with("a sks b sks c sks d", "sks", tags=False, separator=", ") == (
        "sks, a b sks c sks d"
    )


def test_a_name_whose_only_dot_leads_it_has_no_extension() -> None:
    assert stem_and_name_forms(".png", "txt") == (".png.txt", ".png.txt")
    assert siblings_of(".png", [".png", ".png.jpg", ".jpg"], ["jpg"]) == [".png.jpg"]


def test_a_folder_name_ending_in_the_letters_of_a_slash_strip_is_kept_whole() -> None:
    r = CaptionRecord("/d/XX/a.png", "wd_tagger", "c", "/d/XX/a.txt", "h1", 0.0)
    assert target(record=r, folder_path="/d/XX").ours == {"h1"}
    assert target(record=r, folder_path="/d/XX/").ours == {"h1"}
