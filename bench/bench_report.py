"""The dataset report over 100,000 indexed images, and the first perceptual-hash pass.

Run: ``.venv/bin/python bench/bench_report.py [--runs 3] [--clip-dir DIR]``. Prints a
Markdown section for bench/README.md.

Report. A fresh database holds 100,000 images in 500 folders of a root that does not
exist on disk (so nothing can be read from the disk: the report reads the index only),
each with a WD tag caption (20-45 tags from a Zipf-distributed list of 3,000), a prose
caption for every other image, a size and a pHash, done jobs, 1% failed, 1% pending.

- baseline: the same rows fetched with the index's report queries and nothing else
  (what any report must read), in the same run;
- the first check pass over 100,000 images that were never checked (the daemon does
  it in the background, once; the report checks for at most 2 s and names the rest);
- the first facts pass: each caption's words, CLIP limit, tag ids and trigger word,
  computed once and kept in the index (the daemon does it in the background);
- the report with every image checked and its facts kept (what a user waits for):
  target <= 5 s;
- the report over an index without facts (as an older captiond leaves it): it computes
  and stores them (with a CLIP tokenizer: from an empty memo of token counts, as a
  daemon just started);
- the worker's hook: ``Maintainer.notify`` per image (the only cost on the hot path);
- CLIP tokens: with ``--clip-dir`` (a folder holding a CLIP tokenizer, e.g. built from
  open_clip's ``bpe_simple_vocab_16e6.txt.gz``, see bench/README.md), loaded as the
  daemon loads it (``tokens.load_folder``: tokenizers, no transformers), the report
  counts with it; else with the estimate.

pHash pass. 400 image files (300 JPEG 1600x1200 camera-like, 100 PNG 768x768) written
to ``bench/.data/phash``, page cache warm:

- decode alone, as the tagger's pipeline decodes (``decode_image`` with the WD
  tagger's 448 px draft on the longer side);
- decode alone, in full (no draft);
- the pass (confined read, content-hash check, decode at the pHash's 64 px draft, pHash,
  one transaction per 64), images per second.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from cpuinfo import cpu_name
from PIL import Image

from daemon.config import Settings
from daemon.hashing import content_hash
from daemon.pipeline.images import decode_image
from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
from daemon.report import phash as ph
from daemon.report.service import Maintainer, ReportService
from daemon.report.stats import Options
from daemon.report.tokens import ClipCounter, Estimator, load_folder

HERE = Path(__file__).resolve().parent
ROOT = "/nonexistent/bench-dataset"  # never on disk: the report cannot read files
N = 100_000
FOLDERS = 500
VOCAB = 3_000
PROSE = [
    "A young woman with long {h} hair stands in a sunny park, wearing a {c} dress.",
    "A man in a dark suit sits at a desk in an office, reading documents.",
    "Two children play with a dog on a sandy beach under a cloudy sky.",
    "An anime-style illustration of a girl with {h} hair holding a sword.",
    "A close-up portrait of a smiling woman with {h} hair and blue eyes.",
    "A quiet street at night, lit by lamps, with a bicycle leaning on a wall.",
]
HAIR = ["blonde", "black", "brown", "red", "pink", "white"]
COLOUR = ["red", "blue", "white", "green", "black"]


def cpu_reference() -> float:
    """Seconds for a fixed pure-Python loop: how busy the shared cores were (the same
    loop takes about 0.25 s on this machine when nothing else runs)."""
    t = time.perf_counter()
    sum(range(10**7))
    return time.perf_counter() - t


def machine() -> str:
    return (
        f"{os.cpu_count()} cores, {cpu_name()}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, numpy {np.__version__}, {platform.system()} "
        f"{platform.release()}; load average before: {os.getloadavg()[0]:.1f}"
    )


def build(db: Database, rng: random.Random) -> None:
    index, queue = FileIndex(db), JobQueue(db)
    vocab = [f"tag {i}" for i in range(VOCAB)]
    weights = [1 / (i + 1) for i in range(VOCAB)]
    rows, recs, imgs, jobs = [], [], [], []
    for i in range(N):
        d = f"set{i % FOLDERS:03d}"
        name = f"img_{i:06d}.jpg"
        path = f"{ROOT}/{d}/{name}"
        rows.append((d, name, 100_000, i))
        digest = f"{i:032x}"
        k = rng.randint(20, 45)
        tags = list(dict.fromkeys(rng.choices(vocab, weights, k=k)))
        gender = "1girl" if i % 3 else "1boy"
        text = ", ".join(["sks", gender, "solo", *tags])
        recs.append(CaptionRecord(path, "wd_tagger", digest, path[:-4] + ".txt", "s", 0.0,
                                  text=text))  # fmt: skip
        if i % 2 == 0:
            prose = rng.choice(PROSE).format(h=rng.choice(HAIR), c=rng.choice(COLOUR))
            recs.append(CaptionRecord(path, "vlm", digest, path[:-4] + ".caption", "s", 0.0,
                                      text="sks, " + prose))  # fmt: skip
        w, h = rng.choice([(1024, 1024), (832, 1216), (1216, 832), (512, 768), (3000, 2000)])
        imgs.append((digest, w, h, f"{rng.getrandbits(64):016x}"))
        jobs.append((path, "wd_tagger", 0))
    index.upsert_files(ROOT, rows)
    for i in range(0, len(recs), 5000):
        index.record_captions(recs[i : i + 5000])
    index.record_phashes(imgs)
    queue.enqueue_many(jobs)
    done = 0
    while claimed := queue.claim("wd_tagger", 1000):
        with queue.transaction():
            for j in claimed:
                done += 1
                if done % 100 == 0:
                    queue.fail(j.id, "bad_image", "not a recognised image format", False)
                elif done % 100 == 1:
                    queue.release([j.id], delay=3600)
                else:
                    queue.ack(j.id, "written")


def timed(fn, runs: int) -> tuple[float, list[float], object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def bench_report(runs: int, clip_dir: Path | None) -> list[str]:
    ref0 = cpu_reference()
    rng = random.Random(14)
    tmp = tempfile.mkdtemp(prefix="bench-report-")
    atexit.register(shutil.rmtree, tmp, True)  # about 130 MB of index
    db = Database(Path(tmp) / "q.db")
    t = time.perf_counter()
    build(db, rng)
    build_s = time.perf_counter() - t
    settings = Settings(state_dir=Path(tmp), cache_dir=Path(tmp) / "cache",
                        watch=[{"path": ROOT, "name": "ds", "trigger_word": "sks"}])  # fmt: skip
    index, queue = FileIndex(db), JobQueue(db)
    svc = ReportService(settings=settings, index=index, queue=queue)
    tokens: Estimator | ClipCounter = Estimator()
    if clip_dir is not None:  # loaded as the daemon loads it (tokenizers, no transformers)
        found = load_folder(clip_dir)
        if found is None:
            raise SystemExit(f"no CLIP tokenizer in {clip_dir}")
        tokens = found
    import daemon.report.service as service_mod

    service_mod.find_counter = lambda *a, **k: tokens  # type: ignore[assignment]

    def baseline() -> int:
        n = len(index.files_in(ROOT))
        n += len(index.report_captions(ROOT)) + len(queue.report_jobs(ROOT))
        n += len(index.image_facts({f"{i:032x}" for i in range(N)})) + len(index.flags_under(ROOT))
        return n

    base_s, base_runs, nrows = timed(baseline, runs)
    t = time.perf_counter()
    checked, left = svc.check_stale(None, budget=None)
    check_s = time.perf_counter() - t
    flags = svc.flag_status()
    t = time.perf_counter()
    facts_n = svc.fill_facts()
    facts_s = time.perf_counter() - t
    rep_s, rep_runs, rep = timed(lambda: svc.report([], Options()), runs)
    with db.transaction() as conn:  # as an older captiond leaves them: no facts at all
        conn.execute("UPDATE captions SET facts = NULL")
    if isinstance(tokens, ClipCounter):  # a daemon just upgraded remembers no counts
        tokens._memo.clear()
    cold_s, _r, _o = timed(lambda: svc.report([], Options()), 1)
    m = Maintainer(svc)
    batch = [(f"{ROOT}/x/{i}.jpg", "wd_tagger", "written", None) for i in range(8)]
    t = time.perf_counter()
    for _ in range(10_000):
        m.notify(batch)
        m._pending.clear()
    notify_us = (time.perf_counter() - t) / 80_000 * 1e6
    db.close()
    r = rep  # type: ignore[assignment]
    phases = ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
    over = sum(g["over_clip_limit"] for g in r["length"]["by_generator"].values())
    lines = [
        f"Machine: {machine()}. CPU reference loop before / after: {ref0:.2f} / "
        f"{cpu_reference():.2f} s. Index built in {build_s:.0f} s "
        f"({N:,} images, {nrows:,} rows read by a report).",
        "",
        "| step | median | runs | vs baseline | target |",
        "|---|---|---|---|---|",
        f"| baseline: the report's queries alone ({nrows:,} rows) | {base_s:.2f} s | "
        f"{', '.join(f'{x:.2f}' for x in base_runs)} | 1.0x | |",
        f"| report, every image checked | **{rep_s:.2f} s** | "
        f"{', '.join(f'{x:.2f}' for x in rep_runs)} | {rep_s / base_s:.1f}x | <= 5 s |",
        f"| first check pass, {checked:,} images never checked (background) | {check_s:.1f} s | "
        f"1 | | ({checked / check_s:,.0f} images/s) |",
        f"| first facts pass, {facts_n:,} caption records (background) | {facts_s:.1f} s | "
        f"1 | | ({facts_n / max(facts_s, 1e-9):,.0f} records/s) |",
        f"| report, no facts kept yet (computes and stores them; no token count "
        f"remembered) | {cold_s:.2f} s | 1 | "
        f"{cold_s / base_s:.1f}x | |",
    ]
    lines += [
        f"| worker hook (`Maintainer.notify`), per image | {notify_us:.2f} µs | | | |",
        "",
        f"Counted with: {tokens.note}. Over the CLIP limit: {over:,} captions; flags raised: "
        f"{flags['open']:,} ({', '.join(f'{k} {v}' for k, v in flags['by_check'].items())}); "
        f"not checked after the pass: {left}. Phases of the last report (s): {phases}.",
    ]
    return lines


def make_images(n_jpeg: int = 300, n_png: int = 100) -> list[Path]:
    d = HERE / ".data" / "phash"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(14)
    out = []
    for i in range(n_jpeg + n_png):
        jpg = i < n_jpeg
        p = d / (f"cam_{i:04d}.jpg" if jpg else f"art_{i:04d}.png")
        if not p.exists():
            size = (1600, 1200) if jpg else (768, 768)
            base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 12, (size[1], size[0], 3))
            arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            img.save(p, "JPEG", quality=90) if jpg else img.save(p, "PNG")
        out.append(p)
    return out


def bench_phash(runs: int) -> list[str]:
    files = make_images()
    datas = [p.read_bytes() for p in files]  # warm the page cache

    def decode(draft: int | None) -> float:
        t = time.perf_counter()
        for data in datas:
            decode_image(data, draft_size=draft, draft_longer_side=True)
        return len(datas) / (time.perf_counter() - t)

    def one_pass() -> float:
        tmp = tempfile.mkdtemp(prefix="bench-phash-")
        db = Database(Path(tmp) / "q.db")
        index = FileIndex(db)
        root = str(files[0].parent)
        index.record_captions([
            CaptionRecord(str(p), "wd_tagger", content_hash(d), str(p) + ".txt", "s", 0.0,
                          text="x")
            for p, d in zip(files, datas, strict=True)
        ])  # fmt: skip
        settings = Settings(state_dir=Path(tmp), watch=[{"path": root, "name": "b"}])
        hp = ph.HashPass(index, settings.watch_for)
        t = time.perf_counter()
        stats = hp.run()
        rate = stats.hashed / (time.perf_counter() - t)
        db.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert stats.hashed == len(files), stats
        return rate

    wd = [decode(448) for _ in range(runs)]
    full = [decode(None) for _ in range(runs)]
    passes = [one_pass() for _ in range(runs)]
    m_wd, m_full, m_pass = (statistics.median(x) for x in (wd, full, passes))
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    return [
        f"{len(files)} files (300 JPEG 1600x1200, 100 PNG 768x768), page cache warm.",
        "",
        "| | images/s (median) | runs | vs the tagger's decode |",
        "|---|---|---|---|",
        f"| decode as the WD tagger's pipeline does (448 px draft) | {m_wd:.0f} | {fmt(wd)} "
        "| 1.0x |",
        f"| decode in full (no draft) | {m_full:.0f} | {fmt(full)} | {m_full / m_wd:.2f}x |",
        f"| **first pHash pass** (read, hash check, 64 px draft decode, pHash, store) | "
        f"**{m_pass:.0f}** | {fmt(passes)} | {m_pass / m_wd:.2f}x |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clip-dir", type=Path)
    ap.add_argument("--only", choices=["report", "phash"])
    ap.add_argument("--images", type=int, default=N, help="images in the index")
    args = ap.parse_args()
    globals()["N"] = args.images
    out = ["## Dataset report", ""]
    if args.only != "phash":
        out += bench_report(args.runs, args.clip_dir)
    if args.only != "report":
        out += ["", "### First perceptual-hash pass", "", *bench_phash(args.runs)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
