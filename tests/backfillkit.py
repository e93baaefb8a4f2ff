"""A dataset, a configuration and a state database for the backfill tests, and the
checks every scenario ends with: exactly one sidecar per image, with the caption its
colour gives, recorded in the index; the queue settled; no temp file anywhere."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from daemon.config import Settings, load_settings
from daemon.confined import is_temp_name
from daemon.hashing import sidecar_hash
from daemon.queue import Database, FileIndex, JobQueue
from daemon.scanning.reconcile import Scanner
from tests.daemonproc import make_image, toml_value

COLORS = ["red", "green", "blue", "white"]
WORD = {"red": "red background", "green": "green background", "blue": "blue background",
        "white": "white background"}  # fmt: skip


class Site:
    """``<tmp>/data`` watched (sidecars ``.txt``), ``<tmp>/state`` its database."""

    def __init__(self, tmp: Path, model_dir: Path | str, *, watch: dict[str, Any] | None = None):
        self.tmp = tmp
        self.root = tmp / "data"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        self.images: dict[Path, str] = {}
        self.bad: list[Path] = []
        w = {"path": str(self.root), "sidecar_extension": "txt", "settle_seconds": 0.3}
        w |= watch or {}
        lines = [
            f"state_dir = {toml_value(str(self.state))}",
            f"cache_dir = {toml_value(str(tmp / 'cache'))}",
            f"socket_path = {toml_value(str(tmp / 'captiond.sock'))}",
            'log_format = "json"',
            'log_level = "debug"',
            "[[watch]]",
            *(f"{k} = {toml_value(v)}" for k, v in w.items()),
            "[queue]",
            "backoff_base_seconds = 0.2",
            "backoff_max_seconds = 1.0",
            "[worker]",
            "batch_size = 4",
            "load_retry_seconds = 0.5",
            "[generators.wd_tagger]",
            f"model = {toml_value(str(model_dir))}",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def settings(self) -> Settings:
        return load_settings(self.config)

    def add(self, n: int, *, start: int = 0, folders: int = 4, prefix: str = "img") -> list[Path]:
        out = []
        for i in range(start, start + n):
            color = COLORS[i % len(COLORS)]
            p = make_image(self.root / f"d{i % folders}" / f"{prefix}{i:04d}.png", color)
            self.images[p] = color
            out.append(p)
        return out

    def add_bad(self, name: str = "d0/broken.png") -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
        old = time.time() - 600  # not "being written": a bad image, not a busy one
        os.utime(p, (old, old))
        self.bad.append(p)
        return p

    def open(self) -> tuple[Database, JobQueue, FileIndex]:
        db = Database(self.state / "captiond.db")
        return db, JobQueue(db), FileIndex(db)

    def scan(self) -> int:
        """What the daemon's scan does: index the folder and queue its images."""
        db, q, index = self.open()
        try:
            Scanner(index, q).reconcile(self.settings().watch[0])
            return q.totals().get("pending", 0)
        finally:
            db.close()

    def totals(self) -> dict[str, int]:
        db, q, _ = self.open()
        try:
            return q.totals()
        finally:
            db.close()

    def job_rows(self) -> dict[str, tuple[str, str | None, int, str | None]]:
        """path -> (state, outcome, attempts, error_type) of the wd_tagger jobs."""
        db, q, _ = self.open()
        try:
            return {
                j.path: (str(j.state), j.outcome, j.attempts, j.error_type)
                for j in q.jobs(limit=100_000)
            }
        finally:
            db.close()

    def temp_files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if is_temp_name(p.name)]

    def check_exactly_once(self) -> None:
        """One ``.txt`` per good image with its colour's tags, recorded in the index
        with the file's hash; none for bad images; every job settled; no temp files."""
        sidecars = sorted(self.root.rglob("*.txt"))
        expected = sorted(p.with_suffix(".txt") for p in self.images)
        assert sidecars == expected, (
            f"{len(sidecars)} sidecars for {len(expected)} images; extra: "
            f"{sorted(set(sidecars) - set(expected))[:5]} missing: "
            f"{sorted(set(expected) - set(sidecars))[:5]}"
        )
        for p, color in self.images.items():
            text = p.with_suffix(".txt").read_text()
            assert WORD[color] in text and text.endswith("\n") and text.count("\n") == 1, text
        assert self.temp_files() == []
        db, q, index = self.open()
        try:
            records = index.get_captions("wd_tagger", [str(p) for p in self.images])
            for p in self.images:
                rec = records[str(p)]
                assert rec.sidecar_path == str(p.with_suffix(".txt"))
                assert rec.sidecar_hash == sidecar_hash(p.with_suffix(".txt").read_bytes())
            totals = q.totals()
            assert totals.get("pending", 0) == 0 and totals.get("leased", 0) == 0, totals
            jobs = {j.path: j for j in q.jobs(limit=100_000)}
            for p in self.images:
                assert str(jobs[str(p)].state) == "done", jobs[str(p)]
            for p in self.bad:
                assert jobs[str(p)].error_type == "bad_image", jobs[str(p)]
        finally:
            db.close()


def tags_site(
    tmp: Path, model_dir: Path | str, monkeypatch: Any, generators: tuple[str, ...] = ()
) -> Site:
    """A site whose watch has the WD tagger (``.txt``) and ``tagecho`` (``.caption``),
    a describer whose prompt uses ``{tags}`` (tests/fakegen.py); or ``generators``."""
    from daemon.generators import registry

    monkeypatch.setitem(registry.BUILTINS, "tagecho", "tests.fakegen:TagEchoGenerator")
    gens = list(generators) or ["wd_tagger", "tagecho"]
    ext = {"wd_tagger": "txt", "tagecho": "caption"}
    watch = {"generators": gens, "sidecar_extension": {g: ext[g] for g in gens}}
    return Site(tmp, model_dir, watch=watch)


def check_tag_captions(images: list[Path]) -> None:
    """Each image's ``tagecho`` caption is made of its ``.txt`` tags as they are now."""
    for img in images:
        tags = img.with_suffix(".txt").read_text().strip()
        assert img.with_suffix(".caption").read_text() == f"an image with {tags}.\n"


def recolour(site: Site, image: Path) -> None:
    """New content at the same path (another colour, so other tags)."""
    make_image(image, "white" if site.images[image] != "white" else "red")
