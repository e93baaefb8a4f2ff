"""What the driver and the actors exchange, and what both must agree on: the actor's
specification (a small JSON-able dict), rows and results, path maps between the
daemon's host and the nodes, and the captiond version each side runs. No Ray here."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.errors import CaptionError, ErrorType, classify

WAITING = "waiting"  # an error result's condition: a {tags} job whose tags are not there

Row = tuple[int, int, str] | tuple[int, int, str, list[str | None]]
"""(job id, index of its root in the spec's ``roots``, path relative to that root), and
for a ``{tags}`` prompt the tagger's caption: [content hash or None, text]."""


# -- path maps ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathMap:
    """``[NODE:]FROM=TO``: a root under FROM on the daemon's host is under TO on the
    nodes (all but the driver's own), or only on NODE (a host name, IP or Ray node id)."""

    src: str
    dst: str
    node: str | None = None

    def __str__(self) -> str:
        return f"{self.node + ':' if self.node else ''}{self.src}={self.dst}"


def _clean_abs(p: str, spec: str) -> str:
    if not p.startswith("/"):
        raise ValueError(f"--path-map {spec!r}: {p!r} is not an absolute path")
    parts = [x for x in p.split("/") if x]
    if any(x in (".", "..") for x in parts) or "\x00" in p:
        raise ValueError(f"--path-map {spec!r}: '.' and '..' are refused")
    return "/" + "/".join(parts)


def parse_path_map(spec: str) -> PathMap:
    """Parse ``[NODE:]FROM=TO`` (both absolute paths)."""
    node = None
    rest = spec
    if not spec.startswith("/"):
        node, sep, rest = spec.partition(":")
        if not sep or not node:
            raise ValueError(f"--path-map {spec!r}: write FROM=TO or NODE:FROM=TO")
    src, sep, dst = rest.partition("=")
    if not sep:
        raise ValueError(f"--path-map {spec!r}: write FROM=TO or NODE:FROM=TO")
    return PathMap(_clean_abs(src, spec), _clean_abs(dst, spec), node)


def map_path(path: str, maps: list[PathMap], names: set[str], *, driver_node: bool) -> str:
    """Where ``path`` (as the daemon's host sees it) is on the node called ``names``.

    A map for this node by name wins over a general one; the longest FROM wins among
    equals. General maps never apply on the driver's node (the daemon's host, where
    the roots are where the daemon watches them)."""
    best: tuple[int, int, PathMap] | None = None
    for m in maps:
        if m.node is not None and m.node not in names:
            continue
        if m.node is None and driver_node:
            continue
        src = m.src.rstrip("/") or "/"
        if path == src or path.startswith(src.rstrip("/") + "/"):
            rank = (1 if m.node is not None else 0, len(src))
            if best is None or rank > best[:2]:
                best = (*rank, m)
    if best is None:
        return path
    m = best[2]
    tail = path[len(m.src.rstrip("/")) :]
    return (m.dst.rstrip("/") + tail) or "/"


# -- versions -------------------------------------------------------------------------


@cache
def code_fingerprint() -> str:
    """A hash of captiond's own source files as installed here: nodes must run the
    same code, not only the same version number (an editable install drifts)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.blake2b(digest_size=8)
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def local_facts() -> dict[str, str]:
    """What a node runs: captiond's version and code, Python, Ray; its host name."""
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "-"
    return {
        "host": socket.gethostname(),
        "captiond": __version__,
        "code": code_fingerprint(),
        "python": platform.python_version(),
        "ray": ray_version,
    }


def version_problem(
    expected: dict[str, str], facts: dict[str, str], who: str | None = None
) -> str | None:
    """A sentence when ``facts`` (a node's) do not match ``expected`` (the driver's);
    ``who``: how to name the node (default: by its host name)."""
    diffs = []
    if facts.get("captiond") != expected.get("captiond"):
        diffs.append(f"captiond {facts.get('captiond')} (driver: {expected.get('captiond')})")
    elif facts.get("code") != expected.get("code"):
        diffs.append(
            f"captiond {facts.get('captiond')} with other code (source hash "
            f"{facts.get('code')}, driver: {expected.get('code')})"
        )
    if facts.get("python", "").rsplit(".", 1)[0] != expected.get("python", "").rsplit(".", 1)[0]:
        diffs.append(f"Python {facts.get('python')} (driver: {expected.get('python')})")
    if facts.get("ray") != expected.get("ray"):
        diffs.append(f"Ray {facts.get('ray')} (driver: {expected.get('ray')})")
    if not diffs:
        return None
    who = who or f"node {facts.get('host', '?')}"
    return f"{who} runs {', '.join(diffs)}: install the same captiond and Ray on every node"


# -- results --------------------------------------------------------------------------


class RemoteFailure(CaptionError):
    """An image's failure on an actor, as the actor classified it (by exception type,
    as the daemon does). ``condition``: a condition of the system there (a vanished or
    unreachable mount), which puts the job back without using an attempt."""

    def __init__(
        self,
        error_type: str,
        message: str,
        retryable: bool,
        *,
        errno: int | None = None,
        condition: str | None = None,
        node: str = "",
    ) -> None:
        super().__init__(message)
        self.error_type = ErrorType(error_type)
        self.retryable = retryable
        self.errno = errno
        self.condition = condition
        self.node = node


def ok_result(
    job: int,
    caption: str,
    content_hash: str,
    owner: tuple[int, int] | None,
    size: tuple[int, int] | None,
) -> dict[str, Any]:
    return {
        "job": job,
        "caption": caption,
        "hash": content_hash,
        "owner": list(owner) if owner else None,
        "size": list(size) if size else None,
    }


def error_result(
    job: int, exc: BaseException, *, condition: str | None = None, node: str = ""
) -> dict[str, Any]:
    from daemon.conditions import errno_of

    c = classify(exc)
    return {
        "job": job,
        "error": {
            "type": c.error_type.value,
            "message": c.message,
            "retryable": c.retryable,
            "errno": errno_of(exc),
            "condition": condition,
            "node": node,
        },
    }


def failure_of(result: dict[str, Any]) -> RemoteFailure | None:
    e = result.get("error")
    if not e:
        return None
    return RemoteFailure(
        e["type"],
        e["message"],
        bool(e["retryable"]),
        errno=e.get("errno"),
        condition=e.get("condition"),
        node=e.get("node", ""),
    )


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "captiond")
