"""The dataset report over a fixture index whose numbers were worked out by hand
(issue 14): the report's JSON must equal them, section by section."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.hashing import sidecar_hash
from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
from daemon.report.checks import Source
from daemon.report.stats import Options, Scope, buckets_for, build_report
from daemon.report.tokens import Estimator

ROOT = "/data/ds"
H1, H2, H3 = "1" * 32, "2" * 32, "3" * 32
SOURCES = {"wd_tagger": Source("wd_tagger", "tags"), "vlm": Source("vlm", "prose")}
LONG = "sks, " + " ".join(["tree"] * 80) + "."  # 81 words; 83 CLIP pieces: over 75


def _rec(path: str, gen: str, digest: str, ext: str, text: str | None) -> CaptionRecord:
    stem = path.rsplit(".", 1)[0]
    return CaptionRecord(f"{ROOT}/{path}", gen, digest, f"{ROOT}/{stem}.{ext}", "s" * 64, 0.0,
                         text=text)  # fmt: skip


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[FileIndex, JobQueue]:
    """7 images: a, b, c, d in the root, e, f, g in sub/.

    a, c: the same content (H1); b: H2 (pHash 2 bits from H1's); e: H3.
    wd_tagger tagged a, b, c, e; vlm described a, b (and c, before texts were kept).
    d failed (bad_image); f is pending; g has a person's caption that was kept.
    e's caption was edited on disk and read back.
    """
    db = Database(tmp_path / "q.db")
    index = FileIndex(db, clock=lambda: 50.0)
    queue = JobQueue(db, clock=lambda: 10.0)
    index.upsert_files(ROOT, [("", n, 1, 1) for n in ("a.png", "b.png", "c.png", "d.png")])
    index.upsert_files(ROOT, [("sub", n, 1, 1) for n in ("e.png", "f.png", "g.png")])
    index.upsert_files("/data/other", [("", "x.png", 1, 1)])  # another root: not counted
    index.record_captions(
        [
            _rec("a.png", "wd_tagger", H1, "txt", "sks, 1girl, solo, long hair, blonde hair"),
            _rec("b.png", "wd_tagger", H2, "txt", "sks, 1girl, solo, short hair"),
            _rec("c.png", "wd_tagger", H1, "txt", "1boy, solo, short hair"),
            _rec("sub/e.png", "wd_tagger", H3, "txt", "old text"),
            _rec("a.png", "vlm", H1, "caption", "sks, A man with black hair."),
            _rec("b.png", "vlm", H2, "caption", LONG),
            _rec("c.png", "vlm", H1, "caption", None),
            CaptionRecord(
                "/data/other/x.png", "wd_tagger", H3, "/data/other/x.txt", "s", 0.0, text="1girl"
            ),
        ]
    )
    edited = "sks, 1girl, solo, long hair, hat"
    index.set_texts([(f"{ROOT}/sub/e.png", "wd_tagger", edited, sidecar_hash(b"edited"))])
    index.record_images([(H1, 1024, 1024), (H2, 512, 768), (H3, 2048, 1024)])
    index.record_phashes([(H1, None, None, "ffff000000000000"), (H2, None, None,
                          "ffff000000000003"), (H3, None, None, "0000ffffffffffff")])  # fmt: skip
    jobs = {
        "a.png": ("wd_tagger", "written"),
        "b.png": ("wd_tagger", "written"),
        "c.png": ("wd_tagger", "written"),
        "sub/e.png": ("wd_tagger", "written"),
        "sub/g.png": ("wd_tagger", "caption_exists"),
    }
    for rel, (gen, outcome) in jobs.items():
        queue.enqueue(f"{ROOT}/{rel}", gen, 0)
        (job,) = queue.claim(gen, 1)
        queue.ack(job.id, outcome)
    queue.enqueue(f"{ROOT}/d.png", "wd_tagger", 0)
    (job,) = queue.claim("wd_tagger", 1)
    queue.fail(job.id, "bad_image", "not a recognised image format", False)
    queue.enqueue(f"{ROOT}/sub/f.png", "wd_tagger", 0)
    db.conn.execute(  # flags as the checks leave them: one open, one dismissed
        "INSERT INTO flags VALUES (?, 'vlm', 'gender', 'the prose says man', ?, 100.0, NULL)",
        (f"{ROOT}/a.png", H1),
    )
    db.conn.execute(
        "INSERT INTO flags VALUES (?, 'vlm', 'cut_sentence', 'cut', ?, 100.0, 200.0)",
        (f"{ROOT}/b.png", H2),
    )
    yield index, queue
    db.close()


def _report(dataset: tuple[FileIndex, JobQueue], **kw: object) -> dict:
    index, queue = dataset
    scopes = kw.pop("scopes", [Scope("ds", ROOT, "", "sks")])
    return build_report(index, queue, scopes, sources=SOURCES, tokens=Estimator(),
                        options=Options(**kw), clock=lambda: 1000.0)  # type: ignore[arg-type]  # fmt: skip


def test_coverage(dataset: tuple[FileIndex, JobQueue]) -> None:
    assert _report(dataset)["coverage"] == {
        "images": 7,
        "captioned": 4,
        "by_generator": {
            "vlm": {"images": 3, "sidecar_types": {"caption": 3}},
            "wd_tagger": {"images": 4, "sidecar_types": {"txt": 4}},
        },
        "by_person": {
            "images": 2,  # g (kept), e (edited on disk)
            "written_through_api": 0,
            "kept_as_found": 1,
            "edited_after_captiond": 1,
        },
        "pending": 1,
        "failed": {"failed": {"bad_image": 1}, "dead": {}},
        "empty_after_post_processing": 0,
        "no_caption": 2,  # d, f
    }


def test_texts(dataset: tuple[FileIndex, JobQueue]) -> None:
    t = _report(dataset)["texts"]
    assert (t["known"], t["unknown"], t["read_back_after_edit"]) == (6, 1, 1)


def test_tags(dataset: tuple[FileIndex, JobQueue]) -> None:
    tags = _report(dataset, top=10)["tags"]
    assert tags["generators"] == ["wd_tagger"]
    assert tags["tagged_images"] == 4
    assert tags["distinct"] == 7
    assert tags["top"] == [
        {"tag": "solo", "count": 4, "share": 1.0},
        {"tag": "1girl", "count": 3, "share": 0.75},
        {"tag": "long hair", "count": 2, "share": 0.5},
        {"tag": "short hair", "count": 2, "share": 0.5},
        {"tag": "1boy", "count": 1, "share": 0.25},
        {"tag": "blonde hair", "count": 1, "share": 0.25},
        {"tag": "hat", "count": 1, "share": 0.25},
    ]
    assert tags["rare"] == {
        "count": 5,
        "list": [
            {"tag": "1boy", "count": 1},
            {"tag": "blonde hair", "count": 1},
            {"tag": "hat", "count": 1},
            {"tag": "long hair", "count": 2},
            {"tag": "short hair", "count": 2},
        ],
    }
    assert tags["in_every_image"] == ["solo"]
    folders = {f["folder"]: (f["images"], f["distinct"]) for f in tags["per_folder"]["list"]}
    assert folders == {"ds": (3, 6), "ds/sub": (1, 4)}
    assert tags["per_folder"]["folders"] == 2
    assert tags["trigger"] == [
        {
            "root": "ds",
            "word": "sks",
            "captioned_images": 4,
            "with_trigger": 3,
            "by_generator": {
                "wd_tagger": {"captions": 4, "with_trigger": 3, "share": 0.75},
                "vlm": {"captions": 2, "with_trigger": 2, "share": 1.0},
            },
            "missing": ["ds/c.png"],
            "share": 0.75,
            "co_occurring": [
                {"tag": "1girl", "count": 3, "share": 1.0},
                {"tag": "solo", "count": 3, "share": 1.0},
                {"tag": "long hair", "count": 2, "share": 0.6667},
                {"tag": "blonde hair", "count": 1, "share": 0.3333},
                {"tag": "hat", "count": 1, "share": 0.3333},
                {"tag": "short hair", "count": 1, "share": 0.3333},
            ],
        }
    ]


def test_length(dataset: tuple[FileIndex, JobQueue]) -> None:
    length = _report(dataset)["length"]
    assert length["clip"]["limit"] == 77
    assert length["clip"]["exact"] is False and length["clip"]["tokenizer"] is None
    assert "estimate" in length["clip"]["note"]
    wd = length["by_generator"]["wd_tagger"]
    assert wd["words"] == {"count": 4, "min": 4, "median": 5.5, "mean": 5.5, "max": 7}
    hist = {b["bin"]: b["count"] for b in wd["histogram"] if b["count"]}
    assert hist == {"0-5": 1, "5-10": 3}
    assert wd["over_clip_limit"] == 0
    vlm = length["by_generator"]["vlm"]
    assert vlm["words"] == {"count": 2, "min": 6, "median": 43.5, "mean": 43.5, "max": 81}
    assert {b["bin"]: b["count"] for b in vlm["histogram"] if b["count"]} == {
        "5-10": 1,
        "75-100": 1,
    }
    assert vlm["over_clip_limit"] == 1 and vlm["over_clip_share"] == 0.5
    assert vlm["examples"] == [{"path": "ds/b.png", "tokens": 85, "words": 81}]


def test_images(dataset: tuple[FileIndex, JobQueue]) -> None:
    im = _report(dataset)["images"]
    assert (im["with_size"], im["without_size"]) == (4, 3)
    assert {b["bin"]: b["count"] for b in im["megapixels"] if b["count"]} == {
        "0.25-0.5 MP": 1,
        "1-2 MP": 2,
        "2-4 MP": 1,
    }
    assert {b["bin"]: b["count"] for b in im["aspect"] if b["count"]} == {
        "2:3": 1,
        "1:1": 2,
        "2:1 or wider": 1,
    }
    assert im["common_sizes"] == [
        {"size": "1024x1024", "count": 2},
        {"size": "2048x1024", "count": 1},
        {"size": "512x768", "count": 1},
    ]
    assert im["below_resolution"] == {
        "resolution": 1024,
        "count": 1,
        "share": 0.25,
        "examples": [{"path": "ds/b.png", "size": "512x768"}],
    }
    assert im["buckets"] == {
        "resolution": 1024,
        "step": 64,
        "min": 256,
        "max": 2048,
        "upscaled": 1,  # b: 512x768 into 832x1216
        "list": [
            {"bucket": "832x1216", "aspect": 0.684, "count": 1},
            {"bucket": "1024x1024", "aspect": 1.0, "count": 2},
            {"bucket": "1408x704", "aspect": 2.0, "count": 1},
        ],
    }
    assert im["exact_duplicates"] == {
        "groups": 1,
        "images": 2,
        "redundant": 1,
        "not_hashed": 3,
        "list": [{"count": 2, "paths": ["ds/a.png", "ds/c.png"]}],
    }
    near = im["near_duplicates"]
    assert (near["contents"], near["hashed"], near["unreadable"], near["not_hashed_yet"]) == (
        3,
        3,
        0,
        0,
    )
    assert near["too_plain"] == 0
    assert (near["groups"], near["images"]) == (1, 3)
    assert near["list"] == [
        {"contents": 2, "max_distance": 2, "paths": ["ds/a.png", "ds/b.png", "ds/c.png"]}
    ]


def test_near_duplicates_at_distance_one_are_none(dataset: tuple[FileIndex, JobQueue]) -> None:
    near = _report(dataset, near_distance=1)["images"]["near_duplicates"]
    assert (near["groups"], near["images"], near["list"]) == (0, 0, [])


def test_flags(dataset: tuple[FileIndex, JobQueue]) -> None:
    flags = _report(dataset)["flags"]
    assert flags == {
        "open": 1,
        "dismissed": 1,
        "by_check": {
            "cut_sentence": {"open": 0, "dismissed": 1},
            "gender": {"open": 1, "dismissed": 0},
        },
        "list": [
            {
                "path": "ds/a.png",
                "generator": "vlm",
                "check": "gender",
                "reason": "the prose says man",
                "since": 100.0,
            }
        ],
    }


def test_a_folder_scope_counts_only_that_folder(dataset: tuple[FileIndex, JobQueue]) -> None:
    r = _report(dataset, scopes=[Scope("ds", ROOT, "sub", "sks")])
    assert r["coverage"]["images"] == 3
    assert r["coverage"]["captioned"] == 1
    assert r["tags"]["top"][0] == {"tag": "1girl", "count": 1, "share": 1.0}
    assert r["images"]["exact_duplicates"]["groups"] == 0
    assert r["flags"]["open"] == 0


def test_kohya_buckets() -> None:
    """sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64), its defaults for
    SD 1.x, worked out by hand from its loop."""
    assert buckets_for(512, 64, 256, 1024) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768),
        (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
        (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip


def test_empty_scope_is_a_clear_empty_report(tmp_path: Path) -> None:
    db = Database(tmp_path / "q.db")
    try:
        r = build_report(FileIndex(db), JobQueue(db), [Scope("empty", "/nowhere")],
                         sources={}, tokens=Estimator())  # fmt: skip
    finally:
        db.close()
    assert r["coverage"]["images"] == 0 and r["coverage"]["no_caption"] == 0
    assert r["tags"]["top"] == [] and r["tags"]["in_every_image"] == []
    assert r["images"]["with_size"] == 0 and r["images"]["buckets"]["list"] == []
    assert r["length"]["by_generator"] == {}
    assert r["flags"]["open"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"resolution": 10},
        {"bucket_step": 0},
        {"near_distance": 99},
        {"min_bucket": 4096},
        {"top": 0},
    ],
)
def test_bad_options_are_refused(bad: dict, dataset: tuple[FileIndex, JobQueue]) -> None:
    with pytest.raises(ValueError):
        _report(dataset, **bad)


def test_html_escapes_and_draws_hostile_tags(tmp_path: Path) -> None:
    """Tags and paths come from files anyone may name: escaped in the page, and a tag
    like '$_$' is a kaomoji to matplotlib, not a formula."""
    from daemon.report.html import render

    db = Database(tmp_path / "q.db")
    try:
        index = FileIndex(db)
        index.upsert_files(ROOT, [("", "<img src=x onerror=alert(1)>.png", 1, 1)])
        path = f"{ROOT}/<img src=x onerror=alert(1)>.png"
        text = "$_$, <script>alert(1)</script>, a_b"
        index.record_captions([CaptionRecord(path, "wd_tagger", H1, path + ".txt", "s", 0.0,
                                             text=text)])  # fmt: skip
        r = build_report(index, JobQueue(db), [Scope("ds", ROOT, "", "sks")], sources=SOURCES,
                         tokens=Estimator())  # fmt: skip
        empty = build_report(index, JobQueue(db), [Scope("ds", ROOT, "nothing-here")],
                             sources=SOURCES, tokens=Estimator())  # fmt: skip
    finally:
        db.close()
    assert {t["tag"] for t in r["tags"]["top"]} == {"$ $", "<script>alert(1)</script>", "a b"}
    page = render(r)
    assert r["tags"]["trigger"][0]["missing"] == ["ds/<img src=x onerror=alert(1)>.png"]
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "ds/&lt;img src=x onerror=alert(1)&gt;.png" in page
    assert page.count("<svg") >= 4
    assert "<svg" in render(empty) or "none" in render(empty)  # an empty report renders
