"""A test-only fault seam: kill the process or hang a read at a named point.

Off unless the environment asks for it (read once, at import), so production code
pays one set lookup per point. Used by the crash tests to SIGKILL the daemon at the
dangerous moments (between recording a caption and renaming its file, halfway through
a batch of acks...) and to stand in for a read on a hung network mount.

- ``CAPTIOND_CRASH_AT=NAME`` or ``NAME@N``: SIGKILL this process the first (or N-th)
  time :func:`point` is reached with that name. Several, comma-separated.
- ``CAPTIOND_HANG=NAME:SUFFIX``: :func:`hang` blocks for ever when called with that
  name and a key ending in ``SUFFIX`` (e.g. ``read:hung.jpg``).

Points: ``after_stage`` (sidecars written under temp names, nothing recorded),
``after_record`` (recorded, not renamed), ``after_rename`` (renamed and synced, not
acked), ``mid_acks`` (half of a batch's acks sent in their transaction),
``model_load`` (a model's load() has returned, the slot still says loading: for a model
in its own process, that process is up with the weights in memory) and ``checkpoint``
(the daemon's periodic WAL checkpoint: the kill lands once SQLite has begun writing
the database file, see :func:`during`, at the latest when the checkpoint returns).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_CRASH: dict[str, int] = {}
for _spec in filter(None, os.environ.get("CAPTIOND_CRASH_AT", "").split(",")):
    _name, _, _n = _spec.strip().partition("@")
    _CRASH[_name] = int(_n or 1)
_HANG: dict[str, str] = {}
for _spec in filter(None, os.environ.get("CAPTIOND_HANG", "").split(",")):
    _name, _, _suffix = _spec.strip().partition(":")
    _HANG[_name] = _suffix
_lock = threading.Lock()

ENABLED = bool(_CRASH or _HANG)


def _due(name: str) -> bool:
    """Count this arrival at ``name``; True when it is the one to crash at."""
    if not _CRASH or name not in _CRASH:
        return False
    with _lock:
        _CRASH[name] -= 1
        return _CRASH[name] == 0


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Crash here if the environment named this point (see the module doc)."""
    if _due(name):
        _kill()


@contextmanager
def during(name: str, begun: Callable[[], bool] | None = None) -> Iterator[None]:
    """Crash while the block runs, if the environment named this point.

    ``begun`` is polled from another thread and the process is killed as soon as it
    returns True: the kill then lands inside a call that runs without the GIL (SQLite
    copying pages into the database file), not only before or after it. At the latest
    the kill comes when the block ends."""
    if not _due(name):
        yield
        return
    if begun is not None:

        def watch() -> None:
            while not begun():
                time.sleep(0)  # give the GIL back; the block's C code runs meanwhile
            _kill()

        threading.Thread(target=watch, name=f"captiond-fault-{name}", daemon=True).start()
    try:
        yield
    finally:
        _kill()


def hang(name: str, key: str) -> None:
    """Block for ever if the environment asked to hang ``name`` for ``key``."""
    suffix = _HANG.get(name) if _HANG else None
    if suffix is not None and key.endswith(suffix):
        threading.Event().wait()
