"""No silent skips: in CI a test skipped for a missing dependency fails the run; skips
for other reasons stay skips (tests/deps.py). Checked on an inner pytest run."""

from __future__ import annotations

import pytest

from tests.deps import DEPENDENCY, in_ci, missing, requires

pytest_plugins = ["pytester"]

CONFTEST = """
from tests.deps import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
"""

TESTS = """
import pytest

from tests.deps import require, requires


def test_require():
    require("captiond_no_such_module_a")


@requires("captiond_no_such_module_b", tools=("captiond-no-such-tool",))
def test_marker():
    pass


def test_plain_importorskip():
    pytest.importorskip("captiond_no_such_module_c")


def test_needs_root():
    pytest.skip("switching to another user needs root")


@pytest.mark.skipif(True, reason="CUDA is available here")
def test_other_marker():
    pass


def test_fine():
    require("json")
"""

MODULE_SKIP = """
from tests.deps import require

require("captiond_no_such_module_d")


def test_never_collected():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=TESTS, test_module_skip=MODULE_SKIP)
    return pytester


def test_outside_ci_dependency_skips_are_skips(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=6)
    result.stdout.fnmatch_lines([f"*{DEPENDENCY} captiond_no_such_module_a*"])
    result.stdout.fnmatch_lines(
        [f"*{DEPENDENCY} captiond_no_such_module_b, captiond-no-such-tool (executable)*"]
    )


def test_in_ci_dependency_skips_fail_and_other_skips_stay(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "test_inner.py")
    # a marker skips at setup: there it shows as an error; either way the run fails
    result.assert_outcomes(passed=1, failed=2, errors=1, skipped=2)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*CI=true: a test skipped for a missing dependency*"])
    # a module skipped as a whole for a dependency is a collection error
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "test_module_skip.py")
    result.assert_outcomes(errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*{DEPENDENCY} captiond_no_such_module_d*"])


def test_helpers() -> None:
    assert in_ci({"CI": "true"}) and in_ci({"CI": "1"}) and not in_ci({}) and not in_ci({"CI": ""})
    assert missing("json", "captiond_no_such_module", tools=("sh", "captiond-no-tool")) == [
        "captiond_no_such_module",
        "captiond-no-tool (executable)",
    ]
    marker = requires("json", tools=("sh",))
    assert marker.args == (False,)
