"""The daemon's process gives large buffers back to the system when they are freed
(daemon.residency.memory.give_back_large_buffers): image buffers freed on many threads
must not stay resident for the life of the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Eight threads each allocate, touch and free a 4 MiB buffer twenty times, all eight
# held at once (decoded images, file reads), after one large free in the main thread
# (which, by glibc's default, raises its mmap threshold). Prints RSS growth in MB.
SCRIPT = """
import sys, threading
from daemon.residency.memory import give_back_large_buffers, rss_mb
if sys.argv[1] == "fixed":
    assert give_back_large_buffers()
del bytearray(8 << 20)[:]  # one large buffer freed
base = rss_mb()
barrier = threading.Barrier(8)
def work():
    for _ in range(20):
        b = bytearray(4 << 20)
        b[::4096] = b"x" * len(range(0, len(b), 4096))
        barrier.wait()  # all eight held at once, each from its own thread's arena
        del b
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(rss_mb() - base)
"""


def growth_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def test_large_buffers_freed_on_threads_leave_no_resident_memory_behind():
    fixed = growth_mb("fixed")
    assert fixed < 8, f"RSS grew {fixed:.1f} MB"
    # the same without the call keeps them (glibc's default): the measure can tell
    assert growth_mb("default") > 16  # measured: 32 MB (eight arenas of 4 MB)


def test_the_environment_rules_when_it_sets_the_threshold(monkeypatch):
    from daemon.residency.memory import give_back_large_buffers

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert give_back_large_buffers() is False


def test_captiond_run_fixes_the_threshold_before_the_daemon_starts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import daemon.app
    import daemon.residency.memory as memory
    from daemon.cli import main

    calls: list[str] = []
    monkeypatch.setattr(memory, "give_back_large_buffers", lambda: calls.append("fixed"))

    class FakeDaemon:
        def __init__(self, settings):
            calls.append("daemon")

        def run_forever(self) -> int:
            return 0

    monkeypatch.setattr(daemon.app, "Daemon", FakeDaemon)
    (tmp_path / "photos").mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = CliRunner().invoke(main, ["--config", str(cfg), "run", "--watch", str(tmp_path / "photos")])
    assert r.exit_code == 0, r.output
    assert calls == ["fixed", "daemon"]
