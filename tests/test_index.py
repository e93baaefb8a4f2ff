"""The file index, the caption records, and content hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from daemon.hashing import hash_bytes, hash_file
from daemon.queue import CaptionRecord, Database, FileIndex


@pytest.fixture
def index(tmp_path: Path) -> FileIndex:
    db = Database(tmp_path / "q.db")
    yield FileIndex(db, clock=lambda: 123.0)
    db.close()


def test_upsert_and_read_dir_entries(index: FileIndex) -> None:
    rows = [("", "a.jpg", 10, 1), ("", "b.jpg", 20, 2), ("sub", "c.jpg", 30, 3)]
    index.upsert_files("/r", rows)
    index.upsert_files("/other", [("", "a.jpg", 99, 9)])
    assert index.dir_entries("/r", "") == {"a.jpg": (10, 1), "b.jpg": (20, 2)}
    assert index.dir_entries("/r", "sub") == {"c.jpg": (30, 3)}
    assert index.dirs("/r") == {"", "sub"}
    assert index.get_file("/r", "", "a.jpg") == (10, 1)
    assert index.get_file("/r", "", "zzz.jpg") is None
    assert index.count_files() == 4
    assert index.count_files("/r") == 3
    index.upsert_files("/r", [("", "a.jpg", 11, 5)])  # update in place
    assert index.get_file("/r", "", "a.jpg") == (11, 5)
    assert index.count_files("/r") == 3


def test_upsert_many_rows_in_batches(index: FileIndex) -> None:
    index.upsert_files("/r", ((f"d{i % 7}", f"{i}.jpg", i, i) for i in range(2500)))
    assert index.count_files("/r") == 2500
    assert len(index.dirs("/r")) == 7


def test_remove_files_and_dir(index: FileIndex) -> None:
    index.upsert_files("/r", [("a", "1.jpg", 1, 1), ("a", "2.jpg", 1, 1), ("a/b", "3.jpg", 1, 1)])
    index.remove_files("/r", "a", ["1.jpg", "nope.jpg"])
    assert index.dir_entries("/r", "a") == {"2.jpg": (1, 1)}
    index.remove_dir("/r", "a")
    assert index.dir_entries("/r", "a") == {}
    assert index.dir_entries("/r", "a/b") == {"3.jpg": (1, 1)}  # subdirs untouched
    assert index.remove_root("/r") == 1
    assert index.count_files() == 0


def test_dir_versions_move_on_every_change(index: FileIndex) -> None:
    assert index.dir_state("/r", "a") == (0, [])
    index.upsert_files("/r", [("a", "1.jpg", 1, 1)])
    v1, rows = index.dir_state("/r", "a")
    assert rows == [("1.jpg", 1, 1)]
    index.upsert_files("/r", [("a", "1.jpg", 2, 2)])
    v2, _ = index.dir_state("/r", "a")
    index.remove_files("/r", "a", ["1.jpg"])
    v3, rows = index.dir_state("/r", "a")
    assert rows == []
    index.upsert_files("/r", [("a", "1.jpg", 1, 1)])  # back to the first content
    v4, _ = index.dir_state("/r", "a")
    assert len({v1, v2, v3, v4}) == 4  # a version never repeats
    # a write from another connection (another process) also moves it
    other = Database(index.db.path)
    FileIndex(other).remove_dir("/r", "a")
    assert index.dir_state("/r", "a")[0] > v4
    assert index.dir_versions("/r")["a"] > v4
    other.close()


def test_caption_records(index: FileIndex) -> None:
    assert index.get_caption("/r/a.jpg", "wd") is None
    index.record_caption("/r/a.jpg", "wd", "h1", "/r/a.tags", "s1")
    index.record_caption("/r/a.jpg", "blip", "h1", "/r/a.txt", "s2")
    rec = index.get_caption("/r/a.jpg", "wd")
    assert rec == CaptionRecord("/r/a.jpg", "wd", "h1", "/r/a.tags", "s1", 123.0)
    assert index.caption_by_sidecar("/r/a.txt").generator == "blip"
    assert index.caption_by_sidecar("/r/nope.txt") is None
    index.record_caption("/r/a.jpg", "wd", "h2", "/r/a.tags", "s3")  # rewritten
    assert index.get_caption("/r/a.jpg", "wd").content_hash == "h2"
    index.forget_captions("/r/a.jpg")
    assert index.get_caption("/r/a.jpg", "wd") is None
    assert index.get_caption("/r/a.jpg", "blip") is None


def test_hash_file_matches_hash_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several chunks
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert hash_file(p) == hash_bytes(data)
    assert hash_bytes(data) == hashlib.blake2b(data, digest_size=32).hexdigest()
    assert hash_bytes(b"a") != hash_bytes(b"b")
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty") == hash_bytes(b"")
