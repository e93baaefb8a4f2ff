"""``captiond caption DIR --once``: the daemon's pipeline, in-process, over one folder.

The same scanner, queue, worker, generators and sidecar rules as the daemon, with a
state database of its own (a temporary one unless ``--state-dir`` is given), run until
the folder is done. What kohya's tagging script is used for, with captiond's rules.
"""

from __future__ import annotations

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


@dataclass
class OneShotResult:
    total: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model_error: str = ""

    @property
    def failed(self) -> int:
        return len(self.errors)


def watch_for_folder(settings: Settings, folder: Path, generator: str | None) -> WatchConfig:
    """The folder's settings: those of the watch that holds it, else the defaults."""
    folder = folder.expanduser().absolute()
    base = settings.watch_for(str(folder))
    data = base.model_dump() if base is not None else {}
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
    return WatchConfig.model_validate(data)


def run_once(
    settings: Settings,
    folder: Path,
    *,
    generator: str | None = None,
    force: bool = False,
    state_dir: Path | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    poll_seconds: float = 0.2,
) -> OneShotResult:
    watch = watch_for_folder(settings, folder, generator)
    if state_dir is not None and state_dir.expanduser().absolute() == settings.state_dir:
        raise ValueError(
            f"--state-dir {state_dir} is the daemon's own state directory; pick another"
        )
    with tempfile.TemporaryDirectory(prefix="captiond-once-") as tmp:
        state = state_dir or Path(tmp)
        local = settings.model_copy(
            update={"watch": [watch], "state_dir": state, "socket_path": state / "unused.sock"}
        )
        db = Database(local.db_path)
        try:
            return _run(local, watch, db, force, progress, poll_seconds)
        finally:
            db.close()


def _run(
    settings: Settings,
    watch: WatchConfig,
    db: Database,
    force: bool,
    progress: Callable[[int, int], None],
    poll_seconds: float,
) -> OneShotResult:
    started = time.monotonic()
    queue = JobQueue(db, **settings.queue.queue_kwargs())
    index = FileIndex(db)
    queue.recover_all_leased()
    Scanner(index, queue).reconcile(watch, priority_class=PRIORITY_EXPLICIT)
    prefix = str(watch.path).rstrip("/") + "/"

    def here(path: str) -> bool:  # a kept --state-dir may hold other folders' jobs
        return path.startswith(prefix)

    queue.prune(lambda path, gen: here(path) and gen in watch.generators)
    if force:  # everything in the folder, captioned before or not
        for job in queue.jobs(limit=10_000_000):
            queue.enqueue(job.path, job.generator, PRIORITY_EXPLICIT, options={"force": True})
    models = ModelManager.for_settings(settings, watch.generators)
    worker = Worker(settings=settings, queue=queue, index=index, models=models)
    result = OneShotResult()
    worker.start()
    try:
        while True:
            totals = totals_of(queue.counts())
            result.total = sum(totals.values())
            open_ = totals.get("pending", 0) + totals.get("leased", 0)
            progress(result.total - open_, result.total)
            if open_ == 0:
                break
            if (err := _model_stuck(models, watch.generators)) is not None:
                result.model_error = err  # its jobs would wait for ever: stop here
                break
            time.sleep(poll_seconds)
    finally:
        worker.stop()
        if not worker.alive:  # else a load or generate() is still running: leave it
            models.unload_all()
    for by in queue.outcome_counts().values():
        for outcome, n in by.items():
            result.outcomes[outcome] = result.outcomes.get(outcome, 0) + n
    for job in queue.jobs(JobState.FAILED, limit=10_000) + queue.jobs(JobState.DEAD, limit=10_000):
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
