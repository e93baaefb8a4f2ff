"""Daemon memory without models: RSS of the real daemon with 100,000 images indexed.

Run: ``.venv/bin/python bench/bench_memory.py [--files 100000] [--per-dir 100]``

Builds (or reuses) the tree of tiny image-named files from ``bench/bench_scan.py``
(``bench/.data/tree-<N>``), starts ``python -m daemon run`` (via
``tests/daemonproc.py``) watching it with ``scan.on_start = true``,
``worker.preload = []`` and a ``wd_tagger`` model folder that holds no model, so the
load fails and no model runtime is ever loaded (the jobs wait in the queue). Once the
first scan is done (``status()["scans"]["last"][root]`` and ``files_indexed == N``)
it reads ``VmRSS``/``VmHWM`` from ``/proc/PID/status`` and counts the inotify watches
from ``/proc/PID/fdinfo``. Baseline, same run: a bare ``python -c "import daemon.app"``
process (imports only) measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_scan import build_tree, machine  # noqa: E402

from tests.daemonproc import DaemonProcess, wait_for  # noqa: E402

TARGET_MB = 150.0


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile in MB, and the thread count."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def inotify_watches(pid: int) -> int:
    """Inotify watches held by ``pid`` (one ``inotify wd:`` line per watch in fdinfo)."""
    n = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            text = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
        except OSError:
            continue
        n += sum(1 for line in text.splitlines() if line.startswith("inotify wd:"))
    return n


def mapped(pid: int, needle: str) -> bool:
    """Whether a shared object whose path contains ``needle`` is mapped into ``pid``."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def baseline(modules: str = "daemon.app") -> dict[str, float]:
    """A bare interpreter that imports ``modules`` and idles."""
    code = f"import {modules}, sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); input()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        return proc_status(proc.pid)
    finally:
        proc.communicate("\n", timeout=10)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--per-dir", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    tree = HERE / ".data" / f"tree-{args.files}"
    t = time.perf_counter()
    build_tree(tree, args.files, args.per_dir)
    print(f"tree {tree} ready in {time.perf_counter() - t:.1f} s")
    ndirs = sum(1 for _ in os.walk(tree))

    base = baseline()
    print(f"baseline `import daemon.app`: {base}")
    base_ort = baseline("daemon.app, onnxruntime")
    print(f"baseline `import daemon.app, onnxruntime`: {base_ort}")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mem-") as tmp:
        work = Path(tmp)
        no_model = work / "no-model"  # exists, holds no model.onnx: load fails
        no_model.mkdir()
        daemon = DaemonProcess(
            work,
            [tree],
            no_model,
            watch={"sidecar_extension": "txt", "settle_seconds": 2.0},
            sections={
                "worker": {"preload": [], "load_retry_seconds": 3600},
                "scan": {"on_start": True, "interval_seconds": 0},
            },
            env={"CAPTIOND_LOG_LEVEL": "info"},  # the file says debug; env wins
        )
        t_start = time.perf_counter()
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        try:
            t_healthy = time.perf_counter() - t_start
            name = tree.name

            def scanned() -> dict[str, object] | None:
                s = daemon.status()
                last = s["scans"]["last"].get(name)
                if last and s["files_indexed"] >= args.files and not s["scans"]["scanning"]:
                    return s
                return None

            status = wait_for(scanned, timeout=args.timeout, interval=0.25)
            t_done = time.perf_counter() - t_start
            time.sleep(1.0)  # let the worker notice the jobs and fail its model load
            status = daemon.status()
            mem = proc_status(pid)
            watches = inotify_watches(pid)
            ort_mapped = mapped(pid, "onnxruntime")
        finally:
            code = daemon.stop()
        if code != 0:
            raise SystemExit(f"daemon exited with {code}:\n{daemon.logs()[-4000:]}")
    load_after = os.getloadavg()

    last = status["scans"]["last"][name]
    gen = status["generators"]["wd_tagger"]
    watcher = status["watchers"].get(name, {})
    result: dict[str, object] = {
        "machine": machine(),
        "python": platform.python_version(),
        "files": args.files,
        "dirs": ndirs,
        "files_indexed": status["files_indexed"],
        "queue": status["queue"]["totals"],
        "scan": last,
        "generator_state": gen.get("state"),
        "generator_error": gen.get("last_error"),
        "daemon": mem,
        "baseline": base,
        "baseline_with_onnxruntime": base_ort,
        "inotify_watches": watches,
        "onnxruntime_mapped": ort_mapped,
        "watcher": watcher,
        "seconds_to_healthy": t_healthy,
        "seconds_to_first_scan_done": t_done,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    rss, hwm = mem["VmRSS"], mem["VmHWM"]
    print(f"{machine()}")
    print(f"tree: {args.files:,} files in {ndirs:,} dirs; indexed {status['files_indexed']:,}")
    print(f"queue: {status['queue']['totals']}; wd_tagger: {gen.get('state')}")
    print(
        f"first scan: {last.get('seconds', float('nan')):.2f} s in the scanner; "
        f"start -> scan done {t_done:.2f} s (healthy after {t_healthy:.2f} s)"
    )
    print(f"watcher: mode {watcher.get('mode')}, inotify watches held {watches:,}")
    print(
        f"daemon  VmRSS {rss:6.1f} MB  VmHWM {hwm:6.1f} MB  "
        f"(anon {mem['RssAnon']:.1f}, file {mem['RssFile']:.1f}, threads {mem['Threads']:.0f})"
    )
    print(
        f"baseline VmRSS {base['VmRSS']:6.1f} MB  VmHWM {base['VmHWM']:6.1f} MB  "
        "(python -c 'import daemon.app')"
    )
    print(
        f"baseline VmRSS {base_ort['VmRSS']:6.1f} MB  with onnxruntime imported too "
        f"(mapped into the daemon: {ort_mapped}; the failed load imports it)"
    )
    print(f"index + watcher + threads add {rss - base['VmRSS']:.1f} MB (VmRSS)")
    verdict = "met" if max(rss, hwm) <= TARGET_MB else "NOT met"
    print(f"target VmRSS <= {TARGET_MB:.0f} MB: {verdict} (peak {hwm:.1f} MB)")
    print(f"load average before/after: {load_before} / {load_after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
