"""The backfill on Ray (``captiond backfill``): scaling, overhead against the daemon,
and the driver at a backlog of 1,000,000 jobs.

Run: ``.venv/bin/python bench/bench_backfill.py [--images 256] [--rounds 2]
[--jobs 1000000] [--real 20000] [--json FILE]``

1. **Scaling.** One local Ray instance (``num_cpus=2``, no dashboard). The same
   ``--images`` camera-sized JPEGs (``bench/.data``, hard-linked under new names into
   a fresh folder and state each time) through a backfill with 1 actor and with 2
   actors (1 CPU each, onnxruntime ``intra_op_threads`` = 1), the realistic
   WD-contract model, batch 8, chunks of 32; ``--rounds`` alternating rounds. Steady
   rate: images recorded / time from the first result to the last; end to end: the
   whole ``run()`` (pool start and model load included, Ray's init not).
2. **Overhead.** The same images through the daemon's own worker in-process
   (``captiond caption --once``: scan, queue, worker with 2 decode threads and
   onnxruntime's default threads, sidecars) in the same run. Steady rate from its
   progress callback (first image done -> last). Ray's fixed cost per run: ``ray.init``,
   the time to the first result (actor processes, imports, model load, one chunk), and
   ``ray.shutdown``, each measured.
3. **Planning at scale.** A state database with ``--jobs`` pending jobs, of which
   ``--real`` are small real images (the rest name files that do not exist, queued
   behind them); a backfill with ``--limit --real`` and 2 actors running the tiny WD
   model (next to no compute, so the driver and Ray are what is measured). Reported:
   counting the claimable backlog, the time to the first planned chunk and to the first
   result, the driver's CPU time per image in planning (lease + plan) and in recording
   (finish + acks) and the rate they allow, the driver's RSS (before, peak), and Ray
   Data's cost for the 3,907 tokens a 1,000,000-image run has (an identity actor pool).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (HERE, ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_tagging  # noqa: E402
from cpuinfo import cpu_name  # noqa: E402

from daemon.backfill.driver import Backfill, BackfillOptions, ray_executor  # noqa: E402
from daemon.oneshot import run_once  # noqa: E402
from tests.backfillkit import Site  # noqa: E402
from tests.wdmodel import build_wd_model  # noqa: E402

DATA = HERE / ".data"


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def fresh_site(base: Path, sources: list[Path], n: int, model: Path) -> Site:
    site = Site(base, model)
    text = site.config.read_text().replace("batch_size = 4", "batch_size = 8")
    site.config.write_text(text)  # the daemon's batch = the actors' batch
    for i in range(n):
        src = sources[i % len(sources)]
        dst = site.root / f"d{i // 100:03d}" / f"img{i:05d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    return site


def one_backfill(site: Site, actors: int) -> dict[str, float]:
    site.scan()
    opts = BackfillOptions(actors=actors, batch_size=8, chunk_size=32)
    bf = Backfill(site.settings(), opts)
    marks: list[tuple[float, int]] = []
    record = bf.record

    def timed(*a: Any, **k: Any) -> None:
        record(*a, **k)
        marks.append((time.monotonic(), len(a[2])))

    bf.record = timed  # type: ignore[method-assign]
    t0 = time.monotonic()
    p = bf.run(make_executor=ray_executor(opts))
    wall = time.monotonic() - t0
    assert p.state == "finished" and not p.failures, (p.state, p.message, p.failures)
    marks.sort()
    after_first = sum(n for _, n in marks[1:])
    return {
        "images": p.done,
        "wall_s": wall,
        "steady_img_s": after_first / (marks[-1][0] - marks[0][0]),
        "first_result_s": marks[0][0] - t0,
    }


def one_daemon(site: Site) -> dict[str, float]:
    marks: list[tuple[float, int]] = []
    t0 = time.monotonic()
    result = run_once(
        site.settings(), site.root, progress=lambda d, t: marks.append((time.monotonic(), d))
    )
    wall = time.monotonic() - t0
    assert result.failed == 0 and result.total > 0
    first = next(t for t, d in marks if d > 0)
    last_t, last_d = marks[-1]
    first_d = next(d for t, d in marks if d > 0)
    return {
        "images": result.total,
        "wall_s": wall,
        "steady_img_s": (last_d - first_d) / (last_t - first) if last_t > first else 0.0,
    }


def scaling_and_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    sources, model = bench_tagging.ensure_data(8, 0)
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200_000_000, _temp_dir=str(work / "ray"))  # fmt: skip
    init_s = time.monotonic() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs: dict[str, list[dict[str, float]]] = {"1": [], "2": [], "daemon": []}
    for r in range(args.rounds):
        order = ["1", "2", "daemon"] if r % 2 == 0 else ["daemon", "2", "1"]
        for what in order:
            base = work / f"r{r}-{what}"
            site = fresh_site(base, sources, args.images, model)
            res = one_daemon(site) if what == "daemon" else one_backfill(site, int(what))
            runs[what].append(res)
            print(f"round {r} {what}: {json.dumps(res)}", file=sys.stderr)
            shutil.rmtree(base)
    t0 = time.monotonic()
    ray.shutdown()
    shutdown_s = time.monotonic() - t0

    def best(what: str, key: str) -> float:
        return max(x[key] for x in runs[what]) if "img" in key else min(x[key] for x in runs[what])

    one, two, dmn = (best(w, "steady_img_s") for w in ("1", "2", "daemon"))
    e2e = {w: args.images / best(w, "wall_s") for w in ("1", "2", "daemon")}
    return {
        "runs": runs,
        "steady_img_s": {"1 actor": one, "2 actors": two, "daemon": dmn},
        "end_to_end_img_s": e2e,
        "scaling_steady": two / one,
        "scaling_end_to_end": e2e["2"] / e2e["1"],
        "backfill_1_vs_daemon_steady": one / dmn,
        "backfill_1_vs_daemon_end_to_end": e2e["1"] / e2e["daemon"],
        "ray_init_s": init_s,
        "first_result_s_1_actor": best("1", "first_result_s"),
        "ray_shutdown_s": shutdown_s,
    }


def planning_at_scale(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    from daemon.queue import Database, FileIndex, JobQueue

    tiny = build_wd_model(work / "tiny")
    site = Site(work / "scale", tiny)
    src = site.root / "src.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(src)
    t0 = time.monotonic()
    real = []
    for i in range(args.real):
        dst = site.root / f"r{i // 1000:03d}" / f"img{i:06d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
        real.append(str(dst))
    src.unlink()
    db = Database(site.state / "captiond.db")
    q = JobQueue(db)
    q.enqueue_many((p, "wd_tagger", 100) for p in real)
    ghosts = (
        (f"{site.root}/g{i // 1000:04d}/x{i:07d}.png", "wd_tagger", 0)
        for i in range(args.jobs - args.real)
    )
    q.enqueue_many(ghosts)
    FileIndex(db)
    db.close()
    setup_s = time.monotonic() - t0
    print(f"queue of {args.jobs} built in {setup_s:.1f}s", file=sys.stderr)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200_000_000, _temp_dir=str(work / "ray2"))  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_before = rss_mb()
    opts = BackfillOptions(actors=2, batch_size=32, chunk_size=256, limit=args.real)
    bf = Backfill(site.settings(), opts)
    t0 = time.monotonic()
    claimable = bf.queue.count_claimable(bf.generator, bf.prefixes)
    count_s = time.monotonic() - t0
    assert claimable == args.jobs, claimable
    spent = {"plan": 0.0, "record": 0.0}
    first_chunk: list[float] = []
    plan_cpu: list[float] = [0.0]
    record_cpu: list[float] = [0.0]
    orig_next, orig_record = bf.next_chunk, bf.record
    run_t0 = [0.0]

    def timed_next() -> Any:
        c0, t = time.thread_time(), time.monotonic()
        out = orig_next()
        spent["plan"] += time.monotonic() - t
        plan_cpu[0] += time.thread_time() - c0
        if not first_chunk:  # (its own duration, when it was ready after the run began)
            first_chunk.append(time.monotonic() - t)
            first_chunk.append(time.monotonic() - run_t0[0])
        return out

    def timed_record(*a: Any, **k: Any) -> None:
        c0, t = time.thread_time(), time.monotonic()
        orig_record(*a, **k)
        spent["record"] += time.monotonic() - t
        record_cpu[0] += time.thread_time() - c0

    bf.next_chunk = timed_next  # type: ignore[method-assign]
    bf.record = timed_record  # type: ignore[method-assign]
    peak = [rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    run_t0[0] = time.monotonic()
    p = bf.run(make_executor=ray_executor(opts))
    wall = time.monotonic() - run_t0[0]
    done.set()
    assert p.state == "finished" and p.done == args.real, (p.state, p.message, p.done)
    assert p.first_result is not None

    # Ray Data's own cost for the tokens of a 1,000,000-image run (256 per chunk).
    tokens = -(-1_000_000 // 256)

    class Identity:
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return batch

    t0 = time.monotonic()
    ds = ray.data.from_items([{"token": i} for i in range(tokens)], override_num_blocks=tokens)
    made_s = time.monotonic() - t0
    out = ds.map_batches(Identity, batch_size=1, compute=ray.data.ActorPoolStrategy(size=2),
                         num_cpus=1)  # fmt: skip
    n = sum(len(b["token"]) for b in out.iter_batches(batch_size=None))
    tokens_s = time.monotonic() - t0
    assert n == tokens
    ray.shutdown()
    per_image_cpu = (plan_cpu[0] + record_cpu[0]) / p.done
    return {
        "pending_jobs": args.jobs,
        "images": p.done,
        "count_claimable_s": count_s,
        "first_chunk_lease_and_plan_s": first_chunk[0],
        "first_chunk_ready_after_s": first_chunk[1],
        "first_result_s": p.first_result - run_t0[0],
        "wall_s": wall,
        "end_to_end_img_s": p.done / wall,
        "plan_ms_per_image": 1000 * spent["plan"] / p.done,
        "record_ms_per_image_summed_over_recorders": 1000 * spent["record"] / p.done,
        "plan_cpu_ms_per_image": 1000 * plan_cpu[0] / p.done,
        "record_cpu_ms_per_image": 1000 * record_cpu[0] / p.done,
        "driver_capacity_img_s": 1 / per_image_cpu,
        "driver_rss_before_mb": rss_before,
        "driver_rss_peak_mb": peak[0],
        "ray_data_tokens_1m": tokens,
        "ray_data_tokens_build_s": made_s,
        "ray_data_tokens_through_identity_pool_s": tokens_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--real", type=int, default=20_000)
    ap.add_argument("--skip", choices=["scaling", "scale"], action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = tempfile.mkdtemp(prefix="captiond-bench-home-")
    os.environ["HOME"] = home  # Ray writes its token under HOME: not the real one
    work = Path(tempfile.mkdtemp(prefix="cbf-", dir="/tmp"))
    out: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), **bench_tagging.machine()},
        "load_average_start": os.getloadavg(),
    }
    try:
        if "scaling" not in args.skip:
            out["scaling"] = scaling_and_overhead(args, work)
        if "scale" not in args.skip:
            out["scale"] = planning_at_scale(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    out["load_average_end"] = os.getloadavg()
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
