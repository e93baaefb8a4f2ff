"""The daemon as a subprocess on temporary folders: the spine end to end with the
tiny WD-contract model (tests/wdmodel.py)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.confined import is_temp_name
from tests.daemonproc import DaemonProcess, image_bytes, make_image, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "dataset"
    r.mkdir()
    return r


@pytest.fixture
def daemon(tmp_path: Path, root: Path, wd_model_dir: Path):
    procs: list[DaemonProcess] = []

    def make(**kw) -> DaemonProcess:
        d = DaemonProcess(tmp_path / "run", [root], wd_model_dir, **kw)
        procs.append(d)
        return d

    (tmp_path / "run").mkdir()
    yield make
    for d in procs:
        d.stop()


def sidecars(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.txt"))


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def written_paths(d: DaemonProcess) -> list[str]:
    return [e["path"] for e in d.events("caption_written")]


def test_existing_and_dropped_images_get_one_sidecar_each(daemon, root):
    make_image(root / "before.png", "red")
    make_image(root / "sub" / "deep.jpg", "blue")
    d = daemon().start()
    wait_for(lambda: len(sidecars(root)) == 2)
    assert "red background" in (root / "before.txt").read_text()
    assert "blue background" in (root / "sub" / "deep.txt").read_text()

    # dropped in one go
    (root / "dropped.png").write_bytes(image_bytes("green"))
    wait_for(lambda: (root / "dropped.txt").exists())
    assert "green background" in (root / "dropped.txt").read_text()
    wait_for(d.idle)
    assert sorted(written_paths(d)) == sorted(
        str(root / p) for p in ["before.png", "sub/deep.jpg", "dropped.png"]
    )
    assert (root / "dropped.txt").read_text().endswith("\n")


def test_slow_copy_renamed_and_moved_in(daemon, root, tmp_path):
    d = daemon().start()
    wait_for(d.idle)
    # a slow copy: a partial file first, the rest after a pause shorter than settle
    data = image_bytes("red", size=(256, 256))
    with open(root / "slow.png", "wb") as fh:
        fh.write(data[: len(data) // 3])
        fh.flush()
        time.sleep(0.2)
        fh.write(data[len(data) // 3 :])
    # rsync style: a temp dotfile renamed to its real name
    tmp = root / ".renamed.png.Xy12Ab"
    tmp.write_bytes(image_bytes("blue"))
    os.rename(tmp, root / "renamed.png")
    # a folder with images moved in from outside the tree
    outside = tmp_path / "outside" / "album"
    make_image(outside / "one.png", "green")
    make_image(outside / "two.jpg", "red")
    os.rename(outside, root / "album")
    expected = ["album/one.txt", "album/two.txt", "renamed.txt", "slow.txt"]
    wait_for(lambda: sidecars(root) == expected)
    wait_for(d.idle)
    assert "red background" in (root / "slow.txt").read_text()
    assert "blue background" in (root / "renamed.txt").read_text()
    written = written_paths(d)
    assert len(written) == len(set(written)) == 4  # once each
    assert d.status()["queue"]["totals"].get("failed", 0) == 0


def test_restart_redoes_nothing_and_touch_does_not_recaption(daemon, root):
    for i, color in enumerate(["red", "green", "blue"]):
        make_image(root / f"img{i}.png", color)
    d = daemon().start()
    wait_for(lambda: len(sidecars(root)) == 3)
    wait_for(d.idle)
    assert d.stop() == 0

    os.utime(root / "img0.png")  # touched, same bytes
    d2 = daemon().start()
    wait_for(d2.idle)
    # the log file is shared: count writes across both runs
    assert len(d2.events("caption_written")) == 3
    # a real content change re-captions the image, replacing captiond's own sidecar
    (root / "img1.png").write_bytes(image_bytes("blue"))
    wait_for(lambda: "blue background" in (root / "img1.txt").read_text())
    wait_for(d2.idle)
    assert len(d2.events("caption_written")) == 4


def test_kill9_mid_batch_then_restart(daemon, root):
    n = 60
    for i in range(n):
        make_image(root / f"p{i:03d}.png", ["red", "green", "blue"][i % 3], size=(400, 300))
    d = daemon(sections={"worker": {"batch_size": 2, "load_retry_seconds": 0.5}})
    d.start()
    wait_for(lambda: len(sidecars(root)) >= 3, timeout=30, interval=0.01)
    d.kill9()
    assert len(sidecars(root)) < n, "the daemon finished before it could be killed"
    d.start()
    wait_for(lambda: len(sidecars(root)) == n, timeout=60)
    wait_for(d.idle)
    assert sidecars(root) == [f"p{i:03d}.txt" for i in range(n)]
    for i in range(n):
        text = (root / f"p{i:03d}.txt").read_text()
        assert f"{['red', 'green', 'blue'][i % 3]} background" in text
        assert text.count("\n") == 1
    assert temp_files(root) == []
    d.stop()
    db = sqlite3.connect(d.state_dir / "captiond.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    states = dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert states == {"done": n}


def test_bad_images_fail_cleanly(daemon, root):
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    good = image_bytes("red", fmt="JPEG")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    make_image(root / "bomb.png", "red", size=(2000, 2000))
    make_image(root / "fine.png", "green")
    old = time.time() - 60  # not "still being written"
    for name in ["empty.jpg", "text.png", "truncated.jpg", "bomb.png"]:
        os.utime(root / name, (old, old))
    d = daemon(sections={"worker": {"max_image_pixels": 1_000_000, "load_retry_seconds": 0.5}})
    d.start()
    wait_for(lambda: d.totals().get("failed", 0) == 4, timeout=30)
    wait_for(d.idle)
    assert sidecars(root) == ["fine.txt"]
    errors = {Path(e["path"]).name: e for e in d.status()["recent_errors"]}
    assert set(errors) == {"empty.jpg", "text.png", "truncated.jpg", "bomb.png"}
    assert {e["error_type"] for e in errors.values()} == {"bad_image"}
    assert all(e["state"] == "failed" for e in errors.values())
    assert d.healthy()
    # a fixed file is picked up again
    (root / "text.png").write_bytes(image_bytes("blue"))
    wait_for(lambda: (root / "text.txt").exists())


def test_edited_and_foreign_sidecars_are_left_alone(daemon, root):
    make_image(root / "mine.png", "red")
    make_image(root / "theirs.png", "red")
    (root / "theirs.txt").write_text("a caption a person wrote\n")
    d = daemon().start()
    wait_for(lambda: (root / "mine.txt").exists())
    wait_for(d.idle)
    assert (root / "theirs.txt").read_text() == "a caption a person wrote\n"
    # a person edits captiond's caption, then the image changes
    (root / "mine.txt").write_text("red background, hand-fixed\n")
    (root / "mine.png").write_bytes(image_bytes("blue"))
    wait_for(
        lambda: d.status()["queue"]["outcomes"].get("wd_tagger", {}).get("caption_edited") == 1
    )
    assert (root / "mine.txt").read_text() == "red background, hand-fixed\n"
    outcomes = d.status()["queue"]["outcomes"]["wd_tagger"]
    assert outcomes.get("caption_exists") == 1


def test_overwrite_policy_applies_to_foreign_caption_at_first_sight(daemon, root):
    make_image(root / "a.png", "red")
    (root / "a.txt").write_text("old caption\n")
    d = daemon(watch={"existing_caption": "prepend"}).start()
    wait_for(lambda: (root / "a.txt").read_text() != "old caption\n")
    text = (root / "a.txt").read_text()
    assert "red background" in text and text.endswith(", old caption\n")
    wait_for(d.idle)


def test_stem_clash(daemon, root):
    make_image(root / "a.jpg", "red")
    d = daemon().start()
    wait_for(lambda: (root / "a.txt").exists())
    wait_for(d.idle)
    make_image(root / "a.png", "blue")
    wait_for(lambda: (root / "a.png.txt").exists())
    assert "red background" in (root / "a.txt").read_text()
    assert "blue background" in (root / "a.png.txt").read_text()
    clashes = d.status()["worker"]["stem_clashes"]
    assert [c["image"] for c in clashes] == [str(root / "a.png")]
    d.stop()  # the list of clashes outlives a restart
    d.start()
    clashes = d.status()["worker"]["stem_clashes"]
    assert [(c["image"], c["shares_stem_with"]) for c in clashes] == [
        (str(root / "a.png"), "a.jpg")
    ]
    # two new images sharing a stem at once: the first name in sort order takes it
    make_image(root / "b.png", "green")
    make_image(root / "b.jpg", "blue")
    wait_for(lambda: {"b.txt", "b.png.txt"} <= set(sidecars(root)))
    wait_for(d.idle)
    assert "blue background" in (root / "b.txt").read_text()
    assert "b.jpg.txt" not in sidecars(root)
    # the clash ends (a.jpg deleted) and a.png changes: it keeps its own sidecar
    (root / "a.jpg").unlink()
    (root / "a.png").write_bytes(image_bytes("green"))
    wait_for(lambda: "green background" in (root / "a.png.txt").read_text())
    wait_for(d.idle)
    assert "red background" in (root / "a.txt").read_text()


def test_model_download_failure_keeps_jobs_waiting(daemon, root):
    make_image(root / "a.png", "red")
    d = daemon(
        sections={"generators.wd_tagger": {"model": "captiond-test/no-such-model"}},
    ).start()

    def failed_download():
        g = d.status()["generators"]["wd_tagger"]
        return g["state"] == "failed" and g["last_error"]["error_type"] == "model_download"

    wait_for(failed_download)
    wait_for(lambda: d.totals().get("pending") == 1)
    failures = len(d.events("model_load_failed"))
    # two more load attempts (load_retry_seconds 0.5, doubling) and the job still waits
    wait_for(lambda: len(d.events("model_load_failed")) >= failures + 2, timeout=30)
    totals = d.totals()
    assert totals.get("pending") == 1 and not totals.get("failed") and not totals.get("dead")
    assert d.healthy()
    assert not (root / "a.txt").exists()


def test_status_cli(daemon, root):
    import subprocess
    import sys

    make_image(root / "a.png", "red")
    d = daemon().start()
    wait_for(d.idle)
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(d.config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wd_tagger" in proc.stdout and "loaded" in proc.stdout
    assert "1 written" in proc.stdout
    d.stop()
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(d.config), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "not running" in proc.stderr


def test_systemd_notify_ready_status_and_watchdog(daemon, root, tmp_path):
    import socket

    make_image(root / "a.png", "red")
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(0.2)
    d = daemon(env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"}).start(wait=False)
    got: list[str] = []

    def received(prefix: str) -> bool:
        try:
            while True:
                got.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            pass
        return any(line.startswith(prefix) for line in got)

    wait_for(lambda: received("READY=1"), timeout=30)
    assert d.healthy()  # READY=1 came once the socket, database and watchers were up
    wait_for(lambda: received("STATUS=queue:"))
    pings = sum(line == "WATCHDOG=1" for line in got)
    wait_for(lambda: received("WATCHDOG=1") and sum(x == "WATCHDOG=1" for x in got) > pings + 2)
    d.stop()
    assert received("STOPPING=1")
    sock.close()


def test_second_instance_refuses_and_leaves_the_first_alone(daemon, root, wd_model_dir):
    make_image(root / "a.png", "red")
    first = daemon().start()
    wait_for(first.idle)
    second = DaemonProcess(first.workdir, [root], wd_model_dir)  # same config and socket
    second.log = first.workdir / "second.log"
    second.start(wait=False)
    assert second.proc.wait(30) == 1
    assert "already running" in second.logs()
    assert first.healthy()
    make_image(root / "b.png", "blue")
    wait_for(lambda: (root / "b.txt").exists())


def test_generator_options_reach_the_sidecar(daemon, root):
    make_image(root / "a.png", "red")
    d = daemon(
        watch={"trigger_word": "sks"},
        sections={"generators.wd_tagger": {"remove_underscores": False, "rating": "first"}},
    ).start()
    wait_for(lambda: (root / "a.txt").exists())
    # trigger word first, then the rating, underscores kept by both tagger and pipeline
    assert (
        root / "a.txt"
    ).read_text() == "sks, general, simple_background, red_background, no_humans\n"
    wait_for(d.idle)


def test_metrics_endpoint(daemon, root):
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.client import UnixHTTPConnection

    make_image(root / "a.png", "red")
    (root / "bad.png").write_text("not an image")
    old = time.time() - 60
    os.utime(root / "bad.png", (old, old))
    d = daemon().start()
    wait_for(lambda: d.totals().get("failed") == 1 and (root / "a.txt").exists())
    wait_for(d.idle)
    conn = UnixHTTPConnection(d.socket)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(resp.read().decode())
        for s in fam.samples
    }
    assert samples[("captiond_captions_written_total", (("generator", "wd_tagger"),))] == 1
    key = ("captiond_failures_total", (("error_type", "bad_image"), ("generator", "wd_tagger")))
    assert samples[key] == 1
    assert samples[("captiond_jobs", (("generator", "wd_tagger"), ("state", "failed")))] == 1
    assert samples[("captiond_model_loaded", (("generator", "wd_tagger"),))] == 1
    assert samples[("captiond_generation_seconds_count", (("generator", "wd_tagger"),))] >= 1


def test_named_generator_instances_per_watch(daemon, root, wd_model_dir):
    make_image(root / "a.png", "red")
    d = daemon(
        watch={
            "generators": ["wd_tagger", "strict"],
            "sidecar_extension": {"wd_tagger": "txt", "strict": "strict"},
        },
        sections={
            "generators.strict": {
                "use": "wd_tagger",
                "model": str(wd_model_dir),
                "general_threshold": 0.55,
            }
        },
    ).start()
    wait_for(lambda: (root / "a.txt").exists() and (root / "a.strict").exists())
    assert (root / "a.txt").read_text() == "simple background, red background, no humans\n"
    assert (root / "a.strict").read_text() == "simple background\n"
    wait_for(d.idle)
    status = d.status()
    assert status["generators"]["strict"]["state"] == "loaded"
    assert status["queue"]["outcomes"]["strict"] == {"written": 1}


def test_a_hung_read_is_given_up_and_does_not_block_shutdown(daemon, root):
    """A read that never returns, as on a hung network mount (the fault seam hangs the
    read of hung.jpg for ever): the job fails as io after read_timeout_seconds, other
    images are still captioned, and SIGTERM still stops the daemon at once (Python would
    otherwise join the stuck thread at exit)."""
    make_image(root / "hung.jpg", "blue")
    d = daemon(
        sections={"worker": {"read_timeout_seconds": 1.0, "batch_size": 2}},
        env={"CAPTIOND_HANG": "read:hung.jpg"},
    ).start()
    wait_for(lambda: d.totals().get("failed", 0) + d.totals().get("dead", 0) >= 1, timeout=60)
    error = d.status()["recent_errors"][0]
    assert Path(error["path"]).name == "hung.jpg" and error["error_type"] == "io"
    assert "longer than 1 s" in error["error"]
    make_image(root / "fine.png", "green")
    wait_for(lambda: (root / "fine.txt").exists(), timeout=30)
    t0 = time.monotonic()
    assert d.stop(timeout=20) == 0
    assert time.monotonic() - t0 < 15
    assert "exit_with_stuck_reads" in d.logs()
    assert not (root / "hung.txt").exists()


def test_a_fifo_named_like_an_image_is_refused_at_once(daemon, root):
    """A FIFO can never block a read: it is opened non-blocking, seen not to be a
    regular file, and its job fails at once with a clear, non-retryable error."""
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    d = daemon(sections={"worker": {"read_timeout_seconds": 30.0}})
    # The scanner skips what is not a regular file; a queued job for it stands in for a
    # file replaced by a FIFO after it was queued.
    from daemon.queue import Database, JobQueue

    db = Database(d.state_dir / "captiond.db")
    JobQueue(db).enqueue(str(fifo), "wd_tagger", 100)
    db.close()
    d.start()
    wait_for(lambda: d.totals().get("failed", 0) >= 1, timeout=20)
    error = d.status()["recent_errors"][0]
    assert Path(error["path"]).name == "pipe.jpg" and error["error_type"] == "io"
    assert "not a regular file" in error["error"]
    assert not (root / "pipe.txt").exists()


def test_sidecars_over_1_mib_are_left_alone(daemon, root):
    """A sidecar larger than 1 MiB is never read or replaced, whatever the policy: the
    job fails as io (not retried) and the file keeps its bytes, inode and mtime. One of
    exactly 1 MiB is an ordinary caption (overwritten here, as the policy says)."""
    from daemon.client import request

    limit = 1 << 20
    make_image(root / "big.png", "red")
    make_image(root / "edge.png", "green")
    big, edge = root / "big.txt", root / "edge.txt"
    big.write_bytes(b"x" * (limit + 1))
    edge.write_bytes(b"y" * limit)
    before = os.stat(big)
    d = daemon(watch={"existing_caption": "overwrite"}).start()
    wait_for(lambda: d.totals().get("failed") == 1 and d.totals().get("done") == 1)
    wait_for(d.idle)
    (error,) = d.status()["recent_errors"]
    assert Path(error["path"]).name == "big.png"
    assert (error["error_type"], error["state"]) == ("io", "failed")
    assert "larger than 1 MiB" in error["error"] and error["attempts"] == 1
    assert "green background" in edge.read_text()  # exactly 1 MiB: replaced
    # asked explicitly, with force: still refused, still untouched
    code, body = request(d.socket, "POST", "/api/generate-caption/_/big.png?force=true", timeout=30)
    assert code >= 400 and body["error_type"] == "io", body
    after = os.stat(big)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert big.read_bytes() == b"x" * (limit + 1)
    assert temp_files(root) == []
    assert written_paths(d) == [str(root / "edge.png")]
