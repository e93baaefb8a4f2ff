"""Durable SQLite job queue and file index."""

from daemon.queue.db import Database, DatabaseError
from daemon.queue.index import CaptionRecord, FileIndex
from daemon.queue.jobs import Job, JobQueue, JobState, counts_of, outcomes_of, totals_of

__all__ = [
    "CaptionRecord",
    "Database",
    "DatabaseError",
    "FileIndex",
    "Job",
    "JobQueue",
    "JobState",
    "counts_of",
    "outcomes_of",
    "totals_of",
]
