"""CPU time per stage of the caption pipeline, summed over the threads that ran it.

Each stage adds the thread CPU time (``time.thread_time``) it used, so a stage that
waits (for a disk, a lock, the model's other threads) costs only what it computed.
``STAGES`` is the process's clock: the worker's, the one-shot run's and a Ray actor's
alike; the daemon exports it in ``/status`` and as ``captiond_stage_cpu_seconds``.
"""

from __future__ import annotations

import threading
import time

# In the order an image meets them.
ORDER = (
    "claim",  # the queue's claim and the batch's plan (targets, existing sidecars)
    "read",  # the confined open and read of the image
    "hash",  # its content hash
    "decode",  # decode_image
    "prepare",  # the generator's prepare()
    "generate",  # the generator's generate(), in the calling thread
    "postprocess",  # the post-processing chain
    "decide",  # targets again, the existing sidecar, the never-clobber decision
    "stage",  # sidecars written under temp names and fsynced
    "record",  # the index's records, one transaction
    "rename",  # renames into place and one fsync per folder
    "ack",  # the queue's acks, one transaction
)

now = time.thread_time


class StageClock:
    """Thread-safe sums of CPU seconds per stage, and the images finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cpu: dict[str, float] = dict.fromkeys(ORDER, 0.0)
        self.images = 0

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._cpu[stage] = self._cpu.get(stage, 0.0) + seconds

    def finished(self, images: int) -> None:
        with self._lock:
            self.images += images

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._cpu)

    def reset(self) -> None:
        with self._lock:
            self._cpu = dict.fromkeys(ORDER, 0.0)
            self.images = 0


STAGES = StageClock()
