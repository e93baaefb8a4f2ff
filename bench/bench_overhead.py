"""captiond's own cost per image, beside the I/O it cannot avoid (issue 19).

Run: ``.venv/bin/python bench/bench_overhead.py [--images 3000] [--rounds 3]
[--batch-size 32] [--json FILE]`` (prints Markdown for bench/README.md).

Workload: ``--images`` small JPEGs (64x48, noise; generated once into
``bench/.data/overhead``), hard-linked into a fresh folder for every measurement.
Everything below runs in the same run, alternating, ``--rounds`` times; ratios are
taken within a round.

- **plain I/O loop** (one thread): read each file, hash it (XXH3, captiond's
  ``content_hash``), decode it (``decode_image``), write its sidecar atomically (temp
  file, fsync, rename, folder fsync). The I/O captiond cannot avoid.
- **plain model loop** (one thread): decode, preprocess with the WD tagger's own
  ``prepare()`` and run the tiny WD test model (``tests/wdmodel.py``) in batches of 8,
  onnxruntime on one thread. What one core does without captiond.
- **--once**: ``captiond caption DIR --once --fresh`` in a subprocess, with the null
  generator (``tests.fakegen:NullGenerator``: a fixed caption, pixels unseen) and with
  the tiny WD model. Timed from the command's start to its exit; the same command over
  an empty folder is timed too (start-up: imports, model load) and reported beside it.
- **daemon**: ``captiond run`` (``tests/daemonproc.py``) watching an empty folder; the
  images are hard-linked in at once and the time runs until the last sidecar appears
  (seen through inotify). The daemon's CPU per thread (``/proc``), per stage
  (``/status``'s ``stage_cpu_seconds``) and the watcher's events per file are read
  before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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

import numpy as np  # noqa: E402
from bench_e2e import Dropper, cpu_by_thread, thread_cpu, thread_names  # noqa: E402
from bench_tagging import machine  # noqa: E402
from PIL import Image  # noqa: E402

from daemon.hashing import content_hash  # noqa: E402
from daemon.pipeline.images import decode_image  # noqa: E402
from daemon.pipeline.stages import ORDER  # noqa: E402
from tests.daemonproc import DaemonProcess, register_generators, wait_for  # noqa: E402

DATA = HERE / ".data" / "overhead"
NULL = {"null": "tests.fakegen:NullGenerator"}


def ensure_images(n: int) -> list[Path]:
    folder = DATA / f"small-{n}"
    paths = [folder / f"img{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(19)
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(p, quality=90)
    return paths


def ensure_model() -> Path:
    from tests.wdmodel import build_wd_model

    folder = DATA / "wd_tiny"
    if not (folder / "model.onnx").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_wd_model(folder)
    return folder


def fresh_copy(sources: Sequence[Path], work: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="set-", dir=work))
    for src in sources:
        os.link(src, folder / src.name)
    return folder


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- baselines (this process, one thread) ---------------------------------------------


def plain_io(folder: Path) -> tuple[float, float]:
    """images/s and CPU ms per image of read, hash, decode, atomic sidecar write."""
    files = sorted(folder.iterdir())
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    c0, t0 = cpu_self(), time.perf_counter()
    for i, f in enumerate(files):
        data = f.read_bytes()
        content_hash(data)
        decode_image(data)
        tmp = f"{f.stem}.{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
        os.write(fd, b"1girl, solo, simple background\n")
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, f"{f.stem}.txt", src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    seconds, cpu = time.perf_counter() - t0, cpu_self() - c0
    os.close(dfd)
    return len(files) / seconds, cpu / len(files) * 1000


def plain_model(folder: Path, model_dir: Path) -> tuple[float, float]:
    """images/s and CPU ms per image of decode, WD prepare and the model, one thread."""
    from daemon.generators.base import ImageInput
    from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig

    gen = WDTagger(WDTaggerConfig(model=str(model_dir), providers=["cpu"], intra_op_threads=1))
    gen.load()
    files = sorted(folder.iterdir())
    c0, t0 = cpu_self(), time.perf_counter()
    batch: list = []
    for f in files:
        image = decode_image(
            f.read_bytes(), draft_size=gen.draft_size, draft_longer_side=gen.draft_longer_side
        )
        batch.append(gen.prepare(ImageInput(f, image)))
        if len(batch) == 8:
            gen.generate(batch)
            batch = []
    if batch:
        gen.generate(batch)
    seconds, cpu = time.perf_counter() - t0, cpu_self() - c0
    gen.unload()
    return len(files) / seconds, cpu / len(files) * 1000


# -- captiond ----------------------------------------------------------------------------


def write_config(work: Path, model_dir: Path, batch_size: int) -> Path:
    cfg = work / "once.toml"
    cfg.write_text(
        f'state_dir = "{work / "state-unused"}"\nlog_level = "warning"\n'
        f"[worker]\nbatch_size = {batch_size}\npreload = []\n"
        f'[generators.wd_tagger]\nmodel = "{model_dir}"\nproviders = ["cpu"]\n'
    )
    return cfg


def once(folder: Path, generator: str, cfg: Path, plugins: Path) -> tuple[float, float]:
    """Seconds and CPU seconds (the child's) of ``caption DIR --once --fresh``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), str(ROOT), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = env["YOLO_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "daemon", "--config", str(cfg), "caption", str(folder)]
    cmd += ["--once", "--fresh", "--generator", generator, "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"--once failed ({out.returncode}):\n{out.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu


class Daemon:
    """One daemon for a generator, watching an empty folder; rounds drop images in."""

    def __init__(self, work: Path, generator: str, model_dir: Path, batch_size: int):
        self.watched = work / f"watched-{generator}"
        self.watched.mkdir()
        (self.watched / "KEEP").write_text("an empty root would look unmounted\n")
        self.generator = generator
        (work / f"daemon-{generator}").mkdir()
        self.proc = DaemonProcess(
            work / f"daemon-{generator}",
            [self.watched],
            model_dir,
            watch={"settle_seconds": 0.2, "generators": [generator]},
            sections={
                "worker": {"batch_size": batch_size, "preload": [generator]},
                "generators.wd_tagger": {"providers": ["cpu"]},
            },
            env={"CAPTIOND_LOG_LEVEL": "warning"},
            generators=NULL if generator == "null" else None,
        )
        self.proc.start()
        wait_for(
            lambda: self.proc.status()["generators"][generator]["state"] == "loaded",
            timeout=120,
            interval=0.05,
        )
        self.drop = Dropper(self.watched, self.proc)
        self.pid = self.proc.proc.pid if self.proc.proc else 0
        self.names: dict[int, str] = {}

    def round(self, sources: Sequence[Path]) -> dict[str, object]:
        status = self.proc.status()
        events0 = sum(w.get("events_seen", 0) for w in status["watchers"].values())
        stages0 = status["worker"]["stage_cpu_seconds"]
        cpu0 = thread_cpu(self.pid)
        t0 = time.perf_counter()
        self.drop(sources)
        seconds = time.perf_counter() - t0
        cpu1 = thread_cpu(self.pid)
        wait_for(lambda: self._idle(), timeout=60, interval=0.1)
        status = self.proc.status()
        events = sum(w.get("events_seen", 0) for w in status["watchers"].values()) - events0
        stages1 = status["worker"]["stage_cpu_seconds"]
        if not self.names:
            self.names = thread_names(self.pid)
        per_thread = cpu_by_thread(cpu0, cpu1, self.names)
        n = len(sources)
        return {
            "rate": n / seconds,
            "seconds": seconds,
            "cpu_ms": sum(per_thread.values()) / n * 1000,
            "events_per_file": events / n,
            "stages_ms": {k: (stages1.get(k, 0) - stages0.get(k, 0)) / n * 1000 for k in ORDER},
            "threads_ms": {k: v / n * 1000 for k, v in per_thread.items()},
        }

    def _idle(self) -> bool:
        totals = self.proc.status()["queue"]["totals"]
        return not totals.get("pending") and not totals.get("leased")

    def clear(self) -> None:
        """Empty the watched folder between rounds (the daemon forgets the files)."""
        for f in self.watched.iterdir():
            if f.name != "KEEP":
                f.unlink()
        wait_for(lambda: self.proc.status()["files_indexed"] == 0, timeout=60, interval=0.1)

    def close(self) -> None:
        self.drop.close()
        self.proc.stop()


def burst(n: int, batch_size: int) -> dict[str, object]:
    """One drop of ``n`` images into each daemon (null, tiny WD): drop to last sidecar,
    events per file, failures."""
    sources = ensure_images(n)
    model_dir = ensure_model()
    out: dict[str, object] = {}
    m = machine()
    print(f"\n### Burst of {n}: {time.strftime('%Y-%m-%d')}, {m['cpu']}, {m['cores']} cores\n")
    print("| generator | images/s | seconds | CPU ms/image | events per file | failed | load |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="overhead-", dir=HERE / ".data") as tmp:
        for gen in ("null", "wd_tagger"):
            d = Daemon(Path(tmp), gen, model_dir, batch_size)
            try:
                r = d.round(sources)
                totals = d.proc.status()["queue"]["totals"]
                failed = totals.get("failed", 0) + totals.get("dead", 0)
            finally:
                d.close()
            out[gen] = r | {"failed": failed}
            print(
                f"| {gen} | {r['rate']:.0f} | {r['seconds']:.1f} | {r['cpu_ms']:.2f} | "
                f"{r['events_per_file']:.1f} | {failed} | {os.getloadavg()[0]:.1f} |"
            )
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="worker.batch_size")
    ap.add_argument("--skip-daemon", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--burst", type=int, default=0, help="only the daemons, one drop of this many images"
    )
    args = ap.parse_args(argv)
    if args.burst:
        return burst(args.burst, args.batch_size)

    sources = ensure_images(args.images)
    model_dir = ensure_model()
    load = [os.getloadavg()[0]]
    results: dict[str, list] = {k: [] for k in (
        "plain_io", "plain_model", "once_null", "once_tiny", "daemon_null", "daemon_tiny",
    )}  # fmt: skip
    startup: dict[str, list[float]] = {"null": [], "wd_tagger": []}
    with tempfile.TemporaryDirectory(prefix="overhead-", dir=HERE / ".data") as tmp:
        work = Path(tmp)
        plugins = register_generators(work / "plugins", NULL)
        cfg = write_config(work, model_dir, args.batch_size)
        empty = work / "empty"
        empty.mkdir()
        daemons: dict[str, Daemon] = {}
        if not args.skip_daemon:
            daemons = {
                g: Daemon(work, g, model_dir, args.batch_size) for g in ("null", "wd_tagger")
            }
            for d in daemons.values():  # a warm-up round each
                d.round(sources[:200])
                d.clear()
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
                folder = fresh_copy(sources, work)
                results["plain_io"].append(plain_io(folder))
                shutil.rmtree(folder)
                folder = fresh_copy(sources, work)
                results["plain_model"].append(plain_model(folder, model_dir))
                shutil.rmtree(folder)
                for gen, key in (("null", "once_null"), ("wd_tagger", "once_tiny")):
                    startup[gen].append(once(empty, gen, cfg, plugins)[0])
                    folder = fresh_copy(sources, work)
                    results[key].append(once(folder, gen, cfg, plugins))
                    shutil.rmtree(folder)
                for gen, key in (("null", "daemon_null"), ("wd_tagger", "daemon_tiny")):
                    if gen in daemons:
                        results[key].append(daemons[gen].round(sources))
                        daemons[gen].clear()
                load.append(os.getloadavg()[0])
        finally:
            for d in daemons.values():
                d.close()
    report = summarise(args, results, startup, load)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "startup": startup}, indent=1))
    return report


def summarise(
    args: argparse.Namespace,
    results: dict[str, list],
    startup: dict[str, list[float]],
    load: list[float],
) -> dict[str, object]:
    n = args.images
    m = machine()
    print(f"\n### {time.strftime('%Y-%m-%d')}, {m['cpu']}, {m['cores']} cores\n")
    print(
        f"Python {m['python']}, onnxruntime {m['onnxruntime']}, Pillow {m['pillow']}; "
        f"{n} images of 64x48, worker.batch_size {args.batch_size}, {args.rounds} rounds; "
        f"load average {min(load):.1f}-{max(load):.1f}.\n"
    )
    io = [r[0] for r in results["plain_io"]]
    model = [r[0] for r in results["plain_model"]]
    print("| what | images/s (median) | runs | CPU ms/image | vs plain I/O | vs model loop |")
    print("|---|---|---|---|---|---|")

    def row(name: str, rates: list[float], cpu: list[float]) -> None:
        ratios_io = [rates[i] / io[i] for i in range(len(rates))]
        ratios_model = [rates[i] / model[i] for i in range(len(rates))]
        print(
            f"| {name} | {median(rates):.0f} | {', '.join(f'{x:.0f}' for x in rates)} | "
            f"{median(cpu):.2f} | {median(ratios_io):.2f}x | {median(ratios_model):.2f}x |"
        )

    row("plain I/O loop (1 thread)", io, [r[1] for r in results["plain_io"]])
    row("plain model loop, tiny WD (1 thread)", model, [r[1] for r in results["plain_model"]])
    for key, gen, label in (("once_null", "null", "--once, null"),
                            ("once_tiny", "wd_tagger", "--once, tiny WD")):  # fmt: skip
        runs = results[key]
        rates = [n / s for s, _ in runs]
        net = [n / max(1e-9, s - startup[gen][i]) for i, (s, _) in enumerate(runs)]
        row(label, rates, [c / n * 1000 for _, c in runs])
        row(label + " (start-up taken off)", net, [c / n * 1000 for _, c in runs])
    for key, label in (("daemon_null", "daemon, null"), ("daemon_tiny", "daemon, tiny WD")):
        runs = results[key]
        if runs:
            row(label + " (drop to last sidecar)", [r["rate"] for r in runs],
                [r["cpu_ms"] for r in runs])  # fmt: skip
    for key, label in (("daemon_null", "null"), ("daemon_tiny", "tiny WD")):
        runs = results[key]
        if not runs:
            continue
        print(f"\nDaemon, {label}: events per file "
              f"{median([r['events_per_file'] for r in runs]):.1f}; CPU ms per image by stage "
              "(thread CPU, median of rounds):\n")  # fmt: skip
        print("| " + " | ".join(ORDER) + " |")
        print("|" + "---|" * len(ORDER))
        print("| " + " | ".join(
            f"{median([r['stages_ms'][k] for r in runs]):.3f}" for k in ORDER) + " |")  # fmt: skip
        threads = runs[-1]["threads_ms"]
        print("\nBy thread (last round), CPU ms per image: " + ", ".join(
            f"{k} {v:.2f}" for k, v in threads.items() if v >= 0.005))  # fmt: skip
    print(f"\nStart-up (--once over an empty folder): null {median(startup['null']):.2f} s, "
          f"tiny WD {median(startup['wd_tagger']):.2f} s")  # fmt: skip
    return {"results": results, "startup": startup}


if __name__ == "__main__":
    main()
