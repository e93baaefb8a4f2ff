"""The systemd units pass ``systemd-analyze verify`` and score well on ``security``.

``verify`` fails when ExecStart's executable does not exist, so each unit is copied to
a temporary directory with ExecStart pointing at an executable that does (the venv's
``captiond`` if installed, else ``/bin/true``); nothing else is changed. Both commands
run offline: systemd need not be PID 1. Skipped only if systemd-analyze is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deps import requires

pytestmark = pytest.mark.timeout(60)

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = SYSTEMD_DIR / "captiond.service"
USER_UNIT = SYSTEMD_DIR / "captiond-user.service"
ANALYZE = shutil.which("systemd-analyze")

# Measured with systemd 252 (Debian 12): system unit 2.0 "OK", user unit 6.6 "MEDIUM".
SYSTEM_MAX_EXPOSURE = 4.5
USER_MAX_EXPOSURE = 7.0

needs_analyze = requires(
    tools=("systemd-analyze",), hint="make test installs it; Debian: apt-get install systemd"
)


def _executable() -> str:
    venv = Path(sys.executable).parent / "captiond"
    return str(venv) if os.access(venv, os.X_OK) else "/bin/true"


def _parse(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines (sections flattened; repeated keys keep every value)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _copy_unit(src: Path, dest_dir: Path, exec_start: str | None = None) -> Path:
    """Copy ``src`` as ``dest_dir/<same name>`` with ExecStart's executable replaced."""
    text = src.read_text()
    exe = exec_start or _executable()
    new, n = re.subn(r"^ExecStart=\S+", f"ExecStart={exe}", text, count=1, flags=re.M)
    assert n == 1, f"{src.name} has no ExecStart="
    dest = dest_dir / src.name
    dest.write_text(new)
    return dest


def _env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    # --user needs a runtime dir; colours off for parsing.
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_COLORS": "0"}


def _analyze(
    args: list[str], unit: Path, user: bool, tmp_path: Path
) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    cmd = [ANALYZE, *(["--user"] if user else []), *args, str(unit)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, cwd=unit.parent, env=_env(tmp_path)
    )


def _exposure(output: str) -> tuple[float, str]:
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", output)
    assert m, output
    return float(m.group(1)), m.group(2)


UNITS = [pytest.param(SYSTEM_UNIT, False, id="system"), pytest.param(USER_UNIT, True, id="user")]


@needs_analyze
def test_systemd_analyze_runs() -> None:
    assert ANALYZE is not None
    out = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert out.stdout.startswith("systemd ")


@needs_analyze
@pytest.mark.parametrize(("unit", "user"), UNITS)
def test_verify_clean(unit: Path, user: bool, tmp_path: Path) -> None:
    copy = _copy_unit(unit, tmp_path)
    res = _analyze(["verify"], copy, user, tmp_path)
    complaints = [line for line in (res.stdout + res.stderr).splitlines() if unit.name in line]
    assert res.returncode == 0, res.stdout + res.stderr
    assert complaints == [], "\n".join(complaints)


@needs_analyze
@pytest.mark.parametrize(("unit", "user"), UNITS)
def test_verify_catches_breakage(unit: Path, user: bool, tmp_path: Path) -> None:
    """Guard for the test above: a missing executable and an unknown key are reported."""
    copy = _copy_unit(unit, tmp_path, exec_start="/nonexistent/captiond")
    res = _analyze(["verify"], copy, user, tmp_path)
    assert res.returncode != 0
    assert "/nonexistent/captiond" in res.stderr

    copy = _copy_unit(unit, tmp_path)
    copy.write_text(copy.read_text().replace("[Service]\n", "[Service]\nNotAKey=1\n", 1))
    res = _analyze(["verify"], copy, user, tmp_path)
    assert "Unknown key" in res.stderr


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "user", "limit"),
    [
        pytest.param(SYSTEM_UNIT, False, SYSTEM_MAX_EXPOSURE, id="system"),
        pytest.param(USER_UNIT, True, USER_MAX_EXPOSURE, id="user"),
    ],
)
def test_security_exposure(unit: Path, user: bool, limit: float, tmp_path: Path) -> None:
    copy = _copy_unit(unit, tmp_path)
    res = _analyze(["security", "--offline=true"], copy, user, tmp_path)
    score, label = _exposure(res.stdout + res.stderr)
    print(f"{unit.name}: exposure {score} {label}")
    assert score <= limit, res.stdout
    if not user:
        assert label == "OK"


@needs_analyze
def test_security_baseline_is_worse(tmp_path: Path) -> None:
    """The threshold means something: the same service without hardening fails it."""
    bare = tmp_path / "captiond.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={_executable()} run\n")
    score, _ = _exposure(_analyze(["security", "--offline=true"], bare, False, tmp_path).stdout)
    assert score > SYSTEM_MAX_EXPOSURE


def test_system_unit_settings() -> None:
    keys = _parse(SYSTEM_UNIT.read_text())
    one = {k: v[-1] for k, v in keys.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["WatchdogSec"] == "60"
    assert one["Restart"] == "on-failure"
    assert one["ExecStart"].startswith("/")
    assert one["ProtectSystem"] == "strict"
    assert keys["ReadWritePaths"], "ProtectSystem=strict needs the dataset roots writable"
    assert one["CapabilityBoundingSet"] == ""
    assert one["DevicePolicy"] == "closed"
    assert {"/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia-frontend rw"} <= set(
        keys["DeviceAllow"]
    )
    assert "HF_HOME=%C/captiond/hf" in keys["Environment"]
    for directory in ("StateDirectory", "RuntimeDirectory", "CacheDirectory"):
        assert one[directory] == "captiond"
    # JIT code (CUDA, PyTorch) needs writable+executable memory.
    assert "MemoryDenyWriteExecute" not in keys
    # Sidecars must stay readable (and editable) by the dataset owner's group.
    assert int(one["UMask"], 8) & 0o070 == 0


def test_user_unit_settings() -> None:
    keys = _parse(USER_UNIT.read_text())
    one = {k: v[-1] for k, v in keys.items()}
    assert one["Type"] == "notify"
    assert one["WatchdogSec"] == "60"
    assert "HF_HOME=%C/captiond/hf" in keys["Environment"]
    # Options a user manager cannot apply, or that need a system manager, are absent.
    for key in ("User", "Group", "DevicePolicy", "ProtectSystem", "CapabilityBoundingSet"):
        assert key not in keys, key
    assert "MemoryDenyWriteExecute" not in keys
    assert one["WantedBy"] == "default.target"
