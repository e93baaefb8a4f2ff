"""The test-only fault seam (daemon/faults.py) kills exactly where and when it is asked
to: at the N-th arrival, inside a block once its work has begun, and never unasked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def run(code: str, crash: str | None, tmp_path: Path) -> tuple[int, list[str]]:
    """``code`` in a fresh interpreter (faults reads the environment at import)."""
    env = {k: v for k, v in os.environ.items() if k != "CAPTIOND_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO)
    if crash is not None:
        env["CAPTIOND_CRASH_AT"] = crash
    script = "import sys\nfrom daemon import faults\n" + textwrap.dedent(code)
    p = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
    )
    return p.returncode, p.stdout.split()


POINTS = """
for i in range(1, 4):
    faults.point("other")
    faults.point("here")
    print(f"passed{i}", flush=True)
"""


def test_a_point_kills_at_its_nth_arrival_only(tmp_path: Path) -> None:
    assert run(POINTS, "here@2", tmp_path) == (-signal.SIGKILL, ["passed1"])
    assert run(POINTS, "here", tmp_path) == (-signal.SIGKILL, [])
    assert run(POINTS, "elsewhere,nothere@1", tmp_path) == (0, ["passed1", "passed2", "passed3"])
    assert run(POINTS, None, tmp_path) == (0, ["passed1", "passed2", "passed3"])


DURING = """
import threading
from pathlib import Path
flag = Path("begun")
for i in range(1, 3):
    with faults.during("block", flag.exists):
        print(f"inside{i}", flush=True)
        if i == 2:
            flag.touch()  # the work has begun: the kill comes while the block still runs
            threading.Event().wait()
        print(f"end{i}", flush=True)
    print(f"after{i}", flush=True)
"""


def test_during_kills_inside_the_block_once_its_work_has_begun(tmp_path: Path) -> None:
    assert run(DURING, "block@2", tmp_path) == (
        -signal.SIGKILL,
        ["inside1", "end1", "after1", "inside2"],
    )


def test_during_kills_at_the_end_of_the_block_at_the_latest(tmp_path: Path) -> None:
    code = """
    with faults.during("block", lambda: False):
        print("inside", flush=True)
    print("after", flush=True)
    """
    assert run(code, "block", tmp_path) == (-signal.SIGKILL, ["inside"])
    assert run(code, None, tmp_path) == (0, ["inside", "after"])
