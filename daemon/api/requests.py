"""Explicit caption requests: ids, status, waiting and cancelling.

A request is a job enqueued at PRIORITY_EXPLICIT whose ``options`` carry the request
id (plus ``force`` / ``post_process``). The worker reports what became of every job
that carries options (``Worker.on_result``, called on the worker thread: this only
stores the result and notifies a condition, it never blocks). HTTP threads wait on
that condition with a timeout; nothing here ever waits inside the worker.

Requests live in memory (their jobs are durable: after a restart the job still runs,
only its request id is forgotten). Finished requests are kept for an hour, at most
``max_finished`` of them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.queue import Job, JobQueue
from daemon.queue.jobs import JobState
from daemon.worker import JobResult

FINISHED = ("completed", "failed", "cancelled")
KEEP_FINISHED_SECONDS = 3600.0


@dataclass(slots=True)
class CaptionRequest:
    id: str
    path: str  # absolute image path (the job's key)
    rel: str  # as the client named it
    generator: str
    caption_type: str | None
    options: dict[str, Any]
    job_id: int
    prior: Job | None  # the job row before this request (restored on cancel)
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | processing | completed | failed | cancelled
    result: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None
    finished_at: float | None = None
    batch: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.id,
            "state": self.state,
            "path": self.rel,
            "generator": self.generator,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "result": self.result,
            "last_error": self.last_error,
        }


class RequestRegistry:
    def __init__(self, queue: JobQueue, *, max_finished: int = 1000) -> None:
        self.queue = queue
        self.max_finished = max_finished
        self._cond = threading.Condition()
        self._requests: OrderedDict[str, CaptionRequest] = OrderedDict()

    # -- creating --------------------------------------------------------------------

    def create(
        self,
        *,
        path: str,
        rel: str,
        generator: str,
        caption_type: str | None,
        priority: int,
        force: bool,
        post_process: bool,
        batch: str | None = None,
    ) -> CaptionRequest:
        rid = str(uuid.uuid4())
        options = {"request": rid, "force": force, "post_process": post_process}
        prior = self.queue.get(path, generator)
        req = CaptionRequest(
            rid, path, rel, generator, caption_type, options, -1, prior, batch=batch
        )
        with self._cond:  # known before the worker can possibly report on it
            self._requests[rid] = req
            self._prune_locked()
        try:  # no lock held over a database write: the worker reports under that lock
            req.job_id = self.queue.enqueue(path, generator, priority, options=options).id
        except BaseException:
            with self._cond:
                self._requests.pop(rid, None)
            raise
        return req

    def _prune_locked(self) -> None:
        now = time.time()
        finished = [r for r in self._requests.values() if r.finished]
        excess = len(finished) - self.max_finished
        for r in finished:
            old = r.finished_at is not None and now - r.finished_at > KEEP_FINISHED_SECONDS
            if excess > 0 or old:
                self._requests.pop(r.id, None)
                excess -= 1

    # -- the worker's report ---------------------------------------------------------

    def on_result(self, res: JobResult) -> None:
        """Called on the worker thread for every finished job carrying options."""
        rid = (res.options or {}).get("request")
        with self._cond:
            req = self._requests.get(rid) if rid else None
            if req is None or req.finished:
                return
            elapsed = round(time.monotonic() - req.started, 4)
            if res.state == JobState.PENDING and res.error_type:  # a retry is due
                req.last_error = {
                    "error": res.error,
                    "error_type": res.error_type,
                    "retryable": res.retryable,
                }
                req.state = "queued"
                self._cond.notify_all()
                return
            base = {
                "generator": res.generator,
                "caption_type": res.caption_type or req.caption_type,
                "processing_time": elapsed,
                "path": req.rel,
                "request_id": req.id,
            }
            if res.state == JobState.DONE and res.outcome in ("written", "unchanged"):
                req.state = "completed"
                req.result = {"success": True, "caption": (res.caption or "").rstrip("\n")}
                req.result |= base | {"outcome": res.outcome, "sidecar": self._rel(req, res)}
            elif res.state == JobState.DONE:  # caption_exists / caption_edited
                req.state = "failed"
                req.result = {
                    "success": False,
                    "error": f"a caption already exists ({res.outcome}); use force=true "
                    "to replace it",
                    "error_type": res.outcome,
                    "retryable": False,
                    "sidecar": self._rel(req, res),
                } | base
            else:
                req.state = "failed"
                req.result = {
                    "success": False,
                    "error": res.error or "failed",
                    "error_type": res.error_type or "unexpected",
                    "retryable": res.retryable,
                    "job_state": res.state,
                } | base
            req.finished_at = time.time()
            self._cond.notify_all()

    @staticmethod
    def _rel(req: CaptionRequest, res: JobResult) -> str | None:
        """The sidecar's API name: it is always beside the image."""
        if not res.sidecar:
            return None
        folder = req.rel.rsplit("/", 1)[0]
        return f"{folder}/{res.sidecar.rsplit('/', 1)[-1]}"

    # -- reading and waiting ---------------------------------------------------------

    def get(self, rid: str) -> CaptionRequest | None:
        with self._cond:
            req = self._requests.get(rid)
        if req is not None and not req.finished:
            job = self.queue.get_by_id(req.job_id)
            with self._cond:
                if not req.finished:
                    leased = job is not None and job.state == JobState.LEASED
                    req.state = "processing" if leased else "queued"
        return req

    def all(self) -> list[CaptionRequest]:
        with self._cond:
            ids = list(self._requests)
        return [r for rid in ids if (r := self.get(rid)) is not None]

    def wait(self, req: CaptionRequest, timeout: float) -> bool:
        """Wait until ``req`` is finished (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: req.finished, timeout)

    def wait_any(self, reqs: Iterable[CaptionRequest], timeout: float) -> list[CaptionRequest]:
        """The requests of ``reqs`` that are finished, waiting up to ``timeout`` for one."""
        reqs = list(reqs)
        with self._cond:
            self._cond.wait_for(lambda: any(r.finished for r in reqs), timeout)
            return [r for r in reqs if r.finished]

    # -- cancelling ------------------------------------------------------------------

    def cancel(self, req: CaptionRequest) -> str:
        """``cancelled``, ``running`` (already being captioned) or ``finished``."""
        if req.finished:
            return "finished"
        # Succeeds only while the job is pending with this request's options: the
        # worker has not claimed it, so no report on it can arrive meanwhile.
        if self.queue.cancel(req.job_id, req.prior, req.options):
            with self._cond:
                req.state = "cancelled"
                req.finished_at = time.time()
                req.result = {
                    "success": False,
                    "error": "cancelled",
                    "error_type": "cancelled",
                    "retryable": False,
                    "path": req.rel,
                    "generator": req.generator,
                    "request_id": req.id,
                }
                self._cond.notify_all()
                return "cancelled"
        return "finished" if req.finished else "running"
