"""The progress-gated systemd watchdog for real: the daemon as a subprocess with
NOTIFY_SOCKET pointing at a datagram socket this test reads and WATCHDOG_USEC set,
and a generator that blocks (tests/fakegen.py, registered as an entry point). While
the worker is stuck for longer than worker.stall_seconds, WATCHDOG=1 stops and STATUS=
goes on; once the block ends the pings resume."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemonproc import DaemonProcess, make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

INTERVAL = 0.5  # WATCHDOG_USEC / 2
STALL = 2.0  # worker.stall_seconds


class NotifySocket:
    """systemd's side: a bound datagram socket; every line received, in order, with
    the time it arrived."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="cdw-", dir="/tmp")  # short: sun_path limit
        self.path = str(Path(self._dir) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                self.lines += [(now, line) for line in data.decode().splitlines()]

    def seen(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def index_of(self, predicate) -> int | None:
        for i, (_, line) in enumerate(self.seen()):
            if predicate(line):
                return i
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def pings(lines: list[tuple[float, str]]) -> int:
    return sum(line == "WATCHDOG=1" for _, line in lines)


def test_watchdog_stops_while_the_worker_is_stuck_and_resumes(
    tmp_path: Path, wd_model_dir: Path, notify: NotifySocket
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    gate, started = tmp_path / "gate", tmp_path / "started"
    gate.touch()
    (tmp_path / "run").mkdir()
    d = DaemonProcess(
        tmp_path / "run",
        [root],
        wd_model_dir,
        watch={"generators": ["blocking"]},
        sections={
            "generators.blocking": {"gate": str(gate), "started": str(started)},
            "worker": {
                "batch_size": 1,
                "preload": [],
                "stall_seconds": STALL,
                "read_timeout_seconds": 1.0,
                "load_retry_seconds": 0.5,
            },
        },
        env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(2 * INTERVAL * 1e6))},
        generators={"blocking": "tests.fakegen:BlockingGenerator"},
    )
    d.start()
    try:
        wait_for(lambda: notify.index_of(lambda line: line == "READY=1") is not None)
        wait_for(lambda: pings(notify.seen()) >= 3)  # idle and healthy: fed
        assert d.status()["generators"]["blocking"]["available"]  # found as an entry point

        make_image(root / "stuck.png", "red")
        wait_for(started.exists)  # generate() is running, and blocks
        # the daemon reports the failing check (only the worker's)...
        wait_for(lambda: d.events("watchdog_check_failed"), timeout=STALL + 10)
        assert [e["check"] for e in d.events("watchdog_check_failed")] == ["_worker_progressing"]
        # ...and on the wire: STATUS= goes on while no WATCHDOG=1 comes. Each image
        # dropped in changes the status; the datagrams arrive in the order they were
        # sent, so a status line received proves no ping was sent before it unseen.
        last_ping = max(i for i, (_, line) in enumerate(notify.seen()) if line == "WATCHDOG=1")
        quiet_from = notify.seen()[last_ping][0]
        n = 0
        while True:
            n += 1
            make_image(root / f"queued{n}.png", "blue")
            wait_for(lambda n=n: notify.index_of(lambda line: f"{n} pending" in line) is not None)
            window = notify.seen()[last_ping + 1 :]
            if window[-1][0] - quiet_from >= 4 * INTERVAL and n >= 2:
                break
        assert pings(window) == 0, window
        statuses = [line for _, line in window if line.startswith("STATUS=")]
        assert "STATUS=queue: 1 pending, 1 working, 0 dead" in statuses
        assert f"STATUS=queue: {n} pending, 1 working, 0 dead" in statuses
        assert not (root / "stuck.txt").exists()

        gate.unlink()  # the block ends: work goes on, the pings resume
        before = pings(notify.seen())
        wait_for(lambda: pings(notify.seen()) >= before + 2, timeout=STALL + 10)
        assert d.events("watchdog_check_recovered")[0]["check"] == "_worker_progressing"
        wait_for(lambda: (root / "stuck.txt").exists() and len(list(root.glob("*.txt"))) == n + 1)
        wait_for(d.idle)
    finally:
        code = d.stop()
    assert code == 0
    wait_for(lambda: notify.index_of(lambda line: line == "STOPPING=1") is not None)
