"""Which files a watch captions: the candidate rules shared by the scan, the watcher and
the API.

Glob matching (``include`` / ``exclude``, :func:`fnmatch` syntax, case-sensitive): a
file matches a pattern when its path relative to the root (``/`` separators) or its
bare name matches; ``*`` also matches ``/``. A directory whose relative path or name
matches an ``exclude`` pattern is not descended into (``exclude = ["thumbs"]`` skips
every ``thumbs`` directory). An ``include`` list that is empty or contains ``"*"``
includes everything. Extensions are compared case-insensitively. Dotfiles,
dot-directories, temporary names and the lock and backup files editors and office
suites leave beside a file (``~$name.jpg``, ``~name.jpg``: any name starting with
``~``) are never candidates.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from daemon.config import WatchConfig

TEMP_SUFFIXES = (".tmp", ".part", ".crdownload", "~")


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True, slots=True)
class Rules:
    exts: frozenset[str]
    name_re: re.Pattern[str]  # not a dotfile or ~lock file, an image extension, not a temp name
    include: re.Pattern[str] | None  # None: everything included
    exclude: re.Pattern[str] | None
    recursive: bool

    def file_ok(self, rel: str, name: str) -> bool:
        """Glob rules for a file (name checks are done by the caller)."""
        inc = self.include
        if inc is not None and not (inc.match(rel) or inc.match(name)):
            return False
        exc = self.exclude
        return exc is None or not (exc.match(rel) or exc.match(name))

    def dir_ok(self, rel: str, name: str) -> bool:
        exc = self.exclude
        return exc is None or not (exc.match(rel) or exc.match(name))


@lru_cache(maxsize=64)
def _rules_for(
    exts: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...], recursive: bool
) -> Rules:
    inc = None if not include or "*" in include else _compile(include)
    # Temp suffixes are never image extensions, so "ends in an image extension" also
    # rules out *.tmp, *.part, *.crdownload and *~.
    keep = sorted({e.lower() for e in exts} - {t.lstrip(".") for t in TEMP_SUFFIXES} - {""})
    alt = "|".join(re.escape(e) for e in keep) or "(?!)"
    # No leading "." (dotfiles, rsync's .name.XXXXXX) or "~" (~$name.jpg office locks,
    # ~name.jpg editor backups).
    name_re = re.compile(rf"[^.~].*\.(?:{alt})\Z", re.IGNORECASE | re.DOTALL)
    return Rules(frozenset(keep), name_re, inc, _compile(exclude), recursive)


def rules_for_watch(watch: WatchConfig) -> Rules:
    return _rules_for(
        tuple(watch.image_extensions),
        tuple(watch.include),
        tuple(watch.exclude),
        watch.recursive,
    )


def split_path(watch: WatchConfig, path: Path | str) -> tuple[str, str, str] | None:
    """(root, rel_dir, name) of ``path`` under the watch root, or None if outside."""
    root = str(watch.path)
    p = os.path.abspath(path)
    if not p.startswith(root.rstrip("/") + "/"):
        return None
    rel = p[len(root.rstrip("/")) + 1 :]
    rel_dir, _, name = rel.rpartition("/")
    return root, rel_dir, name


def is_candidate(watch: WatchConfig, path: Path) -> bool:
    """Whether ``path`` (under ``watch.path``) is an image this watch captions.

    Decided from the name alone (no stat), so it also answers for deleted files.
    """
    parts = split_path(watch, path)
    if parts is None:
        return False
    _, rel_dir, name = parts
    rules = rules_for_watch(watch)
    if not rules.name_re.match(name):
        return False
    if rel_dir:
        if not rules.recursive:
            return False
        acc = ""
        for part in rel_dir.split("/"):
            acc = f"{acc}/{part}" if acc else part
            if part.startswith(".") or not rules.dir_ok(acc, part):
                return False
    return rules.file_ok(f"{rel_dir}/{name}" if rel_dir else name, name)
