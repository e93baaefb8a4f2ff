"""Run a generator in a child worker process that exits on unload.

Why: ``bench/bench_unload.py`` measured that unloading in-process does not give the
memory back: importing the runtime (torch: ~700 MB RSS, CUDA context and allocator
caches on a GPU) stays in the process for good, whatever the model object does. A
process that exits gives everything back (Immich does the same).

The parent holds a ``ChildGenerator``: the same interface as a Generator
(``load``/``prepare``/``generate``/``unload``, ``name``, ``caption_type``,
``config``, ``draft_size``), so the worker does not know the difference.

- The child is started with the ``spawn`` context (never ``fork`` in a threaded
  daemon), instantiates the generator class by its import path
  (``module:QualName``) with the pickled config, and answers requests over a pipe.
- ``prepare()`` in the parent returns the decoded ``ImageInput`` unchanged; the child
  runs the generator's real ``prepare()`` before ``generate()``. A generator's
  ``prepare()`` may depend on what ``load()`` read from the model (the WD tagger's
  input size), and loading anything in the parent is what isolation avoids. The
  decoded image pickles as raw pixels (a 1024x1024 RGB image is 3 MB, under 10 ms
  over the pipe), and heavy models spend seconds per batch in ``generate()``, so
  preparing in the child costs little.
- Errors come back classified (error type, retryable, message, out-of-memory), never
  as pickled library exceptions: unpickling a torch exception would import torch in
  the parent. Out-of-memory stays ``OutOfMemoryError`` so the worker halves batches.
- A child that dies (segfault, ``os.abort()``, killed for memory) raises
  ``WorkerCrashError`` in the waiting call; the proxy is then unloaded and the model
  manager starts a fresh child on the next demand.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import (
    CaptionError,
    ErrorType,
    GenerationError,
    GenerationTimeoutError,
    ModelLoadingError,
    NetworkError,
    OutOfMemoryError,
    WorkerCrashError,
    classify,
    is_out_of_memory,
)
from daemon.generators.base import Generator, ImageInput

log = structlog.get_logger(__name__)

_CONTEXT = "spawn"
_live: weakref.WeakSet[ChildGenerator] = weakref.WeakSet()


class RemoteError(CaptionError):
    """An error raised in the child, carried over with its classification."""

    def __init__(self, message: str, error_type: str, retryable: bool, type_name: str = ""):
        super().__init__(message)
        self.error_type = ErrorType(error_type)
        self.retryable = retryable
        self.type_name = type_name


def _describe(exc: BaseException) -> dict[str, Any]:
    c = classify(exc)
    return {
        "error_type": c.error_type.value,
        "retryable": c.retryable,
        "message": c.message,
        "oom": is_out_of_memory(exc),
        "type": type(exc).__name__,
        "retry_after": exc.retry_after if isinstance(exc, NetworkError) else None,
    }


def _rebuild(d: dict[str, Any]) -> BaseException:
    if d.get("oom"):
        return OutOfMemoryError(d["message"])
    if d["error_type"] == ErrorType.NETWORK.value:  # a remote server: the job waits for it
        return NetworkError(d["message"], retry_after=d.get("retry_after"))
    return RemoteError(d["message"], d["error_type"], d["retryable"], d.get("type", ""))


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(ref: str) -> type[Generator]:
    import importlib

    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# -- the child ----------------------------------------------------------------------
def child_main(
    conn: Connection,
    ref: str,
    config: Any,
    cache_dir: Path | None,
    log_args: tuple[str, str] | None,
) -> None:
    """Entry point of the child process: serve requests until "exit" or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if log_args is not None:
        with contextlib.suppress(Exception):
            from daemon.logs import configure_logging

            configure_logging(*log_args)
    from daemon.residency import progress
    from daemon.residency.memory import gpu_footprint_mb, rss_mb

    send_lock = threading.Lock()  # hub download threads report progress concurrently

    def send(msg: tuple[str, Any]) -> None:
        with send_lock:
            conn.send(msg)

    gen: Generator | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        op = msg[0]
        if op == "exit":
            break
        try:
            if op == "load":
                if gen is None:
                    gen = _resolve(ref)(config, cache_dir=cache_dir)
                with progress.reporting(lambda p: send(("progress", p))):
                    gen.load()
                try:
                    draft = gen.draft_size
                except Exception:
                    draft = None
                mem = {"rss_mb": rss_mb(), "gpu_mb": gpu_footprint_mb()}
                send(("ok", {"draft_size": draft, **mem}))
            elif op == "generate":
                assert gen is not None, "generate before load"
                prepared = [gen.prepare(item) for item in msg[1]]
                out = gen.generate(prepared)
                send(("ok", [str(c) for c in out]))
            elif op == "stats":
                send(("ok", {"pid": os.getpid(), "rss_mb": rss_mb(), "gpu_mb": gpu_footprint_mb()}))
            else:
                raise ValueError(f"unknown request {op!r}")
        except BaseException as exc:  # everything goes back to the parent
            try:
                send(("err", _describe(exc)))
            except (OSError, EOFError):
                break
    sys.stderr.flush()
    os._exit(0)  # skip library atexit handlers: the memory goes back with the process


# -- the parent's proxy -------------------------------------------------------------
class ChildGenerator:
    """A Generator look-alike whose model lives in a child process."""

    isolated = True

    def __getattr__(self, attr: str) -> Any:
        # Settings-derived properties (prompt, context_keys) from the unloaded shadow.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._shadow, attr)

    def __init__(
        self,
        cls: type[Generator],
        config: Any = None,
        *,
        cache_dir: Path | None = None,
        log_args: tuple[str, str] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stop_timeout: float = 10.0,
        generate_timeout: float | None = None,
    ):
        self.cls = cls
        self._shadow = cls(config, cache_dir=cache_dir)  # settings and metadata only
        self.config = self._shadow.config
        self.cache_dir = cache_dir
        self.name = cls.name
        # From the instance: a generator's settings may change them (multi_person's mode).
        self.caption_type = self._shadow.caption_type
        self.description = cls.description
        self.version = cls.version
        self.weight = self._shadow.weight
        self.ref = class_ref(cls)
        self.log_args = log_args
        self.on_progress = on_progress
        self.stop_timeout = stop_timeout
        self.generate_timeout = generate_timeout
        self._lock = threading.Lock()  # one request at a time over the pipe
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self._draft_size: int | None = None
        self.footprint: dict[str, float | None] = {}
        self.starts = 0
        self.last_exit: str | None = None
        _live.add(self)

    # -- the Generator interface ---------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._ready and self._proc is not None and self._proc.exitcode is None

    @property
    def pid(self) -> int | None:
        proc = self._proc  # read once: status asks without the lock
        return proc.pid if proc is not None else None

    @property
    def draft_size(self) -> int | None:
        if self._draft_size is not None:
            return self._draft_size
        try:
            return self._shadow.draft_size
        except Exception:
            return None

    def load(self) -> None:
        with self._lock:
            if self.loaded:
                return
            self._stop_child()
            ctx = multiprocessing.get_context(_CONTEXT)
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=child_main,
                args=(child, self.ref, self.config, self.cache_dir, self.log_args),
                name=f"captiond-model-{self.name}",
                daemon=False,  # a daemonic process may not start its own children
            )
            proc.start()
            child.close()  # so that the child's death reads as EOF here
            self._proc, self._conn = proc, parent
            self.starts += 1
            log.info("model_process_started", generator=self.name, pid=proc.pid)
            try:
                info = self._request(("load",), None)
            except WorkerCrashError as exc:
                raise ModelLoadingError(f"{exc} while loading") from None
            except BaseException:
                self._stop_child()
                raise
            self._draft_size = info.get("draft_size")
            self.footprint = {"rss_mb": info.get("rss_mb"), "gpu_mb": info.get("gpu_mb")}
            self._ready = True

    def unload(self) -> None:
        with self._lock:
            self._stop_child()

    def prepare(self, item: ImageInput) -> Any:
        return item  # the generator's own prepare() runs in the child

    def generate(self, batch: Sequence[Any]) -> list[str]:
        with self._lock:
            if not self.loaded:
                why = f" (it {self.last_exit})" if self.last_exit else ""
                raise WorkerCrashError(f"{self.name} worker process is not running{why}")
            out = self._request(("generate", list(batch)), self.generate_timeout)
        if not isinstance(out, list):
            raise GenerationError(f"{self.name} worker process answered {type(out).__name__}")
        return out

    def reconfigure(self, config: Any) -> None:
        """New settings for the next load (the caller has unloaded the child)."""
        self._shadow = self.cls(config, cache_dir=self.cache_dir)
        self.config = self._shadow.config

    def stats(self) -> dict[str, Any]:
        with self._lock:
            if not self.loaded:
                return {}
            return self._request(("stats",), 30.0)

    def exited(self) -> str | None:
        """If a loaded child died on its own (e.g. killed while idle): why; it is reaped."""
        if not self._ready or self._proc is None or self._proc.exitcode is None:
            return None
        if not self._lock.acquire(blocking=False):
            return None  # a request is running and will notice itself
        try:
            if self._proc is None or self._proc.exitcode is None:
                return None
            self._reap()
            return self.last_exit
        finally:
            self._lock.release()

    # -- internals ----------------------------------------------------------------
    def _request(self, msg: tuple[Any, ...], timeout: float | None) -> Any:
        conn, proc = self._conn, self._proc
        assert conn is not None and proc is not None
        try:
            conn.send(msg)
        except (OSError, EOFError):
            self._crashed()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([conn, proc.sentinel], left)
            if not ready:
                self._stop_child()
                raise GenerationTimeoutError(
                    f"{self.name} worker process did not answer within {timeout:g} s; restarted"
                )
            if conn not in ready and not conn.poll():
                self._crashed()
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                self._crashed()
            if kind == "progress":
                if self.on_progress is not None:
                    with contextlib.suppress(Exception):
                        self.on_progress(payload)
                continue
            if kind == "ok":
                return payload
            raise _rebuild(payload)

    def _crashed(self) -> Any:
        pid = self.pid
        self._reap()
        log.error("model_process_died", generator=self.name, pid=pid, exit=self.last_exit)
        raise WorkerCrashError(f"{self.name} worker process {self.last_exit}")

    def _reap(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._ready = False
        if proc is not None:
            proc.join(5.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5.0)
            self.last_exit = describe_exit(proc.exitcode)
        if conn is not None:
            conn.close()

    def _stop_child(self) -> None:
        """Ask the child to exit; terminate, then kill, if it does not."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        self._proc = self._conn = None
        self._ready = False
        if conn is not None:
            with contextlib.suppress(OSError, EOFError):
                conn.send(("exit",))
        proc.join(self.stop_timeout)
        if proc.exitcode is None:
            proc.terminate()
            proc.join(3.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(3.0)
        if conn is not None:
            conn.close()
        log.info("model_process_stopped", generator=self.name, pid=proc.pid)


@atexit.register
def _kill_children() -> None:
    for gen in list(_live):
        proc = gen._proc
        if proc is not None and proc.exitcode is None:
            proc.kill()
