"""The daemon caps glibc's malloc arenas (daemon.residency.memory.limit_malloc_arenas):
large buffers freed on many long-lived threads must not stay resident, one arena per
thread, for the life of the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Eight long-lived threads (a server's request threads, the decode threads) each,
# five times: allocate, touch and free a 4 MiB buffer (a file read whole, a decoded
# image), keeping a small allocation made after it (which pins the heap above the hole,
# as a thread's other work does). First one large free in the main thread, which
# raises glibc's mmap threshold above 4 MiB as the first decoded image does. Prints the
# growth of RSS in MB.
SCRIPT = """
import sys, threading, time
from daemon.residency.memory import limit_malloc_arenas, rss_mb
if sys.argv[1] == "capped":
    assert limit_malloc_arenas(cpus=2) == 2
del bytearray(8 << 20)[:]
base = rss_mb()
keep = []
def work():
    for _ in range(5):
        small = [bytearray(64) for _ in range(100)]  # the thread's other work
        b = bytearray(4 << 20)
        b[::4096] = b"x" * len(range(0, len(b), 4096))
        keep.append(bytearray(1000))
        del b
        time.sleep(0.01)
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


def test_buffers_freed_on_many_threads_stay_in_few_arenas():
    capped = growth_mb("capped")
    assert capped < 40, f"RSS grew {capped:.1f} MB"  # measured: 16 MB
    # without the cap every thread's arena keeps its own (measured: 64 MB)
    assert growth_mb("default") > 48


def test_the_cap_follows_the_cpus_and_the_environment_rules(monkeypatch):
    from daemon.residency import memory

    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: FakeLibc())
    assert memory.limit_malloc_arenas(cpus=2) == 2
    assert memory.limit_malloc_arenas(cpus=64) == 16
    assert calls == [(memory.M_ARENA_MAX, 2), (memory.M_ARENA_MAX, 16)]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_malloc_arenas(cpus=64) is None
    assert len(calls) == 2


def test_captiond_run_caps_the_arenas_before_the_daemon_starts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import daemon.app
    import daemon.residency.memory as memory
    from daemon.cli import main

    calls: list[str] = []
    monkeypatch.setattr(memory, "limit_malloc_arenas", lambda: calls.append("capped"))
    import daemon.report.tokens as tokens

    monkeypatch.setattr(tokens, "encode_on_the_callers_thread", lambda: calls.append("serial"))

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
    assert calls == ["capped", "serial", "daemon"]
