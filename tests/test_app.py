"""Daemon wiring that needs no subprocess."""

import subprocess
import sys
from pathlib import Path

import daemon.app as app_module
from daemon.config import Settings


def test_warns_when_the_database_is_on_a_network_filesystem(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "fs_type", lambda path: "nfs4")
    settings = Settings(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock")
    d = app_module.Daemon(settings)
    try:
        assert any("network filesystem (nfs4)" in w for w in d.warnings)
        assert d.status()["warnings"] == d.warnings
    finally:
        d.db.close()


def test_local_state_dir_gives_no_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "fs_type", lambda path: "ext4")
    d = app_module.Daemon(Settings(state_dir=tmp_path / "s", socket_path=tmp_path / "s.sock"))
    try:
        assert d.warnings == []
    finally:
        d.db.close()


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "daemon", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    for word in ("run", "status", "check-config", "--config"):
        assert word in out
    run_help = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "--watch" in run_help and "foreground" in run_help


def test_run_without_folders_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"state_dir = '{tmp_path / 'st'}'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "no folders to watch" in proc.stderr


def test_corrupt_database_is_a_clear_error(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "captiond.db").write_bytes(b"this is not a database" * 100)
    root = tmp_path / "pics"
    root.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"state_dir = '{state}'\nsocket_path = '{tmp_path / 's.sock'}'\n"
        f"[[watch]]\npath = '{root}'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot open the queue database" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_looks_for_the_socket_where_services_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    s = Settings(state_dir=tmp_path / "st")
    assert s.client_socket_paths() == [
        tmp_path / "st" / "captiond.sock",
        Path("/run/captiond/captiond.sock"),
        tmp_path / "xdg" / "captiond" / "captiond.sock",
    ]
    assert Settings(socket_path=tmp_path / "x.sock").client_socket_paths() == [tmp_path / "x.sock"]


SHUTDOWN_SCRIPT = """
import sys, time
import daemon.app as app
from daemon.config import Settings
app.STOP_TIMEOUT_SECONDS = float(sys.argv[2])
d = app.Daemon(Settings(state_dir=sys.argv[1], socket_path=sys.argv[1] + "/s.sock"))
d.start = lambda: print("started", flush=True)
d.stop = lambda: (print("stopping", flush=True), time.sleep(100))  # a shutdown that hangs
d.run_forever()
"""


def _hanging_daemon(tmp_path, stop_timeout: float):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, str(tmp_path), str(stop_timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    return proc, time.monotonic()


def test_a_second_signal_exits_at_once(tmp_path):
    import signal
    import time

    proc, t0 = _hanging_daemon(tmp_path, 60)
    # the first signal was handled: stop() runs (structlog's lines come first)
    lines = iter(proc.stdout.readline, "")
    assert any(line.strip() == "stopping" for line in lines)
    assert proc.poll() is None  # and the shutdown hangs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 10


def test_a_hanging_shutdown_is_cut_short(tmp_path):
    import time

    proc, t0 = _hanging_daemon(tmp_path, 1.0)
    assert proc.wait(20) == 1
    assert time.monotonic() - t0 < 15
    assert "shutdown_timed_out" in proc.stdout.read()  # structlog default: stdout


def test_sigterm_delivered_to_another_thread_still_stops_the_daemon(tmp_path):
    script = """
import signal, sys, threading, time
import daemon.app as app
from daemon.config import Settings
d = app.Daemon(Settings(state_dir=sys.argv[1], socket_path=sys.argv[1] + "/s.sock"))
d.start = lambda: None
d.stop = lambda: print("stopped", flush=True)
other = threading.Thread(target=time.sleep, args=(30,), daemon=True)
other.start()
# the kernel may hand a process-directed signal to any thread: force a non-main one
threading.Timer(0.5, signal.pthread_kill, (other.ident, signal.SIGTERM)).start()
d.run_forever()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stdout


def test_a_tree_that_outgrew_the_watch_budget_switches_to_polling(tmp_path, monkeypatch):
    """A whole-root scan's folder count goes back to the watcher: past the inotify budget
    the root is polled (watchdog would silently drop the watches beyond the limit)."""
    from daemon.config import WatchConfig
    from daemon.scanning.reconcile import ScanStats

    monkeypatch.setattr(app_module, "fs_type", lambda path: "ext4")
    root = tmp_path / "data"
    root.mkdir()
    settings = Settings(
        state_dir=tmp_path / "s",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, watch_mode="inotify")],
    )
    d = app_module.Daemon(settings)
    try:
        name = settings.watch[0].name
        watcher = d.watchers.roots[name]
        if watcher.mode != "inotify":
            import pytest

            pytest.skip(f"no inotify here: {watcher.reason}")
        d.scans.on_root_scanned(name, ScanStats(str(root), dirs=10))
        assert watcher.mode == "inotify"
        d.scans.on_root_scanned(name, ScanStats(str(root), dirs=10**9))
        assert watcher.mode == "polling"
        assert "exceed the inotify watch budget" in watcher.reason
    finally:
        d.db.close()
