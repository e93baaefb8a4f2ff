"""In-process pieces of the control API: path confinement, peer authorisation, token
files, per-job options in the queue (cancel restores, claim skips paused roots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.api.security import Authoriser, StartupError, load_token, resolve_image
from daemon.config import WatchConfig
from daemon.queue import Database, JobQueue
from daemon.server import HTTPError, PeerCredentials, Request
from tests.daemonproc import make_image


@pytest.fixture
def watch(tmp_path: Path) -> WatchConfig:
    root = tmp_path / "root"
    make_image(root / "sub" / "a.png")
    return WatchConfig(path=root, name="ds", exclude=["skip*"])


@pytest.mark.parametrize(
    ("rel", "status"),
    [
        ("ds/../root/sub/a.png", 403),
        ("ds/sub/../sub/a.png", 403),
        ("/etc/passwd", 403),
        ("ds//sub/a.png", 403),
        ("ds/sub/a.png\x00.png", 422),
        ("ds/sub/a.txt", 422),
        ("ds/sub/.hidden.png", 422),
        ("ds/skipme.png", 422),
        ("ds/sub/missing.png", 404),
        ("other/sub/a.png", 404),
        ("ds", 422),
    ],
)
def test_resolve_refuses(watch: WatchConfig, rel: str, status: int) -> None:
    with pytest.raises(HTTPError) as exc:
        resolve_image([watch], rel)
    assert exc.value.status == status


def test_resolve_accepts_and_follows_links_only_inside(watch: WatchConfig, tmp_path: Path) -> None:
    ref = resolve_image([watch], "_/sub/a.png")
    assert ref.path == watch.path / "sub" / "a.png" and ref.rel == "ds/sub/a.png"
    os.symlink(watch.path / "sub" / "a.png", watch.path / "inside.png")
    assert resolve_image([watch], "ds/inside.png").path == watch.path / "inside.png"
    make_image(tmp_path / "out.png")
    os.symlink(tmp_path / "out.png", watch.path / "escape.png")
    with pytest.raises(HTTPError) as exc:
        resolve_image([watch], "ds/escape.png")
    assert exc.value.status == 403


def _req(peer: PeerCredentials | None, auth: str = "peer") -> Request:
    return Request("POST", "/x", {}, {}, b"", peer, auth=auth)


def test_authoriser() -> None:
    a = Authoriser(admin_gid=4242, own_uid=1000)
    assert a.may_mutate(_req(PeerCredentials(os.getpid(), 0, 0)))
    assert a.may_mutate(_req(PeerCredentials(1, 1000, 1000)))
    assert a.may_mutate(_req(PeerCredentials(1, 2000, 4242)))  # primary group
    assert not a.may_mutate(_req(PeerCredentials(1, 2000, 2000)))
    assert not a.may_mutate(_req(None))
    assert a.may_mutate(_req(None, auth="token"))
    with pytest.raises(HTTPError) as exc:
        a.require_admin(_req(PeerCredentials(1, 2000, 2000)))
    assert exc.value.status == 403


def test_token_file_rules(tmp_path: Path) -> None:
    t = tmp_path / "tok"
    t.write_text("0123456789abcdefXYZ\n")
    os.chmod(t, 0o640)
    with pytest.raises(StartupError, match="0600"):
        load_token(t)
    os.chmod(t, 0o600)
    assert load_token(t) == b"0123456789abcdefXYZ"
    t.write_text("short")
    with pytest.raises(StartupError, match="16"):
        load_token(t)
    with pytest.raises(StartupError, match="does not exist"):
        load_token(tmp_path / "none")


def test_queue_options_cancel_restores_and_paused_roots(tmp_path: Path) -> None:
    q = JobQueue(Database(tmp_path / "q.db"))
    q.enqueue("/r/a.png", "g", 100)  # the scanner's job, pending
    before = q.get("/r/a.png", "g")
    job = q.enqueue("/r/a.png", "g", 200, options={"request": "x", "force": True})
    assert job.id == before.id and job.priority == 200 and job.options["force"] is True
    # a later scanner enqueue keeps the request's options
    q.enqueue_many([("/r/a.png", "g", 0)])
    assert q.get("/r/a.png", "g").options == {"request": "x", "force": True}
    assert q.cancel(job.id, before, {"request": "x", "force": True})
    after = q.get("/r/a.png", "g")
    assert (after.priority, after.options, after.state) == (100, None, "pending")
    # a request on a new image: cancel deletes the job
    j2 = q.enqueue("/r/b.png", "g", 200, options={"request": "y"})
    assert q.cancel(j2.id, None, {"request": "y"}) and q.get("/r/b.png", "g") is None
    # paused roots are not claimed; ack clears the options of the finished run
    q.enqueue("/other/c.png", "g", 50, options={"request": "z"})
    claimed = q.claim("g", 10, exclude_prefixes=["/r"])
    assert [j.path for j in claimed] == ["/other/c.png"]
    q.ack(claimed[0].id, "written", options=claimed[0].options)
    assert q.get("/other/c.png", "g").options is None
    # retry and purge
    q.fail(q.claim("g", 1)[0].id, "bad_image", "x", False)
    assert q.retry(prefix="/r") == 1 and q.get("/r/a.png", "g").state == "pending"
    assert q.purge(["done"]) == 1 and q.get("/other/c.png", "g") is None
