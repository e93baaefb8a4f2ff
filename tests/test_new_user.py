"""What a new user trips on (issue 16), walked through as a NAS owner would: the quick
start's `run --watch`, a dataset reached through a symlink, `caption` while paused,
`caption --once` twice, kohya's everyday options, the small CLI promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.daemonproc import make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, **kw):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIOND_")}
    full |= {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"} | (env or {})
    cwd = cwd or Path(full.get("HOME", "/"))  # not the repository: its config.toml would win
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


@pytest.fixture
def home(tmp_path: Path, wd_model_dir: Path) -> dict[str, str]:
    """A user's environment: XDG dirs under tmp, a config with the tiny model."""
    cfg = tmp_path / "xdg" / "captiond" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'socket_path = "{tmp_path / "c.sock"}"\n'
        "[generators.wd_tagger]\n"
        f'model = "{wd_model_dir}"\n'
    )
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "XDG_STATE_HOME": str(tmp_path / "xstate"),
        "HOME": str(tmp_path),
    }


@pytest.fixture
def run_watch(tmp_path: Path, home: dict[str, str]):
    procs = []

    def start(folder: Path, *extra: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIOND_")}
        env |= {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"} | home
        log = open(tmp_path / f"daemon{len(procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--watch", str(folder), *extra],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append((p, log))
        wait_for(lambda: cli("status", env=home).returncode == 0, timeout=30)
        return p

    yield start
    for p, log in procs:
        p.terminate()
        p.wait(30)
        log.close()


def test_the_quick_start_folder_through_a_symlink_gets_txt_captions_and_caption_works(
    tmp_path: Path, home: dict[str, str], run_watch
) -> None:
    """`run --watch ~/datasets/x` where x links to the NAS: live changes arrive, the
    sidecars are .txt (what trainers read), `captiond caption` accepts either spelling."""
    nas = tmp_path / "mnt" / "nas" / "x"
    make_image(nas / "old.png", "red")
    (tmp_path / "datasets").mkdir()
    link = tmp_path / "datasets" / "x"
    link.symlink_to(nas)
    run_watch(link)
    wait_for(lambda: (nas / "old.txt").exists())
    make_image(link / "new.png", "blue")  # a live drop through the link
    wait_for(lambda: (nas / "new.txt").exists(), timeout=20)
    status = json.loads(cli("status", "--json", env=home).stdout)
    w = status["watchers"]["x"]
    assert w["path"] == str(nas) and w["events_seen"] > 0
    assert "blue background" in (nas / "new.txt").read_text()
    # `caption` on either spelling of a path, and on the folder
    (nas / "new.txt").unlink()
    for spelling in (
        link / "new.png",
        nas / "new.png",
        tmp_path / "datasets" / ".." / "mnt" / "nas" / "x" / "new.png",
    ):
        out = cli("caption", "--redo", str(spelling), env=home)
        assert out.returncode == 0, out.stderr
    assert (nas / "new.txt").exists()
    out = cli("caption", str(link), env=home)
    assert out.returncode == 0 and "2 left alone" in out.stdout, out.stdout + out.stderr
    assert out.stdout.count("captiond's own caption is there (--redo makes it again)") == 2


def test_caption_says_at_once_that_the_queue_is_paused_and_timeout_ends_the_wait(
    tmp_path: Path, home: dict[str, str], run_watch
) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    run_watch(folder)
    assert cli("pause", env=home).returncode == 0
    human = cli("status", env=home).stdout
    assert "PAUSED: no job is claimed" in human
    make_image(folder / "p.png", "red")
    t0 = time.monotonic()
    out = cli("caption", "--timeout", "3", str(folder / "p.png"), env=home)
    assert out.returncode == 1
    assert "waiting: the queue is paused" in out.stderr
    assert "stopped waiting (3 s)" in out.stderr and time.monotonic() - t0 < 30
    assert cli("resume", env=home).returncode == 0
    assert cli("pause", "pics", env=home).returncode == 0
    assert "PAUSED: folder pics" in cli("status", env=home).stdout
    cli("resume", env=home)


def test_caption_once_remembers_what_it_wrote_and_keeps_a_persons_caption(
    tmp_path: Path, home: dict[str, str]
) -> None:
    folder = tmp_path / "ds"
    make_image(folder / "a.png", "red")
    make_image(folder / "b.png", "green")
    first = cli("caption", "--once", str(folder), env=home)
    assert first.returncode == 0, first.stderr
    assert "2 written" in first.stdout
    assert '"event"' not in first.stderr  # no JSON log lines mixed in
    assert (folder / "a.txt").exists() and (folder / "b.txt").exists()
    again = cli("caption", "--once", str(folder), env=home)
    assert "nothing new to do" in again.stdout, again.stdout
    # a changed image gets a new caption; a person's edit stays, and says why
    make_image(folder / "a.png", "blue", size=(80, 60))
    (folder / "b.txt").write_text("my own words\n")
    make_image(folder / "b.png", "red", size=(81, 61))
    third = cli("caption", "--once", str(folder), env=home)
    assert "1 written" in third.stdout and "1 caption_edited" in third.stdout, third.stdout
    assert "left alone:" in third.stdout and "edited by a person" in third.stdout
    assert "blue background" in (folder / "a.txt").read_text()
    assert (folder / "b.txt").read_text() == "my own words\n"
    # --redo makes captiond's own again, still not the person's
    redo = cli("caption", "--once", "--redo", str(folder), env=home)
    assert "1 unchanged" in redo.stdout and (folder / "b.txt").read_text() == "my own words\n"
    # --overwrite replaces the person's too (no terminal here: no question)
    over = cli("caption", "--once", "--overwrite", str(folder), env=home)
    assert over.returncode == 0 and "red background" in (folder / "b.txt").read_text()


def test_caption_once_takes_kohyas_everyday_options(tmp_path: Path, home: dict[str, str]) -> None:
    folder = tmp_path / "k"
    make_image(folder / "a.png", "red")
    (folder / "b.caption").write_text("by hand")
    make_image(folder / "b.png", "red")
    out = cli(
        "caption", "--once", str(folder), "--ext", "caption", "--trigger-word", "sks",
        "--undesired-tags", "simple_background", "--general-threshold", "0.5",
        "--existing", "append", "--batch-size", "2", env=home,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    a = (folder / "a.caption").read_text()
    assert a.startswith("sks, ") and "simple background" not in a and "red background" in a
    b = (folder / "b.caption").read_text()
    assert b.startswith("sks, by hand") and "red background" in b  # appended, trigger first
    assert cli("caption", str(folder), "--ext", "txt", env=home).returncode == 2


def test_small_cli_promises(tmp_path: Path, home: dict[str, str], run_watch) -> None:
    folder = tmp_path / "s"
    make_image(folder / "a.png", "red")
    run_watch(folder)
    # --config works after the subcommand too
    cfg = Path(home["XDG_CONFIG_HOME"]) / "captiond" / "config.toml"
    assert cli("status", "--config", str(cfg), cwd=tmp_path).returncode == 0
    # config get is TOML
    assert cli("config", "set", "wd_tagger", "max_tags=2", env=home).returncode == 0
    got = cli("config", "get", "wd_tagger", env=home).stdout
    parsed = tomllib.loads(got)
    assert parsed["generators"]["wd_tagger"]["max_tags"] == 2
    assert "set through the API" in got and "revision = null" not in got
    # check-config writes the socket mode as written in the file
    check = cli("check-config", env=home).stdout
    assert '"socket_mode": "0o660"' in check and "wd_tagger: max_tags" in check
    # config reset drops the override at once
    out = cli("config", "reset", "wd_tagger", "max_tags", env=home)
    assert out.returncode == 0 and "generators.wd_tagger.max_tags" in out.stdout
    assert "set through the API" not in cli("config", "get", "wd_tagger", env=home).stdout
    # types --remove of a type in use, and retry -g of an unknown generator, are errors
    out = cli("types", "--remove", "txt", env=home)
    assert out.returncode == 1 and "in use" in out.stderr
    out = cli("retry", "-g", "nope", env=home)
    assert out.returncode == 1 and "nope" in out.stderr
    # models load of an available generator not in use says how to use it
    out = cli("models", "load", "vlm", env=home)
    assert out.returncode == 1 and "add it to a watch's generators" in out.stderr


def test_metrics_say_a_scan_mode_folder_is_watched(tmp_path: Path, home: dict[str, str]) -> None:
    from tests.daemonproc import DaemonProcess

    root = tmp_path / "scanned"
    root.mkdir()
    model = Path(
        tomllib.loads((Path(home["XDG_CONFIG_HOME"]) / "captiond" / "config.toml").read_text())[
            "generators"
        ]["wd_tagger"]["model"]
    )
    (tmp_path / "run").mkdir()
    d = DaemonProcess(tmp_path / "run", [root], model, watch={"watch_mode": "scan"})
    d.start()
    try:
        from daemon.client import request

        code, body = request(d.socket, "GET", "/metrics")
        assert code == 200
        text = body.get("raw", "")
        assert 'captiond_watcher_alive{mode="scan",root="scanned"} 1.0' in text, text[:2000]
    finally:
        d.stop()
