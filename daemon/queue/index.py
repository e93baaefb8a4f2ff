"""The file index (what the last scan saw) and the record of captions written.

``files`` holds one row per candidate image: (root, dir, name) -> (size, mtime_ns),
``dir`` being the directory relative to the watch root with ``/`` separators (``''``
for the root itself). The reconcile scan compares the disk against it, one directory
at a time. ``dir_versions`` (kept by triggers) changes whenever a directory's rows change.

``captions`` remembers, per (image, generator), the hash of the image content that was
captioned and the hash of the sidecar written, so that a touched-but-unchanged image is
not captioned again and a sidecar edited by a person can be recognised. Paths are
absolute strings.

Deleting an image removes its ``files`` row and its jobs, but NOT its caption record:
the sidecar stays on disk, and if the image comes back (moved back, a remount, a
re-sync) the record still says the sidecar is ours and what it was written from.
:meth:`FileIndex.forget_captions` exists for explicit clean-up only.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

from daemon.queue.db import Database

BATCH = 1000


@dataclass(slots=True)
class CaptionRecord:
    image_path: str
    generator: str
    content_hash: str
    sidecar_path: str
    sidecar_hash: str
    written_at: float
    prev_hash: str | None = None
    base_text: str | None = None
    text: str | None = None  # the caption as written (for reports; the file may change)

    def owned_hashes(self, sidecar_path: str) -> frozenset[str]:
        """Hashes of content at ``sidecar_path`` that captiond may replace."""
        if self.sidecar_path != sidecar_path:
            return frozenset()
        return frozenset(h for h in (self.sidecar_hash, self.prev_hash) if h)


_CAP_COLS = (
    "image_path, generator, content_hash, sidecar_path, sidecar_hash, written_at, "
    "prev_hash, base_text, text"
)


class FileIndex:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # -- files ---------------------------------------------------------------------

    def dir_entries(self, root: str, dir: str) -> dict[str, tuple[int, int]]:
        """name -> (size, mtime_ns) of the indexed files directly in ``dir``."""
        rows = self.db.conn.execute(
            "SELECT name, size, mtime_ns FROM files WHERE root = ? AND dir = ?", (root, dir)
        ).fetchall()
        return {name: (size, mtime) for name, size, mtime in rows}

    def dir_state(self, root: str, dir: str) -> tuple[int, list[tuple[str, int, int]]]:
        """(version, [(name, size, mtime_ns)]) of ``dir``, read as one consistent snapshot.

        The version changes whenever any connection changes the directory's rows.
        """
        conn = self.db.conn
        if conn.in_transaction:
            return self._dir_state(conn, root, dir)
        conn.execute("BEGIN")
        try:
            return self._dir_state(conn, root, dir)
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _dir_state(
        conn: sqlite3.Connection, root: str, dir: str
    ) -> tuple[int, list[tuple[str, int, int]]]:
        row = conn.execute(
            "SELECT version FROM dir_versions WHERE root = ? AND dir = ?", (root, dir)
        ).fetchone()
        rows = conn.execute(
            "SELECT name, size, mtime_ns FROM files WHERE root = ? AND dir = ?", (root, dir)
        ).fetchall()
        return (0 if row is None else row[0]), rows

    def dir_versions(self, root: str) -> dict[str, int]:
        """dir -> version of every directory under ``root`` ever indexed."""
        rows = self.db.conn.execute("SELECT dir, version FROM dir_versions WHERE root = ?", (root,))
        return dict(rows.fetchall())

    def dirs(self, root: str) -> set[str]:
        """Relative paths of the directories holding indexed files under ``root``."""
        rows = self.db.conn.execute("SELECT DISTINCT dir FROM files WHERE root = ?", (root,))
        return {r[0] for r in rows}

    def upsert_files(self, root: str, rows: Iterable[tuple[str, str, int, int]]) -> None:
        """Insert or update (dir, name, size, mtime_ns) rows, 1,000 per transaction."""
        it = iter(rows)
        while chunk := list(islice(it, BATCH)):
            with self.db.transaction() as conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO files (root, dir, name, size, mtime_ns) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(root, d, n, s, m) for d, n, s, m in chunk],
                )

    def remove_files(self, root: str, dir: str, names: Iterable[str]) -> None:
        it = iter(names)
        while chunk := list(islice(it, BATCH)):
            with self.db.transaction() as conn:
                conn.executemany(
                    "DELETE FROM files WHERE root = ? AND dir = ? AND name = ?",
                    [(root, dir, n) for n in chunk],
                )

    def remove_dir(self, root: str, dir: str) -> None:
        """Remove the files directly in ``dir`` (not those of its subdirectories)."""
        self.db.conn.execute("DELETE FROM files WHERE root = ? AND dir = ?", (root, dir))

    def remove_root(self, root: str) -> int:
        """Remove every indexed file of a watch root (a watch removed from the config)."""
        return self.db.conn.execute("DELETE FROM files WHERE root = ?", (root,)).rowcount

    def get_file(self, root: str, dir: str, name: str) -> tuple[int, int] | None:
        row = self.db.conn.execute(
            "SELECT size, mtime_ns FROM files WHERE root = ? AND dir = ? AND name = ?",
            (root, dir, name),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def count_files(self, root: str | None = None) -> int:
        if root is None:
            return self.db.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        return self.db.conn.execute(
            "SELECT count(*) FROM files WHERE root = ?", (root,)
        ).fetchone()[0]

    # -- captions ------------------------------------------------------------------

    def get_caption(self, image_path: str, generator: str) -> CaptionRecord | None:
        row = self.db.conn.execute(
            f"SELECT {_CAP_COLS} FROM captions WHERE image_path = ? AND generator = ?",
            (image_path, generator),
        ).fetchone()
        return None if row is None else CaptionRecord(*row)

    def record_caption(
        self,
        image_path: str,
        generator: str,
        content_hash: str,
        sidecar_path: str,
        sidecar_hash: str,
        *,
        prev_hash: str | None = None,
        base_text: str | None = None,
    ) -> None:
        """Remember that ``sidecar_path`` is (about to be) written from ``content_hash``.

        The worker records before it renames the sidecar into place, so ``prev_hash``
        (what was there before) still counts as ours if it crashes in between.
        """
        self.db.conn.execute(
            f"INSERT OR REPLACE INTO captions ({_CAP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                image_path,
                generator,
                content_hash,
                sidecar_path,
                sidecar_hash,
                self.clock(),
                prev_hash,
                base_text,
                None,
            ),
        )

    def get_captions(self, generator: str, image_paths: Iterable[str]) -> dict[str, CaptionRecord]:
        """The records of ``generator`` for many images (missing ones are absent)."""
        out: dict[str, CaptionRecord] = {}
        paths = list(dict.fromkeys(image_paths))
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            sql = (
                f"SELECT {_CAP_COLS} FROM captions WHERE generator = ? "
                f"AND image_path IN ({','.join('?' * len(chunk))})"
            )
            for row in self.db.conn.execute(sql, (generator, *chunk)):
                out[row[0]] = CaptionRecord(*row)
        return out

    def record_captions(self, records: Iterable[CaptionRecord]) -> None:
        """:meth:`record_caption` for a batch, in one transaction (``written_at`` is now)."""
        now = self.clock()
        rows = [
            (
                r.image_path,
                r.generator,
                r.content_hash,
                r.sidecar_path,
                r.sidecar_hash,
                now,
                r.prev_hash,
                r.base_text,
                r.text,
            )
            for r in records
        ]
        if not rows:
            return
        with self.db.transaction() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO captions ({_CAP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def caption_by_sidecar(self, sidecar_path: str) -> CaptionRecord | None:
        """The record of whoever wrote ``sidecar_path`` (most recent if several)."""
        row = self.db.conn.execute(
            f"SELECT {_CAP_COLS} FROM captions WHERE sidecar_path = ? "
            "ORDER BY written_at DESC LIMIT 1",
            (sidecar_path,),
        ).fetchone()
        return None if row is None else CaptionRecord(*row)

    def record_images(self, rows: Iterable[tuple[str, int, int]]) -> None:
        """Remember (content hash, width, height) of decoded images (for reports)."""
        rows = list(rows)
        if rows:
            with self.db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO images (content_hash, width, height) VALUES (?, ?, ?) "
                    "ON CONFLICT (content_hash) DO UPDATE SET width = excluded.width, "
                    "height = excluded.height",
                    rows,
                )

    def record_stem_clash(self, image_path: str, sidecar_path: str, shares_stem_with: str) -> None:
        self.db.conn.execute(
            "INSERT OR REPLACE INTO stem_clashes (image_path, sidecar_path, shares_stem_with, at) "
            "VALUES (?, ?, ?, ?)",
            (image_path, sidecar_path, shares_stem_with, self.clock()),
        )

    def stem_clashes(self, limit: int = 50) -> list[dict[str, str]]:
        """The most recent stem clashes (kept across restarts), newest first."""
        rows = self.db.conn.execute(
            "SELECT image_path, sidecar_path, shares_stem_with FROM stem_clashes "
            "ORDER BY at DESC LIMIT ?",
            (limit,),
        )
        return [{"image": i, "sidecar": s, "shares_stem_with": w} for i, s, w in rows]

    def captions_under(self, prefix: str) -> list[CaptionRecord]:
        """Every caption record of images under the folder ``prefix`` (absolute)."""
        p = prefix.rstrip("/")
        rows = self.db.conn.execute(
            f"SELECT {_CAP_COLS} FROM captions WHERE image_path >= ? AND image_path < ?",
            (p + "/", p + "0"),
        )
        return [CaptionRecord(*r) for r in rows]

    def forget_paths(self, paths: Iterable[str], *, roots: Iterable[str]) -> int:
        """Drop the ``files`` rows of these images (absolute paths under one of
        ``roots``), so that the next scan finds them as new. Returns how many."""
        roots = sorted((r.rstrip("/") for r in roots), key=len, reverse=True)
        rows = []
        for path in paths:
            root = next((r for r in roots if path.startswith(r + "/")), None)
            if root is None:
                continue
            rel_dir, _, name = path[len(root) + 1 :].rpartition("/")
            rows.append((root, rel_dir, name))
        n = 0
        for i in range(0, len(rows), BATCH):
            with self.db.transaction() as conn:
                before = conn.total_changes
                conn.executemany(
                    "DELETE FROM files WHERE root = ? AND dir = ? AND name = ?", rows[i : i + BATCH]
                )
                n += conn.total_changes - before
        return n

    def forget_captions(self, image_path: str) -> None:
        """Drop every caption record of an image. Not called on deletion (see module doc)."""
        self.db.conn.execute("DELETE FROM captions WHERE image_path = ?", (image_path,))
