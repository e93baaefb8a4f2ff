"""The CLI against a real daemon (subprocess), and `caption --once` without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess, image_bytes, make_image, wait_for

pytestmark = pytest.mark.slow


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def running(tmp_path: Path, wd_model_dir: Path):
    root = tmp_path / "data"
    root.mkdir()
    make_image(root / "a.png", "red")
    (tmp_path / "run").mkdir()
    d = DaemonProcess(tmp_path / "run", [root], wd_model_dir, watch={"settle_seconds": 0.2})
    d.start()
    wait_for(lambda: (root / "a.txt").exists())
    wait_for(d.idle)
    yield d, root
    d.stop()


def test_generators_config_types_and_logs(running):
    d, root = running
    out = cli(d.config, "generators")
    assert out.returncode == 0, out.stderr
    assert "wd_tagger" in out.stdout and "tags" in out.stdout
    data = json.loads(cli(d.config, "generators", "--json").stdout)
    assert any(g["name"] == "wd_tagger" for g in data["generators"])

    out = cli(d.config, "config", "set", "wd_tagger", "general_threshold=0.9", "rating=first")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(cli(d.config, "config", "get", "wd_tagger", "--json").stdout)
    assert cfg["wd_tagger"]["general_threshold"] == 0.9 and cfg["wd_tagger"]["rating"] == "first"
    bad = cli(d.config, "config", "set", "wd_tagger", "general_threshold=lots")
    assert bad.returncode == 1 and "general_threshold" in bad.stderr

    assert cli(d.config, "types", "--add", "caption").returncode == 0
    assert ".caption" in cli(d.config, "types").stdout

    (root / "broken.png").write_text("not an image")
    old = time.time() - 60
    os.utime(root / "broken.png", (old, old))
    wait_for(lambda: "bad_image" in cli(d.config, "logs").stdout, timeout=30)
    errors = json.loads(cli(d.config, "logs", "--json").stdout)
    assert errors[0]["error_type"] == "bad_image"


def test_caption_now_with_progress_and_force(running):
    d, root = running
    make_image(root / "sub" / "b.png", "blue")
    make_image(root / "sub" / "c (1) é.png", "green")  # needs quoting in a URL
    wait_for(lambda: (root / "sub" / "c (1) é.txt").exists())
    wait_for(d.idle)
    # existing captions are skipped without --force
    out = cli(d.config, "caption", str(root / "sub"))
    assert out.returncode == 0, out.stderr
    assert "0 captioned, 2 left alone, 0 failed" in out.stdout
    # a person edits one; --force replaces both
    (root / "sub" / "b.txt").write_text("edited\n")
    out = cli(d.config, "caption", "--force", str(root / "sub"), str(root / "a.png"))
    assert out.returncode == 0, out.stderr
    assert "3 captioned" in out.stdout
    assert "blue background" in (root / "sub" / "b.txt").read_text()
    outside = cli(d.config, "caption", str(Path(__file__)))
    assert outside.returncode == 1 and "not in a folder the daemon watches" in outside.stderr


def test_queue_control_and_models(running):
    d, root = running
    assert cli(d.config, "pause").returncode == 0
    (root / "new.png").write_bytes(image_bytes("green"))
    wait_for(lambda: d.totals().get("pending") == 1)  # queued...
    d.wait_worker_turns(2)  # ...and passed over by two whole worker turns
    assert d.totals().get("pending") == 1 and not d.totals().get("leased")
    assert not (root / "new.txt").exists()  # paused: nothing is claimed
    assert d.status()["worker"]["paused"] is True
    assert cli(d.config, "resume").returncode == 0
    wait_for(lambda: (root / "new.txt").exists())

    listed = json.loads(cli(d.config, "models", "list", "--json").stdout)
    assert [m["name"] for m in listed["models"]] == ["wd_tagger"]
    assert cli(d.config, "models", "unload", "wd_tagger").returncode == 0
    wait_for(lambda: d.status()["generators"]["wd_tagger"]["state"] != "loaded")
    assert "no model in memory" in cli(d.config, "models", "list").stdout
    out = cli(d.config, "models", "load", "wd_tagger", "--wait")
    assert out.returncode == 0, out.stderr
    assert d.status()["generators"]["wd_tagger"]["state"] == "loaded"
    missing = cli(d.config, "models", "load", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_rescan_reconciles_what_no_watcher_reported(tmp_path, wd_model_dir):
    """watch_mode = "scan" and no periodic scan: an image dropped in is found only by
    a reconcile. `captiond rescan` runs one; --recaption redoes captiond's own unedited
    captions with the current settings and leaves a person's edit alone."""
    root = tmp_path / "data"
    make_image(root / "a.png", "red")
    make_image(root / "b.png", "red")
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        watch={"watch_mode": "scan"},
        sections={"scan": {"interval_seconds": 0}},
    ).start()
    try:
        wait_for(d.idle)
        assert (root / "a.txt").exists() and (root / "b.txt").exists()
        first = d.status()["scans"]["last"]["data"]
        make_image(root / "late.png", "blue")  # no watcher: nobody notices
        out = cli(d.config, "rescan", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"roots": ["data"], "recaption_enqueued": 0}
        wait_for(lambda: (root / "late.txt").exists())
        assert "blue background" in (root / "late.txt").read_text()
        wait_for(lambda: d.status()["scans"]["last"]["data"]["at"] > first["at"])
        scan = d.status()["scans"]["last"]["data"]
        assert scan["ok"] and scan["files_seen"] == 3 and scan["new"] == 1

        # --recaption: a's caption is captiond's own, b's was edited by hand
        (root / "b.txt").write_text("edited by hand\n")
        out = cli(d.config, "config", "set", "wd_tagger", "max_tags=1")
        assert out.returncode == 0, out.stderr
        out = cli(d.config, "rescan", "data", "--recaption", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["recaption_enqueued"] == 2  # a and late, not b
        wait_for(lambda: (root / "a.txt").read_text().count(",") == 0)  # one tag now
        wait_for(lambda: (root / "late.txt").read_text().count(",") == 0)
        wait_for(d.idle)
        assert (root / "b.txt").read_text() == "edited by hand\n"
    finally:
        d.stop()


def test_commands_say_when_the_daemon_is_not_running(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"state_dir = '{tmp_path / 'state'}'\nsocket_path = '{tmp_path / 's.sock'}'\n")
    for args in (["status"], ["generators"], ["models", "list"], ["pause"]):
        out = cli(cfg, *args)
        assert out.returncode == 1
        assert "captiond is not running" in out.stderr
        assert "Traceback" not in out.stderr


def test_caption_once_without_a_daemon(tmp_path, wd_model_dir):
    folder = tmp_path / "set"
    make_image(folder / "r.png", "red")
    make_image(folder / "deep" / "b.jpg", "blue")
    (folder / "bad.png").write_text("nope")
    (folder / "keep.png").write_bytes(image_bytes("green"))
    (folder / "keep.txt").write_text("a person's caption\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"state_dir = '{tmp_path / 'state'}'\n"
        f"[generators.wd_tagger]\nmodel = '{wd_model_dir}'\n"
        f"[[watch]]\npath = '{tmp_path / 'set'}'\nsidecar_extension = 'txt'\n"
    )
    os.utime(folder / "bad.png", (time.time() - 60, time.time() - 60))
    out = cli(cfg, "caption", "--once", str(folder))
    assert out.returncode == 1  # one image failed
    assert "4 images" in out.stdout and "2 written" in out.stdout
    assert "1 caption_exists" in out.stdout and "bad_image" in out.stdout
    assert "red background" in (folder / "r.txt").read_text()
    assert "blue background" in (folder / "deep" / "b.txt").read_text()
    assert (folder / "keep.txt").read_text() == "a person's caption\n"
    assert not (folder / "bad.txt").exists()
    assert not (tmp_path / "state" / "captiond.db").exists()  # its own temporary database
    # --force replaces the person's caption too
    out = cli(cfg, "caption", "--once", "--force", str(folder), "--json")
    result = json.loads(out.stdout)
    assert result["outcomes"]["written"] == 3
    assert "green background" in (folder / "keep.txt").read_text()


def test_models_pull(tmp_path, wd_model_dir):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[generators.wd_tagger]\nmodel = '{wd_model_dir}'\n")
    out = cli(cfg, "models", "pull", "wd_tagger")
    assert out.returncode == 0 and str(wd_model_dir) in out.stdout
    cfg.write_text(
        f"cache_dir = '{tmp_path / 'cache'}'\n[generators.wd_tagger]\nmodel = 'nobody/no-model'\n"
    )
    out = cli(cfg, "models", "pull", "wd_tagger")
    assert out.returncode == 1 and "model" in out.stderr and "Traceback" not in out.stderr


def test_caption_once_with_a_kept_state_dir_reports_only_its_folder(tmp_path, wd_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "bad.png").parent.mkdir()
    (a / "bad.png").write_text("nope")
    os.utime(a / "bad.png", (time.time() - 60, time.time() - 60))
    make_image(b / "ok.png", "red")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"state_dir = '{tmp_path / 'st'}'\n[generators.wd_tagger]\nmodel = '{wd_model_dir}'\n"
    )
    keep = tmp_path / "once-state"
    assert cli(cfg, "caption", "--once", "--state-dir", str(keep), str(a)).returncode == 1
    out = cli(cfg, "caption", "--once", "--state-dir", str(keep), str(b), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["errors"] == [] and result["outcomes"] == {"written": 1}
    refused = cli(cfg, "caption", "--once", "--state-dir", str(tmp_path / "st"), str(b))
    assert refused.returncode == 2 and "daemon's own state directory" in refused.stderr
