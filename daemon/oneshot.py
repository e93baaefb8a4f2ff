"""``captiond caption DIR --once``: the daemon's pipeline, in-process, over one folder.

The same scanner, queue, worker (and through it the caption pipeline), generators and
sidecar rules as the daemon, run until the folder is done: what kohya's tagging script
is used for, with captiond's rules. Its state (which sidecars it wrote, from which
image content) is kept per folder under the user's state directory
(``$XDG_STATE_HOME/captiond/once/<folder hash>``), so that a second run knows its own
captions: a changed image gets a new caption, a person's caption stays unless asked
(``overwrite``), and ``redo`` makes captiond's own again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import (
    PRIORITY_EXPLICIT,
    Settings,
    WatchConfig,
    discover_generators,
    generator_config,
)
from daemon.queue import Database, FileIndex, JobQueue, JobState, totals_of
from daemon.residency.manager import ModelManager
from daemon.scanning.reconcile import Scanner
from daemon.worker import Worker

LEFT_ALONE = {
    "caption_exists": "a caption captiond did not write is there (--overwrite replaces it)",
    "caption_edited": "edited by a person after captiond wrote it (--overwrite replaces it)",
}


@dataclass
class OneShotResult:
    total: int = 0  # images in the folder
    outcomes: dict[str, int] = field(default_factory=dict)  # of this run only
    errors: list[dict[str, Any]] = field(default_factory=list)  # of this run only
    left_alone: list[dict[str, Any]] = field(default_factory=list)  # person's captions kept
    seconds: float = 0.0
    model_error: str = ""
    state_dir: str = ""

    @property
    def failed(self) -> int:
        return len(self.errors)


@dataclass
class OnceOptions:
    """kohya-style settings for one run, over the folder's and generators' own."""

    ext: str | None = None
    trigger_word: str | None = None
    existing: str | None = None  # skip | overwrite | append | prepend
    batch_size: int | None = None
    tagger: dict[str, Any] = field(default_factory=dict)  # general_threshold, ...

    def apply(self, settings: Settings, watch: dict[str, Any], generator: str) -> Settings:
        if self.ext:
            watch["sidecar_extension"] = self.ext.lstrip(".")
        if self.trigger_word is not None:
            watch["trigger_word"] = self.trigger_word
        if self.existing:
            watch["existing_caption"] = self.existing
        update: dict[str, Any] = {}
        if self.batch_size:
            update["worker"] = settings.worker.model_copy(update={"batch_size": self.batch_size})
        if self.tagger:
            gens = dict(settings.generators)
            gens[generator] = {**gens.get(generator, {}), **self.tagger}
            update["generators"] = gens
        return settings.model_copy(update=update) if update else settings


def default_state_dir(folder: Path) -> Path:
    """Where a folder's --once state lives: one database per (canonical) folder."""
    base = Path(os.environ.get("XDG_STATE_HOME") or "~/.local/state").expanduser()
    key = hashlib.sha256(os.fsencode(os.path.realpath(folder))).hexdigest()[:16]
    return base / "captiond" / "once" / key


def watch_for_folder(settings: Settings, folder: Path, generator: str | None) -> dict[str, Any]:
    """The folder's settings: those of the watch that holds it, else the defaults."""
    folder = Path(os.path.realpath(folder.expanduser()))
    base = settings.watch_for(str(folder))
    data = base.model_dump(exclude={"name"}) if base is not None else {}
    data |= {"path": folder, "name": folder.name or "root"}
    if generator:
        names = [generator]
        found = discover_generators(settings).get(generator)
        if found is not None and found.cls is not None:
            gen = found.cls(generator_config(settings, generator, found.cls))
            if "tags" in gen.context_keys:  # its prompt needs a tagger's tags first
                taggers = [g for g in data.get("generators", ["wd_tagger"]) if g != generator]
                names = [*(taggers[:1] or ["wd_tagger"]), generator]
        data["generators"] = names
        ext = data.get("sidecar_extension")
        if isinstance(ext, dict):
            data["sidecar_extension"] = {g: ext[g] for g in names if g in ext} or None
    return data


def run_once(
    settings: Settings,
    folder: Path,
    *,
    generator: str | None = None,
    redo: bool = False,
    overwrite: bool = False,
    state_dir: Path | None = None,
    fresh: bool = False,
    options: OnceOptions | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    poll_seconds: float = 0.2,
) -> OneShotResult:
    """Caption ``folder``. ``redo``: captiond's own unedited captions are made again;
    ``overwrite``: every caption is replaced, a person's too. ``state_dir``: where the
    run's state lives (default: :func:`default_state_dir`); ``fresh``: a temporary one."""
    data = watch_for_folder(settings, folder, generator)
    options = options or OnceOptions()
    names = data.get("generators") or ["wd_tagger"]
    settings = options.apply(settings, data, generator or names[0])
    watch = WatchConfig.model_validate(data)
    if state_dir is not None and os.path.realpath(state_dir) == os.path.realpath(
        settings.state_dir
    ):
        raise ValueError(
            f"--state-dir {state_dir} is the daemon's own state directory; pick another"
        )
    with tempfile.TemporaryDirectory(prefix="captiond-once-") as tmp:
        state = Path(tmp) if fresh else (state_dir or default_state_dir(watch.path))
        state.mkdir(parents=True, exist_ok=True)
        local = settings.model_copy(
            update={"watch": [watch], "state_dir": state, "socket_path": state / "unused.sock"}
        )
        db = Database(local.db_path)
        try:
            result = _run(local, watch, db, redo, overwrite, progress, poll_seconds)
        finally:
            db.close()
        result.state_dir = "" if fresh else str(state)
        return result


def _run(
    settings: Settings,
    watch: WatchConfig,
    db: Database,
    redo: bool,
    overwrite: bool,
    progress: Callable[[int, int], None],
    poll_seconds: float,
) -> OneShotResult:
    started, t0 = time.monotonic(), time.time()
    queue = JobQueue(db, **settings.queue.queue_kwargs())
    index = FileIndex(db)
    queue.recover_all_leased()
    scanner = Scanner(index, queue)
    prefix = str(watch.path).rstrip("/") + "/"

    def here(path: str) -> bool:  # a kept state may hold other folders' jobs
        return path.startswith(prefix)

    queue.prune(lambda path, gen: here(path) and gen in watch.generators)
    models = ModelManager.for_settings(settings, watch.generators)
    for slot in models.slots.values():  # a light model loads while the folder is scanned
        if not slot.heavy:  # (a heavy one only when an image needs it)
            slot.ensure_loaded(wait=False)
    try:
        scanner.reconcile(watch, priority_class=PRIORITY_EXPLICIT)
        if overwrite:  # everything in the folder, captioned before or not, a person's too
            for job in queue.jobs(limit=10_000_000):
                queue.enqueue(job.path, job.generator, PRIORITY_EXPLICIT, options={"force": True})
        elif redo:
            scanner.recaption_ours(watch, PRIORITY_EXPLICIT)
        queue.retry()  # a failed image gets another chance with this run
    except BaseException:
        models.wait_for_loads()
        models.unload_all()
        raise
    worker = Worker(settings=settings, queue=queue, index=index, models=models)
    result = OneShotResult()
    worker.start()
    result.total = sum(totals_of(queue.counts()).values())  # nothing else enqueues here
    try:
        while True:
            open_ = queue.open_count()
            progress(result.total - open_, result.total)
            if open_ == 0:
                break
            if (err := _model_stuck(models, watch.generators)) is not None:
                result.model_error = err  # its jobs would wait for ever: stop here
                break
            time.sleep(poll_seconds)
    finally:
        worker.stop()
        # the light model's load started before the scan may still run (a folder with
        # nothing to do): wait for it, an exit during an onnxruntime load aborts
        models.wait_for_loads()
        if not worker.alive:  # else a load or generate() is still running: leave it
            models.unload_all()
    for job in queue.finished_since(t0):
        if job.state == JobState.DONE and job.outcome:
            result.outcomes[job.outcome] = result.outcomes.get(job.outcome, 0) + 1
            if job.outcome in LEFT_ALONE:
                result.left_alone.append(
                    {"path": job.path, "outcome": job.outcome, "reason": LEFT_ALONE[job.outcome]}
                )
        elif job.state in (JobState.FAILED, JobState.DEAD):
            result.errors.append(
                {"path": job.path, "error_type": job.error_type, "error": job.error_message}
            )
    result.seconds = time.monotonic() - started
    return result


def _model_stuck(models: ModelManager, names: list[str]) -> str | None:
    """A reason when a generator's model cannot run (unavailable, or its load failed)."""
    for name in names:
        slot = models.get(name)
        st = slot.status() if slot else {"state": "unavailable", "reason": "unknown generator"}
        if st.get("state") == "unavailable":
            return f"{name}: {st.get('reason')}"
        if st.get("state") == "failed" and (err := st.get("last_error")):
            return f"{name}: {err['error_type']}: {err['message']}"
    return None
