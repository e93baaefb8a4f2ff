"""captiond ``caption --once`` against kohya's ``tag_images_by_wd14_tagger.py``.

Run: ``.venv/bin/python bench/bench_kohya.py [--images 96] [--rounds 5]
[--kohya-workers 0,2] [--json FILE]``

Same model, same images, same settings, same Python, on the CPU, in one run:

- **kohya**: sd-scripts' ``finetune/tag_images_by_wd14_tagger.py``, verbatim (checked
  against its git blob id at start), from ``bench/third_party/sd_scripts`` with the
  two ``library`` modules cut down to what it uses (see that folder's README), run as
  ``python tag_images_by_wd14_tagger.py DIR --onnx --repo_id R --model_dir M
  --batch_size 8 --general_threshold 0.35 --character_threshold 0.85
  --caption_extension .txt --remove_underscore --character_tags_first``, once as its
  documentation shows it (images read in the main process) and once per
  ``--kohya-workers`` N > 0 with ``--max_data_loader_n_workers N`` (its "faster"
  option: a torch DataLoader reads and preprocesses in N processes). The model is laid
  out where the script looks for it (``M/<R with / as _>/model.onnx`` and
  ``selected_tags.csv``, hard links) and ``HF_HUB_OFFLINE=1``: nothing is downloaded.
- **captiond**: ``python -m daemon --config CFG caption DIR --once --fresh --generator
  wd_tagger --json`` with ``[generators.wd_tagger] model = <the same model folder>``,
  ``providers = ["cpu"]``, thresholds 0.35 / 0.85, ``[worker] batch_size = 8`` (its
  default; decode_workers stays at its default, one thread per CPU: 2 on a 2-core
  machine), sidecar ``txt`` (its default).

The model is ``tests/wdmodel.py``'s realistic WD-contract model (random weights, the
WD v3 input and output, 10,861 tags) and the images are ``bench_tagging.ensure_data``'s
camera-sized JPEGs (3000x2000 and portrait, about 1.2 MB) and PNGs (2400x1600, about 7
MB), 3:1. Each run gets its own fresh folder of hard links (unique names, the mix
repeated up to ``--images``) in ``bench/.data``.

A round runs every tool once; the order rotates from round to round. Each run is timed
as a whole command (launch to exit: this is the images/s and the ratio), and split:

- kohya's start-up from its own log lines, as they arrive on its stderr: imports
  (until "using existing wd14 tagger model"), then the model section (onnx and
  onnxruntime imports, ``onnx.load``, the session, the tag CSV, the folder listing;
  until "found N images"), then its loop (until "done!");
- captiond's from its ``--json`` summary: ``seconds`` is the time inside the run
  (scan, model load, captioning, the end), the rest of the command is start-up
  (interpreter, imports, settings);
- for both the same way: the first and last sidecar's mtime, hence the time to the
  first caption and the rate between the first and the last batch;
- CPU time (``getrusage(RUSAGE_CHILDREN)``: the command and the processes it waited
  for), the whole machine's busy share (``/proc/stat``) and what other processes took
  of it, and the load average.

After the rounds, it checks that every image of every run has a non-empty sidecar and
compares the tag sets (names compared case-insensitively with ``_`` as a space: kohya's
``--remove_underscore`` keeps underscores only in tags of 3 characters or fewer,
captiond in its kaomoji list). Order is not compared (kohya writes general tags in the
model's output order, captiond by probability). Then, in this process, it looks at why
tags differ or not: for each distinct image, the model input from kohya's
``preprocess_image`` (imported from the vendored script), from captiond's decode +
``WDTagger.prepare`` and from the reference WD preprocessing (full decode, white square
pad, BICUBIC), how far apart they are in grey levels, how much the model's
probabilities move between them, and which tags each puts across a threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (HERE, ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_tagging import DATA, ensure_data, naive_prepare  # noqa: E402
from cpuinfo import cpu_name  # noqa: E402

SD_SCRIPTS = HERE / "third_party" / "sd_scripts"
KOHYA_SCRIPT = SD_SCRIPTS / "finetune" / "tag_images_by_wd14_tagger.py"
KOHYA_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"
# git's blob id of finetune/tag_images_by_wd14_tagger.py at KOHYA_COMMIT: the vendored
# copy must be byte for byte the same.
KOHYA_SCRIPT_BLOB = "b4019819e362065f5eaa96c7b91d144944dde988"
REPO_ID = "SmilingWolf/wd-eva02-large-tagger-v3"  # only names the folder; nothing is fetched

BATCH = 8
GENERAL_THRESHOLD = 0.35
CHARACTER_THRESHOLD = 0.85
EXT = "txt"
CORES = os.cpu_count() or 1


# -- set-up ----------------------------------------------------------------------------


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_vendored() -> None:
    got = git_blob_id(KOHYA_SCRIPT)
    if got != KOHYA_SCRIPT_BLOB:
        raise SystemExit(
            f"{KOHYA_SCRIPT} is not sd-scripts' file at {KOHYA_COMMIT[:10]} "
            f"(blob {got}, want {KOHYA_SCRIPT_BLOB}): it must stay verbatim"
        )


def kohya_model_dir(model_dir: Path, root: Path) -> Path:
    """``root/<REPO_ID with / as _>`` holding the model's two files (hard links): where
    the script looks before it would download."""
    dest = root / REPO_ID.replace("/", "_")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "selected_tags.csv"):
        target = dest / name
        if not target.exists():
            try:
                os.link(model_dir / name, target)
            except OSError:
                shutil.copyfile(model_dir / name, target)
    return root


def make_folder(dest: Path, sources: Sequence[Path]) -> list[Path]:
    """A fresh folder of hard links to ``sources``, unique names, unique stems."""
    dest.mkdir(parents=True)
    out = []
    for i, src in enumerate(sources):
        dst = dest / f"{i:03d}_{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def captiond_config(path: Path, model_dir: Path, state: Path) -> Path:
    path.write_text(
        f'state_dir = "{state}"\n'
        f'socket_path = "{state / "unused.sock"}"\n'
        "[worker]\n"
        f"batch_size = {BATCH}\n"
        "[generators.wd_tagger]\n"
        f'model = "{model_dir}"\n'
        'providers = ["cpu"]\n'
        f"general_threshold = {GENERAL_THRESHOLD}\n"
        f"character_threshold = {CHARACTER_THRESHOLD}\n"
    )
    return path


def base_env(work: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CAPTIOND_", "PYTHONPATH", "OMP_", "HF_"))
    }
    return env | {
        "HF_HUB_OFFLINE": "1",
        "HOME": str(work / "home"),
        "XDG_CONFIG_HOME": str(work / "home" / "config"),
        "XDG_STATE_HOME": str(work / "home" / "state"),
        "XDG_CACHE_HOME": str(work / "home" / "cache"),
        "COLUMNS": "300",  # rich (kohya's log handler) does not wrap its lines then
    }


# -- one run ---------------------------------------------------------------------------


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


class _Lines(threading.Thread):
    """Reads a pipe to the end; keeps each line (split at \\n and \\r: tqdm) with the
    time it arrived, in seconds after ``t0``."""

    def __init__(self, fd: int, t0: float):
        super().__init__(daemon=True)
        self.fd, self.t0 = fd, t0
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        buf = b""
        while chunk := os.read(self.fd, 65536):
            now = time.perf_counter() - self.t0
            buf += chunk
            *parts, buf = re.split(rb"[\r\n]", buf)
            self.lines += [(now, p.decode(errors="replace")) for p in parts if p.strip()]
        if buf.strip():
            self.lines.append((time.perf_counter() - self.t0, buf.decode(errors="replace")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, line in self.lines if rx.search(line)), None)


@dataclass
class Run:
    tool: str
    round: int
    images: int
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    machine_busy: float  # share of all cores busy during the run (everyone)
    others_busy: float  # of that, what was not this command (other people's jobs)
    load_before: float
    load_after: float
    first_caption_s: float  # first sidecar's mtime after launch
    last_caption_s: float
    phases: dict[str, float] = field(default_factory=dict)  # start-up split, seconds
    missing: list[str] = field(default_factory=list)  # images without a (non-empty) sidecar

    @property
    def img_s(self) -> float:
        return self.images / self.wall_s

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    @property
    def startup_s(self) -> float:
        return self.phases.get("startup", float("nan"))

    @property
    def steady_img_s(self) -> float:
        """Between the first and the last sidecar: images after the first batch."""
        span = self.last_caption_s - self.first_caption_s
        return (self.images - BATCH) / span if span > 0 else float("nan")


def run_command(
    tool: str,
    rnd: int,
    cmd: list[str],
    env: dict[str, str],
    cwd: Path,
    images: Sequence[Path],
    timeout: float,
) -> tuple[Run, _Lines, _Lines, int]:
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = machine_cpu()
    launch_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Lines(proc.stdout.fileno(), t0), _Lines(proc.stderr.fileno(), t0)
    out.start()
    err.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    m1 = machine_cpu()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.join(10)
    err.join(10)
    proc.stdout.close()
    proc.stderr.close()
    user, sys_ = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    jiffies = max(1, m1[1] - m0[1])
    busy = (m1[0] - m0[0]) / jiffies
    # Our command's share of all cores over the same interval.
    ours = (user + sys_) / (wall * CORES)
    mtimes, missing = [], []
    for img in images:
        side = img.with_suffix("." + EXT)
        try:
            st = side.stat()
        except FileNotFoundError:
            missing.append(img.name)
            continue
        if st.st_size == 0:
            missing.append(img.name)
        mtimes.append(st.st_mtime_ns / 1e9 - launch_wall)
    run = Run(
        tool=tool,
        round=rnd,
        images=len(images),
        wall_s=wall,
        cpu_user_s=user,
        cpu_sys_s=sys_,
        machine_busy=busy,
        others_busy=max(0.0, busy - ours),
        load_before=load0,
        load_after=os.getloadavg()[0],
        first_caption_s=min(mtimes, default=float("nan")),
        last_caption_s=max(mtimes, default=float("nan")),
        missing=missing,
    )
    return run, out, err, code


def run_kohya(
    rnd: int, folder: Path, images: Sequence[Path], models: Path, work: Path, workers: int
) -> Run:
    cmd = [
        sys.executable,
        str(KOHYA_SCRIPT),
        str(folder),
        "--onnx",
        "--repo_id",
        REPO_ID,
        "--model_dir",
        str(models),
        "--batch_size",
        str(BATCH),
        "--general_threshold",
        str(GENERAL_THRESHOLD),
        "--character_threshold",
        str(CHARACTER_THRESHOLD),
        "--caption_extension",
        "." + EXT,
        "--remove_underscore",
        "--character_tags_first",
    ]
    if workers:
        cmd += ["--max_data_loader_n_workers", str(workers)]
    env = base_env(work) | {"PYTHONPATH": str(SD_SCRIPTS)}
    tool = kohya_name(workers)
    run, out, err, code = run_command(tool, rnd, cmd, env, work, images, timeout=1800)

    def logged(pattern: str) -> float | None:
        """When a log line first arrived: on stderr with rich (sd-scripts' requirement),
        on stdout with logging's plain handler (its fallback without rich)."""
        t = err.first(pattern)
        return t if t is not None else out.first(pattern)

    if code != 0:
        raise SystemExit(f"{tool} exited with {code}:\n{err.text()[-3000:]}")
    if logged(r"downloading wd14 tagger model") is not None:
        raise SystemExit(f"{tool} tried to download the model:\n{err.text()[-2000:]}")
    imports = logged(r"using existing wd14 tagger model")
    found = logged(r"found \d+ images")
    done = logged(r"done!")
    if imports is None or found is None or done is None:
        raise SystemExit(f"{tool}: its log lines were not found:\n{err.text()[-3000:]}")
    run.phases = {
        "imports": imports,  # interpreter, torch, cv2, huggingface_hub, ...
        "model": found - imports,  # onnx + onnxruntime import, onnx.load, session, CSV
        "startup": found,
        "loop": done - found,
        "after_loop": run.wall_s - done,
    }
    return run


def run_captiond(rnd: int, folder: Path, images: Sequence[Path], config: Path, work: Path) -> Run:
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "--config",
        str(config),
        "caption",
        str(folder),
        "--once",
        "--fresh",
        "--generator",
        "wd_tagger",
        "--json",
    ]
    env = base_env(work) | {"PYTHONPATH": str(ROOT)}
    run, out, err, code = run_command("captiond", rnd, cmd, env, work, images, timeout=1800)
    if code != 0:
        raise SystemExit(f"captiond exited with {code}:\n{out.text()}\n{err.text()[-3000:]}")
    summary = json.loads(out.text())
    written = summary.get("outcomes", {}).get("written", 0)
    if written != len(images) or summary.get("errors"):
        raise SystemExit(f"captiond wrote {written} of {len(images)}: {summary}")
    inside = float(summary["seconds"])
    run.phases = {"startup": run.wall_s - inside, "run": inside}
    return run


def kohya_name(workers: int) -> str:
    return f"kohya (DataLoader, {workers} workers)" if workers else "kohya"


# -- tags ------------------------------------------------------------------------------


def tag_key(tag: str) -> str:
    return " ".join(tag.strip().lower().replace("_", " ").split())


def read_tags(sidecar: Path) -> tuple[str, frozenset[str]]:
    text = sidecar.read_text(encoding="utf-8").strip()
    return text, frozenset(tag_key(t) for t in text.split(",") if t.strip())


@dataclass
class Agreement:
    images: int = 0
    same_set: int = 0
    same_text: int = 0
    differ: int = 0
    only_a: int = 0  # tags only in a's sidecars, summed over images
    only_b: int = 0
    tags_a: int = 0
    tags_b: int = 0
    max_diff: int = 0  # most tags differing on one image (both directions)
    jaccard_sum: float = 0.0
    by_source: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def jaccard_mean(self) -> float:
        return self.jaccard_sum / self.images if self.images else float("nan")


def compare(a: Sequence[Path], b: Sequence[Path]) -> Agreement:
    """Sidecars of the same images written by two tools (``a`` and ``b`` hold the images
    in the same order)."""
    ag = Agreement()
    for ia, ib in zip(a, b, strict=True):
        ta, sa = read_tags(ia.with_suffix("." + EXT))
        tb, sb = read_tags(ib.with_suffix("." + EXT))
        ag.images += 1
        ag.tags_a += len(sa)
        ag.tags_b += len(sb)
        union = sa | sb
        ag.jaccard_sum += len(sa & sb) / len(union) if union else 1.0
        ag.same_text += ta == tb
        if sa == sb:
            ag.same_set += 1
            continue
        ag.differ += 1
        ag.only_a += len(sa - sb)
        ag.only_b += len(sb - sa)
        ag.max_diff = max(ag.max_diff, len(sa ^ sb))
        source = ia.name.split("_", 1)[1]
        ag.by_source[source] = {"only_a": sorted(sa - sb), "only_b": sorted(sb - sa)}
    return ag


def explain(
    model_dir: Path, sources: Sequence[Path], differing: dict[str, dict[str, list[str]]]
) -> dict[str, Any]:
    """Why tags differ (or do not): per distinct image, the model input of kohya's
    ``preprocess_image`` (the vendored script's own function), of captiond's decode +
    ``WDTagger.prepare`` and of the reference WD preprocessing (``naive_prepare``: full
    decode, white square pad, BICUBIC); the model's probabilities on each; which tags
    each input puts on the other side of its threshold from the reference input; and
    how close any tag came to its threshold. In this process, after the timed rounds
    (importing the kohya script imports torch)."""
    import numpy as np
    import onnxruntime as ort

    from daemon.generators.base import ImageInput
    from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig
    from daemon.pipeline.images import decode_image

    sys.path.insert(0, str(SD_SCRIPTS))
    spec = importlib.util.spec_from_file_location("kohya_tagger", KOHYA_SCRIPT)
    assert spec is not None and spec.loader is not None
    kohya = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kohya)
    from PIL import Image

    gen = WDTagger(WDTaggerConfig(model=str(model_dir), providers=["cpu"]))
    gen.load()
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    tags = gen._tags
    assert tags is not None
    idx = np.concatenate([tags.general, tags.character])
    thr = np.concatenate(
        [
            np.full(tags.general.size, GENERAL_THRESHOLD),
            np.full(tags.character.size, CHARACTER_THRESHOLD),
        ]
    )
    keys = [tag_key(tags.names[i]) for i in idx]

    def kohya_prep(src: Path) -> np.ndarray:  # what its loop does per image
        with Image.open(src) as im:
            return kohya.preprocess_image(im)

    def captiond_prep(src: Path) -> np.ndarray:  # what the worker's decode threads do
        data = src.read_bytes()
        return gen.prepare(
            ImageInput(src, decode_image(data, draft_size=448, draft_longer_side=True))
        )

    def best_ms(fn: Any, src: Path, repeat: int = 2) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(src)
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    per_image = []
    for src in sources:
        data = src.read_bytes()
        x_c = captiond_prep(src)
        x_k = kohya_prep(src)
        x_r = naive_prepare(data)
        probs = session.run(None, {name: np.stack([x_k, x_c, x_r]).astype(np.float32)})[0]
        pk, pc, pr = (probs[j][idx] for j in range(3))
        on_k, on_c, on_r = pk >= thr, pc >= thr, pr >= thr

        def names(mask: np.ndarray) -> list[str]:
            return [keys[i] for i in np.flatnonzero(mask)]

        per_image.append(
            {
                "image": src.name,
                "grey_kohya_vs_reference": float(np.abs(x_k - x_r).mean()),
                "grey_captiond_vs_reference": float(np.abs(x_c - x_r).mean()),
                "grey_kohya_vs_captiond": float(np.abs(x_k - x_c).mean()),
                "max_prob_change_kohya_vs_captiond": float(np.abs(pk - pc).max()),
                "closest_to_threshold": float(np.abs(pc - thr).min()),
                "flips_kohya_vs_captiond": names(on_k != on_c),
                "flips_kohya_vs_reference": names(on_k != on_r),
                "flips_captiond_vs_reference": names(on_c != on_r),
                "sidecars_differ": differing.get(src.name, {}),
                "prep_ms_kohya": best_ms(kohya_prep, src),
                "prep_ms_captiond": best_ms(captiond_prep, src),
            }
        )
    return {"images": per_image}


# -- report ----------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("onnxruntime", "onnx", "torch", "cv2", "numpy", "PIL", "huggingface_hub", "tqdm"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            out[mod] = "missing"
    return out


def machine() -> dict[str, Any]:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB"
    except OSError:
        pass
    lscpu: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lscpu = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in out.splitlines())
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu_name(),
        "family_model": f"{lscpu.get('CPU family', '?')}/{lscpu.get('Model', '?')}",
        "l3": lscpu.get("L3 cache", "?"),
        "hypervisor": lscpu.get("Hypervisor vendor", ""),
        "cores": CORES,
        "ram": mem,
        "kernel": platform.release(),
        "sd_scripts": KOHYA_COMMIT,
    }


def fmt(xs: Sequence[float], spec: str = ".2f") -> str:
    return ", ".join(format(x, spec) for x in xs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96, help="images per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jpegs", type=int, default=24, help="distinct JPEGs (bench/.data)")
    ap.add_argument("--pngs", type=int, default=8, help="distinct PNGs (bench/.data)")
    ap.add_argument(
        "--kohya-workers",
        default="0,2",
        help="kohya runs per round: 0 = as documented, N = --max_data_loader_n_workers N",
    )
    ap.add_argument("--no-explain", action="store_true", help="skip the tag-difference analysis")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows when sent to a file

    check_vendored()
    sources, model_dir = ensure_data(args.jpegs, args.pngs)
    jpegs = [p for p in sources if p.suffix == ".jpg"]
    pngs = [p for p in sources if p.suffix == ".png"]
    # The sources in one fixed shuffled order, repeated: JPEGs and PNGs mixed 3:1 in
    # every stretch of the folder, as in a real dataset.
    mix = random.Random(0).sample([*jpegs, *pngs], len(jpegs) + len(pngs))
    images = [mix[i % len(mix)] for i in range(args.images)]
    workers = [int(w) for w in args.kohya_workers.split(",") if w.strip()]
    tools = [kohya_name(w) for w in workers] + ["captiond"]
    info = machine() | {"versions": versions()}
    print(f"machine: {info}")
    n_jpeg = sum(p.suffix == ".jpg" for p in images)
    print(
        f"{args.images} images per run: {n_jpeg} JPEG (3000x2000 / 2000x3000) + "
        f"{args.images - n_jpeg} PNG (2400x1600), from {len(jpegs)} + {len(pngs)} distinct; "
        f"batch {BATCH}, thresholds {GENERAL_THRESHOLD} / {CHARACTER_THRESHOLD}, .{EXT}"
    )
    load_start = os.getloadavg()
    runs: list[Run] = []
    folders: dict[tuple[str, int], list[Path]] = {}
    with tempfile.TemporaryDirectory(prefix="kohya-", dir=DATA) as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        models = kohya_model_dir(model_dir, work / "models")
        config = captiond_config(work / "captiond.toml", model_dir, work / "state")

        def one(tool: str, rnd: int, imgs: Sequence[Path]) -> Run:
            folder = work / f"r{rnd:02d}-{re.sub(r'[^a-z0-9]+', '-', tool.lower())}"
            placed = make_folder(folder, imgs)
            folders[(tool, rnd)] = placed
            if tool == "captiond":
                return run_captiond(rnd, folder, placed, config, work)
            w = workers[tools.index(tool)]
            return run_kohya(rnd, folder, placed, models, work, w)

        # Warm-up (not counted): page cache, .pyc files, the first import of torch.
        for tool in tools:
            r = one(tool, 0, images[: 2 * BATCH])
            print(f"warm-up {tool}: {r.images} images in {r.wall_s:.2f} s")
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(tools)
            for tool in tools[k:] + tools[:k]:
                r = one(tool, rnd, images)
                runs.append(r)
                extra = ", ".join(f"{n} {v:.2f}" for n, v in r.phases.items())
                print(
                    f"round {rnd} {tool:32s} {r.wall_s:6.2f} s = {r.img_s:5.2f} img/s "
                    f"({extra}); first caption {r.first_caption_s:.2f} s, "
                    f"then {r.steady_img_s:.2f} img/s; CPU {r.cpu_s:.1f} s; machine busy "
                    f"{r.machine_busy:.0%} (others {r.others_busy:.0%}); load "
                    f"{r.load_before:.2f} -> {r.load_after:.2f}; missing {len(r.missing)}"
                )
        load_end = os.getloadavg()

        # Tags: captiond against each kohya run of the same round, and kohya's runs
        # against each other (the same script: they must agree exactly).
        agreements: dict[str, list[Agreement]] = {}
        for rnd in range(1, args.rounds + 1):
            for tool in tools[:-1]:
                ag = compare(folders[(tool, rnd)], folders[("captiond", rnd)])
                agreements.setdefault(f"{tool} vs captiond", []).append(ag)
            for tool in tools[1:-1]:
                ag = compare(folders[(tools[0], rnd)], folders[(tool, rnd)])
                agreements.setdefault(f"{tools[0]} vs {tool}", []).append(ag)
        differing: dict[str, dict[str, list[str]]] = {}
        for ag in agreements[f"{tools[0]} vs captiond"]:
            differing |= ag.by_source

    missing = {f"{r.tool} round {r.round}": r.missing for r in runs if r.missing}
    explained: dict[str, Any] = {}
    if not args.no_explain:
        explained = explain(model_dir, sources, differing)

    # -- summary ----------------------------------------------------------------------
    def of(tool: str) -> list[Run]:
        return [r for r in runs if r.tool == tool]

    cap = of("captiond")
    result: dict[str, Any] = {
        "machine": info,
        "images_per_run": args.images,
        "mix": {"jpeg": n_jpeg, "png": args.images - n_jpeg},
        "rounds": args.rounds,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "runs": [asdict(r) | {"img_s": r.img_s, "steady_img_s": r.steady_img_s} for r in runs],
        "missing_sidecars": missing,
    }
    print()
    print(
        "| tool | img/s per round (whole command) | median | start-up (s) | first caption (s) "
        "| rate after the first caption (img/s) | CPU per image (ms) | others' share of the "
        "cores |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tool in tools:
        rs = of(tool)
        print(
            f"| {tool} | {fmt([r.img_s for r in rs])} "
            f"| {statistics.median(r.img_s for r in rs):.2f} "
            f"| {fmt([r.startup_s for r in rs])} | {fmt([r.first_caption_s for r in rs])} "
            f"| {fmt([r.steady_img_s for r in rs])} "
            f"| {fmt([r.cpu_s / r.images * 1000 for r in rs], '.0f')} "
            f"| {fmt([r.others_busy for r in rs], '.0%')} |"
        )
    ratios: dict[str, Any] = {}
    print()
    for tool in tools[:-1]:
        ks = of(tool)
        per = [c.img_s / k.img_s for c, k in zip(cap, ks, strict=True)]
        steady = [c.steady_img_s / k.steady_img_s for c, k in zip(cap, ks, strict=True)]
        cpu = [(k.cpu_s / k.images) / (c.cpu_s / c.images) for c, k in zip(cap, ks, strict=True)]
        ratios[tool] = {
            "per_round": per,
            "median": statistics.median(per),
            "steady_per_round": steady,
            "steady_median": statistics.median(steady),
            "cpu_per_image_kohya_over_captiond": cpu,
        }
        verdict = "met" if statistics.median(per) >= 3 else "NOT met"
        print(
            f"captiond / {tool}: per round {fmt(per)}; median {statistics.median(per):.2f} "
            f"(target >= 3: {verdict}); after the first caption {fmt(steady)} (median "
            f"{statistics.median(steady):.2f}); CPU per image, {tool} / captiond {fmt(cpu)}"
        )
    result["ratios"] = ratios
    for tool in tools:
        rs = of(tool)
        keys = rs[0].phases.keys()
        parts = ", ".join(f"{k} {statistics.median(r.phases[k] for r in rs):.2f}" for k in keys)
        print(f"{tool} phases, median s: {parts}")
    print()
    result["tags"] = {}
    for pair, ags in agreements.items():
        a = ags[0]
        stable = all((g.differ, g.only_a, g.only_b) == (a.differ, a.only_a, a.only_b) for g in ags)
        a_name, b_name = pair.split(" vs ")
        result["tags"][pair] = {
            "images": a.images,
            "same_set": a.same_set,
            "same_text": a.same_text,
            "differ": a.differ,
            f"tags_only_in_{a_name}": a.only_a,
            f"tags_only_in_{b_name}": a.only_b,
            "tags_a": a.tags_a,
            "tags_b": a.tags_b,
            "max_tags_differing_on_one_image": a.max_diff,
            "jaccard_mean": a.jaccard_mean,
            "same_in_every_round": stable,
            "by_source": a.by_source,
        }
        print(
            f"tags, {pair} (round 1 of {len(ags)}; the same in every round: {stable}): "
            f"{a.images} images, same tag set {a.same_set}, same text {a.same_text}, "
            f"differ {a.differ}; tags only in {a_name}: {a.only_a}, only in {b_name}: "
            f"{a.only_b} (of {a.tags_a} / {a.tags_b}); at most {a.max_diff} on one image; "
            f"mean Jaccard {a.jaccard_mean:.3f}"
        )
        for src, d in sorted(a.by_source.items()):
            print(f"  {src}: only {a_name} {d['only_a']}, only {b_name} {d['only_b']}")
    print(f"missing or empty sidecars: {missing or 'none'}")
    if explained:
        result["explain"] = explained
        imgs = explained["images"]

        def span(key: str, spec: str = ".2f") -> str:
            xs = [e[key] for e in imgs]
            return f"{format(min(xs), spec)}-{format(max(xs), spec)}"

        def flips(key: str) -> str:
            n = sum(len(e[key]) for e in imgs)
            on = sum(bool(e[key]) for e in imgs)
            return f"{n} tags on {on} of {len(imgs)} images"

        print()
        print(
            f"model input of the {len(imgs)} distinct images, mean |difference| in grey "
            f"levels (0-255): kohya vs reference {span('grey_kohya_vs_reference')}, captiond "
            f"vs reference {span('grey_captiond_vs_reference')}, kohya vs captiond "
            f"{span('grey_kohya_vs_captiond')}"
        )
        print(
            "largest change of a tag's probability, kohya's input vs captiond's: "
            f"{span('max_prob_change_kohya_vs_captiond', '.1e')}; closest any tag came to "
            f"its threshold (captiond's input): {span('closest_to_threshold', '.1e')}"
        )
        print(
            "tags across a threshold: kohya's input vs captiond's "
            f"{flips('flips_kohya_vs_captiond')}; "
            f"kohya's vs the reference {flips('flips_kohya_vs_reference')}; captiond's vs the "
            f"reference {flips('flips_captiond_vs_reference')}"
        )
        for kind in (".jpg", ".png"):
            some = [e for e in imgs if e["image"].endswith(kind)]
            if some:
                mk = statistics.median(e["prep_ms_kohya"] for e in some)
                mc = statistics.median(e["prep_ms_captiond"] for e in some)
                print(
                    f"decode + preprocess per {kind} image, one thread, median of best of 2: "
                    f"kohya {mk:.1f} ms, captiond {mc:.1f} ms ({mk / mc:.2f}x)"
                )
        for e in imgs:
            keys = [k for k in e if k.startswith("flips_") or k == "sidecars_differ"]
            if any(e[k] for k in keys):
                what = "; ".join(f"{k.removeprefix('flips_')}: {e[k]}" for k in keys if e[k])
                print(f"  {e['image']}: {what}")
    print(f"load average start / end: {fmt(load_start)} / {fmt(load_end)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
