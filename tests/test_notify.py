"""sd_notify datagrams and the progress watchdog, against sockets the tests bind."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from daemon.notify import Heartbeat, Notifier, ProgressWatchdog, watchdog_interval

pytestmark = pytest.mark.timeout(30)


class Listener:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)

    def drain(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return out

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        finally:
            self.sock.settimeout(0.05)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener() -> Iterator[tuple[str, Listener]]:
    d = tempfile.mkdtemp(prefix="cdn-", dir="/tmp")
    address = os.path.join(d, "notify")
    lst = Listener(address)
    yield address, lst
    lst.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, Listener]]:
    name = f"captiond-test-{uuid.uuid4().hex}"
    lst = Listener("\0" + name)
    yield "@" + name, lst
    lst.close()


def test_path_socket_messages(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener
    n = Notifier({"NOTIFY_SOCKET": env})
    assert n.enabled
    assert n.ready(status="serving")
    assert lst.recv() == "READY=1\nSTATUS=serving"
    assert n.status("queue: 12 pending,\n3 leased")
    assert lst.recv() == "STATUS=queue: 12 pending, 3 leased"
    assert n.watchdog()
    assert lst.recv() == "WATCHDOG=1"
    assert n.stopping()
    assert lst.recv() == "STOPPING=1"
    assert n.extend_timeout(1.5)
    assert lst.recv() == "EXTEND_TIMEOUT_USEC=1500000"
    n.close()


def test_abstract_socket_messages(abstract_listener: tuple[str, Listener]) -> None:
    env, lst = abstract_listener
    n = Notifier({"NOTIFY_SOCKET": env})
    assert n.ready()
    assert lst.recv() == "READY=1"
    assert n.watchdog()
    assert lst.recv() == "WATCHDOG=1"


def test_reads_os_environ(
    path_listener: tuple[str, Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, lst = path_listener
    monkeypatch.setenv("NOTIFY_SOCKET", env)
    assert Notifier().ready()
    assert lst.recv() == "READY=1"


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False


def test_send_failure_never_raises() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/captiond/notify"})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False  # logged once, still no exception


def test_unsupported_address_disables() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "junk"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", "1" if os.getpid() != 1 else "2")
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0


def _wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_progress_watchdog_stops_and_resumes(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener
    healthy = threading.Event()
    healthy.set()

    def worker_alive() -> bool:
        return healthy.is_set()

    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), 0.05, [worker_alive, lambda: True])
    wd.start()
    try:
        assert _wait_for(lambda: wd.pings >= 3)
        assert set(lst.drain()) == {"WATCHDOG=1"}

        healthy.clear()
        time.sleep(0.1)  # let an in-flight tick finish
        lst.drain()
        paused_at = wd.pings
        time.sleep(0.3)  # ~6 intervals
        assert wd.pings == paused_at
        assert lst.drain() == []

        healthy.set()
        assert lst.recv(timeout=2.0) == "WATCHDOG=1"
        assert _wait_for(lambda: wd.pings >= paused_at + 2)
    finally:
        wd.stop()
    lst.drain()
    time.sleep(0.15)
    assert lst.drain() == []  # stop() really stops


def test_raising_check_counts_as_failure(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener

    def broken() -> bool:
        raise RuntimeError("supervisor gone")

    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), 0.01, [broken])
    assert wd.healthy() is False
    wd.tick()
    assert wd.pings == 0
    assert lst.drain() == []


def test_status_sent_only_when_changed(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener
    text = ["queue: 12 pending, 3 leased"]
    wd = ProgressWatchdog(
        Notifier({"NOTIFY_SOCKET": env}), None, [], status=lambda: text[0], status_interval=0.01
    )
    wd.tick()
    wd.tick()
    assert lst.drain() == ["STATUS=queue: 12 pending, 3 leased"]
    text[0] = "queue: 11 pending, 3 leased"
    wd.tick()
    wd.tick()
    assert lst.drain() == ["STATUS=queue: 11 pending, 3 leased"]


def test_status_updates_from_thread(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener
    n = [0]
    wd = ProgressWatchdog(
        Notifier({"NOTIFY_SOCKET": env}), 10.0, [], status=lambda: f"n={n[0]}", status_interval=0.02
    )
    wd.start()
    try:
        assert lst.recv() == "WATCHDOG=1"  # first ping at once, not after 10 s
        assert lst.recv() == "STATUS=n=0"
        n[0] = 1
        assert lst.recv() == "STATUS=n=1"
    finally:
        wd.stop()


def test_heartbeat_check() -> None:
    hb = Heartbeat("worker")
    check = hb.recent(0.05)
    assert check.__name__ == "worker_within_0.05s"
    assert check()
    time.sleep(0.08)
    assert not check()
    hb.beat()
    assert check()


def test_watchdog_disabled_by_pid_mismatch_sends_nothing(
    path_listener: tuple[str, Listener],
) -> None:
    env, lst = path_listener
    interval = watchdog_interval({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert interval is None
    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), interval, [lambda: True])
    wd.start()
    time.sleep(0.1)
    wd.stop()
    assert lst.drain() == []
    assert wd.pings == 0
