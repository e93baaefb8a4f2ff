"""Memory readings from /proc (no psutil), and whether NVIDIA GPUs are present."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


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


def give_back_large_buffers() -> bool:
    """Have glibc serve allocations of 1 MiB or more (file reads, decoded images) by
    mmap and unmap them at free. By default it raises its mmap threshold after the first
    large free and keeps later buffers in the heap of each thread's arena: measured
    with the web UI making thumbnails of 60 camera JPEGs on its request threads, the
    daemon's RSS grew 154 -> 279 MB; with the threshold fixed, 112 -> 119 MB. False
    (nothing done) off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` is set (it rules)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
