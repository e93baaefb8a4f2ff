"""The Makefile installs what is asked for: one install stamp per extra, so that a venv
set up by `make run EXTRAS=test` gets the vlm and people extras at the next `make test`
(planned with `make -n` on a stand-in venv: nothing is installed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deps import requires

REPO = Path(__file__).resolve().parent.parent

pytestmark = requires(tools=("make",))


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    v = tmp_path / "venv"
    (v / "bin").mkdir(parents=True)
    (v / "bin" / "python").touch(mode=0o755)
    return v


def plan(venv: Path, *args: str, stamps: tuple[str, ...]) -> list[str]:
    """The commands `make -n` would run, with these install stamps up to date."""
    for name in stamps:
        (venv / f".installed-{name}").touch()
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), f"VENV={venv}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line.split("-e ", 1)[1] for line in lines if "pip install" in line and "-e " in line]


def test_make_test_installs_the_extras_a_run_with_fewer_left_out(venv: Path) -> None:
    lines = plan(venv, "test", stamps=("base", "test"))  # after `make run EXTRAS=test`
    assert installs(lines) == ["'.[vlm]'", "'.[people]'", "'.[report]'", "'.[ray]'"]
    assert any("-m pytest -n auto" in line for line in lines)


def test_make_test_installs_all_extras_whatever_extras_says(venv: Path) -> None:
    assert installs(plan(venv, "test", "EXTRAS=test", stamps=("base",))) == [
        "'.[test]'",
        "'.[vlm]'",
        "'.[people]'",
        "'.[report]'",
        "'.[ray]'",
    ]


def test_nothing_to_install_when_every_stamp_is_current(venv: Path) -> None:
    every = ("base", "test", "vlm", "people", "report", "ray")
    lines = plan(venv, "test", "PYTEST_WORKERS=0", stamps=every)
    assert installs(lines) == []
    assert any("-m pytest -n 0" in line for line in lines)


def test_make_run_installs_only_its_extras(venv: Path) -> None:
    lines = plan(venv, "run", "EXTRAS=test", "DATASET=/nowhere", stamps=())
    assert installs(lines) == [".", "'.[test]'"]
    assert not any("vlm" in line or "people" in line for line in lines)


def test_a_changed_pyproject_reinstalls(venv: Path) -> None:
    import os

    stamps = ("base", "test", "vlm", "people", "report", "ray")
    plan(venv, "test", stamps=stamps)
    old = (REPO / "pyproject.toml").stat().st_mtime - 3600
    for name in stamps:  # stamps older than pyproject.toml
        os.utime(venv / f".installed-{name}", (old, old))
    assert installs(plan(venv, "test", stamps=())) == [
        ".",
        "'.[test]'",
        "'.[vlm]'",
        "'.[people]'",
        "'.[report]'",
        "'.[ray]'",
    ]
