"""Where a ``{tags}`` prompt's tags come from: the tagging generator of the image's
watch, and that generator's recorded caption of the image (its sidecar as it is now, a
person's edits included). The daemon's worker and the backfill driver both ask here."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from daemon.config import WatchConfig
from daemon.confined import Root
from daemon.errors import DependencyPendingError, GenerationError
from daemon.generators.base import Generator
from daemon.hashing import sidecar_hash
from daemon.pipeline.sidecars import Action
from daemon.queue import FileIndex, JobQueue, JobState

DEPENDENCY_DELAY_SECONDS = 5.0  # a {tags} job waits this long for the tagger's job


def tagger_of(watch: WatchConfig, generators: Mapping[str, Generator]) -> str:
    """The watch's first tagging generator (tags, with no ``{tags}`` of its own)."""
    for name in watch.generators:
        gen = generators.get(name)
        if gen is not None and gen.caption_type == "tags" and "tags" not in gen.context_keys:
            return name
    raise GenerationError(
        f"a prompt uses {{tags}}, but watch {watch.name!r} has no tagging generator "
        "(add wd_tagger to its generators, listed first)"
    )


def read_recorded(watch: WatchConfig, sidecar_path: str) -> bytes | None:
    """A sidecar captiond recorded, read confined to the watch's root."""
    root = Root(str(watch.path), watch.follow_symlinks)
    rel = root.rel(sidecar_path)
    rel_dir, _, name = rel.rpartition("/")
    try:
        with root.folder(rel_dir) as folder:
            return folder.read_sidecar(name)
    except FileNotFoundError:
        return None


def recorded_tags(
    index: FileIndex,
    watch: WatchConfig,
    path: str,
    tagger: str,
    content_ok: Callable[[str], bool] = lambda content_hash: True,
) -> tuple[str, str] | None:
    """(content hash, text) of the tagger's recorded caption of ``path``, if
    ``content_ok(content hash)``: the text serves only content with that hash. None
    while the record is ahead of its file (recorded, not yet renamed into place, or a
    crash in between: the file still holds the caption it replaces)."""
    record = index.get_caption(path, tagger)
    if record is None or not content_ok(record.content_hash):
        return None
    data = read_recorded(watch, record.sidecar_path)
    if data is None:
        return None
    if (
        record.prev_hash not in (None, record.sidecar_hash)
        and sidecar_hash(data) == record.prev_hash
    ):
        return None
    return record.content_hash, data.decode("utf-8", "replace").strip()


def tags_when_unrecorded(
    queue: JobQueue,
    path: str,
    tagger: str,
    persons_sidecar: Callable[[], bytes | None],
    priority: int,
) -> str:
    """No recorded caption of this content: the tags of a person's sidecar the tagger
    left alone; else the tagger's job is queued (unless it is on its way) and this job
    must wait (DependencyPendingError). A tagger that failed on the image fails it too."""
    job = queue.get(path, tagger)
    if job is None or job.state in (JobState.DONE, JobState.FAILED, JobState.DEAD):
        if job is not None and job.state is not JobState.DONE:
            raise GenerationError(f"{tagger} failed on this image: {job.error_message}")
        if job is not None and job.outcome in (Action.EXISTS.value, Action.EDITED.value):
            text = persons_sidecar()
            if text is not None:
                return text.decode("utf-8", "replace").strip()
        queue.enqueue(path, tagger, priority)
    raise DependencyPendingError(f"waiting for {tagger}'s tags")
