"""Who may change things, without root: the daemon's real API server (in process, on a
real Unix socket) with the peer's credentials injected where SO_PEERCRED is read, and
the user and group databases (``/proc/<pid>/status``, passwd, group) injected where
``daemon.api.security`` reads them. The end-to-end test with real users switching
(``test_api.py::test_other_users_may_read_but_not_mutate``) needs root; these do not.

The rule under test is the README's: anyone who can open the socket may read; every
change (every method but GET) needs root, the daemon's own user or a member of
``api.admin_group``. It is checked against every operation of ``/openapi.json``, not
against the route table's own ``admin`` flags."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import daemon.api.listeners as listeners
import daemon.api.security as security
from daemon.api.http import PeerCredentials
from daemon.client import request
from tests.daemonproc import make_image

ADMINS = 4242  # api.admin_group (a gid that names no group here)
OWN_UID = 3000  # the daemon's user, as the Authoriser sees it
STRANGER = PeerCredentials(pid=70001, uid=4000, gid=4000)

USERS = {4000: ("stranger", 4000), 4001: ("member", 4001), 4002: ("primary", ADMINS)}
GROUPS = {ADMINS: ("admins", ["member"]), 4000: ("stranger", [])}
PROCS: dict[int, tuple[int, set[int]]] = {}  # pid -> (effective uid, supplementary groups)


class Served:
    def __init__(self, daemon: Any, root: Path) -> None:
        self.daemon = daemon
        self.root = root
        self.socket = daemon.server.path
        self.peer = STRANGER

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        raw = None if body is None else json.dumps(body).encode()
        return request(self.socket, method, url, raw, timeout=10)


@pytest.fixture
def served(tmp_path: Path, wd_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    import daemon.app as app_module
    from daemon.config import Settings, WatchConfig

    root = tmp_path / "pics"
    make_image(root / "a.png")
    settings = Settings(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, name="ds", sidecar_extension="txt")],
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        api={"admin_group": str(ADMINS)},
    )
    monkeypatch.setattr(app_module, "fs_type", lambda path: "ext4")
    d = app_module.Daemon(settings)
    d.control.auth.own_uid = OWN_UID
    served = Served(d, root)

    # injected credentials: the peer of each connection, and the account databases
    monkeypatch.setattr(listeners, "peer_credentials", lambda sock: served.peer)

    def proc_groups(pid: int, uid: int) -> set[int] | None:
        euid, groups = PROCS.get(pid, (None, set()))
        return groups if euid == uid else None

    def getpwuid(uid: int) -> Any:
        if uid not in USERS:
            raise KeyError(uid)
        name, gid = USERS[uid]
        return SimpleNamespace(pw_name=name, pw_gid=gid)

    def getgrgid(gid: int) -> Any:
        if gid not in GROUPS:
            raise KeyError(gid)
        name, members = GROUPS[gid]
        return SimpleNamespace(gr_name=name, gr_mem=members)

    monkeypatch.setattr(security, "_proc_groups", proc_groups)
    monkeypatch.setattr(security, "pwd", SimpleNamespace(getpwuid=getpwuid))
    monkeypatch.setattr(security, "grp", SimpleNamespace(getgrgid=getgrgid))
    PROCS.clear()
    d.server.bind()
    d.server.start()
    try:
        yield served
    finally:
        d.server.stop()
        d.worker.stop(1)
        d.db.close()


def operations(served: Served) -> list[tuple[str, str]]:
    """Every operation of the API's own description, path parameters filled in."""
    code, spec = served.call("GET", "/openapi.json")
    assert code == 200
    values = {"path": "ds/a.png", "request_id": "nope", "name": "wd_tagger"}
    ops = []
    for template, item in spec["paths"].items():
        url = template
        for key, value in values.items():
            url = url.replace("{" + key + "}", value)
        assert "{" not in url, f"no value for a parameter of {template}"
        ops += [(method.upper(), url) for method in item]
    return ops


def state(served: Served) -> dict[str, Any]:
    """What a change would leave behind."""
    d = served.daemon
    return {
        "files": sorted(p.name for p in served.root.iterdir()),
        "settings_file": d.settings.runtime_settings_path.exists(),
        "jobs": d.queue.counts(),
        "paused": (d.worker.paused, sorted(d.worker.paused_roots)),
        "types": served.call("GET", "/api/caption-types")[1],
        "postprocess": served.call("GET", "/api/caption-post-processing")[1],
        "models": {n: s["state"] for n, s in d.models.status().items()},
    }


def test_a_stranger_may_read_everything_and_change_nothing(served: Served) -> None:
    ops = operations(served)
    changes = [(m, u) for m, u in ops if m != "GET"]
    assert len(changes) >= 15 and len(ops) - len(changes) >= 8
    before = state(served)
    for method, url in changes:
        code, body = served.call(method, url, {"types": ["x"]} if method != "DELETE" else None)
        assert code == 403, (method, url, code, body)
        assert body["error_type"] == "forbidden" and body["retryable"] is False
        assert "uid 4000 may read but not change anything" in body["error"]
    for method, url in ops:
        if method == "GET":
            code, body = served.call(method, url)
            assert code != 403, (method, url, body)
    assert served.call("GET", "/status")[0] == 200
    assert state(served) == before


@pytest.mark.parametrize(
    ("who", "peer", "procs"),
    [
        ("root", PeerCredentials(70002, 0, 0), {}),
        ("the daemon's user", PeerCredentials(70002, OWN_UID, OWN_UID), {}),
        ("admin group as primary group (SO_PEERCRED)", PeerCredentials(70002, 4000, ADMINS), {}),
        ("admin group as supplementary group", STRANGER, {70001: (4000, {10, ADMINS})}),
        ("admin group member by name", PeerCredentials(70002, 4001, 4001), {}),
        ("admin group as primary group (passwd)", PeerCredentials(70002, 4002, 4002), {}),
    ],
)
def test_who_may_change_things(
    served: Served, who: str, peer: PeerCredentials, procs: dict[int, tuple[int, set[int]]]
) -> None:
    PROCS.update(procs)
    served.peer = peer
    code, body = served.call("POST", "/api/queue/pause", {})
    assert code == 200 and body["paused"] is True, (who, body)
    assert served.daemon.worker.paused is True
    code, body = served.call("PUT", "/api/caption/ds/a.png", {"type": "txt", "caption": who})
    assert code == 200, (who, body)
    assert (served.root / "a.txt").read_text() == who + "\n"
    assert served.call("POST", "/api/queue/resume", {})[0] == 200


@pytest.mark.parametrize(
    ("why", "peer", "procs"),
    [
        ("another user in another group", STRANGER, {}),
        ("no credentials (cannot be read)", None, {}),
        # the pid was reused by another user's process: its groups are not the peer's
        ("supplementary groups of a reused pid", STRANGER, {70001: (4999, {ADMINS})}),
        ("supplementary groups without the admin group", STRANGER, {70001: (4000, {10, 20})}),
        ("a user unknown to passwd", PeerCredentials(70003, 4998, 4998), {}),
    ],
)
def test_who_may_not(
    served: Served, why: str, peer: PeerCredentials | None, procs: dict[int, Any]
) -> None:
    PROCS.update(procs)
    served.peer = peer
    code, body = served.call("POST", "/api/queue/pause", {})
    assert (code, body["error_type"]) == (403, "forbidden"), (why, body)
    assert served.daemon.worker.paused is False
    code, _ = served.call("PUT", "/api/caption/ds/a.png", {"type": "txt", "caption": why})
    assert code == 403
    assert not (served.root / "a.txt").exists()
    assert served.call("GET", "/api/queue")[0] == 200  # reading is still fine


def test_peer_in_group_reads_this_process_groups() -> None:
    """Without injection: the supplementary groups really come from /proc, and only
    while the process still runs as the peer's uid."""
    me = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
    groups = security._proc_groups(me.pid, me.uid)
    assert groups == set(os.getgroups())
    assert security._proc_groups(me.pid, me.uid + 1) is None
    assert security._proc_groups(2**22 + 12345, me.uid) is None  # no such process
    assert security.peer_in_group(me, me.gid)
