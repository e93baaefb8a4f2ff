"""The report on the daemon's side: scopes, the lazy checks, reading edited captions
back, dismissing flags, and the background pass.

When checks run. After a batch's acks, the worker hands the written captions' paths to
:class:`Maintainer` (a deque append on the writer thread: no disk read, no query on the
hot path); the maintainer's thread checks them within a second or two from the index,
in one query and one transaction per batch. A report also checks, first, the images
of its scope whose captions changed since they were last checked (captions written by
``caption --once``, through the API, by an older captiond, or after a rule changed),
within a time budget; what is left is named in the report and done by the background
pass.

A caption edited on disk by a person. The index keeps the text captiond wrote; it learns
a person's edit (a) when captiond itself meets the file (a job that ends
``caption_edited`` carries the text it found: recorded), and (b) when asked:
``captiond report --refresh`` (:meth:`ReportService.refresh`) reads the sidecar of every
caption record in the scope, confined to its root, and keeps the text of each one whose
hash no longer matches (``captions.text_hash``; ``sidecar_hash``, which decides
ownership, is never touched). A report never reads the disk by itself.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from daemon.config import Settings, WatchConfig
from daemon.confined import Root
from daemon.errors import UnsafeSidecarError
from daemon.hashing import sidecar_hash
from daemon.queue import FileIndex, JobQueue
from daemon.report import phash as ph
from daemon.report.checks import (
    Checker,
    Context,
    Source,
    check_images,
    group_rows,
    guess_source,
    source_of,
)
from daemon.report.facts import fill_missing
from daemon.report.stats import HUMAN_EDIT_PREFIX, Options, Scope, build_report
from daemon.report.tokens import find_counter

log = structlog.get_logger(__name__)

CHECK_BUDGET_SECONDS = 2.0  # a report checks stale images for at most this long
CHECK_CHUNK = 500


class ScopeError(ValueError):
    """A scope that names no watched root, or leaves it."""


class BusyError(RuntimeError):
    """Another report is being built."""


class ReportService:
    """What the API and the background pass do with reports and flags."""

    def __init__(
        self,
        *,
        settings: Settings,
        index: FileIndex,
        queue: JobQueue,
        sources: Callable[[], dict[str, Source]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.index = index
        self.queue = queue
        self.sources = sources
        self.clock = clock
        self._lock = threading.Lock()  # one report or refresh at a time
        self.offline = False  # no background pass: a report compares every image's key
        self.phash_state: dict[str, Any] = {}

    @classmethod
    def for_models(
        cls, *, settings: Settings, index: FileIndex, queue: JobQueue, models: Any
    ) -> ReportService:
        """A service whose generator formats come from the model manager's slots."""

        def sources() -> dict[str, Source]:
            return {
                name: source_of(name, slot.generator)
                for name, slot in models.slots.items()
                if slot.generator is not None
            }

        return cls(settings=settings, index=index, queue=queue, sources=sources)

    # -- helpers -------------------------------------------------------------------------
    def context(self, path: str) -> Context:
        watch = self.settings.watch_for(path)
        return Context(
            trigger=watch.trigger_word if watch is not None else "",
            language=self.settings.report.language,
        )

    def checker(self) -> Checker:
        return Checker(self.sources(), self.context)

    def scopes(self, names: Sequence[str]) -> list[Scope]:
        """``ROOT`` or ``ROOT/sub/folder`` (API names; ``_`` is the only root) -> scopes;
        every root when ``names`` is empty. Lexical only: the report reads the index."""
        watches = list(self.settings.watch)
        if not watches:
            raise ScopeError("no folder is watched")
        out: list[Scope] = []
        for name in names or [w.name for w in watches]:
            watch, rest = _split(watches, name)
            out.append(
                Scope(
                    watch.name,
                    str(watch.path).rstrip("/"),
                    "/".join(rest),
                    watch.trigger_word,
                    self.settings.report.language,
                )
            )
        return list(dict.fromkeys(out))

    def _acquire(self, wait: float) -> None:
        if not self._lock.acquire(timeout=wait):
            raise BusyError("another report is being built; try again in a moment")

    # -- checks ----------------------------------------------------------------------------
    def check_paths(self, paths: Iterable[str]) -> int:
        """Check these images now (from the index). Returns flags new or re-opened."""
        if not self.settings.report.checks:
            return 0
        return check_images(self.index, self.checker(), paths)

    def check_stale(
        self,
        prefixes: Sequence[str] | None = None,
        *,
        budget: float | None = None,
        full: bool = True,
    ) -> tuple[int, int]:
        """Check the images under ``prefixes`` (every root when None) whose captions
        changed since they were last checked, for at most ``budget`` seconds. Returns
        (images checked, images left for later). ``full``: compare every image's key
        (finds a changed rule, trigger word or language too); else only the images with
        a caption recorded after their last check (one query: what a report does)."""
        if not self.settings.report.checks:
            return 0, 0
        started = time.monotonic()
        checker = self.checker()
        roots = prefixes or [str(w.path).rstrip("/") for w in self.settings.watch]
        done = left = 0
        for prefix in roots:
            ctx = self.context(prefix.rstrip("/") + "/")  # one watch holds the whole folder
            if full:
                grouped = group_rows(self.index.report_captions(prefix))
                stale = checker.stale(grouped, self.index.checked_keys(prefix), ctx)
            else:
                stale = self.index.unchecked(prefix)
                grouped = group_rows(self.index.caption_rows(stale)) if stale else {}
            for i in range(0, len(stale), CHECK_CHUNK):
                if budget is not None and time.monotonic() - started > budget:
                    left += len(stale) - i
                    break
                chunk = stale[i : i + CHECK_CHUNK]
                self.index.apply_checks(checker.results({p: grouped[p] for p in chunk}, ctx))
                done += len(chunk)
        return done, left

    # -- report facts ----------------------------------------------------------------------
    def fill_facts(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Compute and keep the report facts of every caption record that has none
        (:mod:`daemon.report.facts`): the background pass, so that a report only
        aggregates. Returns the records done."""
        sources = self.sources()
        tokens = find_counter(
            [self.settings.cache_dir / "hf", None], self.settings.report.clip_tokenizers
        )

        def source_for(gen: str, text: str) -> Source:
            # a generator that is not configured: as a report would guess it (a report
            # that guesses otherwise computes its own)
            src = sources.get(gen)
            if src is None:
                src = sources[gen] = guess_source(gen, text)
            return src

        done = 0
        for w in self.settings.watch:
            prefix = str(w.path).rstrip("/")
            ctx = self.context(prefix + "/")
            done += fill_missing(self.index, prefix, source_for, ctx, tokens, stop=stop)
        return done

    # -- the report ------------------------------------------------------------------------
    def report(self, names: Sequence[str] = (), options: Options | None = None) -> dict[str, Any]:
        """The JSON-able report over ``names`` (see :func:`scopes`); stale images are
        checked first, within :data:`CHECK_BUDGET_SECONDS`."""
        options = options or Options()
        options.check()
        scopes = self.scopes(names)
        self._acquire(30.0)
        try:
            started = time.monotonic()
            # comparing every image's key is the background pass's (or an offline run's)
            done, left = self.check_stale(
                [s.prefix for s in scopes], budget=CHECK_BUDGET_SECONDS, full=self.offline
            )
            checks_s = time.monotonic() - started
            cfg = self.settings.report
            out = build_report(
                self.index,
                self.queue,
                scopes,
                sources=self.sources(),
                tokens=find_counter([self.settings.cache_dir / "hf", None], cfg.clip_tokenizers),
                options=options,
                phash_state=self.phash_state or None,
                clock=self.clock,
            )
            out["flags"]["checked_now"] = done
            out["flags"]["not_checked_yet"] = left
            out["flags"]["checks_enabled"] = cfg.checks
            out["timings"]["checks"] = round(checks_s, 3)
            out["seconds"] = round(time.monotonic() - started, 3)
            return out
        finally:
            self._lock.release()

    # -- captions edited on disk -------------------------------------------------------------
    def refresh(self, names: Sequence[str] = ()) -> dict[str, int]:
        """Read back the sidecar of every caption record under ``names`` and keep the
        text of those a person edited (see the module doc). Reads confined to each root;
        symlinks, FIFOs and files over 1 MiB are not read."""
        scopes = self.scopes(names)
        self._acquire(30.0)
        try:
            return self._refresh(scopes)
        finally:
            self._lock.release()

    def _refresh(self, scopes: Sequence[Scope]) -> dict[str, int]:
        counts = {"sidecars": 0, "edited": 0, "missing": 0, "refused": 0, "not_utf8": 0}
        updates: list[tuple[str, str, str, str]] = []
        for sc in scopes:
            watch = self.settings.watch_for(sc.root + "/x")
            if watch is None:
                continue
            root = Root(str(watch.path), watch.follow_symlinks)
            by_dir: dict[str, list[tuple]] = {}
            for row in self.index.report_captions(sc.prefix):
                try:
                    rel = root.rel(row[3])
                except Exception:
                    counts["refused"] += 1
                    continue
                d, _, _n = rel.rpartition("/")
                by_dir.setdefault(d, []).append(row)
            for d, rows in by_dir.items():
                try:
                    folder = root.folder(d)
                except FileNotFoundError:
                    counts["missing"] += len(rows)
                    continue
                except Exception:
                    counts["refused"] += len(rows)
                    continue
                with folder:
                    for row in rows:
                        counts["sidecars"] += 1
                        name = row[3].rpartition("/")[2]
                        try:
                            data = folder.read_sidecar(name)
                        except (UnsafeSidecarError, OSError):
                            counts["refused"] += 1
                            continue
                        if data is None:
                            counts["missing"] += 1
                            continue
                        known = row[7] or _written_hash(row[4])
                        digest = sidecar_hash(data)
                        if digest == known:
                            continue
                        try:
                            text = data.decode("utf-8")
                        except UnicodeDecodeError:
                            counts["not_utf8"] += 1
                            text = data.decode("utf-8", "replace")
                        counts["edited"] += 1
                        updates.append((row[0], row[1], text.rstrip("\n"), digest))
        self.index.set_texts(updates)
        return counts

    def record_found(self, rows: Iterable[tuple[str, str, str]]) -> int:
        """(image path, generator, text) of captions captiond found edited when it met
        them (a job ended ``caption_edited``): keep that text for reports."""
        updates = []
        for path, gen, text in rows:
            data = text if text.endswith("\n") else text + "\n"
            updates.append((path, gen, text.rstrip("\n"), sidecar_hash(data.encode("utf-8"))))
        return self.index.set_texts(updates)

    # -- flags -------------------------------------------------------------------------------
    def dismiss(self, path: str, generator: str | None, check: str | None) -> int:
        return self.index.dismiss_flags(path, generator, check)

    def flag_status(self) -> dict[str, Any]:
        counts = self.index.flag_counts()
        return {
            "open": sum(o for o, _d in counts.values()),
            "dismissed": sum(d for _o, d in counts.values()),
            "by_check": {k: o for k, (o, _d) in sorted(counts.items()) if o},
        }


def _written_hash(recorded: str) -> str:
    """The hash of the bytes a caption record stands for (a caption a person wrote
    through the API is recorded as ``human-edit:<hash>``)."""
    if recorded.startswith(HUMAN_EDIT_PREFIX + ":"):
        return recorded.split(":", 1)[1]
    return recorded


def _split(watches: list[WatchConfig], name: str) -> tuple[WatchConfig, list[str]]:
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise ScopeError(f"invalid scope {name!r}: name a root or ROOT/sub/folder")
    parts = name.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ScopeError("'.', '..' and empty path segments are refused")
    root, rest = parts[0], parts[1:]
    if root == "_" and len(watches) == 1:
        return watches[0], rest
    for w in watches:
        if w.name == root:
            return w, rest
    names = ", ".join(sorted(w.name for w in watches))
    raise ScopeError(f"no watched root named {root!r}; roots: {names}")


def scope_for_path(settings: Settings, path: Path) -> str:
    """The API scope of a folder on disk (for the CLI): ``ROOT/sub``."""
    p = path.absolute()
    for w in settings.watch:
        if p == w.path or p.is_relative_to(w.path):
            rel = p.relative_to(w.path).as_posix()
            return w.name if rel == "." else f"{w.name}/{rel}"
    raise ScopeError(f"{path} is not in a watched folder")


class Maintainer:
    """The daemon's background pass for reports: checks newly written captions (handed
    over by the worker), checks what went stale, and hashes new contents perceptually,
    at the lowest CPU priority. One thread."""

    def __init__(self, service: ReportService, *, interval: float | None = None) -> None:
        self.service = service
        cfg = service.settings.report
        self.interval = cfg.interval_seconds if interval is None else interval
        self._pending: deque[tuple[str, str, str, str | None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hasher = ph.HashPass(
            service.index,
            service.settings.watch_for,
            max_pixels=service.settings.worker.max_image_pixels,
            stop=self._stop,
        )
        self.checked = 0
        self.last_error: str | None = None

    # called on the worker's writer thread: must be cheap
    def notify(self, done: Iterable[tuple[str, str, str, str | None]]) -> None:
        """(path, generator, outcome, caption) of finished jobs."""
        self._pending.extend(done)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="captiond-report", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drain(self) -> None:
        items = []
        while self._pending:
            items.append(self._pending.popleft())
        if not items:
            return
        found = [(p, g, c) for p, g, o, c in items if o == "caption_edited" and c is not None]
        if found:
            self.service.record_found(found)
        paths = list(dict.fromkeys(p for p, _g, _o, _c in items))
        self.service.check_paths(paths)
        self.checked += len(paths)

    def _run(self) -> None:
        ph.lower_priority()
        cfg = self.service.settings.report
        next_full = 0.0
        while not self._stop.is_set():
            try:
                self._drain()
                if time.monotonic() >= next_full:
                    next_full = time.monotonic() + self.interval
                    self.service.check_stale()
                    self.service.fill_facts(self._stop.is_set)
                    if cfg.phash and ph.available():
                        self._hash()
                self.last_error = None
            except Exception as exc:  # the database is busy or full: next round
                self.last_error = str(exc)
                log.warning("report_pass_failed", error=str(exc))
            self._wake.wait(min(self.interval, 5.0))
            self._wake.clear()

    def _hash(self) -> None:
        """The perceptual-hash pass, 64 contents at a time, checking new captions in
        between."""
        stats = ph.PassStats()
        started = time.monotonic()
        self.hasher.load()
        stats.contents = self.hasher.remaining
        while not self._stop.is_set() and self.hasher.remaining:
            step = self.hasher.step(64)
            stats.hashed += step.hashed
            stats.unreadable += step.unreadable
            stats.skipped += step.skipped
            self._drain()
        stats.seconds = round(time.monotonic() - started, 3)
        stats.stopped = self._stop.is_set()
        if stats.contents:
            log.info("phash_pass", **asdict(stats))
        self.service.phash_state = {"last_pass": asdict(stats), "at": round(time.time(), 1)}
