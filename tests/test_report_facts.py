"""Report facts kept in the index (issue 14, bench/README.md Dataset report): computed
once and reused, made unknown again when a caption's text changes, and a report is the
same whether it computed them or found them."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
from daemon.report import facts as F
from daemon.report.checks import Context, Source
from daemon.report.stats import Options, Scope, build_report
from daemon.report.tokens import Estimator

ROOT = "/data/ds"
SOURCES = {
    "wd_tagger": Source("wd_tagger", "tags"),
    "vlm": Source("vlm", "prose"),
    "mp": Source("mp", "prose", people="lines", scene="scene"),
}
LONG = "sks, " + " ".join(["tree"] * 80) + "."


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(tmp_path / "q.db")
    index = FileIndex(db, clock=lambda: 50.0)
    names = [f"{d}/{i}.png" for d in ("a", "b") for i in range(6)]
    index.upsert_files(ROOT, [(n.split("/")[0], n.split("/")[1], 1, 1) for n in names])
    recs = []
    for k, n in enumerate(names):
        p = f"{ROOT}/{n}"
        tags = ["sks"] if k % 3 else []
        tags += ["1girl" if k % 2 else "1boy", "solo", f"tag {k % 4}", "long_hair"]
        recs.append(CaptionRecord(p, "wd_tagger", f"{k:032x}", p + ".txt", "s", 0.0,
                                  text=", ".join(tags)))  # fmt: skip
        if k % 2 == 0:
            recs.append(CaptionRecord(p, "vlm", f"{k:032x}", p + ".caption", "s", 0.0,
                                      text="sks. A woman." if k % 4 else LONG))  # fmt: skip
        if k == 5:
            recs.append(CaptionRecord(p, "mp", f"{k:032x}", p + ".mp", "s", 0.0,
                                      text="sksA: a woman\nscene: a park"))  # fmt: skip
        if k == 7:
            recs.append(CaptionRecord(p, "other", f"{k:032x}", p + ".o", "s", 0.0,
                                      text="red, blue, green"))  # fmt: skip
        if k == 8:
            recs.append(CaptionRecord(p, "old", f"{k:032x}", p + ".old", "s", 0.0, text=None))
    index.record_captions(recs)
    yield db, index, JobQueue(db)
    db.close()


def _report(world, **kw: object) -> dict:  # type: ignore[no-untyped-def]
    _db, index, queue = world
    r = build_report(index, queue, [Scope("ds", ROOT, "", "sks")], sources=SOURCES,
                     tokens=Estimator(), options=Options(**kw), clock=lambda: 1.0)  # type: ignore[arg-type]  # fmt: skip
    del r["timings"]
    return r


def _facts(db: Database) -> dict[tuple[str, str], bytes | None]:
    return {
        (p, g): f
        for p, g, f in db.conn.execute("SELECT image_path, generator, facts FROM captions")
    }


def _count_computes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = F.compute

    def counting(texts, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return real(texts, *a, **k)

    monkeypatch.setattr(F, "compute", counting)
    return calls


def test_facts_are_computed_once_and_reused(world, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    db, _index, _queue = world
    calls = _count_computes(monkeypatch)
    assert all(f is None for f in _facts(db).values())
    first = _report(world)
    assert sum(calls) == 12 + 6 + 1 + 1  # every caption with a text, once
    stored = _facts(db)
    assert all(f is not None for f in stored.values())
    none_id = dict((t, i) for i, t in db.conn.execute("SELECT id, term FROM report_terms"))[
        F.NO_TEXT_KEY
    ]
    assert F.HEAD.unpack_from(stored[(f"{ROOT}/b/2.png", "old")])[:2] == (none_id, 0)
    calls.clear()
    again = _report(world)
    assert calls == []  # the second report only aggregates
    assert again == first
    assert _facts(db) == stored


def test_report_is_the_same_with_and_without_kept_facts(world) -> None:  # type: ignore[no-untyped-def]
    db, _index, _queue = world
    cold = _report(world)
    warm = _report(world)
    assert warm == cold
    # facts of another key (a changed trigger word, an older captiond's format), or
    # unreadable: computed again, the same report
    with db.transaction() as conn:
        conn.execute("UPDATE captions SET facts = x'0102' WHERE generator = 'wd_tagger'")
        rows = conn.execute("SELECT rowid, facts FROM captions WHERE generator = 'vlm'")
        conn.executemany(  # a key this captiond never made
            "UPDATE captions SET facts = ? WHERE rowid = ?",
            [(b"\xff\xff\xff\xff" + f[4:], i) for i, f in rows.fetchall()],
        )
    assert _report(world) == cold
    # a report with another trigger word computes its own and keeps none
    before = _facts(db)
    other = _report(world, trigger="1girl")
    assert _facts(db) == before
    assert other["tags"]["trigger"][0]["word"] == "1girl"
    assert other["tags"]["trigger"][0]["with_trigger"] == 6


def test_the_numbers_from_facts(world) -> None:  # type: ignore[no-untyped-def]
    r = _report(world)
    _report(world)
    r2 = _report(world)
    assert r2 == r
    tags = r["tags"]
    assert tags["tagged_images"] == 12
    assert tags["generators"] == ["other", "wd_tagger"]
    top = {t["tag"]: t["count"] for t in tags["top"]}
    assert top["solo"] == 12 and top["long hair"] == 12 and top["1girl"] == 6
    assert top["red"] == 1 and "sks" not in top
    assert sorted(tags["in_every_image"]) == ["long hair", "solo"]
    trig = tags["trigger"][0]
    assert trig["captioned_images"] == 12
    # wd_tagger has sks where k % 3; vlm's prose has it everywhere; mp's "sksA" is no
    # trigger word
    assert trig["by_generator"]["wd_tagger"] == {"captions": 12, "with_trigger": 8,
                                                 "share": round(8 / 12, 4)}  # fmt: skip
    assert trig["with_trigger"] == 10  # images 0 and 6 have vlm captions with sks
    assert r["length"]["by_generator"]["vlm"]["over_clip_limit"] == 3
    assert r["texts"]["unknown"] == 1


def test_a_changed_text_makes_its_facts_unknown(world) -> None:  # type: ignore[no-untyped-def]
    db, index, _queue = world
    first = _report(world)
    p = f"{ROOT}/a/0.png"
    index.set_texts([(p, "wd_tagger", "sks, 1boy, solo, hat", "h")])
    assert _facts(db)[(p, "wd_tagger")] is None
    assert _facts(db)[(f"{ROOT}/a/1.png", "wd_tagger")] is not None
    r = _report(world)
    assert r != first
    top = {t["tag"]: t["count"] for t in r["tags"]["top"]}
    assert top["hat"] == 1 and top["long hair"] == 11
    # an older captiond writes the record again (INSERT OR REPLACE): no facts
    db.conn.execute(
        "INSERT OR REPLACE INTO captions (image_path, generator, content_hash, sidecar_path, "
        "sidecar_hash, written_at, text) VALUES (?, 'wd_tagger', 'h', 'x.txt', 's', 1.0, "
        "'sks, 2girls')",
        (p,),
    )
    assert _facts(db)[(p, "wd_tagger")] is None
    top = {t["tag"]: t["count"] for t in _report(world)["tags"]["top"]}
    assert top["2girls"] == 1 and "hat" not in top
    # a fresh index computed from scratch agrees
    with db.transaction() as conn:
        conn.execute("UPDATE captions SET facts = NULL")
    assert _report(world) == _report(world)


def test_the_background_pass_fills_what_is_missing(world) -> None:  # type: ignore[no-untyped-def]
    db, index, _queue = world
    cold = _report(world)
    with db.transaction() as conn:
        conn.execute("UPDATE captions SET facts = NULL")
    ctx = Context("sks", "en")
    n = F.fill_missing(index, ROOT, lambda g, t: SOURCES.get(g) or Source(g, "tags"), ctx,
                       Estimator(), chunk=5)  # fmt: skip
    assert n == len(_facts(db)) == 21
    assert all(f is not None for f in _facts(db).values())
    assert F.fill_missing(index, ROOT, lambda g, t: SOURCES[g], ctx, Estimator()) == 0
    assert _report(world) == cold


def test_a_report_that_cannot_write_still_counts(world, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    db, index, _queue = world
    cold = _report(world)
    with db.transaction() as conn:
        conn.execute("UPDATE captions SET facts = NULL")
        conn.execute("DELETE FROM report_terms")

    def busy(*_a: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(index, "term_ids", busy)
    monkeypatch.setattr(index, "store_facts", busy)
    assert _report(world) == cold
    assert all(f is None for f in _facts(db).values())


def test_facts_kept_name_only_terms_of_the_index(world) -> None:  # type: ignore[no-untyped-def]
    """A report whose own trigger word is one scope's and not another's keeps the facts of
    the one: every id in them is in report_terms, and later reports agree."""
    db, index, queue = world
    scopes = [Scope("ds", ROOT, "a", "sks"), Scope("ds", ROOT, "b", "1girl")]
    build_report(index, queue, scopes, sources=SOURCES, tokens=Estimator(),
                 options=Options(trigger="1girl"))  # fmt: skip
    terms = dict(db.conn.execute("SELECT id, term FROM report_terms").fetchall())
    kept = [f for f in _facts(db).values() if f is not None]
    assert kept
    for blob in kept:
        key, _fl, _w, _c, _at, ext = F.HEAD.unpack_from(blob)
        n = (len(blob) - F.HEAD_SIZE) // 4
        ids = F.struct.unpack_from(f"<{n}I", blob, F.HEAD_SIZE)
        assert {key, ext, *ids} <= terms.keys()
    warm = _report(world)
    with db.transaction() as conn:
        conn.execute("UPDATE captions SET facts = NULL")
    assert _report(world) == warm


def test_the_service_pass_fills_every_watch(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the daemon's background pass runs (Maintainer, after the check pass)."""
    import daemon.report.service as service_mod
    from daemon.config import Settings
    from daemon.report.service import ReportService

    db, index, queue = world
    settings = Settings(state_dir=tmp_path, cache_dir=tmp_path / "cache",
                        watch=[{"path": ROOT, "name": "ds", "trigger_word": "sks"}])  # fmt: skip
    svc = ReportService(settings=settings, index=index, queue=queue, sources=lambda: SOURCES)
    real = service_mod.find_counter
    service_mod.find_counter = lambda *a, **k: Estimator()  # type: ignore[assignment]
    try:
        assert svc.fill_facts() == 21
        assert all(f is not None for f in _facts(db).values())
        assert svc.fill_facts() == 0
        stored = _facts(db)
        r = svc.report([], Options())
    finally:
        service_mod.find_counter = real  # type: ignore[assignment]
    assert _facts(db) == stored  # the report found them all of its key
    del r["timings"], r["generated_at"], r["seconds"]
    assert r["tags"] == _report(world)["tags"]
