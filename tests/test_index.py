"""The file index, the caption records, and content hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from daemon.hashing import (
    bytes_match,
    content_hash,
    content_hash_file,
    file_matches,
    sidecar_hash,
)
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


def test_content_hash_of_a_file_matches_its_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several chunks
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert content_hash_file(p) == content_hash(data)
    assert content_hash(data) != content_hash(data[:-1])
    # XXH3-128 test vectors: the algorithm is part of what the database stores
    assert content_hash(b"") == "99aa06d3014798d86001c324468d497f"
    assert content_hash(b"abc") == "06b05ab6733a618578af5f94892f3950"
    (tmp_path / "empty").write_bytes(b"")
    assert content_hash_file(tmp_path / "empty") == content_hash(b"")


def test_sidecar_hash_is_still_blake2b() -> None:
    """Sidecar hashes recorded by earlier versions must keep matching: a change here
    would make every sidecar captiond wrote look edited by a person."""
    assert (
        sidecar_hash(b"tag1, tag2\n")
        == hashlib.blake2b(b"tag1, tag2\n", digest_size=32).hexdigest()
    )


def test_recorded_image_hashes_of_the_old_algorithm_still_match(tmp_path: Path) -> None:
    data = b"\xff\xd8 some jpeg" * 1000
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    legacy = hashlib.blake2b(data, digest_size=32).hexdigest()
    assert file_matches(p, legacy) and bytes_match(data, legacy)
    assert file_matches(p, content_hash(data)) and bytes_match(data, content_hash(data))
    other = b"another picture"
    assert not file_matches(p, hashlib.blake2b(other, digest_size=32).hexdigest())
    assert not bytes_match(data, hashlib.blake2b(other, digest_size=32).hexdigest())
    assert not file_matches(p, content_hash(other)) and not bytes_match(data, content_hash(other))
