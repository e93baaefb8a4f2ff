"""The ``captiond backfill`` progress line: images done, rate, ETA, failures by type."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def line(info: dict[str, Any], width: int = 30) -> str:
    """One line: ``[#####-----] 1,234/10,000 12.3 img/s ETA 12m ...``."""
    total, done = info.get("total", 0), info.get("done", 0)
    frac = done / total if total else 0.0
    fill = round(frac * width)
    bar = "#" * fill + "-" * (width - fill)
    parts = [f"[{bar}] {done:,}/{total:,}"]
    rate = info.get("images_per_second") or 0
    parts.append(f"{rate:.1f} img/s")
    parts.append(f"ETA {_dur(info.get('eta_seconds'))}" if rate else info.get("state", ""))
    failures = info.get("failures") or {}
    if failures:
        parts.append("failed: " + ", ".join(f"{n} {k}" for k, n in sorted(failures.items())))
    if info.get("released"):
        parts.append(f"{info['released']} back to the queue")
    if info.get("waiting_for_tags"):
        parts.append(f"{info['waiting_for_tags']} left to the daemon (no tags yet)")
    return "  ".join(parts)


class ProgressPrinter:
    """Redraws one line on a terminal; elsewhere prints a line every ``every`` seconds."""

    def __init__(self, out: TextIO = sys.stderr, every: float = 10.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self._last = 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        text = line(info)
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
        elif time.monotonic() - self._last >= self.every:
            self.out.write(text + "\n")
            self.out.flush()
            self._last = time.monotonic()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def summary(info: dict[str, Any]) -> str:
    outs = ", ".join(f"{n} {k}" for k, n in sorted((info.get("outcomes") or {}).items()))
    fails = ", ".join(f"{n} {k}" for k, n in sorted((info.get("failures") or {}).items()))
    text = (
        f"backfill {info.get('state')}: {info.get('done', 0):,} of {info.get('total', 0):,} "
        f"images in {_dur(info.get('elapsed_seconds'))}"
        f" ({info.get('images_per_second', 0):.1f} img/s): {outs or 'nothing recorded'}"
    )
    if fails:
        text += f"; failed: {fails}"
    if info.get("released"):
        text += f"; {info['released']} back to the queue"
    if info.get("waiting_for_tags"):
        text += (
            f"; {info['waiting_for_tags']} left to the daemon: their {{tags}} prompt waits "
            "for the tagger's caption"
        )
    if info.get("lost_leases"):
        text += f"; {info['lost_leases']} results dropped (lease lost)"
    msg = info.get("message")
    if msg and msg != "done":
        text += f"\n{msg}"
    return text
