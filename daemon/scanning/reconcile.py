"""The reconcile scan: the source of truth for what needs captioning.

Watcher events are only hints; :meth:`Scanner.reconcile` walks a watch root, compares
each candidate image's (size, mtime_ns) with the index and enqueues what is new or
changed in content. A file whose stat changed but whose content hash still matches
the captioned content ("touched") is not captioned again. Files and directories gone
from disk are dropped from the index and their jobs forgotten; their sidecars stay
(the scanner never deletes files).

A root that is missing, unreadable, or empty while the index holds files for it
(an unmounted NAS looks like that) raises :class:`ScanError` and forgets nothing.

Which files are candidates: :mod:`daemon.scanning.rules`. Symlinks to files are
followed (the sidecar goes next to the link); symlinked directories are not. A file
name that is not valid UTF-8 cannot be stored and is skipped with a warning.

Caveat of the empty-root rule: a user who deletes every image AND every other entry
of a root gets ScanError until something is put back; the index keeps the old rows
and their jobs fail as "file not found".
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.conditions import NETWORK_ERRNOS, SYSTEMIC_ERRNOS
from daemon.config import PRIORITY_BACKFILL, PRIORITY_NEW, WatchConfig
from daemon.confined import ConfinementError, Folder, Root, is_temp_name
from daemon.errors import CaptionError
from daemon.hashing import content_hash_file, file_hashes, sidecar_hash
from daemon.queue.index import FileIndex
from daemon.queue.jobs import JobQueue
from daemon.scanning.rules import Rules, is_candidate, rules_for_watch, split_path

log = structlog.get_logger(__name__)

FLUSH = 1000
_S_IFMT = stat_mod.S_IFMT(0o177777)
_S_IFREG = stat_mod.S_IFREG


class ScanError(Exception):
    """A watch root cannot be scanned; nothing was forgotten."""


@dataclass(slots=True)
class ScanStats:
    root: str
    files_seen: int = 0  # candidate images found on disk
    new: int = 0  # not in the index before (enqueued)
    changed: int = 0  # stat and content changed (enqueued)
    touched: int = 0  # stat changed, content the same (index updated only)
    removed: int = 0  # in the index but gone from disk
    dirs: int = 0  # directories walked (the watcher compares this to the inotify limit)
    seconds: float = 0.0
    errors: int = 0  # directories or files that could not be read (left as they were)


def _dir_allowed(rules: Rules, rel: str) -> bool:
    """Whether every folder of ``rel`` may be walked (not hidden, not excluded)."""
    acc = ""
    for part in rel.split("/"):
        acc = f"{acc}/{part}" if acc else part
        if part.startswith(".") or not rules.dir_ok(acc, part):
            return False
    return True


def _under(d: str, top: str) -> bool:
    """Whether relative dir ``d`` is ``top`` or inside it (``''`` is the root)."""
    return not top or d == top or d.startswith(top + "/")


class Scanner:
    """Reconciles watch roots with the index and the queue.

    Keeps, per directory, the hash of the set of (name, size, mtime_ns) the index held
    and the directory's version (``dir_versions``, bumped by triggers on any change to
    its rows, from any connection). A rescan compares a directory listing with that
    hash and reads the index rows only where the version moved or the hash differs,
    which keeps SQL out of the warm rescan. Memory: about 200 bytes per directory.
    """

    def __init__(
        self,
        index: FileIndex,
        queue: JobQueue,
        *,
        stale_temps_before: float | None = None,
        network_roots: frozenset[str] = frozenset(),
    ) -> None:
        """``stale_temps_before``: captiond's temp files (:func:`confined.is_temp_name`)
        older than this Unix time are leftovers of a crash and are deleted by the walk.
        The daemon passes its start time: no temp file of the running process is older.
        ``network_roots``: names of watches on network filesystems (an I/O error there
        is the server's, see :mod:`daemon.conditions`)."""
        self.index = index
        self.queue = queue
        self.stale_temps_before = stale_temps_before
        self.network_roots = network_roots
        self._memo: dict[tuple[str, str], tuple[int, int]] = {}

    # -- one file ------------------------------------------------------------------

    def check_file(
        self, watch: WatchConfig, path: Path, *, priority_class: int = PRIORITY_NEW
    ) -> bool:
        """Reconcile one settled file reported by the watcher. True if a job was enqueued.

        A deleted file is dropped from the index and its jobs forgotten (unless the
        whole root is gone: then ScanError, and nothing is forgotten).
        """
        parts = split_path(watch, path)
        if parts is None or not is_candidate(watch, Path(path)):
            return False
        root, rel_dir, name = parts
        full = os.path.join(root, rel_dir, name) if rel_dir else os.path.join(root, name)
        try:
            # Confined: a folder on the way replaced by a symlink, or a file linking
            # out of the root, makes the file unreachable, as if it had gone.
            with Root(root, watch.follow_symlinks).folder(rel_dir) as folder:
                st = folder.stat_file(name)
        except (FileNotFoundError, ConfinementError) as exc:
            st = None
            if isinstance(exc, ConfinementError):
                log.warning("scan_path_refused", path=full, root=root, error=str(exc))
        except OSError as exc:
            log.warning("scan_stat_failed", path=full, root=root, error=str(exc))
            raise
        if st is None:
            self._check_root(root)  # an unmounted share looks like deleted files
            self.queue.forget(full)
            self.index.remove_files(root, rel_dir, [name])
            log.debug("scan_file_removed", path=full, root=root)
            return False
        if not stat_mod.S_ISREG(st.st_mode):
            return False
        old = self.index.get_file(root, rel_dir, name)
        size, mtime = st.st_size, st.st_mtime_ns
        prio = priority_class + watch.priority
        if old is None:
            items = [(full, g, prio) for g in watch.generators]
        elif old == (size, mtime):
            return False
        else:
            try:
                gens = self._content_changed(watch, rel_dir, name, full)
            except (OSError, ConfinementError) as exc:
                log.warning("scan_hash_failed", path=full, root=root, error=str(exc))
                return False
            items = [(full, g, prio) for g in gens]
        if items:
            self.queue.enqueue_many(items)
        self.index.upsert_files(root, [(rel_dir, name, size, mtime)])
        return bool(items)

    @staticmethod
    def _remove_stale_temp(dir_fd: int, dpath: str, name: str, before: float) -> None:
        if not is_temp_name(name):
            return
        try:
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime < before:
                os.unlink(name, dir_fd=dir_fd)
                log.info("stale_temp_removed", path=dpath + "/" + name)
        except OSError as exc:
            log.warning("stale_temp_not_removed", path=dpath + "/" + name, error=str(exc))

    def _content_changed(self, watch: WatchConfig, rel_dir: str, name: str, full: str) -> list[str]:
        """Generators whose recorded caption was not made from this content (the file
        read confined to its root)."""
        recorded = {g: self.index.get_caption(full, g) for g in watch.generators}
        with Root(str(watch.path), watch.follow_symlinks).folder(rel_dir) as folder:
            fd = folder.open_file(name)
            try:
                have = file_hashes(
                    fd,
                    [r.content_hash for r in recorded.values() if r is not None],
                    current=content_hash_file(fd),
                )
            finally:
                os.close(fd)
        return [g for g, r in recorded.items() if r is None or r.content_hash not in have]

    # -- a whole tree --------------------------------------------------------------

    def reconcile(
        self,
        watch: WatchConfig,
        *,
        priority_class: int = PRIORITY_BACKFILL,
        subdir: Path | None = None,
    ) -> ScanStats:
        """Walk the watch root (or ``subdir`` of it) and bring index and queue in line."""
        t0 = time.perf_counter()
        root = str(watch.path)
        stats = ScanStats(root=root)
        rules = rules_for_watch(watch)
        self._check_root(root)

        top = ""
        if subdir is not None:
            parts = split_path(watch, subdir)
            if parts is None:
                raise ValueError(f"{subdir} is not inside the watch root {root}")
            top = f"{parts[1]}/{parts[2]}" if parts[1] else parts[2]
        confined = Root(root, watch.follow_symlinks)
        try:
            root_fd = confined.open()
        except (OSError, ConfinementError) as exc:
            raise ScanError(
                f"{root}: cannot open the watch root ({exc}); nothing was forgotten"
            ) from exc
        if not top:
            revived = self.queue.revive_systemic(root, self._systemic_errnos(watch))
            if revived:
                log.info(
                    "jobs_revived",
                    root=root,
                    jobs=revived,
                    reason="failed by a condition of the system",
                )

        index, queue = self.index, self.queue
        recursive = rules.recursive
        name_ok = rules.name_re.match
        stale_before = self.stale_temps_before
        check_globs = rules.include is not None or rules.exclude is not None
        file_ok, dir_ok = rules.file_ok, rules.dir_ok
        memo = self._memo
        versions = index.dir_versions(root)
        modified: set[str] = set()  # dirs whose index rows this scan changes
        prio = priority_class + watch.priority
        gens = list(watch.generators)

        jobs: list[tuple[str, str, int]] = []
        upserts: list[tuple[str, str, int, int]] = []
        changed: list[tuple[str, str, str, int, int]] = []  # full, dir, name, size, mtime
        gone: list[tuple[str, list[str]]] = []  # (dir, names)
        walked: set[str] = set()
        unreadable: list[str] = []

        def flush() -> None:
            # Jobs before the index: a crash in between re-finds the file as new.
            if jobs:
                queue.enqueue_many(jobs)
                jobs.clear()
            if upserts:
                index.upsert_files(root, upserts)
                upserts.clear()

        try:
            stack: list[tuple[str, str]] = []
            # A subtree's own path must be one the watch captions: a folder moved to a
            # hidden or excluded name is not walked (its index entries go below).
            if (recursive or not top) and (not top or _dir_allowed(rules, top)):
                stack.append((os.path.join(root, top) if top else root, top))
            links = watch.follow_symlinks
            while stack:
                dpath, rel = stack.pop()
                prefix = rel + "/" if rel else ""
                entries: list[tuple[str, int, int]] = []
                try:
                    # Confined: opened beneath the root's descriptor, never through a
                    # symlink (a folder swapped for a link is not walked); listing through
                    # the descriptor makes each stat an fstatat() by name.
                    fd = confined.open_dir(root_fd, rel)
                except (FileNotFoundError, NotADirectoryError, ConfinementError):
                    continue  # vanished, replaced by a link, or never there: entries go below
                except OSError as exc:
                    log.warning("scan_dir_unreadable", path=dpath, root=root, error=str(exc))
                    unreadable.append(rel)
                    stats.errors += 1
                    continue
                try:
                    with os.scandir(fd) as it:
                        for e in it:
                            name = e.name
                            if name_ok(name) and (not check_globs or file_ok(prefix + name, name)):
                                try:
                                    if links != "all" and e.is_symlink():
                                        if links == "never":
                                            continue
                                        got = Folder(confined, rel, fd).stat_file(name)
                                        if got is None:
                                            continue
                                        st = got
                                    else:
                                        st = e.stat()
                                except (FileNotFoundError, ConfinementError):
                                    continue  # vanished mid-walk, or a link out: dropped below
                                except OSError as exc:
                                    log.warning(
                                        "scan_stat_failed",
                                        path=dpath + "/" + name,
                                        root=root,
                                        error=str(exc),
                                    )
                                    stats.errors += 1
                                    unreadable.append(prefix + name)  # keep its index row
                                    continue
                                if st.st_mode & _S_IFMT == _S_IFREG:
                                    entries.append((name, st.st_size, st.st_mtime_ns))
                                    continue
                            elif stale_before is not None and is_temp_name(name):
                                self._remove_stale_temp(fd, dpath, name, stale_before)
                                continue
                            if recursive and name[0] != ".":
                                try:
                                    if not e.is_dir(follow_symlinks=False):
                                        continue
                                except OSError:
                                    continue
                                crel = prefix + name
                                if not check_globs or dir_ok(crel, name):
                                    stack.append((dpath + "/" + name, crel))
                except OSError as exc:  # the listing broke off (e.g. an I/O error on a share)
                    log.warning("scan_dir_unreadable", path=dpath, root=root, error=str(exc))
                    unreadable.append(rel)
                    stats.errors += 1
                finally:
                    os.close(fd)
                walked.add(rel)
                stats.files_seen += len(entries)
                m = memo.get((root, rel))
                if (
                    m is not None
                    and m[0] == versions.get(rel, 0)
                    and m[1] == hash(frozenset(entries))
                    and rel not in unreadable
                ):
                    continue  # the common case on a rescan: nothing changed here
                version, rows = index.dir_state(root, rel)
                memo[(root, rel)] = (version, hash(frozenset(rows)))
                known = {n: (sz, mt) for n, sz, mt in rows}
                for name, size, mtime in entries:
                    old = known.pop(name, None)
                    if old is None:
                        try:
                            name.encode()
                        except UnicodeEncodeError:  # not UTF-8: cannot be stored
                            log.warning("scan_bad_name", path=dpath + "/" + name, root=root)
                            stats.errors += 1
                            continue
                        stats.new += 1
                        full = dpath + "/" + name
                        for g in gens:
                            jobs.append((full, g, prio))
                        upserts.append((rel, name, size, mtime))
                        modified.add(rel)
                    elif old[0] != size or old[1] != mtime:
                        changed.append((dpath + "/" + name, rel, name, size, mtime))
                        modified.add(rel)
                if len(upserts) >= FLUSH:
                    flush()
                for u in unreadable:
                    if u.startswith(prefix) and "/" not in u[len(prefix) :]:
                        known.pop(u[len(prefix) :], None)
                if known and rel not in unreadable:
                    gone.append((rel, list(known)))
                    modified.add(rel)

            flush()
        finally:
            os.close(root_fd)
        stats.dirs = len(walked)

        # Stat changed: re-caption only when the content differs from what was captioned.
        for full, rel, name, size, mtime in changed:
            try:
                todo = self._content_changed(watch, rel, name, full)
            except (OSError, ConfinementError) as exc:
                log.warning("scan_hash_failed", path=full, root=root, error=str(exc))
                stats.errors += 1
                continue
            if todo:
                stats.changed += 1
                jobs.extend((full, g, prio) for g in todo)
            else:
                stats.touched += 1
            upserts.append((rel, name, size, mtime))
            if len(upserts) >= FLUSH:
                flush()
        flush()

        # Directories indexed before but not walked now: gone (or no longer watched).
        # Every directory that ever had rows has a version; the summaries skip the ones
        # already known to be empty.
        empty = hash(frozenset())
        for d, v in versions.items():
            if d in walked or not _under(d, top) or any(_under(d, u) for u in unreadable):
                continue
            m = memo.get((root, d))
            if m is not None and m[0] == v and m[1] == empty:
                continue
            version, rows = index.dir_state(root, d)
            memo[(root, d)] = (version, hash(frozenset(rows)))
            if rows:
                gone.append((d, [r[0] for r in rows]))
                modified.add(d)

        for rel, names in gone:
            base = os.path.join(root, rel) if rel else root
            queue.forget_many(os.path.join(base, n) for n in names)
            if rel in walked:
                index.remove_files(root, rel, names)
            else:
                index.remove_dir(root, rel)
            stats.removed += len(names)
            log.debug("scan_removed", root=root, dir=rel, files=len(names))

        # Summaries of the directories changed here, so the next rescan skips them.
        for rel in modified:
            version, rows = index.dir_state(root, rel)
            memo[(root, rel)] = (version, hash(frozenset(rows)))

        stats.seconds = time.perf_counter() - t0
        log.debug(
            "reconcile_done",
            root=root,
            subdir=top or None,
            files=stats.files_seen,
            new=stats.new,
            changed=stats.changed,
            touched=stats.touched,
            removed=stats.removed,
            dirs=stats.dirs,
            errors=stats.errors,
            seconds=round(stats.seconds, 3),
        )
        return stats

    def recaption_ours(self, watch: WatchConfig, priority_class: int = PRIORITY_BACKFILL) -> int:
        """Queue every image of ``watch`` whose sidecar captiond wrote and nobody edited
        since (read confined; the worker checks again before it writes, so an edit made
        meanwhile is left alone). Returns how many jobs were queued."""
        root = Root(str(watch.path), watch.follow_symlinks)
        items = []
        for rec in self.index.captions_under(str(watch.path)):
            if rec.generator not in watch.generators:
                continue
            try:
                rel_dir, _, name = root.rel(rec.sidecar_path).rpartition("/")
                with root.folder(rel_dir) as folder:
                    if folder.lstat(rec.image_path.rsplit("/", 1)[1]) is None:
                        continue
                    data = folder.read_sidecar(name)
            except (OSError, CaptionError):
                continue
            if data is not None and sidecar_hash(data) in (rec.sidecar_hash, rec.prev_hash):
                items.append((rec.image_path, rec.generator, priority_class + watch.priority))
        return self.queue.enqueue_many(items)

    def _check_root(self, root: str) -> None:
        """Raise ScanError when the root looks missing or unmounted."""
        if gone := self.root_gone(root):
            raise ScanError(gone)

    def root_gone(self, root: str) -> str | None:
        """Why the root looks missing or unmounted (None when it looks fine): it cannot
        be read, or it is empty while files were indexed there."""
        try:
            fd = Root(root).open()
            try:
                with os.scandir(fd) as it:
                    empty = next(it, None) is None
            finally:
                os.close(fd)
        except (OSError, ConfinementError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            return (
                f"{root}: cannot read the watch root ({why}); is it mounted? Nothing was forgotten."
            )
        if empty and self.index.count_files(root):
            return (
                f"{root}: the watch root is empty but files were indexed there; "
                "treating it as unmounted. Nothing was forgotten."
            )
        return None

    def _systemic_errnos(self, watch: WatchConfig) -> frozenset[int]:
        """errnos that say "the system", not "the image", for jobs under ``watch``."""
        if watch.name in self.network_roots:
            return SYSTEMIC_ERRNOS | NETWORK_ERRNOS
        return SYSTEMIC_ERRNOS
