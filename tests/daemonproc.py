"""Start the real daemon as a subprocess on temporary folders, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from daemon.client import DaemonNotRunning, request

REPO = Path(__file__).resolve().parent.parent

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
}


def make_image(path: Path, color: str = "red", size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:].lower()]
    img = Image.new("RGB", size, COLORS[color])
    img.save(path, fmt, quality=95) if fmt == "JPEG" else img.save(path, fmt)
    return path


def image_bytes(color: str = "red", size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[color]).save(buf, fmt)
    return buf.getvalue()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def register_generators(folder: Path, generators: dict[str, str]) -> Path:
    """Make ``generators`` (name -> ``module:Class``) discoverable the way third-party
    generators are: an installed distribution with ``captiond.generators`` entry points.
    Returns the folder to put on the daemon's ``PYTHONPATH``."""
    info = folder / "captiond_test_generators-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: captiond-test-generators\nVersion: 0\n"
    )
    lines = [f"{name} = {ref}" for name, ref in generators.items()]
    (info / "entry_points.txt").write_text("[captiond.generators]\n" + "\n".join(lines) + "\n")
    return folder


def rss_kib(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` in ``/proc/PID/status``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class DaemonProcess:
    """``captiond run`` in a subprocess with its own state dir, socket and config.

    ``generators`` (name -> ``module:Class``, e.g. ``tests.fakegen:EchoGenerator``)
    registers test generators through the entry-point group, as a plugin would."""

    def __init__(
        self,
        workdir: Path,
        roots: list[Path],
        model_dir: Path,
        *,
        watch: dict[str, Any] | None = None,
        top: dict[str, Any] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        generators: dict[str, str] | None = None,
    ):
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.socket = workdir / "captiond.sock"
        self.config = workdir / "config.toml"
        self.log = workdir / "daemon.log"
        self.env = env or {}
        self.pythonpath: list[str] = []
        if generators:
            self.pythonpath.append(str(register_generators(workdir / "plugins", generators)))
        watch = {"settle_seconds": 0.3, "sidecar_extension": "txt"} | (watch or {})
        top = {
            "state_dir": str(self.state_dir),
            "cache_dir": str(workdir / "cache"),
            "socket_path": str(self.socket),
            "log_format": "json",
            "log_level": "debug",
        } | (top or {})
        lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
        sections = {
            "queue": {"backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0},
            "worker": {"batch_size": 4, "load_retry_seconds": 0.5},
        } | (sections or {})
        sections.setdefault("generators.wd_tagger", {})
        sections["generators.wd_tagger"] = {"model": str(model_dir)} | sections[
            "generators.wd_tagger"
        ]
        for root in roots:
            lines.append("[[watch]]")
            lines.append(f"path = {toml_value(str(root))}")
            lines += [f"{k} = {toml_value(v)}" for k, v in watch.items()]
        for name, table in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env |= {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"} | self.env
        # The code under test, and tests/ (test generators) importable in the daemon and
        # in its model processes, also when captiond is installed from elsewhere.
        paths = [*self.pythonpath, str(REPO), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self._logfh = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config), "run"],
            cwd=self.workdir,
            env=env,
            stdout=self._logfh,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for(self.healthy, timeout=30)
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            code, _ = request(self.socket, "GET", "/health", timeout=2)
        except (DaemonNotRunning, OSError):
            return False
        return code == 200

    def status(self) -> dict[str, Any]:
        code, body = request(self.socket, "GET", "/status", timeout=5)
        assert code == 200, body
        return body

    def totals(self) -> dict[str, int]:
        return self.status()["queue"]["totals"]

    def idle(self) -> bool:
        """Nothing pending or leased, and no scan running or waiting."""
        s = self.status()
        t = s["queue"]["totals"]
        scans = s["scans"]
        return (
            t.get("pending", 0) == 0
            and t.get("leased", 0) == 0
            and not scans["scanning"]
            and scans["pending"] == 0
            and bool(scans["last"])
        )

    def wait_worker_turns(self, turns: int = 2, timeout: float = 30.0) -> None:
        """Return once the worker loop has begun ``turns`` new turns after this call.

        Each turn claims whatever is due (unless paused), so after two turns a job that
        was pending before the call and is still pending was passed over by a whole
        turn: waiting on the worker's reported heartbeat, not on a sleep. The status
        rounds ``heartbeat_age_seconds`` to 0.1 s; the bounds below allow for that."""
        since = time.monotonic()
        for _ in range(turns):

            def beat_after(t: float = since) -> float | None:
                asked = time.monotonic()
                age = self.status()["worker"]["heartbeat_age_seconds"]
                earliest = asked - age - 0.05  # the last beat happened after this
                return earliest if earliest > t else None

            since = wait_for(beat_after, timeout) + 0.15  # past that beat's latest time

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == name:
                out.append(rec)
        return out

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._logfh.close()

    def wait_exit(self, timeout: float = 60) -> int:
        """Wait for the daemon to exit by itself (a crash point); its return code."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon is still running:\n{self.logs()}") from None
        self._logfh.close()
        return code

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{self.logs()}") from None
        self._logfh.close()
        return code
