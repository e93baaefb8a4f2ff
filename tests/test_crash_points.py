"""SIGKILL at the dangerous moments, then a restart (daemon/faults.py: CAPTIOND_CRASH_AT).

Each test runs the real daemon three times on the same folder and state:

1. it captions three images (their sidecars are captiond's own);
2. the images change while it is down; the next run starts rewriting the sidecars and
   kills itself with SIGKILL at one named point (what the kill left is checked: temp
   files, records, leases, the database's integrity in that very state);
3. a run without the crash point finishes the work.

After the third run: exactly one sidecar per image holding the new image's caption,
recognised as captiond's own (a rescan with ``recaption`` queues every one of them),
no temp file anywhere, every job done, and a database that passes ``integrity_check``.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.client import request
from daemon.confined import is_temp_name
from daemon.hashing import sidecar_hash
from tests.daemonproc import DaemonProcess, make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# image -> (colour in the first run, colour after the change); the tiny WD model's tags
# follow the colour ("red background"...).
IMAGES = {"a.png": ("red", "blue"), "b.png": ("green", "red"), "c.jpg": ("blue", "green")}
GENERATOR = "wd_tagger"


def sidecar(root: Path, image: str) -> Path:
    return root / (image.rsplit(".", 1)[0] + ".txt")


def shows(root: Path, image: str, colour: str) -> bool:
    """The image's sidecar is the caption of an image of this colour (and no other)."""
    path = sidecar(root, image)
    if not path.exists():
        return False
    text = path.read_text()
    others = {c for pair in IMAGES.values() for c in pair} - {colour}
    return f"{colour} background" in text and not any(f"{o} background" in text for o in others)


def captioned(root: Path, which: int) -> Callable[[], bool]:
    """Every image's sidecar shows its colour of the first (0) or second (1) run."""

    def check() -> bool:
        return all(shows(root, img, colours[which]) for img, colours in IMAGES.items())

    check.__qualname__ = f"every sidecar showing the image's colour {which + 1}"
    return check


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def read_only(db: Path) -> sqlite3.Connection:
    """The database as the kill left it: a read-only connection neither recovers into
    the file nor checkpoints or removes the WAL when it closes."""
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def file_state(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclass
class Crash:
    """What a kill left behind, for the point's own checks."""

    root: Path
    db: Path
    log: list[dict[str, Any]]  # the killed run's log records
    db_before: tuple[int, int]  # the database file's (size, mtime) before that run

    def jobs(self) -> dict[str, str]:
        with read_only(self.db) as conn:
            rows = conn.execute(
                "SELECT path, state FROM jobs WHERE generator = ?", (GENERATOR,)
            ).fetchall()
        return {Path(p).name: s for p, s in rows}

    def records(self) -> dict[str, tuple[str, str | None]]:
        with read_only(self.db) as conn:
            rows = conn.execute(
                "SELECT image_path, sidecar_hash, prev_hash FROM captions WHERE generator = ?",
                (GENERATOR,),
            ).fetchall()
        return {Path(p).name: (h, prev) for p, h, prev in rows}

    def on_disk(self, image: str) -> str:
        return sidecar_hash(sidecar(self.root, image).read_bytes())

    def rewritten(self) -> list[str]:
        return [img for img, (_, new) in IMAGES.items() if shows(self.root, img, new)]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r.get("event") == name]


# -- what each point leaves ------------------------------------------------------------


def staged_not_recorded(c: Crash) -> None:
    assert temp_files(c.root), "no temp file: the kill did not come after staging"
    assert c.rewritten() == []
    records = c.records()
    assert all(records[img][0] == c.on_disk(img) for img in IMAGES), (
        "a new caption was recorded before the kill"
    )


def recorded_not_renamed(c: Crash) -> None:
    assert temp_files(c.root), "no temp file: the kill did not come before the rename"
    assert c.rewritten() == []
    records = c.records()
    pending = [
        img
        for img in IMAGES
        if records[img][0] != c.on_disk(img) and records[img][1] == c.on_disk(img)
    ]
    # recorded: the record names the new text and the file on disk as the one it replaces
    assert pending, f"nothing recorded before the kill: {records}"


def renamed_not_acked(c: Crash) -> None:
    assert temp_files(c.root) == []
    done = c.rewritten()
    assert done, "no sidecar was renamed into place before the kill"
    jobs = c.jobs()
    # a batch's acks are one transaction: none of them committed, however far it got
    assert {img: jobs[img] for img in done} == dict.fromkeys(done, "leased")


def loading_the_model(c: Crash) -> None:
    assert [e["generator"] for e in c.events("model_loading")] == [GENERATOR]
    assert c.events("model_loaded") == []
    assert c.rewritten() == [] and temp_files(c.root) == []


def checkpointing(c: Crash) -> None:
    # In WAL mode only a checkpoint writes the database file: it had begun.
    assert file_state(c.db) != c.db_before, "the database file was not written"
    wal = c.db.with_name(c.db.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0


@dataclass(frozen=True)
class Point:
    name: str
    left: Callable[[Crash], None]
    # The first run ends with SIGKILL when idle, so that its pages are still in the
    # WAL and the crashing run's first checkpoint has them to copy.
    first_run_killed: bool = False
    sections: dict[str, Any] | None = None


POINTS = [
    Point("after_stage", staged_not_recorded),
    Point("after_record", recorded_not_renamed),
    Point("after_rename", renamed_not_acked),
    Point("mid_acks", renamed_not_acked),
    Point("model_load", loading_the_model),
    Point("checkpoint", checkpointing, first_run_killed=True),
]


def daemon_for(
    tmp_path: Path, root: Path, model: Path, *, crash: str = "", checkpoint: float = 0.0
) -> DaemonProcess:
    """A daemon on ``root`` with state in ``tmp_path/run`` (the same for every run)."""
    sections = {
        "queue": {
            "backoff_base_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            "checkpoint_seconds": checkpoint,
        },
        "worker": {"batch_size": 4, "load_retry_seconds": 0.5},
    }
    env = {"CAPTIOND_CRASH_AT": crash} if crash else {}
    return DaemonProcess(tmp_path / "run", [root], model, sections=sections, env=env)


def log_records(d: DaemonProcess, offset: int) -> list[dict[str, Any]]:
    out = []
    for line in d.logs()[offset:].splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.mark.parametrize("point", POINTS, ids=[p.name for p in POINTS])
def test_a_kill_at_the_point_leaves_one_own_sidecar_per_image(
    tmp_path: Path, wd_model_dir: Path, point: Point
) -> None:
    root = tmp_path / "dataset"
    (tmp_path / "run").mkdir()
    for image, (first, _) in IMAGES.items():
        make_image(root / image, first)

    # 1. captioned; the sidecars are captiond's
    d = daemon_for(tmp_path, root, wd_model_dir).start()
    wait_for(captioned(root, 0))
    wait_for(d.idle)
    if point.first_run_killed:
        d.kill9()
    else:
        assert d.stop() == 0
    db = d.state_dir / "captiond.db"

    # 2. the images change; the run that rewrites their sidecars is killed at the point
    for image, (_, second) in IMAGES.items():
        make_image(root / image, second)
    d = daemon_for(tmp_path, root, wd_model_dir, crash=point.name, checkpoint=0.1)
    offset = len(d.logs())
    before = file_state(db)
    d.start(wait=False)
    assert d.wait_exit(timeout=60) == -signal.SIGKILL, d.logs()[offset:]
    crash = Crash(root, db, log_records(d, offset), before)
    point.left(crash)
    with read_only(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # 3. a run without the crash point finishes the work
    d = daemon_for(tmp_path, root, wd_model_dir).start()
    wait_for(captioned(root, 1))
    wait_for(d.idle)
    totals = d.totals()
    assert (totals.get("done"), totals.get("failed", 0), totals.get("dead", 0)) == (3, 0, 0)
    texts = {img: sidecar(root, img).read_bytes() for img in IMAGES}
    # captiond's own: a recaption queues every sidecar it wrote and nobody edited
    code, body = request(d.socket, "POST", "/api/queue/rescan", b'{"recaption": true}')
    assert (code, body["recaption_enqueued"]) == (200, len(IMAGES)), body
    wait_for(lambda: d.status()["queue"]["outcomes"] == {GENERATOR: {"unchanged": 3}})
    wait_for(d.idle)
    assert d.stop() == 0

    names = {p.name for p in root.iterdir()}
    assert names == set(IMAGES) | {sidecar(root, img).name for img in IMAGES}
    assert temp_files(root) == []
    assert {img: sidecar(root, img).read_bytes() for img in IMAGES} == texts
    for text in texts.values():
        assert text.count(b"\n") == 1
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        assert dict(states) == {"done": len(IMAGES)}
    finally:
        conn.close()


def process_gone(pid: int) -> bool:
    """Exited (or a zombie nobody reaped yet: no longer running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_kill_while_a_model_loads_in_its_own_process_leaves_that_process_to_exit(
    tmp_path: Path, wd_model_dir: Path
) -> None:
    """A heavy model loads in its own process: when the daemon is killed with the
    weights in memory there, that process must not linger holding them."""
    root = tmp_path / "dataset"
    (tmp_path / "run").mkdir()
    make_image(root / "a.png", "red")
    make_image(root / "b.png", "green", size=(32, 32))

    def daemon(crash: str = "") -> DaemonProcess:
        return DaemonProcess(
            tmp_path / "run",
            [root],
            wd_model_dir,
            watch={"generators": ["heavy_echo"]},
            sections={"worker": {"batch_size": 4, "preload": [], "load_retry_seconds": 0.5}},
            env={"CAPTIOND_CRASH_AT": crash} if crash else {},
            generators={"heavy_echo": "tests.residency_gens:HeavyEcho"},
        )

    d = daemon("model_load")
    d.start(wait=False)
    assert d.wait_exit(timeout=60) == -signal.SIGKILL, d.logs()
    (started,) = d.events("model_process_started")
    assert started["generator"] == "heavy_echo" and d.events("model_loaded") == []
    wait_for(lambda: process_gone(started["pid"]), timeout=30)

    d = daemon().start()
    wait_for(lambda: sidecar(root, "b.png").exists() and sidecar(root, "a.png").exists())
    wait_for(d.idle)
    assert sidecar(root, "a.png").read_text() == "echo a.png 64x48.\n"
    assert sidecar(root, "b.png").read_text() == "echo b.png 32x32.\n"
    code, body = request(d.socket, "POST", "/api/queue/rescan", b'{"recaption": true}')
    assert (code, body["recaption_enqueued"]) == (200, 2), body
    wait_for(lambda: d.status()["queue"]["outcomes"] == {"heavy_echo": {"unchanged": 2}})
    assert d.stop() == 0
    assert {p.name for p in root.iterdir()} == {"a.png", "a.txt", "b.png", "b.txt"}
