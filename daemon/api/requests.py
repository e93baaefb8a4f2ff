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

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.queue import Job, JobQueue
from daemon.queue.jobs import JobState
from daemon.worker import JobResult

FINISHED = ("completed", "failed", "cancelled")
KEEP_FINISHED_SECONDS = 3600.0
GONE_GRACE_SECONDS = 2.0  # orphaned this long: failed (a report may be on its way)
SWEEP_SECONDS = 60.0  # create() checks every unfinished request this often


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
    seq: int = 0  # creation order: a later request for the same job supersedes

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
    """Requests by id, and by job: several requests may wait on one job.

    A second request for an image whose job is still pending replaces the job's
    options (the job runs once); the first request then *follows* the second and is
    finished with it. A request whose job disappeared (purged, image deleted, pruned)
    or no longer carries it is failed once that has lasted ``GONE_GRACE_SECONDS``
    (the worker acks a job just before it reports on it).
    """

    def __init__(self, queue: JobQueue, *, max_finished: int = 1000) -> None:
        self.queue = queue
        self.max_finished = max_finished
        self._cond = threading.Condition()
        self._requests: dict[str, CaptionRequest] = {}
        self._by_job: dict[int, set[str]] = {}  # job id -> its unfinished requests
        self._finished: deque[str] = deque()  # finished ids, oldest first
        self._suspect: dict[str, float] = {}  # id -> when first seen orphaned (monotonic)
        self._seq = itertools.count()
        self._last_sweep = time.monotonic()

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
        prior = self.queue.get(path, generator)
        if (
            prior is not None
            and prior.state == JobState.PENDING
            and (prior.options or {}).get("force")
        ):
            force = True  # folded into a pending request that asked to replace: keep that
        options = {"request": rid, "force": force, "post_process": post_process}
        req = CaptionRequest(
            rid, path, rel, generator, caption_type, options, -1, prior, batch=batch
        )
        with self._cond:  # known before the worker can possibly report on it
            req.seq = next(self._seq)
            self._requests[rid] = req
            if prior is not None:
                req.job_id = prior.id
                self._by_job.setdefault(prior.id, set()).add(rid)
            self._prune_locked()
        try:  # no lock held over a database write: the worker reports under that lock
            job = self.queue.enqueue(path, generator, priority, options=options)
        except BaseException:
            with self._cond:
                self._requests.pop(rid, None)
                self._unlink_locked(req)
            raise
        with self._cond:
            if req.job_id != job.id:
                self._unlink_locked(req)
                req.job_id = job.id
                if not req.finished:
                    self._by_job.setdefault(job.id, set()).add(rid)
        if time.monotonic() - self._last_sweep > SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            self.all()  # fails the requests nobody asks about whose job is gone
        return req

    def _unlink_locked(self, req: CaptionRequest) -> None:
        ids = self._by_job.get(req.job_id)
        if ids is not None:
            ids.discard(req.id)
            if not ids:
                del self._by_job[req.job_id]

    def _finish_locked(self, req: CaptionRequest, state: str, result: dict[str, Any]) -> None:
        req.state = state
        req.result = result
        req.finished_at = time.time()
        self._unlink_locked(req)
        self._suspect.pop(req.id, None)
        self._finished.append(req.id)

    def _prune_locked(self) -> None:
        """Forget the oldest finished requests: beyond ``max_finished``, or older than
        ``KEEP_FINISHED_SECONDS``. O(1) per request (finished ids are in order)."""
        now = time.time()
        while self._finished:
            head = self._requests.get(self._finished[0])
            fresh = head is not None and (
                head.finished_at is None or now - head.finished_at <= KEEP_FINISHED_SECONDS
            )
            if fresh and len(self._finished) <= self.max_finished:
                break
            self._finished.popleft()
            if head is not None:
                del self._requests[head.id]

    # -- the worker's report ---------------------------------------------------------

    def on_result(self, res: JobResult) -> None:
        """Called on the worker thread for every finished job carrying options.

        Finishes the request the run carried and every request on the same job made
        before it (they were folded into it); later ones wait for the next run."""
        rid = (res.options or {}).get("request")
        with self._cond:
            carrier = self._requests.get(rid) if rid else None
            if carrier is None:
                return
            ids = set(self._by_job.get(res.job_id, ())) | {carrier.id}
            reqs = [
                r
                for i in ids
                if (r := self._requests.get(i)) is not None
                and not r.finished
                and r.seq <= carrier.seq
            ]
            for req in sorted(reqs, key=lambda r: r.seq):
                self._apply_locked(req, res)
            self._prune_locked()
            self._cond.notify_all()

    def _apply_locked(self, req: CaptionRequest, res: JobResult) -> None:
        elapsed = round(time.monotonic() - req.started, 4)
        if res.state == JobState.PENDING and res.error_type:  # a retry is due
            req.last_error = {
                "error": res.error,
                "error_type": res.error_type,
                "retryable": res.retryable,
            }
            req.state = "queued"
            return
        base = {
            "generator": res.generator,
            "caption_type": res.caption_type or req.caption_type,
            "processing_time": elapsed,
            "path": req.rel,
            "request_id": req.id,
        }
        if res.state == JobState.DONE and res.outcome in ("written", "unchanged"):
            result = {"success": True, "caption": (res.caption or "").rstrip("\n")}
            result |= base | {"outcome": res.outcome, "sidecar": self._rel(req, res)}
            self._finish_locked(req, "completed", result)
        elif res.state == JobState.DONE:  # caption_exists / caption_edited
            result = {
                "success": False,
                "error": f"a caption already exists ({res.outcome}); use force=true to replace it",
                "error_type": res.outcome,
                "retryable": False,
                "sidecar": self._rel(req, res),
            } | base
            self._finish_locked(req, "failed", result)
        else:
            result = {
                "success": False,
                "error": res.error or "failed",
                "error_type": res.error_type or "unexpected",
                "retryable": res.retryable,
                "job_state": res.state,
            } | base
            self._finish_locked(req, "failed", result)

    @staticmethod
    def _rel(req: CaptionRequest, res: JobResult) -> str | None:
        """The sidecar's API name: it is always beside the image."""
        if not res.sidecar:
            return None
        folder = req.rel.rsplit("/", 1)[0]
        return f"{folder}/{res.sidecar.rsplit('/', 1)[-1]}"

    # -- reading and waiting ---------------------------------------------------------

    def _refresh(self, reqs: list[CaptionRequest]) -> None:
        """Bring unfinished requests up to date with their jobs (one query per 500):
        queued or processing, or failed when their job is gone or no longer theirs."""
        with self._cond:
            todo = [r for r in reqs if not r.finished and r.job_id >= 0]
        if not todo:
            return
        jobs = self.queue.get_many({r.job_id for r in todo})
        now = time.monotonic()
        with self._cond:
            for req in todo:
                if req.finished:
                    continue
                job = jobs.get(req.job_id)
                carrier = self._carrier_locked(req, job)
                if carrier is not None:
                    self._suspect.pop(req.id, None)
                    leased = job is not None and job.state == JobState.LEASED
                    req.state = "processing" if leased else "queued"
                    continue
                first = self._suspect.setdefault(req.id, now)
                if now - first < GONE_GRACE_SECONDS:
                    continue
                if job is None:
                    why = "its job was removed (purged, image deleted or forgotten, or pruned)"
                else:
                    why = f"its job was replaced or finished without it (job is {job.state})"
                self._finish_locked(
                    req,
                    "failed",
                    {
                        "success": False,
                        "error": f"the request can no longer complete: {why}",
                        "error_type": "job_gone",
                        "retryable": True,
                        "path": req.rel,
                        "generator": req.generator,
                        "request_id": req.id,
                    },
                )
            self._prune_locked()
            self._cond.notify_all()

    def _carrier_locked(self, req: CaptionRequest, job: Job | None) -> CaptionRequest | None:
        """The unfinished request whose run will finish ``req``, or None (orphaned)."""
        if job is None or job.state not in (JobState.PENDING, JobState.LEASED):
            return None
        rid = (job.options or {}).get("request")
        if rid == req.id:
            return req
        other = self._requests.get(rid) if rid else None
        if other is not None and not other.finished and other.seq > req.seq:
            return other  # a later request for the same image: finished with it
        return None

    def get(self, rid: str) -> CaptionRequest | None:
        with self._cond:
            req = self._requests.get(rid)
        if req is not None:
            self._refresh([req])
        return req

    def all(self) -> list[CaptionRequest]:
        with self._cond:
            reqs = list(self._requests.values())
        self._refresh(reqs)
        return reqs

    def wait(self, req: CaptionRequest, timeout: float) -> bool:
        """Wait until ``req`` is finished (True) or ``timeout`` passes (False)."""
        with self._cond:
            if self._cond.wait_for(lambda: req.finished, timeout):
                return True
        self._refresh([req])
        return req.finished

    def wait_any(self, reqs: Iterable[CaptionRequest], timeout: float) -> list[CaptionRequest]:
        """The requests of ``reqs`` that are finished, waiting up to ``timeout`` for one."""
        reqs = list(reqs)
        with self._cond:
            if self._cond.wait_for(lambda: any(r.finished for r in reqs), timeout):
                return [r for r in reqs if r.finished]
        self._refresh(reqs)
        with self._cond:
            return [r for r in reqs if r.finished]

    # -- cancelling ------------------------------------------------------------------

    def cancel(self, req: CaptionRequest) -> str:
        """``cancelled``, ``running`` (already being captioned) or ``finished``."""
        if req.finished:
            return "finished"
        cancelled = {
            "success": False,
            "error": "cancelled",
            "error_type": "cancelled",
            "retryable": False,
            "path": req.rel,
            "generator": req.generator,
            "request_id": req.id,
        }
        job = self.queue.get_by_id(req.job_id)
        with self._cond:
            carrier = self._carrier_locked(req, job)
            if carrier is not None and carrier is not req and not req.finished:
                # Folded into a later request: the job runs for that one; just let go.
                self._finish_locked(req, "cancelled", cancelled)
                self._cond.notify_all()
                return "cancelled"
        # Succeeds only while the job is pending with this request's options: the
        # worker has not claimed it, so no report on it can arrive meanwhile.
        if self.queue.cancel(req.job_id, req.prior, req.options):
            with self._cond:
                if not req.finished:
                    self._finish_locked(req, "cancelled", cancelled)
                self._cond.notify_all()
                return "cancelled"
        return "finished" if req.finished else "running"
