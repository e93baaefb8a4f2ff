"""A full disk, a read-only share or a vanished server pauses captiond; it never kills
jobs or loses images (issue 17).

Two ways: real small tmpfs mounts made by the tests (as root; skipped otherwise, not a
missing dependency), and errors injected at the few system calls involved (always)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.client import request
from daemon.conditions import STATE, Conditions, condition_of, legacy_errno
from daemon.queue import Database, JobQueue
from tests.daemonproc import DaemonProcess, image_bytes, make_image, wait_for

pytestmark = [pytest.mark.timeout(240)]

FAST = {
    "queue": {"backoff_base_seconds": 0.2, "backoff_max_seconds": 0.5, "max_attempts": 2},
    "worker": {"batch_size": 4, "load_retry_seconds": 0.5, "condition_probe_seconds": 1.0},
}


# -- classification -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "network", "kind"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False, "disk_full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False, "quota"),
        (OSError(errno.EROFS, "Read-only file system"), False, "read_only"),
        (OSError(errno.ESTALE, "Stale file handle"), False, "stale_handle"),
        (OSError(errno.ENOTCONN, "not connected"), False, "unreachable"),
        (OSError(errno.EIO, "Input/output error"), True, "io_error"),
        (OSError(errno.EIO, "Input/output error"), False, None),  # a local disk: the image's
        (OSError(errno.EACCES, "Permission denied"), False, None),
        (ValueError("x"), False, None),
    ],
)
def test_conditions_are_told_by_errno(exc, network, kind) -> None:
    found = condition_of(exc, network_fs=network)
    assert (found[0] if found else None) == kind


def test_sqlite_full_is_a_state_condition(tmp_path: Path) -> None:
    err = sqlite3.OperationalError("database or disk is full")
    err.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert condition_of(err) == ("disk_full", None)
    c = Conditions(lambda scope, cond: None, lambda scope, cond: None)
    assert c.check("photos", err) and set(c.active()) == {STATE}
    assert legacy_errno("OSError: [Errno 28] No space left on device: 'x'") == 28


def test_a_condition_is_probed_with_backoff_and_cleared_once() -> None:
    now = [0.0]
    calls: list[float] = []
    cleared: list[str] = []
    ok = [False]

    def probe(scope, cond):
        calls.append(now[0])
        return None if ok[0] else "still full"

    c = Conditions(
        probe,
        lambda s, cond: cleared.append(s),
        clock=lambda: now[0],
        backoff_base=1,
        backoff_max=8,
    )
    assert c.report("photos", "disk_full", "ENOSPC")
    assert not c.report("photos", "disk_full", "again")  # one condition per scope
    for t in range(0, 40):
        now[0] = float(t)
        c.tick()
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[:3] == [2.0, 4.0, 8.0] and max(gaps) == 8.0  # backoff, capped
    ok[0] = True
    now[0] += 9
    c.tick()
    assert cleared == ["photos"] and c.active() == {} and c.cleared == 1


# -- the worker and pipeline in process, errors injected ------------------------------


def test_enospc_on_the_share_releases_jobs_without_attempts_and_resumes(
    tmp_path, wd_model_dir, monkeypatch
) -> None:
    """Sidecar writes fail with ENOSPC for longer than the retry window (max_attempts 2,
    backoff 0.2 s): no job dies; the root is paused; once writes work again, the probe
    clears it and every image gets its caption."""
    import daemon.app as app_module
    from daemon import confined
    from daemon.config import Settings, WatchConfig

    root = tmp_path / "share"
    for i in range(6):
        make_image(root / f"i{i}.png", "red")
    settings = Settings(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, settle_seconds=0.1)],
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        **FAST,
    )
    full = threading.Event()
    full.set()
    real_stage = confined.Folder.stage

    def stage(self, name, data, **kw):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_stage(self, name, data, **kw)

    monkeypatch.setattr(confined.Folder, "stage", stage)
    d = app_module.Daemon(settings)
    d.start()
    try:
        wait_for(lambda: "share" in d.conditions.active(), timeout=30)
        time.sleep(2.0)  # well past the retry window of the old behaviour
        totals = d.queue.totals()
        assert totals.get("dead", 0) == 0 and totals.get("failed", 0) == 0, totals
        status = d.status()
        assert status["conditions"]["share"]["kind"] == "disk_full"
        assert d.health()["status"] == "degraded"
        assert "PAUSED share" in d._status_line()
        full.clear()
        wait_for(lambda: all((root / f"i{i}.txt").exists() for i in range(6)), timeout=60)
        assert d.conditions.active() == {}
        assert d.queue.totals().get("dead", 0) == 0
        assert [p.name for p in root.iterdir() if confined.is_temp_name(p.name)] == []
        assert d.db.integrity_check() == "ok"
    finally:
        d.stop()


def test_a_full_state_disk_keeps_events_and_replays_them(
    tmp_path, wd_model_dir, monkeypatch
) -> None:
    """The database answers "database or disk is full": watcher events are kept in
    memory, status says so, and once it takes writes again every image is captioned
    within seconds, not at the next periodic scan."""
    import daemon.app as app_module
    from daemon.config import Settings, WatchConfig
    from daemon.queue import jobs as jobs_module

    root = tmp_path / "pics"
    root.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, settle_seconds=0.1)],
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        scan={"interval_seconds": 0},  # no periodic scan to hide behind
        **FAST,
    )
    d = app_module.Daemon(settings)
    d.start()
    full = threading.Event()
    real_many = jobs_module.JobQueue.enqueue_many
    real_probe = Database.probe_write

    def disk_full():
        err = sqlite3.OperationalError("database or disk is full")
        err.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
        return err

    def enqueue_many(self, items):
        if full.is_set():
            raise disk_full()
        return real_many(self, items)

    def probe_write(self):
        if full.is_set():
            raise disk_full()
        return real_probe(self)

    monkeypatch.setattr(jobs_module.JobQueue, "enqueue_many", enqueue_many)
    monkeypatch.setattr(Database, "probe_write", probe_write)
    try:
        wait_for(lambda: d.scans.last, timeout=20)
        full.set()
        for i in range(8):
            (root / f"n{i}.png").write_bytes(image_bytes("blue"))
        wait_for(lambda: STATE in d.conditions.active() and d.intake.backlog == 8, timeout=30)
        s = d.status()
        assert s["conditions"]["state"]["kind"] == "disk_full" and s["intake_backlog"] == 8
        assert not any((root / f"n{i}.txt").exists() for i in range(8))
        t0 = time.monotonic()
        full.clear()
        wait_for(lambda: all((root / f"n{i}.txt").exists() for i in range(8)), timeout=30)
        assert time.monotonic() - t0 < 20
        assert d.intake.replayed == 8 and d.conditions.active() == {}
        assert d.db.integrity_check() == "ok"
    finally:
        d.stop()


def test_jobs_killed_by_a_full_disk_in_an_earlier_version_come_back_on_rescan(tmp_path) -> None:
    from daemon.config import WatchConfig
    from daemon.queue import FileIndex
    from daemon.scanning.reconcile import Scanner

    root = tmp_path / "r"
    make_image(root / "a.png")
    make_image(root / "b.png")
    db = Database(tmp_path / "q.db")
    q, index = JobQueue(db), FileIndex(db)
    scanner = Scanner(index, q)
    w = WatchConfig(path=root)
    scanner.reconcile(w)
    for job in q.claim("wd_tagger", 10):  # as captiond 0.1 left them: dead, errno only in text
        msg = "OSError: [Errno 28] No space left on device" if job.path.endswith("a.png") else "bad"
        q.fail(job.id, "io" if "28" in msg else "bad_image", msg, False)
    assert q.count_systemic([errno.ENOSPC]) == 1
    scanner.reconcile(w)  # nothing changed on disk: only the condition's victim returns
    states = {Path(j.path).name: j.state for j in q.jobs(limit=10)}
    assert states == {"a.png": "pending", "b.png": "failed"}


# -- real mounts ------------------------------------------------------------------------


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    d = Path("/tmp") / f"cd-mount-probe-{os.getpid()}"
    d.mkdir(exist_ok=True)
    try:
        ok = (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True
            ).returncode
            == 0
        )
        if ok:
            subprocess.run(["umount", str(d)], capture_output=True)
        return ok
    finally:
        with contextlib.suppress(OSError):
            d.rmdir()


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def health(d: DaemonProcess) -> tuple[int, dict]:
    return request(d.socket, "GET", "/health")


@needs_mount
def test_share_full_for_long_then_freed_all_captioned_none_dead(tmp_path, wd_model_dir) -> None:
    with tmpfs(tmp_path / "nas", "512k") as share:
        for i in range(5):
            make_image(share / f"p{i}.png", "red")
        filler = fill(share)
        (tmp_path / "run").mkdir()
        d = DaemonProcess(tmp_path / "run", [share], wd_model_dir, sections=FAST).start()
        try:
            wait_for(lambda: d.status()["conditions"], timeout=30)
            code, body = health(d)
            assert code == 503 and body["status"] == "degraded"
            assert body["conditions"]["nas"]["kind"] == "disk_full"
            metrics = request(d.socket, "GET", "/metrics")[1]["raw"]
            assert 'captiond_condition{kind="disk_full",scope="nas"} 1.0' in metrics
            time.sleep(3)  # far beyond 2 attempts at 0.2-0.5 s
            assert d.totals().get("dead", 0) == 0 and d.totals().get("failed", 0) == 0
            filler.unlink()
            wait_for(lambda: all((share / f"p{i}.txt").exists() for i in range(5)), timeout=60)
            assert health(d)[0] == 200 and d.totals().get("dead", 0) == 0
        finally:
            d.stop()
        db = Database(d.state_dir / "captiond.db")
        assert db.integrity_check() == "ok"
        db.close()


@needs_mount
def test_state_disk_full_then_freed_captioned_within_seconds(tmp_path, wd_model_dir) -> None:
    root = tmp_path / "pics"
    root.mkdir()
    with tmpfs(tmp_path / "statefs", "2m") as statefs:
        (tmp_path / "run").mkdir()
        sections = FAST | {"scan": {"interval_seconds": 0}}
        d = DaemonProcess(
            tmp_path / "run",
            [root],
            wd_model_dir,
            sections=sections,
            top={"state_dir": str(statefs)},
        )
        d.start()
        try:
            wait_for(lambda: d.idle(), timeout=30)
            filler = fill(statefs)
            for i in range(6):
                (root / f"s{i}.png").write_bytes(image_bytes("green"))
            wait_for(lambda: "state" in d.status()["conditions"], timeout=40)
            code, body = health(d)
            assert code == 503 and body["conditions"]["state"]["kind"] in ("disk_full", "io_error")
            t0 = time.monotonic()
            filler.unlink()
            wait_for(lambda: all((root / f"s{i}.txt").exists() for i in range(6)), timeout=40)
            assert time.monotonic() - t0 < 30  # not at the next periodic scan
        finally:
            d.stop()
        db = Database(statefs / "captiond.db")
        assert db.integrity_check() == "ok"
        db.close()


@needs_mount
def test_a_root_remounted_read_only_then_read_write(tmp_path, wd_model_dir) -> None:
    with tmpfs(tmp_path / "ro", "4m") as share:
        (tmp_path / "run").mkdir()
        d = DaemonProcess(tmp_path / "run", [share], wd_model_dir, sections=FAST).start()
        try:
            wait_for(lambda: d.idle(), timeout=30)
            for i in range(3):
                make_image(share / f"r{i}.png", "blue")
            subprocess.run(["mount", "-o", "remount,ro", str(share)], check=True)
            wait_for(
                lambda: d.status()["conditions"].get("ro", {}).get("kind") == "read_only",
                timeout=40,
            )
            time.sleep(2)
            assert d.totals().get("dead", 0) == 0 and d.totals().get("failed", 0) == 0
            subprocess.run(["mount", "-o", "remount,rw", str(share)], check=True)
            wait_for(lambda: all((share / f"r{i}.txt").exists() for i in range(3)), timeout=60)
        finally:
            d.stop()


@needs_mount
def test_a_root_that_vanishes_and_comes_back(tmp_path, wd_model_dir) -> None:
    mount_point = tmp_path / "gone"
    mount_point.mkdir()
    (tmp_path / "run").mkdir()
    with tmpfs(mount_point, "4m"):
        for i in range(3):
            make_image(mount_point / f"v{i}.png", "red")
        d = DaemonProcess(tmp_path / "run", [mount_point], wd_model_dir, sections=FAST)
        d.start()
        wait_for(lambda: all((mount_point / f"v{i}.txt").exists() for i in range(3)), timeout=30)
        wait_for(d.idle)
        assert request(d.socket, "POST", "/api/queue/pause", b"{}")[0] == 200
        make_image(mount_point / "late.png", "green")
        wait_for(lambda: d.totals().get("pending", 0) == 1, timeout=20)
    # the share is gone (the mount point is an empty folder now)
    try:
        assert request(d.socket, "POST", "/api/queue/resume", b"{}")[0] == 200
        wait_for(
            lambda: d.status()["conditions"].get("gone", {}).get("kind") == "vanished", timeout=40
        )
        assert d.status()["files_indexed"] == 4  # nothing was forgotten
        assert d.totals().get("failed", 0) == 0 and d.totals().get("dead", 0) == 0
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True
        )
        for i in range(3):  # the server comes back with its files
            make_image(mount_point / f"v{i}.png", "red")
            (mount_point / f"v{i}.txt").write_text("simple background, red background, no humans\n")
        make_image(mount_point / "late.png", "green")
        wait_for(lambda: (mount_point / "late.txt").exists(), timeout=60)
        assert d.status()["conditions"] == {}
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
