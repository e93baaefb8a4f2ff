"""Warm rescan of a 100,000-file tree vs ``find -printf``, plus RSS after indexing.

Run: ``.venv/bin/python bench/bench_scan.py [--files N] [--per-dir N] [--runs N]``.
The tree lives in bench/.data/tree-<N> and is reused when present. Results are written
to standard output (a Markdown section for bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog
from cpuinfo import cpu_name

from daemon.config import WatchConfig
from daemon.queue import Database, FileIndex, JobQueue
from daemon.scanning.reconcile import Scanner

HERE = Path(__file__).resolve().parent


def build_tree(root: Path, files: int, per_dir: int) -> None:
    marker = root / ".complete"
    if marker.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    ndirs = (files + per_dir - 1) // per_dir
    n = 0
    for d in range(ndirs):
        # two levels: 10 top folders, the rest below them
        sub = root / f"set{d % 10:02d}" / f"d{d:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_dir):
            if n >= files:
                break
            (sub / f"img_{i:04d}.jpg").write_bytes(b"\xff\xd8\xff" + n.to_bytes(4, "little"))
            n += 1
    marker.touch()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_find(root: Path) -> float:
    t = time.perf_counter()
    subprocess.run(
        ["find", str(root), "-printf", "%s %T@\n"], stdout=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - t


def machine() -> str:
    model = cpu_name()
    return (
        f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--per-dir", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))

    tree = HERE / ".data" / f"tree-{args.files}"
    t = time.perf_counter()
    build_tree(tree, args.files, args.per_dir)
    print(f"tree {tree} ready in {time.perf_counter() - t:.1f} s")

    rss_start = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(Path(tmp) / "captiond.db")
        scanner = Scanner(FileIndex(db), JobQueue(db))
        watch = WatchConfig(path=tree, generators=["wd_tagger"])
        first = scanner.reconcile(watch)
        rss_indexed = rss_mb()
        print(
            f"first scan: {first.files_seen} files, {first.dirs} dirs, {first.new} new, "
            f"{first.seconds:.2f} s; RSS {rss_indexed:.0f} MB (start {rss_start:.0f} MB)"
        )
        scans: list[float] = []
        finds: list[float] = []
        restarts: list[float] = []
        time_find(tree)  # warm the cache for both alike
        for _ in range(args.runs):
            finds.append(time_find(tree))
            st = scanner.reconcile(watch)
            assert st.new == st.changed == st.removed == 0, st
            scans.append(st.seconds)
            # As after a daemon restart: no in-memory directory summaries yet.
            st = Scanner(scanner.index, scanner.queue).reconcile(watch)
            assert st.new == st.changed == st.removed == 0, st
            restarts.append(st.seconds)
        rss_after = rss_mb()
        db.close()

    s_med, f_med = statistics.median(scans), statistics.median(finds)
    ratio = s_med / f_med
    rows = [
        ("files / dirs", f"{first.files_seen:,} / {first.dirs:,}"),
        ("first scan (index + enqueue 1 generator)", f"{first.seconds:.2f} s"),
        ("`find DIR -printf '%s %T@\\n'`, median of 5", f"{f_med * 1000:.0f} ms"),
        ("warm rescan, nothing changed, median of 5", f"{s_med * 1000:.0f} ms"),
        ("ratio rescan / find (target <= 2.0)", f"{ratio:.2f}"),
        (
            "first rescan after a restart (index rows read), median",
            f"{statistics.median(restarts) * 1000:.0f} ms "
            f"({statistics.median(restarts) / f_med:.2f}x find)",
        ),
        ("max RSS after indexing (target <= 150 MB)", f"{rss_indexed:.0f} MB"),
        ("max RSS after the rescans", f"{rss_after:.0f} MB"),
    ]
    print(f"\n{machine()}")
    for k, v in rows:
        print(f"  {k:<48} {v}")
    runs = (
        f"rescans {[round(x * 1000) for x in scans]} ms, find {[round(x * 1000) for x in finds]} ms"
    )
    print(f"  {runs}")
    if not args.no_write:
        lines = [
            "## Reconcile scan (bench/bench_scan.py)",
            "",
            f"Machine: {machine()}. Tree: {args.files:,} tiny files, {args.per_dir} per "
            "directory, two levels, on the local disk; page cache warm for both. "
            "Database in a temp dir.",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
            f"Runs (interleaved, find first): rescans {[round(x * 1000) for x in scans]} ms, "
            f"find {[round(x * 1000) for x in finds]} ms. Load average at the end: "
            f"{os.getloadavg()[0]:.2f} (other work shared the machine; single runs vary "
            "by up to 2x, the ratio within a run much less).",
            "",
            "Notes:",
            "- The warm rescan reads no index rows: each directory listing is compared with "
            "an in-memory hash of what the index holds for it, trusted only while the "
            "directory's `dir_versions` row (bumped by triggers on any change, from any "
            "connection) is unchanged. The floor is the walk itself: `os.scandir` through a "
            "directory fd plus one `fstatat` per file, the same system calls as `find`.",
            "- After a daemon restart the summaries are empty, so the first rescan reads "
            "every directory's rows once (the 'after a restart' line); later rescans are "
            "warm again.",
            f"- RSS is `ru_maxrss` of this process: Python, pydantic, structlog, the queue "
            f"and the scanner, no model runtime. It was {rss_start:.0f} MB before the first "
            "scan: indexing 100,000 files adds a few MB, because the index lives in SQLite "
            "(page cache 2 MB per connection), not in Python objects.",
            "",
        ]
        print("\n".join(lines))  # paste into bench/README.md


if __name__ == "__main__":
    main()
