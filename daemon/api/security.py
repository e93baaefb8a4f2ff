"""Who may do what, and which files a request may name.

Paths: an API path is ``ROOTNAME/sub/file.png`` (``_/file.png`` when there is one
watched root). It is checked lexically first (no NUL, no absolute path, no ``.``,
``..`` or empty segment: refused before the filesystem is asked anything), then on
disk through the same confined resolution as every read and write
(:mod:`daemon.confined`): no symlinked folder on the way, a symlinked file only when
the watch's ``follow_symlinks`` allows it; a regular file with one of the watch's image
extensions that the watch captions (no dotfiles, excluded globs...). Every read and
write checks again at the moment it happens.

Authorisation: reads are for anyone who can open the socket (its mode and group
decide). Mutating endpoints need root, the daemon's own user, or a member of
``[api].admin_group`` (the peer's primary group from SO_PEERCRED, its supplementary
groups from ``/proc/<pid>/status`` when that process still has the peer's uid, or the
group's member list for the peer's user name). On the TCP listener the bearer token
(checked by the server before routing) grants everything.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from daemon.api.http import PeerCredentials, Request
from daemon.api.listeners import SocketPathError
from daemon.api.problems import Problem
from daemon.config import WatchConfig
from daemon.confined import ConfinementError, Root
from daemon.scanning.rules import is_candidate

SINGLE_ROOT = "_"


class StartupError(SocketPathError):
    """The API cannot start as configured (token file, admin group); a clear message."""


# ---------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class ImageRef:
    watch: WatchConfig
    path: Path  # absolute, under watch.path, as the scanner names it (links not resolved)
    rel: str  # ROOTNAME/sub/file.png as the client should name it


def api_path(watch: WatchConfig, path: Path | str, single_root: bool = False) -> str:
    """The API name of a file under ``watch`` (``ROOTNAME/sub/file.png``)."""
    rel = Path(path).relative_to(watch.path).as_posix()
    return f"{watch.name}/{rel}"


def split_api_path(watches: list[WatchConfig], rel: str) -> tuple[WatchConfig, list[str]]:
    """Lexical checks only: which watch, and the path segments below it."""
    if "\x00" in rel:
        raise Problem("invalid", "the path contains a NUL byte")
    if rel.startswith("/") or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":"):
        raise Problem("forbidden", "absolute paths are refused: name a file as ROOT/sub/file.png")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise Problem("forbidden", "'.', '..' and empty path segments are refused")
    if "\\" in rel:
        raise Problem("forbidden", "backslashes are refused in paths")
    root, rest = parts[0], parts[1:]
    if root == SINGLE_ROOT and len(watches) == 1:
        watch = watches[0]
    else:
        found = [w for w in watches if w.name == root]
        if not found:
            names = ", ".join(sorted(w.name for w in watches))
            hint = " ('_' needs exactly one watched root)" if root == SINGLE_ROOT else ""
            raise Problem("not_found", f"no watched root named {root!r}{hint}; roots: {names}")
        watch = found[0]
    if not rest:
        raise Problem("invalid", "the path names a root, not an image: ROOT/sub/file.png")
    return watch, rest


def resolve_image(watches: list[WatchConfig], rel: str, *, must_exist: bool = True) -> ImageRef:
    """An image named by the API, checked to be inside its root (see the module doc).

    The check uses the same confined resolution as every later read
    (:mod:`daemon.confined`): no symlinked folder on the way, a symlinked file only as
    the watch's ``follow_symlinks`` allows. Reads and writes check again when they
    happen; this check gives a clear answer early."""
    watch, rest = split_api_path(watches, rel)
    lexical = watch.path.joinpath(*rest)
    exts = set(watch.image_extensions)
    if lexical.suffix.lower().lstrip(".") not in exts:
        raise Problem("invalid", f"not an image: {'/'.join(rest)} (extensions: {sorted(exts)})")
    if not is_candidate(watch, lexical):
        raise Problem(
            "invalid", "this watch does not caption that file (hidden, temporary or excluded)"
        )
    if must_exist:
        root = Root(str(watch.path), watch.follow_symlinks)
        try:
            with root.folder("/".join(rest[:-1])) as folder:
                st = folder.stat_file(rest[-1])
        except ConfinementError as exc:
            raise Problem("forbidden", f"the path leaves its watched root: {exc}") from None
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise Problem("not_found", f"cannot stat the image: {exc.strerror}") from None
        if st is None:
            raise Problem("not_found", f"no such image: {watch.name}/{'/'.join(rest)}")
        if not stat.S_ISREG(st.st_mode):
            raise Problem("invalid", "not a regular file")
    return ImageRef(watch, lexical, f"{watch.name}/{'/'.join(rest)}")


# -------------------------------------------------------------------- authorisation


def resolve_admin_group(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise StartupError(f"[api].admin_group {name!r} does not exist") from None


def _proc_groups(pid: int, uid: int) -> set[int] | None:
    """Supplementary groups of ``pid`` if it still runs as ``uid`` (pid reuse check)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    uids: list[int] = []
    groups: set[int] = set()
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uids = [int(x) for x in line.split()[1:]]
        elif line.startswith("Groups:"):
            groups = {int(x) for x in line.split()[1:]}
    if len(uids) < 2 or uids[1] != uid:  # effective uid
        return None
    return groups


def peer_in_group(peer: PeerCredentials, gid: int) -> bool:
    if peer.gid == gid:
        return True
    groups = _proc_groups(peer.pid, peer.uid)
    if groups is not None and gid in groups:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid or user.pw_name in group.gr_mem


class Authoriser:
    def __init__(self, admin_gid: int | None, own_uid: int | None = None) -> None:
        self.admin_gid = admin_gid
        self.own_uid = os.geteuid() if own_uid is None else own_uid

    def may_mutate(self, request: Request) -> bool:
        if request.auth == "token":
            return True
        return request.peer is not None and self.privileged(request.peer)

    def privileged(self, peer: PeerCredentials) -> bool:
        """Root, the daemon's own user, or a member of the admin group."""
        if peer.uid in (0, self.own_uid):
            return True
        return self.admin_gid is not None and peer_in_group(peer, self.admin_gid)

    def require_admin(self, request: Request) -> None:
        if not self.may_mutate(request):
            who = f"uid {request.peer.uid}" if request.peer else "this client"
            raise Problem(
                "forbidden",
                f"{who} may read but not change anything: run as root or the daemon's user, "
                "or join the [api].admin_group",
                "forbidden",
            )


MAX_TOKEN_BYTES = 4096


def load_token(path: Path | None) -> bytes:
    """The TCP listener's bearer token; refuses a file others could read or write."""
    if path is None:
        raise StartupError("[api.tcp] is enabled but token_file is not set")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StartupError(f"[api.tcp].token_file {path} does not exist") from None
    except OSError as exc:
        raise StartupError(f"[api.tcp].token_file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"[api.tcp].token_file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StartupError(
                f"[api.tcp].token_file {path} has mode {oct(st.st_mode & 0o777)}; "
                f"it must be 0600 (chmod 600 {path})"
            )
        if st.st_uid != os.geteuid():
            raise StartupError(
                f"[api.tcp].token_file {path} must be owned by the daemon's user "
                f"(uid {os.geteuid()}), not uid {st.st_uid}"
            )
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_BYTES:
        raise StartupError(
            f"[api.tcp].token_file {path} is over {MAX_TOKEN_BYTES} bytes: "
            "it must hold the token alone"
        )
    token = raw.strip()
    if len(token) < 16:
        raise StartupError(f"[api.tcp].token_file {path}: the token must be 16+ characters")
    return token
