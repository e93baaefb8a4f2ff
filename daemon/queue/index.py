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
from typing import Any

from daemon.queue.db import FILE_PATH, PERSON_WHERE, Database

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
        """Remember (content hash, width, height) of decoded images (for reports): the
        image's own size as shown, not the scale a JPEG was decoded at."""
        rows = list(rows)
        if rows:
            with self.db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO images (content_hash, width, height) VALUES (?, ?, ?) "
                    "ON CONFLICT (content_hash) DO UPDATE SET width = excluded.width, "
                    "height = excluded.height",
                    rows,
                )

    def names_by_stem(self, root: str, dir: str, stems: Iterable[str]) -> list[str]:
        """Indexed image names in folder ``dir`` of ``root`` that begin with one of
        ``stems`` and a dot (``a`` -> ``a.png``, ``a.JPG``, also ``a.b.png``: the
        caller tells stems apart). One range of the primary key per stem, so the cost
        does not grow with the folder."""
        conn = self.db.conn
        out: list[str] = []
        for stem in sorted(set(stems)):
            out += [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM files WHERE root = ? AND dir = ? AND name >= ? AND name < ?",
                    (root, dir, stem + ".", stem + "/"),  # '/' sorts right after '.'
                )
            ]
        return out

    def image_size(self, content_hash: str) -> tuple[int, int] | None:
        row = self.db.conn.execute(
            "SELECT width, height FROM images WHERE content_hash = ?", (content_hash,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

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

    # -- browsing (the web UI) ----------------------------------------------------------

    def gallery_paths(
        self,
        f: GalleryFilter,
        *,
        after: str | None = None,
        before: str | None = None,
        limit: int = 60,
    ) -> list[str]:
        """Up to ``limit`` images (absolute paths, ascending) that match ``f``, right
        after ``after`` or right before ``before`` in path order (keyset paging).

        Each filter reads one index in path order and stops after ``limit`` matches
        (the other conditions are probes of single rows), so a page costs about the
        same at 100,000 images as at 100, unless few images match a probe: then the
        walk goes on until it has found ``limit`` or reached the end
        (bench/README.md, Web UI). Pending jobs have no index by path (it would slow
        every enqueue): up to ``SPARSE_PENDING`` of them are read through the state
        index and sorted; more, and the images are walked with a probe each."""
        if limit <= 0:
            return []
        sparse = False
        if f.state == "pending":  # few pending jobs: read them all and sort them
            n = self.db.conn.execute(
                "SELECT count(*) FROM jobs INDEXED BY jobs_state "
                "WHERE state IN ('pending', 'leased')"
            ).fetchone()[0]
            sparse = n <= SPARSE_PENDING
        sql, params = _gallery_sql(f, after=after, before=before, limit=limit, sparse=sparse)
        rows = [r[0] for r in self.db.conn.execute(sql, params)]
        return rows[::-1] if before is not None and after is None else rows

    def gallery_items(self, paths: list[str]) -> dict[str, dict[str, Any]]:
        """What the gallery shows of each image: its file row, its jobs, the caption
        records and open flags, by path (an image no longer indexed has ``size``
        None)."""
        out: dict[str, dict[str, Any]] = {
            p: {"path": p, "size": None, "mtime_ns": None, "jobs": {}, "captions": {},
                "flags": []}
            for p in paths
        }  # fmt: skip
        conn = self.db.conn
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for path, size, mtime in conn.execute(
                f"SELECT {FILE_PATH}, size, mtime_ns FROM files WHERE {FILE_PATH} IN ({marks})",
                chunk,
            ):
                out[path]["size"], out[path]["mtime_ns"] = size, mtime
            for row in conn.execute(
                "SELECT path, generator, state, outcome, error_type, error_message, attempts, "
                f"updated_at FROM jobs WHERE path IN ({marks})",
                chunk,
            ):
                out[row[0]]["jobs"][row[1]] = dict(zip(_JOB_KEYS, row[2:], strict=True))
            for row in conn.execute(
                "SELECT image_path, generator, sidecar_path, sidecar_hash, text, written_at, "
                f"{PERSON_WHERE} FROM captions WHERE image_path IN ({marks})",
                chunk,
            ):
                out[row[0]]["captions"][row[1]] = {
                    "sidecar_path": row[2],
                    "text": row[4],
                    "written_at": row[5],
                    "by_person": bool(row[6]),
                }
            for row in conn.execute(
                "SELECT image_path, generator, check_name, reason, created_at FROM flags "
                f"WHERE image_path IN ({marks}) AND dismissed_at IS NULL",
                chunk,
            ):
                out[row[0]]["flags"].append(
                    {"generator": row[1], "check": row[2], "reason": row[3], "at": row[4]}
                )
        return out

    def folder_counts(self, roots: Iterable[str]) -> dict[str, dict[str, dict[str, int]]]:
        """root -> folder (relative, ``''`` for the root) -> counts of what lies
        directly in it: ``images`` (indexed), jobs by state (``pending`` counts leased
        ones too), and ``person`` (images with a caption a person wrote). One pass
        over each table: about half a second at 100,000 images (cache it)."""
        roots = sorted((r.rstrip("/") for r in roots), key=len, reverse=True)
        out: dict[str, dict[str, dict[str, int]]] = {r: {} for r in roots}
        conn = self.db.conn

        def slot(path_dir: str) -> dict[str, int] | None:
            root = next((r for r in roots if path_dir == r or path_dir.startswith(r + "/")), None)
            if root is None:
                return None
            rel = path_dir[len(root) + 1 :]
            return out[root].setdefault(rel, {})

        for root in roots:
            for d, n in conn.execute(
                "SELECT dir, count(*) FROM files WHERE root = ? GROUP BY dir", (root,)
            ):
                out[root].setdefault(d, {})["images"] = n
        # rtrim(p, replace(p, '/', '')) is p up to its last '/': the image's folder.
        for d, state, n in conn.execute(
            "SELECT rtrim(path, replace(path, '/', '')), state, count(*) FROM jobs GROUP BY 1, 2"
        ):
            if (counts := slot(d.rstrip("/"))) is not None:
                key = "pending" if state == "leased" else state
                counts[key] = counts.get(key, 0) + n
        for d, n in conn.execute(
            "SELECT rtrim(p, replace(p, '/', '')), count(*) FROM ("
            f"SELECT image_path AS p FROM captions WHERE {PERSON_WHERE} UNION "
            "SELECT path FROM jobs WHERE outcome IN ('caption_edited', 'caption_exists')"
            ") GROUP BY 1"
        ):
            if (counts := slot(d.rstrip("/"))) is not None:
                counts["person"] = counts.get("person", 0) + n
        return out

    def written_per_minute(self, since: float, minutes: int) -> list[int]:
        """Caption records written in each of the ``minutes`` minutes from ``since``."""
        out = [0] * minutes
        for bucket, n in self.db.conn.execute(
            "SELECT CAST((written_at - ?) / 60 AS INTEGER), count(*) FROM captions "
            "WHERE written_at >= ? AND written_at < ? GROUP BY 1",
            (since, since, since + minutes * 60),
        ):
            if 0 <= bucket < minutes:
                out[bucket] = n
        return out

    # -- the dataset report and the caption checks (daemon/report) ---------------------
    # Reads for a report take a folder (absolute ``prefix``) and return plain rows; the
    # report package turns them into numbers. Nothing here reads the disk.

    def files_in(self, root: str, dir: str = "") -> list[tuple[str, str]]:
        """(dir, name) of every indexed image under ``dir`` of ``root`` ('' = all)."""
        if not dir:
            return self.db.conn.execute(
                "SELECT dir, name FROM files WHERE root = ?", (root,)
            ).fetchall()
        return self.db.conn.execute(
            "SELECT dir, name FROM files WHERE root = ? AND (dir = ? OR (dir >= ? AND dir < ?))",
            (root, dir, dir + "/", dir + "0"),
        ).fetchall()

    def report_captions(self, prefix: str) -> list[tuple]:
        """(image_path, generator, content_hash, sidecar_path, sidecar_hash, written_at,
        text, text_hash) of every caption record under the folder ``prefix``."""
        p = prefix.rstrip("/")
        return self.db.conn.execute(
            "SELECT image_path, generator, content_hash, sidecar_path, sidecar_hash, "
            "written_at, text, text_hash FROM captions WHERE image_path >= ? AND image_path < ?",
            (p + "/", p + "0"),
        ).fetchall()

    def snapshot(self) -> Any:
        """A read transaction: the reads inside see one state of the index."""
        return self.db.snapshot()

    def report_caption_facts(self, prefix: str) -> list[tuple[str, str, str, bytes | None]]:
        """(image_path, generator, content_hash, facts) of every caption record under the
        folder ``prefix`` (daemon/report/facts.py), from the covering index alone."""
        p = prefix.rstrip("/")
        return self.db.conn.execute(
            "SELECT image_path, generator, content_hash, facts FROM captions "
            "INDEXED BY captions_report WHERE image_path >= ? AND image_path < ?",
            (p + "/", p + "0"),
        ).fetchall()

    def caption_records(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        """(image_path, generator) -> the row of :meth:`report_captions`, for these."""
        out: dict[tuple[str, str], tuple] = {}
        by_path: dict[str, set[str]] = {}
        for p, g in keys:
            by_path.setdefault(p, set()).add(g)
        paths = list(by_path)
        for row in self.caption_rows(paths):
            if row[1] in by_path[row[0]]:
                out[(row[0], row[1])] = row
        return out

    def captions_without_facts(
        self, prefix: str, after: tuple[str, str], limit: int
    ) -> list[tuple]:
        """Rows of :meth:`report_captions` of up to ``limit`` caption records under
        ``prefix`` with no report facts yet, after ``after`` (image_path, generator)."""
        p = prefix.rstrip("/")
        lo = max((p + "/", ""), after)
        return self.db.conn.execute(
            "SELECT image_path, generator, content_hash, sidecar_path, sidecar_hash, "
            "written_at, text, text_hash FROM captions INDEXED BY captions_nofacts "
            "WHERE facts IS NULL AND (image_path, generator) > (?, ?) AND image_path < ? "
            "ORDER BY image_path, generator LIMIT ?",
            (*lo, p + "0", limit),
        ).fetchall()

    def store_facts(self, rows: Iterable[tuple[bytes, tuple]]) -> int:
        """(facts, the row of :meth:`report_captions` they were computed from): kept
        where the record is still that row."""
        params = [(f, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for f, r in rows]
        if not params:
            return 0
        with self.db.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "UPDATE captions SET facts = ? WHERE image_path = ? AND generator = ? "
                "AND content_hash = ? AND sidecar_path = ? AND sidecar_hash = ? "
                "AND written_at = ? AND text IS ? AND text_hash IS ?",
                params,
            )
            return conn.total_changes - before

    def report_terms(self) -> list[tuple[int, str]]:
        return self.db.conn.execute("SELECT id, term FROM report_terms").fetchall()

    def term_ids(self, terms: Iterable[str]) -> dict[str, int]:
        """The ids of ``terms`` in ``report_terms``, added when new."""
        terms = list(dict.fromkeys(terms))
        out: dict[str, int] = {}
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO report_terms (term) VALUES (?)", [(t,) for t in terms]
            )
            for i in range(0, len(terms), 500):
                chunk = terms[i : i + 500]
                out.update(
                    (term, tid)
                    for tid, term in conn.execute(
                        "SELECT id, term FROM report_terms "
                        f"WHERE term IN ({','.join('?' * len(chunk))})",
                        chunk,
                    )
                )
        return out

    def image_facts(
        self, digests: Iterable[str]
    ) -> dict[str, tuple[int | None, int | None, str | None]]:
        """content hash -> (width, height, phash) for these contents (many: one pass over
        the table; few: by key)."""
        want = set(digests)
        out: dict[str, tuple[int | None, int | None, str | None]] = {}
        if len(want) > 5000:
            for digest, w, h, p in self.db.conn.execute(
                "SELECT content_hash, width, height, phash FROM images"
            ):
                if digest in want:
                    out[digest] = (w, h, p)
            return out
        keys = list(want)
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            for digest, w, h, p in self.db.conn.execute(
                "SELECT content_hash, width, height, phash FROM images "
                f"WHERE content_hash IN ({','.join('?' * len(chunk))})",
                chunk,
            ):
                out[digest] = (w, h, p)
        return out

    def set_texts(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """(image_path, generator, text, text_hash): the caption text read back from a
        sidecar a person edited. ``sidecar_hash`` (ownership) is left as it was."""
        rows = [(t, h, p, g) for p, g, t, h in rows]
        if not rows:
            return 0
        with self.db.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "UPDATE captions SET text = ?, text_hash = ? "
                "WHERE image_path = ? AND generator = ?",
                rows,
            )
            return conn.total_changes - before

    # perceptual hashes
    def phash_todo(self) -> dict[str, list[str]]:
        """content hash -> image paths, for every captioned content without a perceptual
        hash yet (NULL: never tried)."""
        out: dict[str, list[str]] = {}
        for digest, path in self.db.conn.execute(
            "SELECT c.content_hash, c.image_path FROM captions c "
            "LEFT JOIN images i ON i.content_hash = c.content_hash "
            "WHERE i.phash IS NULL ORDER BY c.content_hash, c.written_at DESC"
        ):
            paths = out.setdefault(digest, [])
            if path not in paths:
                paths.append(path)
        return out

    def record_phashes(self, rows: Iterable[tuple[str, int | None, int | None, str]]) -> None:
        """(content_hash, width, height, phash); a known size is kept when None is given."""
        rows = list(rows)
        if rows:
            with self.db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO images (content_hash, width, height, phash) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (content_hash) DO UPDATE SET phash = excluded.phash, "
                    "width = coalesce(excluded.width, width), "
                    "height = coalesce(excluded.height, height)",
                    rows,
                )

    def count_phashes(self) -> tuple[int, int]:
        """(contents with a perceptual hash, contents known) in the ``images`` table."""
        row = self.db.conn.execute("SELECT count(phash), count(*) FROM images").fetchone()
        return int(row[0]), int(row[1])

    # caption checks
    def checked_keys(self, prefix: str | None = None) -> dict[str, str]:
        """image_path -> the key its captions had when they were last checked."""
        if prefix is None:
            rows = self.db.conn.execute("SELECT image_path, check_key FROM checked")
        else:
            p = prefix.rstrip("/")
            rows = self.db.conn.execute(
                "SELECT image_path, check_key FROM checked WHERE image_path >= ? AND "
                "image_path < ?",
                (p + "/", p + "0"),
            )
        return dict(rows.fetchall())

    def unchecked(self, prefix: str) -> list[str]:
        """Images under ``prefix`` with a caption recorded after their last check (or
        never checked): what a report checks first. Changes of the rules or of a
        folder's trigger word are found by the full pass (:meth:`checked_keys`)."""
        p = prefix.rstrip("/")
        return [
            r[0]
            for r in self.db.conn.execute(
                "SELECT DISTINCT c.image_path FROM captions c "
                "LEFT JOIN checked k ON k.image_path = c.image_path "
                "WHERE c.image_path >= ? AND c.image_path < ? "
                "AND (k.checked_at IS NULL OR c.written_at > k.checked_at)",
                (p + "/", p + "0"),
            )
        ]

    def caption_rows(self, image_paths: Iterable[str]) -> list[tuple]:
        """The rows of :meth:`report_captions` for these images (500 per query)."""
        paths = list(dict.fromkeys(image_paths))
        out: list[tuple] = []
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            out += self.db.conn.execute(
                "SELECT image_path, generator, content_hash, sidecar_path, sidecar_hash, "
                "written_at, text, text_hash FROM captions "
                f"WHERE image_path IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
        return out

    def apply_checks(
        self, results: Iterable[tuple[str, str, list[tuple[str, str, str, str]]]]
    ) -> int:
        """Store what the checks found: per image ``(image_path, key, flags)`` with flags
        ``(generator, check_name, reason, content_hash)``. The image's other flags go; a
        flag raised again keeps its dismissal while the content hash is the same (a
        changed image is looked at afresh). Returns the number of flags new or re-opened.
        """
        results = list(results)
        if not results:
            return 0
        now = self.clock()
        opened = 0
        with self.db.transaction() as conn:
            for i in range(0, len(results), 500):
                chunk = results[i : i + 500]
                paths = [r[0] for r in chunk]
                have: dict[str, dict[tuple[str, str], tuple[str, float | None]]] = {}
                for path, gen, check, digest, dismissed in conn.execute(
                    "SELECT image_path, generator, check_name, content_hash, dismissed_at "
                    f"FROM flags WHERE image_path IN ({','.join('?' * len(paths))})",
                    paths,
                ):
                    have.setdefault(path, {})[(gen, check)] = (digest, dismissed)
                drop, upsert = [], []
                for path, _key, flags in chunk:
                    old = have.get(path, {})
                    new = {(g, c) for g, c, _r, _h in flags}
                    drop += [(path, g, c) for g, c in old if (g, c) not in new]
                    for g, c, reason, digest in flags:
                        prev = old.get((g, c))
                        if prev is None or prev[0] != digest:
                            opened += 1
                        upsert.append((path, g, c, reason, digest, now))
                conn.executemany(
                    "DELETE FROM flags WHERE image_path = ? AND generator = ? AND check_name = ?",
                    drop,
                )
                conn.executemany(
                    "INSERT INTO flags (image_path, generator, check_name, reason, content_hash, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (image_path, generator, check_name) DO UPDATE SET "
                    "reason = excluded.reason, "
                    "created_at = CASE WHEN content_hash = excluded.content_hash "
                    "THEN created_at ELSE excluded.created_at END, "
                    "dismissed_at = CASE WHEN content_hash = excluded.content_hash "
                    "THEN dismissed_at END, "
                    "content_hash = excluded.content_hash",
                    upsert,
                )
                conn.executemany(
                    "INSERT OR REPLACE INTO checked (image_path, check_key, checked_at) "
                    "VALUES (?, ?, ?)",
                    [(path, key, now) for path, key, _f in chunk],
                )
        return opened

    def flags_under(self, prefix: str | None = None) -> list[tuple]:
        """(image_path, generator, check_name, reason, content_hash, created_at,
        dismissed_at) of the flags under ``prefix`` (all when None)."""
        sql = (
            "SELECT image_path, generator, check_name, reason, content_hash, created_at, "
            "dismissed_at FROM flags"
        )
        if prefix is None:
            return self.db.conn.execute(sql + " ORDER BY image_path").fetchall()
        p = prefix.rstrip("/")
        return self.db.conn.execute(
            sql + " WHERE image_path >= ? AND image_path < ? ORDER BY image_path",
            (p + "/", p + "0"),
        ).fetchall()

    def flag_counts(self) -> dict[str, tuple[int, int]]:
        """check_name -> (open flags, dismissed flags)."""
        rows = self.db.conn.execute(
            "SELECT check_name, count(*) - count(dismissed_at), count(dismissed_at) FROM flags "
            "GROUP BY check_name"
        )
        return {name: (int(o), int(d)) for name, o, d in rows}

    def dismiss_flags(
        self, image_path: str, generator: str | None = None, check_name: str | None = None
    ) -> int:
        """Mark an image's open flags (of one generator, one check) dismissed; how many."""
        sql = "UPDATE flags SET dismissed_at = ? WHERE image_path = ? AND dismissed_at IS NULL"
        params: list = [self.clock(), image_path]
        if generator is not None:
            sql += " AND generator = ?"
            params.append(generator)
        if check_name is not None:
            sql += " AND check_name = ?"
            params.append(check_name)
        return self.db.conn.execute(sql, params).rowcount


SPARSE_PENDING = 2000
GALLERY_STATES = ("captioned", "pending", "failed", "dead", "person", "flagged")
_JOB_KEYS = ("state", "outcome", "error_type", "error_message", "attempts", "updated_at")
_PERSON_OUTCOMES = "('caption_edited', 'caption_exists')"


@dataclass(frozen=True, slots=True)
class GalleryFilter:
    """Which images a gallery lists. ``folder``: an absolute folder (its images at any
    depth); ``state``: one of :data:`GALLERY_STATES` (of ``generator``'s job when
    given; ``person``: a caption a person wrote or edited; ``flagged``: an open flag of
    a caption check); ``generator``: images with a job or caption of it; ``text``: a
    substring of the caption text captiond recorded (case-insensitive for ASCII)."""

    folder: str | None = None
    state: str | None = None
    generator: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in GALLERY_STATES:
            raise ValueError(f"unknown gallery state {self.state!r}")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _range(col: str, f: GalleryFilter, after: str | None, before: str | None) -> tuple[str, list]:
    """The keyset and folder conditions on an ordered path column."""
    sql, params = "", []
    if f.folder is not None:
        p = f.folder.rstrip("/")
        sql += f" AND {col} >= ? AND {col} < ?"
        params += [p + "/", p + "0"]  # '0' sorts right after '/'
    if after is not None:
        sql += f" AND {col} > ?"
        params.append(after)
    elif before is not None:
        sql += f" AND {col} < ?"
        params.append(before)
    return sql, params


def _gallery_sql(
    f: GalleryFilter, *, after: str | None, before: str | None, limit: int, sparse: bool = False
) -> tuple[str, list]:
    """One SELECT of paths in path order for a filter (see gallery_paths)."""
    order = "DESC" if before is not None and after is None else "ASC"
    gen = f.generator

    def job_probe(col: str, state_sql: str | None) -> tuple[str, list]:
        """EXISTS a job of ``col``'s image (in a state; of the generator). ``+state``
        keeps the planner on the (path, generator) index: the state index would read
        every job in that state for each probe."""
        sql = f" AND EXISTS (SELECT 1 FROM jobs WHERE path = {col}"
        params: list = []
        if state_sql is not None:
            sql += f" AND +state {state_sql}"
        if gen is not None:
            sql += " AND generator = ?"
            params.append(gen)
        return sql + ")", params

    def person_probe(col: str) -> tuple[str, list]:
        g_c, g_j, params = "", "", []
        if gen is not None:
            g_c, g_j, params = " AND generator = ?", " AND generator = ?", [gen, gen]
        return (
            f" AND (EXISTS (SELECT 1 FROM captions WHERE image_path = {col} AND {PERSON_WHERE}"
            f"{g_c}) OR EXISTS (SELECT 1 FROM jobs WHERE path = {col} AND outcome IN "
            f"{_PERSON_OUTCOMES}{g_j}))",
            params,
        )

    def flag_probe(col: str) -> tuple[str, list]:
        sql = f" AND EXISTS (SELECT 1 FROM flags WHERE image_path = {col} AND dismissed_at IS NULL"
        if gen is not None:
            return sql + " AND generator = ?)", [gen]
        return sql + ")", []

    def state_probe(col: str) -> tuple[str, list]:
        if f.state == "person":
            return person_probe(col)
        if f.state == "flagged":
            return flag_probe(col)
        if f.state is not None:
            return job_probe(col, _STATE_SQL[f.state])
        return "", []

    def text_probe(col: str) -> tuple[str, list]:
        if not f.text:
            return "", []
        sql = (
            f" AND EXISTS (SELECT 1 FROM captions AS t WHERE t.image_path = {col} "
            "AND t.text LIKE ? ESCAPE '\\'"
        )
        if gen is not None:
            return sql + " AND t.generator = ?)", [_like(f.text), gen]
        return sql + ")", [_like(f.text)]

    # The driver is the rarest condition: a state that few images are in (with the text
    # as a probe), else the text, else every image. Each is aliased ``d``: the probes'
    # own tables have the same column names.
    if f.state == "flagged":
        rng, params = _range("d.image_path", f, after, before)
        sql = "SELECT d.image_path FROM flags AS d WHERE d.dismissed_at IS NULL"
        if gen is not None:
            sql += " AND d.generator = ?"
            params = [gen, *params]
        probe, more = text_probe("d.image_path")
        sql += rng + probe + f" GROUP BY d.image_path ORDER BY d.image_path {order} LIMIT ?"
        return sql, [*params, *more, limit]
    if f.state == "person":
        rng_c, p_c = _range("d.image_path", f, after, before)
        rng_j, p_j = _range("d.path", f, after, before)
        g = " AND d.generator = ?" if gen is not None else ""
        gp = [gen] if gen is not None else []
        t_c, tp_c = text_probe("d.image_path")
        t_j, tp_j = text_probe("d.path")
        sql = (
            "SELECT path FROM ("
            "SELECT * FROM (SELECT d.image_path AS path FROM captions AS d INDEXED BY "
            f"captions_person WHERE {PERSON_WHERE.replace('sidecar_hash', 'd.sidecar_hash')}"
            f"{g}{rng_c}{t_c} GROUP BY d.image_path ORDER BY d.image_path {order} LIMIT ?) "
            "UNION SELECT * FROM (SELECT d.path FROM jobs AS d INDEXED BY jobs_person WHERE "
            f"d.outcome IN {_PERSON_OUTCOMES}{g}{rng_j}{t_j} GROUP BY d.path "
            f"ORDER BY d.path {order} LIMIT ?)"
            f") ORDER BY path {order} LIMIT ?"
        )
        return sql, [*gp, *p_c, *tp_c, limit, *gp, *p_j, *tp_j, limit, limit]
    if f.state in ("failed", "dead") or (f.state == "pending" and sparse):
        # The partial index serves a query whose WHERE repeats the index's own.
        if f.state == "pending":
            where = "jobs_state WHERE d.state IN ('pending', 'leased')"
        else:
            where = f"jobs_trouble WHERE d.state IN ('failed', 'dead') AND +d.state = '{f.state}'"
        rng, params = _range("d.path", f, after, before)
        sql = f"SELECT d.path FROM jobs AS d INDEXED BY {where}"
        if gen is not None:
            sql += " AND d.generator = ?"
            params = [gen, *params]
        probe, more = text_probe("d.path")
        sql += rng + probe + f" GROUP BY d.path ORDER BY d.path {order} LIMIT ?"
        return sql, [*params, *more, limit]
    if f.text:
        # Driven by the caption records in image order, filtered on their text.
        rng, rng_params = _range("d.image_path", f, after, before)
        sql = "SELECT d.image_path FROM captions AS d WHERE d.text LIKE ? ESCAPE '\\'"
        params = [_like(f.text)]
        if gen is not None:
            sql += " AND d.generator = ?"
            params.append(gen)
        probe, more = state_probe("d.image_path")
        sql += rng + probe + f" GROUP BY d.image_path ORDER BY d.image_path {order} LIMIT ?"
        return sql, [*params, *rng_params, *more, limit]
    # Every indexed image, in path order through files_path; a state or generator is a
    # probe of the image's jobs.
    rng, params = _range(FILE_PATH, f, after, before)
    sql = f"SELECT {FILE_PATH} FROM files WHERE 1" + rng
    if f.state is not None:
        probe, more = state_probe(FILE_PATH)
    elif gen is not None:
        probe, more = job_probe(FILE_PATH, None)
    else:
        probe, more = "", []
    sql += probe + f" ORDER BY {FILE_PATH} {order} LIMIT ?"
    return sql, [*params, *more, limit]


_STATE_SQL = {
    "captioned": "= 'done'",
    "pending": "IN ('pending', 'leased')",
    "failed": "= 'failed'",
    "dead": "= 'dead'",
}
