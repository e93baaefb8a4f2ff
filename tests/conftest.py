"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# A skip for a missing dependency fails the run in CI (CI=true): see tests/deps.py.
from tests.deps import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# ---- wd_tagger fixtures (owner: images / wd_tagger) ------------------------------------

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
# Model code loaded with trust_remote_code (tests/vlmmodels.py's moondream2 stand-in)
# is copied into the modules cache: a temporary one, not the user's ~/.cache.
_HF_MODULES = tempfile.mkdtemp(prefix="captiond-hf-modules-")
os.environ.setdefault("HF_MODULES_CACHE", _HF_MODULES)
atexit.register(shutil.rmtree, _HF_MODULES, True)


@pytest.fixture(scope="session")
def wd_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny WD-tagger-contract model folder (model.onnx + selected_tags.csv).

    Tags follow the image's mean colour; see tests/wdmodel.py for the table.
    """
    try:
        from tests.wdmodel import build_wd_model
    except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
        from wdmodel import build_wd_model  # type: ignore[no-redef]

    return build_wd_model(tmp_path_factory.mktemp("wd_model"))


# ---- end wd_tagger fixtures ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _structlog_restored():
    """A command run in-process configures logging for the whole process (a level, a
    renderer): put it back, so that a later test's ``capture_logs`` sees every event."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
