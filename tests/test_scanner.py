"""The reconcile scanner: change detection, removal, safety, candidate filtering."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from daemon.config import PRIORITY_BACKFILL, PRIORITY_NEW, WatchConfig
from daemon.hashing import content_hash_file
from daemon.queue import Database, FileIndex, JobQueue, JobState
from daemon.scanning.reconcile import ScanError, Scanner
from daemon.scanning.rules import is_candidate

GENS = ["wd", "blip"]


@pytest.fixture
def env(tmp_path: Path):
    db = Database(tmp_path / "state" / "q.db")
    index, queue = FileIndex(db), JobQueue(db)
    yield Scanner(index, queue), index, queue
    db.close()


def mk(path: Path, data: bytes = b"img") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def watch_of(root: Path, **kw) -> WatchConfig:
    kw.setdefault("generators", GENS)
    return WatchConfig(path=root, **kw)


def pending_paths(queue: JobQueue, gen: str = "wd") -> set[str]:
    return {j.path for j in queue.jobs(JobState.PENDING, limit=10_000) if j.generator == gen}


def record_captioned(index: FileIndex, path: Path, gens=GENS) -> None:
    for g in gens:
        index.record_caption(str(path), g, content_hash_file(path), str(path) + ".txt", "x")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    mk(r / "a.jpg", b"a")
    mk(r / "b.PNG", b"bb")
    mk(r / "sub" / "c.jpg", b"ccc")
    mk(r / "sub" / "deeper" / "d.webp", b"dddd")
    mk(r / "notes.txt", b"not an image")
    return r


# -- first scan and warm rescan ---------------------------------------------------------


def test_first_scan_indexes_and_enqueues_each_generator(env, root: Path) -> None:
    scanner, index, queue = env
    st = scanner.reconcile(watch_of(root, priority=7))
    assert (st.files_seen, st.new, st.changed, st.touched, st.removed) == (4, 4, 0, 0, 0)
    assert st.dirs == 3
    assert st.root == str(root)
    assert index.count_files() == 4
    assert index.dir_entries(str(root), "sub/deeper").keys() == {"d.webp"}
    assert queue.counts()["wd"]["pending"] == 4
    assert queue.counts()["blip"]["pending"] == 4
    j = queue.get(str(root / "sub" / "c.jpg"), "wd")
    assert j.priority == PRIORITY_BACKFILL + 7


def test_warm_rescan_changes_nothing(env, root: Path) -> None:
    scanner, _index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100) + queue.claim("blip", 100):
        queue.ack(j.id)
    for _ in range(2):  # the second uses the in-memory directory summaries
        st = scanner.reconcile(w)
        assert (st.files_seen, st.new, st.changed, st.touched, st.removed) == (4, 0, 0, 0, 0)
    assert queue.counts()["wd"]["pending"] == 0
    assert queue.counts()["wd"]["done"] == 4


def test_new_file_found_on_rescan(env, root: Path) -> None:
    scanner, _, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    scanner.reconcile(w)
    mk(root / "sub" / "new.jpg")
    st = scanner.reconcile(w)
    assert (st.new, st.removed) == (1, 0)
    assert str(root / "sub" / "new.jpg") in pending_paths(queue)


def test_changed_content_is_recaptioned(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    a = root / "a.jpg"
    for j in queue.claim("wd", 100) + queue.claim("blip", 100):
        queue.ack(j.id)
    record_captioned(index, a)
    scanner.reconcile(w)
    a.write_bytes(b"a new picture")
    st = scanner.reconcile(w)
    assert (st.changed, st.touched, st.new) == (1, 0, 0)
    assert pending_paths(queue) == {str(a)}
    assert pending_paths(queue, "blip") == {str(a)}
    assert index.get_file(str(root), "", "a.jpg")[0] == len(b"a new picture")


def test_same_size_rewrite_detected_by_mtime(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100):
        queue.ack(j.id)
    a = root / "a.jpg"
    record_captioned(index, a)
    scanner.reconcile(w)
    a.write_bytes(b"z")  # same size
    os.utime(a, ns=(1, os.stat(a).st_mtime_ns + 5_000_000))
    st = scanner.reconcile(w)
    assert st.changed == 1
    assert str(a) in pending_paths(queue)


def test_touch_without_content_change_is_not_recaptioned(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100) + queue.claim("blip", 100):
        queue.ack(j.id)
    a = root / "a.jpg"
    record_captioned(index, a)
    scanner.reconcile(w)
    new_mtime = os.stat(a).st_mtime_ns + 10_000_000_000
    os.utime(a, ns=(new_mtime, new_mtime))
    st = scanner.reconcile(w)
    assert (st.touched, st.changed, st.new) == (1, 0, 0)
    assert pending_paths(queue) == set()
    assert index.get_file(str(root), "", "a.jpg")[1] == new_mtime  # stat updated
    st = scanner.reconcile(w)
    assert (st.touched, st.changed) == (0, 0)


def test_touch_after_upgrade_with_an_old_image_hash_is_not_recaptioned(env, root: Path) -> None:
    """Captions recorded with the BLAKE2b image hash of captiond 0.1: a touched file
    with the same content is still recognised; changed content is re-captioned."""
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100) + queue.claim("blip", 100):
        queue.ack(j.id)
    a, b = root / "a.jpg", root / "b.PNG"
    for p in (a, b):
        legacy = hashlib.blake2b(p.read_bytes(), digest_size=32).hexdigest()
        for g in GENS:
            index.record_caption(str(p), g, legacy, str(p) + ".txt", "x")
    later = os.stat(a).st_mtime_ns + 10_000_000_000
    os.utime(a, ns=(later, later))
    b.write_bytes(b"a new picture")
    st = scanner.reconcile(w)
    assert (st.touched, st.changed) == (1, 1)
    assert pending_paths(queue) == {str(b)}


def test_touch_without_caption_record_enqueues(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100) + queue.claim("blip", 100):
        queue.ack(j.id)
    a = root / "a.jpg"
    record_captioned(index, a, gens=["wd"])  # only one generator captioned it
    os.utime(a, ns=(1, os.stat(a).st_mtime_ns + 10_000_000_000))
    st = scanner.reconcile(w)
    assert st.changed == 1
    assert pending_paths(queue, "blip") == {str(a)}
    assert pending_paths(queue, "wd") == set()


def test_change_while_leased_sets_rerun(env, root: Path) -> None:
    scanner, _, queue = env
    w = watch_of(root, generators=["wd"])
    scanner.reconcile(w)
    leased = {j.path: j for j in queue.claim("wd", 100)}
    (root / "a.jpg").write_bytes(b"rewritten while captioning")
    scanner.reconcile(w)
    assert queue.get(str(root / "a.jpg"), "wd").rerun is True
    queue.ack(leased[str(root / "a.jpg")].id)
    assert queue.get(str(root / "a.jpg"), "wd").state == JobState.PENDING


def test_rename_keeping_size_and_mtime_is_seen(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    scanner.reconcile(w)
    os.rename(root / "sub" / "c.jpg", root / "sub" / "c2.jpg")  # keeps size and mtime
    st = scanner.reconcile(w)
    assert (st.new, st.removed) == (1, 1)
    assert index.dir_entries(str(root), "sub").keys() == {"c2.jpg"}
    assert queue.get(str(root / "sub" / "c.jpg"), "wd") is None


def test_swapped_files_are_seen(env, root: Path) -> None:
    scanner, _, queue = env
    w = watch_of(root, generators=["wd"])
    x, y = mk(root / "s" / "x.jpg", b"xx"), mk(root / "s" / "y.jpg", b"yyyy")
    os.utime(x, ns=(1, 1_000_000_000))
    os.utime(y, ns=(1, 2_000_000_000))
    scanner.reconcile(w)
    scanner.reconcile(w)
    for j in queue.claim("wd", 100):
        queue.ack(j.id)
    tmp = root / "s" / "t.tmp"
    os.rename(x, tmp)
    os.rename(y, x)
    os.rename(tmp, y)  # same names, sizes and mtimes, but swapped between them
    st = scanner.reconcile(w)
    assert st.changed == 2
    assert pending_paths(queue) == {str(x), str(y)}


def test_index_changed_by_another_connection_is_noticed(env, root: Path) -> None:
    scanner, index, _queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    scanner.reconcile(w)
    other = Database(index.db.path)
    FileIndex(other).remove_files(str(root), "sub", ["c.jpg"])
    other.close()
    st = scanner.reconcile(w)
    assert st.new == 1
    assert index.get_file(str(root), "sub", "c.jpg") is not None


# -- removal ------------------------------------------------------------------------------


def test_removed_file_leaves_index_and_queue_not_disk(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    sidecar = mk(root / "a.txt", b"a caption")
    scanner.reconcile(w)
    (root / "a.jpg").unlink()
    st = scanner.reconcile(w)
    assert st.removed == 1
    assert index.get_file(str(root), "", "a.jpg") is None
    assert queue.get(str(root / "a.jpg"), "wd") is None
    assert queue.get(str(root / "a.jpg"), "blip") is None
    assert sidecar.read_bytes() == b"a caption"  # the scanner never deletes files
    assert queue.get(str(root / "b.PNG"), "wd") is not None


def test_removed_directory_tree(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    shutil.rmtree(root / "sub")
    st = scanner.reconcile(w)
    assert st.removed == 2
    assert index.dirs(str(root)) == {""}
    assert queue.get(str(root / "sub" / "deeper" / "d.webp"), "wd") is None
    assert st.dirs == 1
    assert scanner.reconcile(w).removed == 0
    mk(root / "sub" / "deeper" / "again.jpg")  # the folder comes back
    st = scanner.reconcile(w)
    assert (st.new, st.removed, st.dirs) == (1, 0, 3)
    assert Scanner(index, queue).reconcile(w).new == 0  # a fresh scanner agrees


def test_subdir_reconcile_only_touches_that_subtree(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    mk(root / "outside.jpg")
    mk(root / "sub" / "inside.jpg")
    (root / "sub" / "deeper" / "d.webp").unlink()
    st = scanner.reconcile(w, subdir=root / "sub", priority_class=PRIORITY_NEW)
    assert (st.new, st.removed, st.dirs) == (1, 1, 2)
    assert queue.get(str(root / "outside.jpg"), "wd") is None
    assert queue.get(str(root / "sub" / "inside.jpg"), "wd").priority == PRIORITY_NEW
    # a subdir that is gone removes its subtree only
    shutil.rmtree(root / "sub")
    st = scanner.reconcile(w, subdir=root / "sub")
    assert st.removed == 2
    assert index.get_file(str(root), "", "a.jpg") is not None
    with pytest.raises(ValueError):
        scanner.reconcile(w, subdir=root.parent)


# -- safety ----------------------------------------------------------------------------


def test_vanished_root_raises_and_forgets_nothing(env, root: Path, tmp_path: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    before = (index.count_files(), queue.counts())
    root.rename(tmp_path / "elsewhere")  # the NAS went away
    with pytest.raises(ScanError, match="mounted"):
        scanner.reconcile(w)
    with pytest.raises(ScanError):
        scanner.check_file(w, root / "a.jpg")
    assert (index.count_files(), queue.counts()) == before


def test_empty_root_with_indexed_files_is_treated_as_unmounted(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    shutil.rmtree(root)
    root.mkdir()  # an empty mount point
    with pytest.raises(ScanError, match="empty"):
        scanner.reconcile(w)
    assert index.count_files() == 4
    assert queue.counts()["wd"]["pending"] == 4


def test_unreadable_directory_is_kept(env, root: Path, monkeypatch) -> None:
    scanner, index, _ = env
    w = watch_of(root)
    scanner.reconcile(w)
    from daemon.confined import Root

    real_open = Root.open_dir

    def fake_open(self, root_fd, rel_dir):
        if rel_dir == "sub":
            raise PermissionError(13, "Permission denied", f"{self.path}/{rel_dir}")
        return real_open(self, root_fd, rel_dir)

    monkeypatch.setattr(Root, "open_dir", fake_open)
    st = scanner.reconcile(w)
    assert st.errors == 1
    assert st.removed == 0
    assert index.count_files() == 4  # sub/ and sub/deeper/ kept as they were


def test_broken_symlink_and_vanished_file_are_skipped(env, root: Path) -> None:
    scanner, index, _ = env
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    st = scanner.reconcile(watch_of(root))
    assert st.files_seen == 4
    assert index.get_file(str(root), "", "broken.jpg") is None


def test_symlinked_directory_is_not_followed(env, root: Path, tmp_path: Path) -> None:
    scanner, index, _ = env
    other = tmp_path / "other"
    mk(other / "x.jpg")
    os.symlink(other, root / "link")
    st = scanner.reconcile(watch_of(root))
    assert st.files_seen == 4
    assert "link" not in index.dirs(str(root))


# -- candidates ------------------------------------------------------------------------


def test_candidate_rules(tmp_path: Path) -> None:
    r = tmp_path / "r"
    w = watch_of(r, exclude=["*/raw/*", "*_mask.png", "thumbs"])
    ok = lambda p: is_candidate(w, r / p)  # noqa: E731
    assert ok("a.jpg") and ok("A.JPG") and ok("x/y/z.JpEg") and ok("b.png")
    for bad in [
        "a.jpg.tmp",
        "a.jpg.part",
        "a.jpg.crdownload",
        "a.jpg~",
        "~$a.jpg",  # office suite lock file
        "~a.jpg",  # editor backup
        "sub/~$B.PNG",
        ".hidden.jpg",
        ".a.jpg.Xy12Qz",  # rsync temp
        ".cache/a.jpg",  # dot-directory
        "notes.txt",
        "a.jpg.txt",  # a sidecar
        "noext",
        "set/raw/a.jpg",  # excluded by path
        "a_mask.png",  # excluded by name
        "x/thumbs/a.jpg",  # excluded directory name
    ]:
        assert not ok(bad), bad
    assert not is_candidate(w, tmp_path / "outside.jpg")
    assert not is_candidate(w, r)
    assert ok("a~b.jpg") and ok("x/a~.png")  # a "~" inside the name is fine


def test_include_and_non_recursive(tmp_path: Path) -> None:
    r = tmp_path / "r"
    w = watch_of(r, include=["keep_*", "good/*"])
    assert is_candidate(w, r / "keep_1.jpg")
    assert is_candidate(w, r / "deep" / "keep_2.jpg")  # bare name matches
    assert is_candidate(w, r / "good" / "any.jpg")  # relative path matches
    assert not is_candidate(w, r / "other.jpg")
    flat = watch_of(r, recursive=False)
    assert is_candidate(flat, r / "a.jpg")
    assert not is_candidate(flat, r / "sub" / "a.jpg")
    exts = watch_of(r, image_extensions=["JXL", ".avif"])
    assert is_candidate(exts, r / "a.jxl") and is_candidate(exts, r / "a.AVIF")
    assert not is_candidate(exts, r / "a.jpg")


def test_scan_applies_candidate_rules(env, tmp_path: Path) -> None:
    scanner, index, _ = env
    r = tmp_path / "r"
    names = [
        "ok.jpg",
        "OK2.JPEG",
        "x.jpg.part",
        "y.jpg~",
        "~$lock.jpg",
        "~backup.png",
        "deep/~$x.jpg",
        ".z.jpg",
        ".dot/in.jpg",
        "raw/skip.jpg",
        "thumbs/t.jpg",
        "deep/ok3.png",
        "dir.jpg/inner.jpg",  # a directory with an image-like name
        "n.txt",
    ]
    for n in names:
        mk(r / n)
    w = watch_of(r, exclude=["raw/*", "thumbs"])
    st = scanner.reconcile(w)
    found = {
        (d + "/" if d else "") + n for d in index.dirs(str(r)) for n in index.dir_entries(str(r), d)
    }
    assert found == {"ok.jpg", "OK2.JPEG", "deep/ok3.png", "dir.jpg/inner.jpg"}
    assert st.files_seen == 4
    for n in names:  # scanner and is_candidate agree
        assert is_candidate(w, r / n) == (n in found), n

    flat = scanner.reconcile(watch_of(r, recursive=False, exclude=["raw/*", "thumbs"]))
    assert flat.files_seen == 2
    assert flat.removed == 2  # no longer watched: dropped from the index
    assert flat.dirs == 1


# -- check_file --------------------------------------------------------------------------


def test_check_file_new_unchanged_changed(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root, generators=["wd"])
    a = root / "a.jpg"
    assert scanner.check_file(w, a) is True
    assert queue.get(str(a), "wd").priority == PRIORITY_NEW
    assert index.get_file(str(root), "", "a.jpg") is not None
    assert scanner.check_file(w, a) is False  # unchanged
    queue.ack(queue.claim("wd", 1)[0].id)
    record_captioned(index, a, ["wd"])
    os.utime(a, ns=(1, os.stat(a).st_mtime_ns + 10**10))
    assert scanner.check_file(w, a) is False  # touched only
    a.write_bytes(b"new content")
    assert scanner.check_file(w, a) is True
    assert scanner.check_file(w, root / "notes.txt") is False
    assert scanner.check_file(w, root / "sub") is False


def test_check_file_deleted_forgets_it(env, root: Path) -> None:
    scanner, index, queue = env
    w = watch_of(root)
    scanner.reconcile(w)
    c = root / "sub" / "c.jpg"
    c.unlink()
    assert scanner.check_file(w, c) is False
    assert index.get_file(str(root), "sub", "c.jpg") is None
    assert queue.get(str(c), "wd") is None
    assert queue.get(str(c), "blip") is None
    assert index.count_files() == 3
    st = scanner.reconcile(w)  # and the rescan agrees
    assert (st.new, st.removed) == (0, 0)


# -- leftovers of a crash ------------------------------------------------------------------


def test_stale_sidecar_temps_are_removed_fresh_ones_kept(env, root: Path) -> None:
    _, index, queue = env
    old = mk(root / "sub" / ".c.txt.0a1b2c3d.captiond.tmp", b"half")
    os.utime(old, (1_000_000, 1_000_000))
    fresh = mk(root / ".a.txt.deadbeef.captiond.tmp", b"being written")
    other = mk(root / ".hidden.tmp", b"not ours")
    os.utime(other, (1_000_000, 1_000_000))
    short = mk(root / "sub" / ".captiond-0123456789abcdef.tmp", b"half")  # today's names
    os.utime(short, (1_000_000, 1_000_000))
    scanner = Scanner(index, queue, stale_temps_before=2_000_000_000)
    os.utime(fresh, (2_100_000_000, 2_100_000_000))  # newer than the daemon's start
    scanner.reconcile(watch_of(root))
    assert not old.exists() and not short.exists()
    assert fresh.exists() and other.exists()
    # without a cut-off nothing is deleted
    os.utime(fresh, (1_000_000, 1_000_000))
    Scanner(index, queue).reconcile(watch_of(root))
    assert fresh.exists()
