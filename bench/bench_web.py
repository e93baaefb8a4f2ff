"""Web UI benchmark (issue 13).

1. Gallery pages of 60 items over an index of 100,000 images: server time of the
   whole handler (route guard, facade, SQL, Jinja2 rendering) called in process as the
   listener calls it, median and p99 over pages spread across the index, for each
   filter; and the 60 thumbnail requests of a page served from the cache.
2. Thumbnail making: images per second of the UI's thumbnailer (confined read, the
   worker's draft-mode decoder, scale, JPEG encode, cache write) against plain Pillow
   (``Image.open`` + ``Image.thumbnail()`` + JPEG encode) on the same camera-sized
   JPEGs, alternating, in the same run.
3. The daemon's RSS with the UI in use (every page, every thumbnail, the live stream)
   against the same daemon with ``ui.enabled = false``, same images, same requests to
   the API.

    .venv/bin/python bench/bench_web.py [--images 100000] [--rounds 200]

Data (the 100,000-image index, camera-sized JPEGs) goes to bench/.data and is reused.
Prints Markdown; copy the numbers into bench/README.md (section "Web UI").
"""

from __future__ import annotations

import argparse
import email.message
import io
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpuinfo import cpu_name  # noqa: E402  (bench/ is on sys.path when run)

from daemon.api.http import PeerCredentials, Request, to_response  # noqa: E402
from daemon.client import UnixHTTPConnection, request  # noqa: E402
from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue  # noqa: E402
from tests.daemonproc import DaemonProcess, wait_for  # noqa: E402
from tests.wdmodel import build_wd_model  # noqa: E402

DATA = REPO / "bench" / ".data"
ROOT_PEER = PeerCredentials(os.getpid(), 0, 0)
WORDS = [
    "1girl",
    "solo",
    "long_hair",
    "smile",
    "blue_eyes",
    "outdoors",
    "sky",
    "cloud",
    "tree",
    "red_background",
    "dress",
    "short_hair",
    "brown_hair",
    "looking_at_viewer",
    "open_mouth",
    "holding",
    "flower",
    "day",
    "standing",
]


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


# ------------------------------------------------------------------ 1. gallery pages


def build_index(state: Path, root: Path, n: int) -> None:
    """An index of ``n`` images in folders of 100: 94% captioned, 4% pending, 1%
    failed, 0.5% dead, 0.5% a person's caption; caption text of 6 tags."""
    if (state / "captiond.db").exists():
        return
    state.mkdir(parents=True, exist_ok=True)
    rng = random.Random(13)
    db = Database(state / "captiond.db")
    q, ix = JobQueue(db), FileIndex(db)
    rows = [(f"set{i // 10000:02d}/d{i // 100:04d}", f"img_{i:06d}.jpg", 1000, 1) for i in range(n)]
    ix.upsert_files(str(root), rows)
    paths = [f"{root}/{d}/{name}" for d, name, _, _ in rows]
    q.enqueue_many((p, "wd_tagger", 0) for p in paths)
    db.execute("UPDATE jobs SET state = 'done', outcome = 'written' WHERE id % 200 >= 11")
    db.execute("UPDATE jobs SET state = 'failed', error_type = 'bad_image', "
               "error_message = 'truncated' WHERE id % 200 IN (0, 1)")  # fmt: skip
    db.execute("UPDATE jobs SET state = 'dead', error_type = 'io', error_message = 'gone' "
               "WHERE id % 200 = 2")  # fmt: skip
    db.execute("UPDATE jobs SET state = 'done', outcome = 'caption_edited' WHERE id % 200 = 3")
    ix.record_captions(
        CaptionRecord(
            p,
            "wd_tagger",
            "c",
            p[:-4] + ".txt",
            "h",
            0,
            text=", ".join(rng.sample(WORDS, 6)).replace("_", " "),
        )
        for i, p in enumerate(paths)
        if i % 200 >= 3
    )
    db.close()


def camera_jpeg(path: Path, seed: int, size: tuple[int, int] = (4032, 3024)) -> None:
    """A camera-sized JPEG with a photo's amount of detail (smooth shapes plus noise:
    about 2-3 MB at quality 90)."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 255, (h // 64, w // 64, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (h, w, 3), dtype=np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


class InProcess:
    """A daemon built in process (not started) over the benchmark's index; requests
    go to its router as the listener sends them."""

    def __init__(self, work: Path, root: Path, state: Path, model: Path) -> None:
        import daemon.app as app_module
        from daemon.config import Settings, WatchConfig

        settings = Settings(
            state_dir=state,
            cache_dir=work / "cache",
            socket_path=work / "s.sock",
            watch=[WatchConfig(path=root, name="photos", sidecar_extension="txt")],
            generators={"wd_tagger": {"model": str(model)}},
            ui={"thumbnail_cache_mb": 512},
        )
        self.d = app_module.Daemon(settings)
        self.router = self.d.server.router

    def get(self, url: str) -> tuple[int, bytes, float]:
        t = time.perf_counter()
        split = urlsplit(url)
        route, params = self.router.match("GET", split.path)
        headers = email.message.Message()
        headers["Host"] = "localhost:8080"
        headers["Cookie"] = "captiond_csrf=" + "c" * 32
        req = Request("GET", split.path, parse_qs(split.query), headers, b"", ROOT_PEER, params,
                      "peer")  # fmt: skip
        resp = to_response(route.handler(req))
        body = resp.encode()
        return resp.status, body, (time.perf_counter() - t) * 1000

    def close(self) -> None:
        self.d.worker.stop(1)
        self.d.db.close()


def gallery_bench(n: int, rounds: int, model: Path) -> dict[str, Any]:
    base = DATA / f"web-{n}"
    root = base / "photos"
    build_index(base / "state", root, n)
    rng = random.Random(5)
    starts = sorted(rng.sample(range(n - 100), 40))
    cursors = [f"photos/set{i // 10000:02d}/d{i // 100:04d}/img_{i:06d}.jpg" for i in starts]
    firsts = [f"photos/set{k // 10000:02d}/d{k // 100:04d}/img_{k:06d}.jpg" for k in
              (i + 1 for i in starts)]  # fmt: skip
    # real files for the first 60 images after each cursor (the thumbnails served)
    src = base / "thumb-src.jpg"
    if not src.exists():
        camera_jpeg(src, 1, (1600, 1200))
    for i in starts:
        for k in range(i + 1, i + 61):
            p = root / f"set{k // 10000:02d}" / f"d{k // 100:04d}" / f"img_{k:06d}.jpg"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, p)
    work = Path(tempfile.mkdtemp(prefix="bweb-"))
    ui = InProcess(work, root, base / "state", model)
    out: dict[str, Any] = {"filters": {}}
    try:
        filters = {
            "none": "",
            "folder (the cursor's, 1 of 10)": "folder={set}",
            "captioned": "state=captioned",
            "pending (4%)": "state=pending",
            "failed (1%)": "state=failed",
            "a person's (0.5%)": "state=person",
            "text, common tag": "q=smile",
            "text + failed": "q=smile&state=failed",
        }
        for name, qs in filters.items():
            times, items = [], []
            for r in range(rounds):
                cursor = cursors[r % len(cursors)]
                q = qs.replace("{set}", cursor.rsplit("/", 2)[0])
                url = f"/ui/gallery?{q}&after={cursor}" if q else f"/ui/gallery?after={cursor}"
                status, body, ms = ui.get(url)
                assert status == 200, body[:300]
                times.append(ms)
                items.append(body.count(b'class="tile"'))
            out["filters"][name] = (
                statistics.median(times),
                pct(times, 99),
                statistics.mean(items),
            )
        # thumbnails of a page: made once, then served from the cache
        import re

        status, body, _ = ui.get(f"/ui/gallery?after={cursors[0]}")
        thumbs = re.findall(rb'src="(/ui/thumb/[^"]+)"', body)
        thumbs = [t.decode().replace("&amp;", "&") for t in thumbs]
        assert len(thumbs) == 60, len(thumbs)
        cold = [ui.get(t)[2] for t in thumbs]
        warm_pages = []
        warm_each: list[float] = []
        for _ in range(max(5, rounds // 20)):
            each = [ui.get(t)[2] for t in thumbs]
            warm_each += each
            warm_pages.append(sum(each))
        out["thumbs"] = {
            "cold_page_ms": sum(cold),
            "warm_each_median": statistics.median(warm_each),
            "warm_each_p99": pct(warm_each, 99),
            "warm_page_median": statistics.median(warm_pages),
        }
        times = []
        for r in range(rounds // 4):
            status, body, ms = ui.get(f"/ui/image/{firsts[r % len(firsts)]}?q=smile")
            assert status == 200, body[:300]
            times.append(ms)
        out["image_page"] = (statistics.median(times), pct(times, 99))
        from daemon.queue.index import GalleryFilter

        sql = []
        for r in range(rounds):
            after = str(root / cursors[r % len(cursors)].split("/", 1)[1])
            t = time.perf_counter()
            ui.d.index.gallery_paths(GalleryFilter(), after=after, limit=61)
            sql.append((time.perf_counter() - t) * 1000)
        out["sql"] = (statistics.median(sql), pct(sql, 99))
        t = time.perf_counter()
        ui.d.control.folders()
        out["folders_ms"] = (time.perf_counter() - t) * 1000
    finally:
        ui.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


# ------------------------------------------------------------ 2. thumbnail making


def thumb_bench(count: int, rounds: int) -> dict[str, Any]:
    from daemon.api.security import resolve_image
    from daemon.config import WatchConfig
    from daemon.web.thumbs import ThumbnailCache

    folder = DATA / "camera-jpegs"
    files = [folder / f"cam_{i:02d}.jpg" for i in range(count)]
    for i, f in enumerate(files):
        if not f.exists():
            camera_jpeg(f, 100 + i)
    watch = WatchConfig(path=folder, name="cam")
    refs = [resolve_image([watch], f"cam/{f.name}") for f in files]

    def ours() -> float:
        d = Path(tempfile.mkdtemp(prefix="bthumb-"))
        cache = ThumbnailCache(d, max_bytes=1 << 30, max_pixels=178_956_970, workers=1)
        t = time.perf_counter()
        for ref in refs:
            assert not cache.get(ref, 320).placeholder
        dt = time.perf_counter() - t
        shutil.rmtree(d)
        return len(refs) / dt

    def plain(save: bool) -> float:
        t = time.perf_counter()
        for f in files:
            with Image.open(f) as im:
                im.thumbnail((320, 320))
                if save:
                    im.save(io.BytesIO(), "JPEG", quality=82)
        return len(files) / (time.perf_counter() - t)

    res: dict[str, list[float]] = {"ours": [], "plain": [], "plain_nosave": []}
    ours(), plain(True)  # warm the page cache and Pillow
    for _ in range(rounds):
        res["ours"].append(ours())
        res["plain"].append(plain(True))
        res["plain_nosave"].append(plain(False))
    size = sum(f.stat().st_size for f in files) / len(files)
    return {k: statistics.median(v) for k, v in res.items()} | {"runs": res, "avg_bytes": size}


# --------------------------------------------------------------------- 3. daemon RSS


def rss(pid: int) -> tuple[float, float]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def rss_bench(model: Path, images: int) -> dict[str, Any]:
    out = {}
    cams = sorted((DATA / "camera-jpegs").glob("cam_*.jpg"))
    for ui_on in (False, True):
        work = Path(tempfile.mkdtemp(prefix="brss-"))
        root = work / "photos"
        for i in range(images):
            p = root / f"d{i % 5}" / f"img_{i:03d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cams[i % len(cams)], p)
        (work / "run").mkdir()
        d = DaemonProcess(
            work / "run", [root], model,
            top={"log_level": "info"},
            sections={"ui": {"enabled": ui_on}, "scan": {"on_start": True}},
        ).start()  # fmt: skip
        try:
            wait_for(lambda d=d: d.idle() and d.totals().get("done", 0) == images, timeout=600)
            pid = d.status()["pid"]
            for _ in range(20):
                request(d.socket, "GET", "/status")
                request(d.socket, "GET", "/api/queue")
            if ui_on:

                def get(url: str, sock: Path = d.socket) -> bytes:
                    c = UnixHTTPConnection(sock, timeout=60)
                    c.request("GET", url, headers={"Host": "localhost"})
                    r = c.getresponse()
                    body = r.read()
                    assert r.status == 200, (url, r.status, body[:200])
                    return body

                for _ in range(3):
                    for url in ("/ui/", "/ui/folders", "/ui/gallery", "/ui/live"):
                        get(url)
                    for i in range(images):
                        rel = f"photos/d{i % 5}/img_{i:03d}.jpg"
                        get(f"/ui/thumb/{rel}?size=s")
                        get(f"/ui/thumb/{rel}?size=m")
                        if i % 10 == 0:
                            get(f"/ui/image/{rel}")
                c = UnixHTTPConnection(d.socket, timeout=30)  # the live stream, 5 s
                c.request("GET", "/ui/events", headers={"Host": "localhost"})
                r = c.getresponse()
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    r.fp.readline()
                c.close()
            time.sleep(2)
            out[ui_on] = rss(pid)
        finally:
            d.stop()
            shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--camera", type=int, default=8, help="camera-sized JPEGs")
    ap.add_argument("--rss-images", type=int, default=60)
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    model = DATA / "wd-tiny"
    if not (model / "model.onnx").exists():
        build_wd_model(model)

    g = gallery_bench(args.images, args.rounds, model)
    t = thumb_bench(args.camera, 5)
    r = rss_bench(model, args.rss_images)

    load = os.getloadavg()[0]
    print(
        f"Machine: {os.cpu_count()} cores, {cpu_name()}, Python {platform.python_version()}, "
        f"Pillow {Image.__version__}; load average {load:.2f} at the end\n"
    )
    print(f"### Gallery page (60 items) over {args.images:,} images, {args.rounds} pages each\n")
    print("| filter | median | p99 | items per page (mean) |")
    print("|---|---|---|---|")
    for name, (med, p99, n) in g["filters"].items():
        print(f"| {name} | {med:.1f} ms | {p99:.1f} ms | {n:.0f} |")
    th = g["thumbs"]
    print(
        f"\nThe unfiltered page's SQL alone: median {g['sql'][0]:.2f} ms, p99 {g['sql'][1]:.2f} ms."
    )
    print(f"Thumbnails of a page (60): made cold {th['cold_page_ms']:.0f} ms in all; from the "
          f"cache {th['warm_each_median']:.2f} ms each (p99 {th['warm_each_p99']:.2f} ms), "
          f"{th['warm_page_median']:.1f} ms for the 60.")  # fmt: skip
    med, p99 = g["image_page"]
    print(
        f"Image page (next/previous in a text filter): median {med:.1f} ms, p99 {p99:.1f} ms. "
        f"Folder counts: {g['folders_ms']:.0f} ms (cached 15 s)."
    )
    mb = t["avg_bytes"] / 1e6
    print(
        f"\n### Thumbnail making, {args.camera} JPEGs 4032x3024 (avg {mb:.1f} MB), 320 px, "
        "median of 5 alternating runs\n"
    )
    print("| what | images/s | vs plain |")
    print("|---|---|---|")
    print(f"| captiond thumbnailer (confined read, draft decode, EXIF, JPEG, cache write) "
          f"| {t['ours']:.1f} | {t['ours'] / t['plain']:.2f}x |")  # fmt: skip
    print(f"| Image.open + Image.thumbnail() + JPEG encode | {t['plain']:.1f} | 1.00x |")
    print(f"| Image.open + Image.thumbnail() (no encode) | {t['plain_nosave']:.1f} | "
          f"{t['plain_nosave'] / t['plain']:.2f}x |")  # fmt: skip
    print(f"\n### Daemon RSS, {args.rss_images} camera-sized images captioned\n")
    print("| daemon | VmRSS | VmHWM (peak) |")
    print("|---|---|---|")
    print(
        f"| ui.enabled = false, API requests only | {r[False][0]:.1f} MiB | {r[False][1]:.1f} MiB |"
    )
    print(f"| UI in use (every page, {2 * args.rss_images} thumbnails x3, live stream) "
          f"| {r[True][0]:.1f} MiB | {r[True][1]:.1f} MiB |")  # fmt: skip
    print(f"| ratio | {r[True][0] / r[False][0]:.2f}x | {r[True][1] / r[False][1]:.2f}x |")


if __name__ == "__main__":
    main()
