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
from structlog.testing import capture_logs

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


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_progress_watchdog_stops_and_resumes(path_listener: tuple[str, Listener]) -> None:
    """Rounds driven by hand on a fake clock: pings every interval while the checks
    pass, none while one fails (however long), and at once when it passes again."""
    env, lst = path_listener
    clock = FakeClock()
    healthy = [True]
    wd = ProgressWatchdog(
        Notifier({"NOTIFY_SOCKET": env}), 10.0, [lambda: healthy[0], lambda: True], clock=clock
    )
    wd.tick()
    assert lst.recv() == "WATCHDOG=1"  # the first round pings at once
    wd.tick()
    clock.now += 9.0
    wd.tick()
    assert wd.pings == 1 and lst.drain() == []  # not due yet
    clock.now += 1.0
    wd.tick()
    assert wd.pings == 2 and lst.drain() == ["WATCHDOG=1"]

    healthy[0] = False
    for _ in range(6):  # a minute of rounds: nothing
        clock.now += 10.0
        wd.tick()
    assert wd.pings == 2 and lst.drain() == []

    healthy[0] = True
    wd.tick()  # overdue: pinged in the very round the check recovers
    assert wd.pings == 3 and lst.drain() == ["WATCHDOG=1"]
    wd.tick()
    assert wd.pings == 3 and lst.drain() == []


class RecordingEvent(threading.Event):
    """The watchdog thread's stop event, recording how long each wait was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return super().wait(timeout)


def test_progress_watchdog_thread_pings_rechecks_and_stops(
    path_listener: tuple[str, Listener],
) -> None:
    """The thread: rounds every interval while healthy; while a check fails, every
    interval/10 (a recovery is pinged long before systemd's deadline), then every
    interval again; stop() ends the thread."""
    env, lst = path_listener
    healthy = threading.Event()
    healthy.set()
    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), 0.5, [healthy.is_set])
    stop = wd._stop = RecordingEvent()
    wd.start()
    thread = wd._thread
    assert thread is not None
    try:
        assert lst.recv() == "WATCHDOG=1"
        assert _wait_for(lambda: stop.waits)
        assert stop.waits[0] == 0.5
        healthy.clear()
        assert _wait_for(lambda: 0.05 in stop.waits)  # failing: re-checked ten times as often
        lst.drain()
        pings = wd.pings
        healthy.set()
        assert lst.recv(timeout=2.0) == "WATCHDOG=1"
        assert _wait_for(lambda: wd.pings == pings + 1)  # counted just after the send
        n = len(stop.waits)
        assert _wait_for(lambda: len(stop.waits) > n)
        assert stop.waits[-1] == 0.5  # healthy again: back to the interval
    finally:
        wd.stop()
    assert wd._thread is None and not thread.is_alive()  # stop() really stops


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
    clock = FakeClock()
    hb = Heartbeat("worker", clock=clock)
    check = hb.recent(0.5)  # exact in binary: "exactly max_age" below is exact
    assert check.__name__ == "worker_within_0.5s"
    assert check() and hb.age() == 0
    clock.now += 0.5
    assert check()  # exactly max_age old: still recent
    clock.now += 0.001
    assert not check()
    hb.beat()
    assert check() and hb.age() == 0


def test_watchdog_disabled_by_pid_mismatch_sends_nothing(
    path_listener: tuple[str, Listener],
) -> None:
    env, lst = path_listener
    interval = watchdog_interval({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert interval is None
    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), interval, [lambda: True])
    wd.start()
    assert wd._thread is None  # nothing to do: no thread at all
    wd.tick()  # and a round by hand pings nothing
    wd.stop()
    assert lst.drain() == []
    assert wd.pings == 0


# -- what the journal says: the watchdog's events are how an operator learns why ------


def events(logs: list[dict], name: str) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "log_level"} for e in logs if e["event"] == name]


def test_a_check_that_fails_is_logged_once_by_name_and_its_recovery_too() -> None:
    ok = [False]

    def worker_progressing() -> bool:
        return ok[0]

    wd = ProgressWatchdog(Notifier({}), 10.0, [worker_progressing, lambda: True])
    with capture_logs() as logs:
        assert not wd.healthy() and not wd.healthy()
        ok[0] = True
        assert wd.healthy() and wd.healthy()
    assert events(logs, "watchdog_check_failed") == [
        {
            "event": "watchdog_check_failed",
            "check": "worker_progressing",
            "action": "withholding WATCHDOG=1",
        }
    ]
    assert events(logs, "watchdog_check_recovered") == [
        {"event": "watchdog_check_recovered", "check": "worker_progressing"}
    ]


def test_a_check_that_raises_is_logged_with_the_error_once() -> None:
    class Probe:  # a callable without a __name__: named by its repr
        def __call__(self) -> bool:
            raise RuntimeError("supervisor gone")

        def __repr__(self) -> str:
            return "<probe>"

    wd = ProgressWatchdog(Notifier({}), 10.0, [Probe()])
    with capture_logs() as logs:
        assert not wd.healthy() and not wd.healthy() and not wd.healthy()
    assert events(logs, "watchdog_check_raised") == [
        {
            "event": "watchdog_check_raised",
            "check": "<probe>",
            "error": "RuntimeError('supervisor gone')",
        }
    ]
    assert [e["check"] for e in events(logs, "watchdog_check_failed")] == ["<probe>"]


def test_a_status_that_cannot_be_made_is_logged_and_the_pings_go_on(
    path_listener: tuple[str, Listener],
) -> None:
    env, lst = path_listener

    def status() -> str:
        raise ValueError("database is locked")

    wd = ProgressWatchdog(Notifier({"NOTIFY_SOCKET": env}), 10.0, [], status=status)
    with capture_logs() as logs:
        wd.tick()
    assert lst.drain() == ["WATCHDOG=1"]
    assert events(logs, "watchdog_status_failed") == [
        {"event": "watchdog_status_failed", "error": "ValueError('database is locked')"}
    ]


def test_a_round_that_fails_is_logged_and_the_thread_goes_on() -> None:
    wd = ProgressWatchdog(Notifier({}), 0.02, [])
    rounds = threading.Semaphore(0)

    def broken_tick() -> None:
        rounds.release()
        raise RuntimeError("bug")

    wd.tick = broken_tick  # type: ignore[method-assign]
    with capture_logs() as logs:
        wd.start()
        try:
            assert rounds.acquire(timeout=10) and rounds.acquire(timeout=10)  # a second round
        finally:
            wd.stop()
    assert events(logs, "watchdog_tick_failed")[0]["event"] == "watchdog_tick_failed"


def test_while_failing_the_checks_run_at_a_tenth_of_the_ping_interval() -> None:
    """Also when the status is refreshed more often than the pings are due."""
    wd = ProgressWatchdog(
        Notifier({}), 0.5, [lambda: False], status=lambda: "", status_interval=0.2
    )
    stop = wd._stop = RecordingEvent()
    wd.start()
    try:
        assert _wait_for(lambda: len(stop.waits) >= 2)
    finally:
        wd.stop()
    assert stop.waits[0] == 0.05


def test_a_failed_notification_is_logged_once() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/captiond/notify"})
    with capture_logs() as logs:
        assert not n.watchdog() and not n.watchdog()
    (e,) = events(logs, "sd_notify_failed")
    assert e["error"].startswith("FileNotFoundError: ")


def test_an_unsupported_socket_is_named_in_the_log_and_none_is_silent() -> None:
    with capture_logs() as logs:
        Notifier({})
        Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert events(logs, "notify_socket_unsupported") == [
        {"event": "notify_socket_unsupported", "notify_socket": "vsock:2:1234"}
    ]


def test_a_closed_notifier_gives_its_socket_back_and_opens_one_when_used_again(
    path_listener: tuple[str, Listener],
) -> None:
    env, lst = path_listener
    n = Notifier({"NOTIFY_SOCKET": env})
    before = set(os.listdir("/proc/self/fd"))
    assert n.status("one")
    assert len(set(os.listdir("/proc/self/fd")) - before) == 1
    n.close()
    assert set(os.listdir("/proc/self/fd")) == before
    n.close()  # twice: harmless
    assert n.status("two")
    assert lst.drain() == ["STATUS=one", "STATUS=two"]
    n.close()


class Recorder:
    """A notifier that records what it sends; ``up = False`` makes every send fail."""

    def __init__(self) -> None:
        self.up = True
        self.sent: list[str] = []

    def _send(self, line: str) -> bool:
        if self.up:
            self.sent.append(line)
        return self.up

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={text}")


def test_a_status_is_sent_in_the_first_round_and_again_after_a_failed_send() -> None:
    n, text = Recorder(), ["a"]
    wd = ProgressWatchdog(n, None, [], status=lambda: text[0])  # type: ignore[arg-type]
    wd.tick()
    assert n.sent == ["STATUS=a"]
    wd.tick()
    assert n.sent == ["STATUS=a"]  # unchanged: not sent again
    text[0], n.up = "b", False
    wd.tick()  # the send fails: "b" is still to be sent
    n.up = True
    wd.tick()
    wd.tick()
    assert n.sent == ["STATUS=a", "STATUS=b"]


def test_a_ping_is_due_at_99_percent_of_the_interval() -> None:
    """systemd is pinged at the interval, or up to 1% early (a round woken a little
    early must not skip a ping and leave systemd without one for two intervals)."""
    n, clock = Recorder(), FakeClock()
    wd = ProgressWatchdog(n, 100.0, [], clock=clock)  # type: ignore[arg-type]
    wd.tick()
    clock.now += 100.0 * 0.99
    wd.tick()
    assert wd.pings == 2
    clock.now += 100.0 * 0.99 - 0.01
    wd.tick()
    assert wd.pings == 2 and n.sent == ["WATCHDOG=1", "WATCHDOG=1"]


def test_nothing_to_say_sends_nothing(path_listener: tuple[str, Listener]) -> None:
    env, lst = path_listener
    n = Notifier({"NOTIFY_SOCKET": env})
    assert n.notify() is False
    assert lst.drain() == []
    n.close()


def test_the_watchdog_thread_is_named_and_never_holds_the_process_open() -> None:
    wd = ProgressWatchdog(Recorder(), 10.0, [])  # type: ignore[arg-type]
    wd.start()
    try:
        (t,) = [t for t in threading.enumerate() if t.name == "sd-watchdog"]
        assert t.daemon
    finally:
        wd.stop()
    assert not t.is_alive()
