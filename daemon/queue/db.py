"""The SQLite database behind the job queue and the file index.

One connection per thread (the worker, watcher, scanner and HTTP threads all share a
``Database``). Connections run in autocommit mode: every write is either a single
statement or runs inside :meth:`Database.transaction` (``BEGIN IMMEDIATE``), which
avoids the deferred-upgrade trap where a read transaction that later writes fails at
once with "database is locked" regardless of ``busy_timeout``.

WAL with ``synchronous=NORMAL``: survives a crash of the process; on power loss the
last commits may roll back (a rolled-back job is simply redone). WAL needs a local
disk: keep the database in the state directory, never on a watched network share.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SCHEMA_VERSION = 1

# A ``files`` row's absolute path, spelt as ``jobs.path`` and ``captions.image_path``
# spell it. The ``files_path`` index is on this very expression: queries that order or
# look up files by path must use it as it is written here to be served by the index.
FILE_PATH = "(root || '/' || CASE WHEN dir = '' THEN name ELSE dir || '/' || name END)"
# Recorded as the sidecar hash (before ":<hash>") of a caption a person wrote through
# captiond (the API, the web UI): it never equals a real hash, so it is never "ours".
PERSON_EDIT = "human-edit"
HISTORY_KEEP = 20  # failed attempts kept per job in job_history
# The captions a person wrote (served by the captions_person index when written so).
PERSON_WHERE = f"substr(sidecar_hash, 1, {len(PERSON_EDIT) + 1}) = '{PERSON_EDIT}:'"

# Version 1. Later versions add an entry to _MIGRATIONS (from_version -> statements).
_SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id            INTEGER PRIMARY KEY,
        path          TEXT    NOT NULL,
        generator     TEXT    NOT NULL,
        priority      INTEGER NOT NULL,
        state         TEXT    NOT NULL DEFAULT 'pending',
        attempts      INTEGER NOT NULL DEFAULT 0,
        enqueued_at   REAL    NOT NULL,
        not_before    REAL    NOT NULL DEFAULT 0,
        lease_until   REAL,
        error_type    TEXT,
        error_message TEXT,
        outcome       TEXT,
        rerun         INTEGER NOT NULL DEFAULT 0,
        updated_at    REAL    NOT NULL,
        options       TEXT,  -- JSON of an explicit request: force, post_process, request
        UNIQUE (path, generator)
    )""",
    # The claim walks this partial index in claim order and stops after LIMIT rows.
    """CREATE INDEX IF NOT EXISTS jobs_claim
        ON jobs (generator, priority DESC, enqueued_at, id) WHERE state = 'pending'""",
    """CREATE INDEX IF NOT EXISTS jobs_due
        ON jobs (generator, not_before) WHERE state = 'pending'""",
    "CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_until) WHERE state = 'leased'",
    """CREATE INDEX IF NOT EXISTS jobs_errors
        ON jobs (updated_at) WHERE error_type IS NOT NULL""",
    # The primary key (root, dir, name) also serves lookups by (root, dir).
    """CREATE TABLE IF NOT EXISTS files (
        root     TEXT    NOT NULL,
        dir      TEXT    NOT NULL,
        name     TEXT    NOT NULL,
        size     INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        PRIMARY KEY (root, dir, name)
    ) WITHOUT ROWID""",
    # Bumped by triggers on every change to a directory's rows in ``files``, by any
    # connection or process; lets the scanner trust its in-memory summary of a
    # directory while the version is unchanged. Rows are never deleted (a version must
    # never repeat).
    """CREATE TABLE IF NOT EXISTS dir_versions (
        root    TEXT    NOT NULL,
        dir     TEXT    NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (root, dir)
    ) WITHOUT ROWID""",
    """CREATE TRIGGER IF NOT EXISTS files_ins AFTER INSERT ON files BEGIN
        INSERT INTO dir_versions (root, dir, version) VALUES (new.root, new.dir, 1)
        ON CONFLICT (root, dir) DO UPDATE SET version = version + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS files_upd AFTER UPDATE ON files BEGIN
        INSERT INTO dir_versions (root, dir, version) VALUES (old.root, old.dir, 1)
        ON CONFLICT (root, dir) DO UPDATE SET version = version + 1;
        INSERT INTO dir_versions (root, dir, version) VALUES (new.root, new.dir, 1)
        ON CONFLICT (root, dir) DO UPDATE SET version = version + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS files_del AFTER DELETE ON files BEGIN
        INSERT INTO dir_versions (root, dir, version) VALUES (old.root, old.dir, 1)
        ON CONFLICT (root, dir) DO UPDATE SET version = version + 1;
    END""",
    """CREATE TABLE IF NOT EXISTS captions (
        image_path   TEXT NOT NULL,
        generator    TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        sidecar_path TEXT NOT NULL,
        sidecar_hash TEXT NOT NULL,
        written_at   REAL NOT NULL,
        prev_hash    TEXT,  -- content captiond replaced with this sidecar (crash safety)
        base_text    TEXT,  -- a person's caption that append/prepend merged with
        PRIMARY KEY (image_path, generator)
    )""",
    "CREATE INDEX IF NOT EXISTS captions_sidecar ON captions (sidecar_path)",
]

_MIGRATIONS: dict[int, list[str]] = {}

# Additions an older captiond can live with (indexes): made at every open if missing,
# without a version bump, so that going back to an earlier captiond keeps working.
_ADDITIONS = [
    # The counts behind /status, /metrics and the systemd status line (by state,
    # generator and outcome; the oldest pending job) read this index alone instead of
    # every row: 6x faster at 100,000 jobs. It costs the write path about a quarter of
    # its speed (bench/README.md, Queue).
    """CREATE INDEX IF NOT EXISTS jobs_state
        ON jobs (state, generator, outcome, enqueued_at)""",
    # Lookups of captions by sidecar (a moved image) and by image prefix (recaption).
    "CREATE INDEX IF NOT EXISTS captions_hash ON captions (generator, sidecar_hash)",
    # What is known of an image's content (by content hash): its size; more facts (a
    # perceptual hash...) are columns added later.
    """CREATE TABLE IF NOT EXISTS images (
        content_hash TEXT PRIMARY KEY,
        width        INTEGER,
        height       INTEGER
    ) WITHOUT ROWID""",
    # Caption checks that want a person's look (see the dataset report).
    """CREATE TABLE IF NOT EXISTS flags (
        image_path   TEXT NOT NULL,
        generator    TEXT NOT NULL,
        check_name   TEXT NOT NULL,
        reason       TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        created_at   REAL NOT NULL,
        dismissed_at REAL,
        PRIMARY KEY (image_path, generator, check_name)
    )""",
    # Images that got <name>.<ext> because another image of the folder shares their stem.
    """CREATE TABLE IF NOT EXISTS stem_clashes (
        image_path       TEXT PRIMARY KEY,
        sidecar_path     TEXT NOT NULL,
        shares_stem_with TEXT NOT NULL,
        at               REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS stem_clashes_at ON stem_clashes (at)",
    # Which captions the caption checks last saw, per image (daemon/report/checks.py):
    # a key of the rules' version and the image's caption records. An image whose key
    # differs (a caption written or refreshed, a rule changed) is checked again.
    """CREATE TABLE IF NOT EXISTS checked (
        image_path TEXT PRIMARY KEY,
        check_key  TEXT NOT NULL,
        checked_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # One row, rewritten by probe_write() to learn whether the database takes writes.
    "CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL)",
    # The web UI's gallery pages over 100,000 images (bench/README.md, Web UI): every
    # listing is ordered by the image's absolute path and read from one of these in
    # that order, LIMIT rows at a time (keyset paging), whatever the filter.
    f"CREATE INDEX IF NOT EXISTS files_path ON files {FILE_PATH}",
    # Partial: failed and dead jobs only, so enqueue, claim and the ack of a done job
    # never touch it. (Pending jobs have no such index: it would cost every enqueue;
    # see FileIndex.gallery_paths.)
    """CREATE INDEX IF NOT EXISTS jobs_trouble
        ON jobs (path) WHERE state IN ('failed', 'dead')""",
    """CREATE INDEX IF NOT EXISTS jobs_person
        ON jobs (path) WHERE outcome IN ('caption_edited', 'caption_exists')""",
    f"""CREATE INDEX IF NOT EXISTS captions_person
        ON captions (image_path) WHERE {PERSON_WHERE}""",
    # Captions written per minute (the web UI's overview).
    "CREATE INDEX IF NOT EXISTS captions_written ON captions (written_at)",
    # The failed attempts of each job (the web UI's image page): one row per attempt
    # that ended with an error, the last HISTORY_KEEP per job, written by the queue
    # where an attempt ends with one (fail, bury, lease recovery; JobQueue._remember).
    # Attempts that succeed leave no row (the job's outcome and the caption record tell
    # them); a release (the batch never ran) is no attempt. The rows of a job go with
    # it. (Not an UPDATE trigger: its mere presence made every enqueue's upsert 1.4x
    # slower, measured; bench/README.md, Queue.)
    """CREATE TABLE IF NOT EXISTS job_history (
        id            INTEGER PRIMARY KEY,
        path          TEXT    NOT NULL,
        generator     TEXT    NOT NULL,
        at            REAL    NOT NULL,
        state         TEXT    NOT NULL,
        error_type    TEXT    NOT NULL,
        error_message TEXT,
        attempt       INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS job_history_job ON job_history (path, generator, id)",
    "DROP TRIGGER IF EXISTS jobs_history_attempt",
    """CREATE TRIGGER IF NOT EXISTS jobs_history_forget AFTER DELETE ON jobs BEGIN
        DELETE FROM job_history WHERE path = old.path AND generator = old.generator;
    END""",
    # Backfill runs on a Ray cluster (daemon.backfill): who, where, and their progress
    # (JSON), for `captiond status`; the row of a running one is its heartbeat.
    """CREATE TABLE IF NOT EXISTS backfills (
        owner       TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        started_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        state       TEXT NOT NULL,
        info        TEXT NOT NULL
    )""",
]

# Columns an older captiond ignores (it names the columns it reads): added at every
# open if missing, also without a version bump.
_COLUMNS = [
    # Times this job's image crashed the model's process (residency.crash_attempts).
    ("jobs", "crashes", "INTEGER NOT NULL DEFAULT 0"),
    # errno of an OSError that failed the job, to tell conditions of the system (a full
    # disk, a vanished share) from faults of the image.
    ("jobs", "errno", "INTEGER"),
    # The caption text captiond wrote (or a person wrote through the API), for reports.
    ("captions", "text", "TEXT"),
    # Hash of the sidecar bytes ``text`` was read back from when a person had edited the
    # file (the report's refresh); NULL while ``text`` is what was recorded. Never used
    # to decide ownership: ``sidecar_hash`` stays what captiond wrote.
    ("captions", "text_hash", "TEXT"),
    # Perceptual hash of the content (imagehash pHash, 16 hex digits) for the report's
    # near duplicates; '' when the image could not be decoded for it.
    ("images", "phash", "TEXT"),
    # Who holds a leased job: NULL for the daemon, else a backfill driver's name
    # (daemon.backfill). The daemon recovers its own leases at start, others' only once
    # they expire.
    ("jobs", "lease_owner", "TEXT"),
    # What the dataset report needs of a caption record, computed once from its text and
    # record (daemon/report/facts.py: words, CLIP limit, tag ids, trigger word, sidecar
    # type, when it was written, whether a person wrote or edited it) by the report's
    # background pass or by the first report that meets it. NULL until then, and again
    # (trigger captions_facts_unknown) whenever the text or the record changes; a new record
    # (INSERT OR REPLACE) starts NULL.
    ("captions", "facts", "BLOB"),
]

# Additions that name columns of _COLUMNS: made after them, at every open if missing.
_LATE_ADDITIONS = [
    # A report reads every caption record of a folder through this index alone (a range
    # of image_path, never a row of the table with its text): bench/README.md, Dataset
    # report.
    """CREATE INDEX IF NOT EXISTS captions_report
        ON captions (image_path, generator, content_hash, facts)""",
    # The records whose report facts are still to be computed (few, once the background
    # pass has run), in the order the pass walks them.
    """CREATE INDEX IF NOT EXISTS captions_nofacts ON captions (image_path, generator)
        WHERE facts IS NULL""",
    # Facts describe one record: a change of its text or sidecar makes them unknown
    # again, whichever captiond (this one, an older one) makes it. (A record written
    # again by INSERT OR REPLACE starts with none.)
    "DROP TRIGGER IF EXISTS captions_facts_stale",  # a development version's, text only
    """CREATE TRIGGER IF NOT EXISTS captions_facts_unknown
        AFTER UPDATE OF text, text_hash, content_hash, sidecar_path, sidecar_hash, written_at
        ON captions WHEN new.facts IS NOT NULL BEGIN
            UPDATE captions SET facts = NULL WHERE rowid = new.rowid;
        END""",
    # Strings the facts refer to by number (tags, the keys facts were computed with).
    # An id is never reused nor renumbered.
    """CREATE TABLE IF NOT EXISTS report_terms (
        id   INTEGER PRIMARY KEY,
        term TEXT NOT NULL UNIQUE
    )""",
]


class DatabaseError(Exception):
    """The database cannot be used (newer schema, corrupt file)."""


class _Pool:
    """Connections of threads that ended, kept for the next short-lived thread (an API
    request): opening one costs about a millisecond (the file, WAL mode, the schema)."""

    SIZE = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[sqlite3.Connection] = []
        self.open = True
        self.pid = os.getpid()

    def take(self) -> sqlite3.Connection | None:
        if self.pid != os.getpid():  # a forked child: the parent's handles are not ours
            self.lock, self.idle, self.pid = threading.Lock(), [], os.getpid()
        with self.lock:
            return self.idle.pop() if self.idle else None

    def give(self, conn: sqlite3.Connection) -> bool:
        """Keep ``conn`` for reuse; False when the caller must close it."""
        try:
            if conn.in_transaction or self.pid != os.getpid():
                return False  # a thread that died mid-transaction: not for anyone else
        except sqlite3.ProgrammingError:  # already closed (the database was)
            return False
        with self.lock:
            if self.open and len(self.idle) < self.SIZE:
                self.idle.append(conn)
                return True
        return False

    def close(self) -> list[sqlite3.Connection]:
        with self.lock:
            self.open = False
            idle, self.idle = self.idle, []
        return idle


class _Holder:
    """Owns one thread's connection; when the thread's locals go away, gives it to the
    pool (or closes it)."""

    __slots__ = ("__weakref__", "conn", "pid", "pool")

    def __init__(self, conn: sqlite3.Connection, pool: _Pool) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.pool = pool

    def close(self) -> None:
        if self.conn is not None:
            with suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None  # type: ignore[assignment]

    def __del__(self) -> None:
        conn = self.conn
        if conn is None or self.pid != os.getpid():
            return
        if not self.pool.give(conn):
            self.close()


class Database:
    """A SQLite file shared by threads (one connection each) and processes."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._holders: weakref.WeakSet[_Holder] = weakref.WeakSet()
        self._pool = _Pool()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._migrate()
        except sqlite3.DatabaseError as exc:  # not a database, corrupt, locked, disk full
            self.close()
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # primary code
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                advice = (
                    "Move the file aside to start with an empty queue (captions already "
                    "written are kept)."
                )
            else:  # locked by another process, disk full, I/O error: the file is fine
                advice = "The file was not changed; fix the cause and start again."
            raise DatabaseError(
                f"{self.path}: cannot open the queue database: {exc}. {advice}"
            ) from exc

    # -- connections ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,  # only so that close() may close it from elsewhere
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use; reopened after a fork)."""
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is not None and holder.pid == os.getpid() and holder.conn is not None:
            return holder.conn
        if self._closed:
            raise DatabaseError(f"{self.path}: database is closed")
        if holder is not None:  # inherited across fork: never touch the parent's handle
            holder.conn = None  # type: ignore[assignment]
        holder = _Holder(self._pool.take() or self._connect(), self._pool)
        self._local.holder = holder
        with self._lock:
            self._holders.add(holder)
        return holder.conn

    def close(self) -> None:
        """Close every thread's connection. Later use raises DatabaseError."""
        self._closed = True
        with self._lock:
            holders = list(self._holders)
        for conn in self._pool.close():
            with suppress(sqlite3.Error):
                conn.close()
        for h in holders:
            if h.conn is not None and h.pid == os.getpid():
                h.close()
        self._local = threading.local()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: the queries inside see one state of the database (WAL).
        Inside a transaction already, it joins it. Nothing may be written inside."""
        conn = self.conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")  # nothing was written: this only ends the read

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error).

        Nested use joins the outer transaction.
        """
        conn = self.conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def probe_write(self) -> None:
        """A small write transaction; raises while the database cannot be written (a
        full disk, a read-only or failing filesystem)."""
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, julianday('now'))")

    def checkpoint(self) -> tuple[int, int, int]:
        """``PRAGMA wal_checkpoint(PASSIVE)``: copy what the WAL holds into the database
        file without waiting for readers or writers (frames a reader still needs stay).
        Returns (busy, frames in the WAL, frames checkpointed); -1 for both counts when
        the database is not in WAL mode."""
        busy, frames, done = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(busy), int(frames), int(done)

    def integrity_check(self) -> str:
        """``"ok"`` or SQLite's description of the damage."""
        rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    def user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise DatabaseError(
                    f"{self.path}: schema version {version} is newer than this captiond "
                    f"understands ({SCHEMA_VERSION}); upgrade captiond"
                )
            if version == 0:
                for stmt in _SCHEMA_V1:
                    conn.execute(stmt)
                version = 1
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    conn.execute(stmt)
                version += 1
            for stmt in _ADDITIONS:
                conn.execute(stmt)
            for table, column, decl in _COLUMNS:
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            for stmt in _LATE_ADDITIONS:
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
