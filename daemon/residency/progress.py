"""Download progress from huggingface_hub's tqdm bars (best effort).

huggingface_hub draws its bars with ``huggingface_hub.utils.tqdm.tqdm``; while a
model loads, ``reporting(callback)`` hooks that class's ``__init__``/``update`` and
calls ``callback`` (at most every ``interval`` seconds) with the aggregate of the
byte bars: ``{"file", "downloaded_mb", "total_mb", "percent"}``. Bars are tracked
even when tqdm itself is disabled (no terminal, e.g. under journald). Nothing
happens if huggingface_hub is not installed or its internals differ.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

Callback = Callable[[dict[str, Any]], None]

_lock = threading.Lock()
_callbacks: list[Callback] = []
_bars: dict[int, dict[str, Any]] = {}
_patched = False
_last_sent = 0.0
_dirty = False
INTERVAL = 0.5


def _snapshot() -> dict[str, Any]:
    byte_bars = [b for b in _bars.values() if b["unit"] == "B"]
    done = sum(b["n"] for b in byte_bars)
    total = sum(b["total"] or 0 for b in byte_bars)
    current = next((b["desc"] for b in reversed(byte_bars) if b["n"] < (b["total"] or 0)), "")
    out: dict[str, Any] = {
        "file": current,
        "downloaded_mb": round(done / 1e6, 1),
        "total_mb": round(total / 1e6, 1) if total else None,
    }
    out["percent"] = round(100.0 * done / total, 1) if total else None
    return out


def _emit(force: bool = False) -> None:
    global _last_sent, _dirty
    now = time.monotonic()
    with _lock:
        if not _callbacks or (not force and now - _last_sent < INTERVAL):
            _dirty = bool(_callbacks)
            return
        _last_sent, _dirty = now, False
        snap, callbacks = _snapshot(), list(_callbacks)
    for cb in callbacks:
        with suppress(Exception):
            cb(snap)


def _patch() -> bool:
    global _patched
    if _patched:
        return True
    try:  # the module: huggingface_hub.utils's own ``tqdm`` attribute is the class
        hf_tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")
    except Exception:
        return False
    cls = getattr(hf_tqdm_module, "tqdm", None)
    if cls is None:
        return False
    orig_init, orig_update = cls.__init__, cls.update

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        with _lock:
            if _callbacks:
                _bars[id(self)] = {
                    "desc": str(kwargs.get("desc") or ""),
                    "unit": kwargs.get("unit", "it"),
                    "total": kwargs.get("total"),
                    "n": kwargs.get("initial") or 0,
                }

    def update(self: Any, n: float | None = 1) -> Any:
        bar = _bars.get(id(self))
        if bar is not None:
            bar["n"] += n or 0
            if getattr(self, "total", None):
                bar["total"] = self.total
            _emit()
        return orig_update(self, n)

    cls.__init__, cls.update = __init__, update
    _patched = True
    return True


@contextmanager
def reporting(callback: Callback) -> Iterator[None]:
    """Report hub download progress to ``callback`` while the block runs."""
    with _lock:
        _callbacks.append(callback)
    _patch()
    done = threading.Event()

    def flush() -> None:  # the last update before a pause is reported too
        while not done.wait(INTERVAL):
            if _dirty:
                _emit(force=True)

    threading.Thread(target=flush, name="captiond-progress", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        _emit(force=True)
        with _lock:
            _callbacks.remove(callback)
            if not _callbacks:
                _bars.clear()
