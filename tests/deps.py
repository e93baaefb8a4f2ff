"""Skips because a dependency is missing, kept apart from every other skip.

A test that cannot run because a package or tool is not installed says so with
:func:`require` (a module), :func:`requires` (a marker) or :func:`dependency_skip`.
Their reason starts with ``DEPENDENCY``. Outside CI that is a skip like any other; in CI
(``CI=true``) the hooks below turn it into a failure, so that an install that lost a
part (e.g. ``make run EXTRAS=test`` before ``make test``) cannot pass with tests quietly
skipped. pytest's own ``importorskip`` counts as a dependency skip too. Skips for other
reasons ("needs root", "CUDA is available here") stay skips.

The hooks are used by ``tests/conftest.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from types import ModuleType
from typing import Any

import pytest

DEPENDENCY = "missing dependency:"
_IMPORTORSKIP = "could not import"  # pytest.importorskip's reason


def in_ci(env: Any = None) -> bool:
    value = (os.environ if env is None else env).get("CI", "")
    return value.strip().lower() in {"1", "true", "yes"}


def missing(*modules: str, tools: tuple[str, ...] = ()) -> list[str]:
    """The modules (import names) and executables that are not installed."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    out += [f"{tool} (executable)" for tool in tools if shutil.which(tool) is None]
    return out


def reason(what: list[str], hint: str = "") -> str:
    return f"{DEPENDENCY} {', '.join(what)}{f' ({hint})' if hint else ''}"


def requires(*modules: str, tools: tuple[str, ...] = (), hint: str = "") -> pytest.MarkDecorator:
    """A marker: skip (fail in CI) when one of ``modules`` or ``tools`` is missing."""
    what = missing(*modules, tools=tools)
    return pytest.mark.skipif(bool(what), reason=reason(what, hint))


def dependency_skip(what: str, hint: str = "") -> None:
    """Skip the running test (or module) because ``what`` is not installed."""
    pytest.skip(reason([what], hint), allow_module_level=True)


def require(module: str, hint: str = "") -> ModuleType:
    """Import ``module``, or skip (fail in CI) the test or module that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dependency_skip(module, hint or f"{type(exc).__name__}: {exc}")
        raise  # not reached: pytest.skip raises


def is_dependency_skip(text: str) -> bool:
    return DEPENDENCY in text or _IMPORTORSKIP in text


def _skip_text(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, message)
        return str(longrepr[2])
    return str(longrepr)


def _fail_in_ci(report: Any) -> None:
    if not (report.skipped and in_ci()):
        return
    text = _skip_text(report)
    if not is_dependency_skip(text):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{text}\nCI=true: a test skipped for a missing dependency fails the run. "
        "Install what the project's own files install (make test; pyproject extras)."
    )


# -- hooks (imported into tests/conftest.py) ------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):
    outcome = yield
    _fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped as a whole (``allow_module_level``) for a missing dependency."""
    outcome = yield
    _fail_in_ci(outcome.get_result())
