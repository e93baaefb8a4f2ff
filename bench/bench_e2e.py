"""End-to-end tagging through the real daemon: drop -> sidecar, model warm, vs the floor.

Run: ``.venv/bin/python bench/bench_e2e.py [--images 64] [--rounds 5] [--decode-workers 2]
[--py-spy FILE] [--json FILE]``

1. Baselines in this run, by ``bench/bench_tagging.py``'s own code (its ``main``):
   ``t_model`` (bare ``session.run`` per image at batch 8 on pre-decoded tensors),
   ``t_prep`` (fastest standalone decode + prepare per image), decode+prepare
   throughput with 1 and 2 threads, and the floor ``1 / (t_model + t_prep / cores)``.
2. The in-process pipeline ceiling (:func:`pipeline_ceiling`): the worker's own stages
   (read, decode, prepare, hash in 2 threads; generate at batch 8) with no queue,
   watcher, SQLite or sidecar writes, the model loaded exactly as the daemon loads it
   (``session.intra_op.allow_spinning = 0`` since the daemon set it), best of 3. It
   separates the daemon's overhead from what the floor formula assumes (perfect
   sharing of the cores).
3. The real daemon (``python -m daemon run`` via ``tests/daemonproc.py``) on an empty
   watched folder with the realistic WD-contract model, batch_size 8, decode_workers 2,
   settle_seconds 0.2, log level info. Once ``status()`` says the model is loaded, a
   warm-up round is dropped, then ``--rounds`` measured rounds of ``--images`` images
   (camera-sized JPEGs and large PNGs from ``bench/.data``, 3:1 like the baseline),
   hard-linked in at once under unique names. Each round is timed by
   ``bench_tagging.end_to_end_vs_floor`` from the first link until the last sidecar
   exists (seen through inotify, so the benchmark itself takes no CPU while it
   waits). Nothing is subtracted; the fixed latency before the first job (settle) is
   reported beside it.
4. Before each round, while the daemon is idle, ``t_model``, ``t_prep`` and the floor
   are measured again (``bench_tagging.floor_now``) and the round is compared with
   that floor: this host's speed drifts by 20-30% within minutes, so a single floor
   from the start of the run decides more than the daemon does. The first floor is
   still printed. The daemon's CPU per thread and the whole machine's busy share
   (/proc/stat) are reported per round.

``--py-spy FILE`` records the daemon with py-spy (``--idle --threads``, raw folded
stacks) during one extra round and prints the top frames.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_tagging  # noqa: E402
from bench_tagging import EndToEnd, end_to_end_vs_floor, ensure_data, floor_now  # noqa: E402
from watchdog.events import FileSystemEvent, FileSystemEventHandler  # noqa: E402
from watchdog.observers.inotify import InotifyObserver  # noqa: E402

from tests.daemonproc import DaemonProcess, wait_for  # noqa: E402

SETTLE = 0.2
SIDECAR_EXT = "txt"  # DaemonProcess's default sidecar_extension


def sidecar_of(image: Path) -> Path:
    return image.with_suffix("." + SIDECAR_EXT)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


class Dropper:
    """Hard-links source images into the watched folder and waits for their sidecars.

    The sidecars are noticed through inotify (watchdog), not by polling: an earlier
    version stat'ed every missing sidecar every 10 ms, which on 2 cores took several
    percent of the CPU away from the daemon it was timing."""

    def __init__(self, watched: Path, daemon: DaemonProcess, timeout: float = 600.0):
        self.watched = watched
        self.daemon = daemon
        self.timeout = timeout
        self.round = 0
        self.first_sidecar_s: float | None = None
        self.appeared: list[float] = []
        self._lock = threading.Lock()
        self._waiting: set[str] = set()
        self._times: list[float] = []
        self._t0 = 0.0
        self._all_in = threading.Event()
        handler = _SidecarHandler(self._seen)
        self._observer = InotifyObserver()
        self._observer.schedule(handler, str(watched), recursive=False)
        self._observer.start()

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(5)

    def _seen(self, path: str) -> None:
        now = time.perf_counter() - self._t0
        with self._lock:
            if path in self._waiting:
                self._waiting.discard(path)
                self._times.append(now)
                if not self._waiting:
                    self._all_in.set()

    def __call__(self, images: Sequence[Path]) -> None:
        self.round += 1
        names = [
            self.watched / f"r{self.round:02d}_{i:03d}_{src.name}" for i, src in enumerate(images)
        ]
        with self._lock:
            self._waiting = {str(sidecar_of(dst)) for dst in names}
            self._times = []
            self._all_in.clear()
        self._t0 = time.perf_counter()
        for src, dst in zip(images, names, strict=True):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        deadline = time.monotonic() + self.timeout
        while not self._all_in.wait(1.0):  # one status request a second: fail fast
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._waiting)} sidecars missing after {self.timeout}s")
            assert self.daemon.proc is not None
            if self.daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.daemon.logs()[-4000:]}")
            status = self.daemon.status()
            totals = status["queue"]["totals"]
            if totals.get("failed", 0) or totals.get("dead", 0):
                errors = status["recent_errors"][:3]
                raise RuntimeError(f"jobs failed, sidecars will not come: {errors}")
        with self._lock:
            self.appeared = sorted(self._times)
        self.first_sidecar_s = self.appeared[0]


class _SidecarHandler(FileSystemEventHandler):
    """Sidecars arrive by rename (temp file, then ``os.replace``) or, in principle, by
    create: both count; the path must be one the round waits for."""

    def __init__(self, seen: Callable[[str], None]):
        self.seen = seen

    def on_moved(self, event: FileSystemEvent) -> None:
        self.seen(os.fsdecode(event.dest_path))

    def on_created(self, event: FileSystemEvent) -> None:
        self.seen(os.fsdecode(event.src_path))


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread id of ``pid``."""
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from ``py-spy dump`` (empty without py-spy)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {}
    try:
        out = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    names = {}
    for line in out.splitlines():
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            if tid.isdigit():
                names[int(tid)] = line.split('"')[1]
    return names


def cpu_by_thread(
    before: dict[int, float], after: dict[int, float], names: dict[int, str]
) -> dict[str, float]:
    """CPU seconds per thread over an interval; unnamed threads are native
    (onnxruntime's intra-op pool) or Python threads that ended before the dump."""
    per: collections.Counter[str] = collections.Counter()
    for tid, t in after.items():
        d = t - before.get(tid, 0.0)
        if d <= 0:
            continue
        name = names.get(tid, "native/unnamed")
        if name.startswith("Thread-"):
            name = "Thread-N (server requests)"
        per[name] += d
    return dict(per.most_common())


def pipeline_ceiling(
    model_dir: Path, images: Sequence[Path], *, workers: int = 2
) -> tuple[float, float]:
    """The worker's stages with nothing else: (images/s, CPU utilisation of all cores).

    In this process, every image is queued on a ``workers``-thread pool at once (read,
    ``decode_image`` with draft, ``WDTagger.prepare``, ``content_hash``, as in
    ``Worker._prepare``) while this thread runs ``WDTagger.generate`` on batches of 8
    in order, exactly as the daemon would if queue, watcher, SQLite and sidecar writes
    cost nothing. The model is loaded by ``WDTagger.load`` itself, so with the daemon's
    session options (no intra-op spinning).
    """
    from daemon.generators.base import ImageInput
    from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig
    from daemon.hashing import content_hash
    from daemon.pipeline.images import decode_image

    gen = WDTagger(WDTaggerConfig(model=str(model_dir), providers=["cpu"]))
    gen.load()

    def prep(p: Path) -> object:
        data = p.read_bytes()
        out = gen.prepare(
            ImageInput(p, decode_image(data, draft_size=gen.draft_size, draft_longer_side=True))
        )
        content_hash(data)
        return out

    with ThreadPoolExecutor(workers) as pool:
        gen.generate(list(pool.map(prep, images[:8])))  # warm-up
        c0, t0 = os.times(), time.perf_counter()
        futures = [pool.submit(prep, p) for p in images]
        for i in range(0, len(futures), 8):
            gen.generate([f.result() for f in futures[i : i + 8]])
        wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return len(images) / wall, cpu / (wall * (os.cpu_count() or 1))


def wait_idle(daemon: DaemonProcess, timeout: float = 120.0) -> None:
    wait_for(daemon.idle, timeout=timeout, interval=0.1)


def py_spy_top(raw: Path, n: int = 25) -> list[tuple[str, float]]:
    """Own-time share per leaf frame from py-spy's raw (folded) output."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        own[stack.split(";")[-1]] += c
    return [(frame, c / total) for frame, c in own.most_common(n)] if total else []


def py_spy_threads(raw: Path) -> dict[str, float]:
    """Share of samples per thread (first folded frame is the thread with --threads)."""
    per: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        per[stack.split(";")[0]] += int(count)
        total += int(count)
    return {k: v / total for k, v in per.most_common()} if total else {}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images per measured round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="baseline repeats (bench_tagging)")
    ap.add_argument("--py-spy", type=Path, help="record one extra round with py-spy here")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--decode-workers", type=int, default=2, help="worker.decode_workers")
    args = ap.parse_args(argv)

    sources, model_dir = ensure_data(12, 4)
    cores = os.cpu_count() or 1

    print("== baselines (bench_tagging.main, same run) ==")
    base = bench_tagging.main(["--jpegs", "12", "--pngs", "4", "--repeat", str(args.repeat)])
    t_model, t_prep = float(base["t_model"]), float(base["t_prep"])  # type: ignore[arg-type]
    floor = 1 / (t_model + t_prep / cores)
    bare_model = 1 / t_model

    images = [sources[i % len(sources)] for i in range(args.images)]
    ceiling_runs: list[tuple[float, float]] = []
    for _ in range(3):
        rate, util = pipeline_ceiling(model_dir, images)
        ceiling_runs.append((rate, util))
        print(f"in-process pipeline: {rate:.2f} img/s, CPU {util:.0%} of {cores} cores")
    ceiling = max(ceiling_runs)
    from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig

    floor_gen = WDTagger(WDTaggerConfig(model=str(model_dir), providers=["cpu"]))
    floor_gen.load()
    blobs = {p: p.read_bytes() for p in sources}
    print("\n== daemon end to end ==")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="e2e-", dir=HERE / ".data") as tmp:
        work = Path(tmp)
        watched = work / "dataset"
        watched.mkdir()
        daemon = DaemonProcess(
            work,
            [watched],
            model_dir,
            watch={"settle_seconds": SETTLE, "sidecar_extension": SIDECAR_EXT},
            sections={
                "worker": {
                    "batch_size": 8,
                    "decode_workers": args.decode_workers,
                    "preload": ["wd_tagger"],
                },
                "generators.wd_tagger": {"providers": ["cpu"]},
            },
            # DaemonProcess writes log_level = "debug"; a second key in `top` would be a
            # duplicate TOML key (a parse error), and the environment beats the file.
            env={"CAPTIOND_LOG_LEVEL": "info"},
        )
        daemon.start()
        try:
            t_load = time.perf_counter()
            wait_for(
                lambda: daemon.status()["generators"]["wd_tagger"]["state"] == "loaded",
                timeout=120,
                interval=0.05,
            )
            wait_idle(daemon)
            print(
                f"model loaded and first scan done {time.perf_counter() - t_load:.2f} s after start"
            )
            drop = Dropper(watched, daemon)

            warm = end_to_end_vs_floor(drop, sources, floor)
            wait_idle(daemon)
            print(f"warm-up: {warm.images} images in {warm.seconds:.2f} s")

            runs: list[EndToEnd] = []
            firsts: list[float] = []
            steady: list[float] = []
            pid = daemon.proc.pid if daemon.proc else 0
            names = thread_names(pid)
            utilisation: list[float] = []
            busy: list[float] = []  # the whole machine, from /proc/stat
            per_thread: dict[str, float] = {}
            floors: list[tuple[float, float, float]] = []
            for r in range(args.rounds):
                # The floor again, just before the round (the daemon is idle): this host's
                # speed drifts by 20-30% within minutes, so each round is compared with
                # a baseline from the same moment.
                floors.append(floor_now(floor_gen, model_dir, blobs))
                cpu0, sys0 = thread_cpu(pid), machine_cpu()
                res = end_to_end_vs_floor(drop, images, floors[-1][2])
                cpu1, sys1 = thread_cpu(pid), machine_cpu()
                busy.append((sys1[0] - sys0[0]) / max(1, sys1[1] - sys0[1]))
                per_thread = cpu_by_thread(cpu0, cpu1, names)
                used = sum(per_thread.values())
                utilisation.append(used / (res.seconds * cores))
                wait_idle(daemon)
                runs.append(res)
                assert drop.first_sidecar_s is not None
                firsts.append(drop.first_sidecar_s)
                # Rate after the first sidecar: excludes settle and the first batch.
                span = drop.appeared[-1] - drop.appeared[0]
                first_n = drop.appeared.count(drop.appeared[0])
                steady.append((len(drop.appeared) - first_n) / span if span > 0 else 0.0)
                print(
                    f"round {r + 1}: {res.images} images in {res.seconds:.2f} s = "
                    f"{res.images_per_s:.2f} img/s, {res.fraction_of_floor:.2f} of the floor "
                    f"measured before it ({floors[-1][2]:.2f} img/s: t_model "
                    f"{floors[-1][0] * 1000:.1f} ms, t_prep {floors[-1][1] * 1000:.1f} ms); "
                    f"first sidecar after {drop.first_sidecar_s:.2f} s; "
                    f"daemon CPU {used:.2f} s = {utilisation[-1]:.0%} of {cores} cores; "
                    f"load {os.getloadavg()[0]:.2f}"
                )

            spy: dict[str, object] = {}
            if args.py_spy:
                spy = profile_round(daemon, drop, images, floor, args.py_spy)

            status = daemon.status()
            outcomes = status["queue"]["outcomes"]
            drop.close()
        finally:
            code = daemon.stop()
        if code != 0:
            print(daemon.logs()[-4000:])
            raise SystemExit(f"daemon exited with {code}")
    load_after = os.getloadavg()

    rates = [r.images_per_s for r in runs]
    best = max(runs, key=lambda r: r.images_per_s)
    med_rate = statistics.median(rates)
    round_ratios = [r.fraction_of_floor for r in runs]
    fixed = SETTLE  # the watcher wakes when a file is due (no tick to wait for)
    result: dict[str, object] = {
        "machine": base["machine"],
        "cores": cores,
        "images_per_round": args.images,
        "mix": f"{sum(p.suffix == '.jpg' for p in images)} JPEG 3000x2000 + "
        f"{sum(p.suffix == '.png' for p in images)} PNG 2400x1600",
        "t_model_ms": t_model * 1000,
        "t_prep_ms": t_prep * 1000,
        "floor_img_s": floor,
        "bare_model_img_s": bare_model,
        "prep_threads_img_s": base["prep_threads_img_s"],
        "t_naive_ms": float(base["t_naive"]) * 1000,  # type: ignore[arg-type]
        "t_decode_full_jpeg_ms": float(base["t_decode_full_jpeg"]) * 1000,  # type: ignore[arg-type]
        "t_decode_png_ms": float(base["t_decode_png"]) * 1000,  # type: ignore[arg-type]
        "pipeline_ceiling_img_s_util": ceiling,
        "pipeline_ceiling_runs": ceiling_runs,
        "daemon_vs_ceiling_best": best.images_per_s / ceiling[0],
        "rounds_img_s": rates,
        "rounds_seconds": [r.seconds for r in runs],
        "first_sidecar_s": firsts,
        "steady_img_s_after_first_sidecar": steady,
        "daemon_img_s_best": best.images_per_s,
        "daemon_img_s_median": med_rate,
        "ratio_best": best.images_per_s / floor,
        "ratio_median": med_rate / floor,
        "round_floors": [
            {"t_model_ms": a * 1000, "t_prep_ms": b * 1000, "floor_img_s": c} for a, b, c in floors
        ],
        "round_ratios_vs_own_floor": round_ratios,
        "round_ratio_median": statistics.median(round_ratios),
        "daemon_cpu_utilisation": utilisation,
        "machine_cpu_busy": busy,
        "last_round_cpu_s_by_thread": per_thread,
        "settle_s": fixed,
        "settle_share_of_best_round": fixed / best.seconds,
        "outcomes": outcomes,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        **({"py_spy": spy} if spy else {}),
    }
    print()
    print(f"floor 1/(t_model + t_prep/{cores})  {floor:6.2f} img/s")
    print(f"bare model (1/t_model, batch 8)   {bare_model:6.2f} img/s")
    print(
        f"in-process pipeline ceiling       {ceiling[0]:6.2f} img/s "
        f"(best of 3, CPU {ceiling[1]:.0%})"
    )
    print(f"daemon, rounds                    {', '.join(f'{x:.2f}' for x in rates)} img/s")
    print(
        f"daemon / first floor              best {best.images_per_s / floor:.2f}, "
        f"median {med_rate / floor:.2f}; best / ceiling {best.images_per_s / ceiling[0]:.2f}"
    )
    print(f"floors before each round          {', '.join(f'{c:.2f}' for _, _, c in floors)} img/s")
    print(
        f"daemon / floor of its round       {', '.join(f'{x:.2f}' for x in round_ratios)}; "
        f"median {statistics.median(round_ratios):.2f} (target >= 0.9)"
    )
    print(
        f"fixed latency settle {SETTLE} s"
        f" = {fixed / best.seconds:.0%} of the best round ({best.seconds:.2f} s); "
        f"first sidecar after {', '.join(f'{x:.2f}' for x in firsts)} s"
    )
    print(f"rate after the first sidecar      {', '.join(f'{x:.2f}' for x in steady)} img/s")
    print(f"daemon CPU / (wall x {cores} cores)  {', '.join(f'{u:.0%}' for u in utilisation)}")
    print(f"machine CPU busy (/proc/stat)    {', '.join(f'{u:.0%}' for u in busy)}")
    print("last round, daemon CPU seconds by thread:")
    for name, sec in per_thread.items():
        print(f"  {sec:6.2f} s  {name}")
    print(f"outcomes: {outcomes}")
    print(f"load average before/after: {load_before} / {load_after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def profile_round(
    daemon: DaemonProcess, drop: Dropper, images: Sequence[Path], floor: float, out: Path
) -> dict[str, object]:
    assert daemon.proc is not None
    spy_bin = Path(sys.executable).parent / "py-spy"
    spy = subprocess.Popen(
        [
            str(spy_bin),
            "record",
            "--pid",
            str(daemon.proc.pid),
            "--format",
            "raw",
            "--threads",
            "--native",
            "--rate",
            "200",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # let py-spy attach
    res = end_to_end_vs_floor(drop, images, floor)
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    _, err = spy.communicate(timeout=60)
    wait_idle(daemon)
    print(
        f"profiled round: {res.images_per_s:.2f} img/s ({res.fraction_of_floor:.2f} of floor, "
        "py-spy attached)"
    )
    if not out.exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        return {}
    threads = py_spy_threads(out)
    top = py_spy_top(out)
    print("py-spy samples per thread:")
    for name, share in threads.items():
        print(f"  {share:6.1%}  {name}")
    print("py-spy own time per frame (top):")
    for frame, share in top:
        print(f"  {share:6.1%}  {frame}")
    return {"threads": threads, "top": top, "img_s": res.images_per_s}


if __name__ == "__main__":
    main()
