"""Memory readings from /proc (no psutil), and whether NVIDIA GPUs are present."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of a process in MB (VmRSS); None if it is gone."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cuda_present() -> bool:
    """An NVIDIA driver is loaded: the memory budget then counts GPU memory.

    Read from /proc so the daemon's own process never imports torch for it.
    """
    return os.path.exists("/proc/driver/nvidia/version")


def gpu_footprint_mb() -> float | None:
    """GPU memory this process's torch holds (reserved by its caching allocator),
    if torch is imported and CUDA initialised; else None."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())) / (
            1024 * 1024
        )
    except Exception:
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(cpus: int | None = None) -> int | None:
    """Cap glibc's malloc arenas at a quarter of the CPUs, at least 2 (glibc's default
    is 8 per CPU). Each long-lived thread (the API's request threads, the decode
    threads) otherwise gets an arena of its own that keeps the large buffers freed on
    it: measured, the web UI's thumbnails of 60 camera JPEGs left the daemon at 279 MB;
    capped, 123 MB, with the tagging rate unchanged (fixing the mmap threshold instead
    cost about 20% of it in page faults). Returns the cap, or None when nothing was
    done: not glibc, or ``MALLOC_ARENA_MAX`` set (it rules)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return None
    n = max(2, (cpus or os.cpu_count() or 1) // 4)
    mallopt = _glibc("mallopt")
    return n if mallopt is not None and mallopt(M_ARENA_MAX, n) else None


def trim_heap() -> None:
    """Hand glibc's free heap back to the system (after an in-process unload)."""
    if (malloc_trim := _glibc("malloc_trim")) is not None:
        malloc_trim(0)


def _glibc(function: str) -> Any:
    """A function of glibc's; None off glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function, None)
    except OSError:
        return None
