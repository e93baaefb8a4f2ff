"""The control API end to end: the real daemon as a subprocess, a real client over the
real Unix socket, the tiny WD-contract model (red image -> "red background")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.client import UnixHTTPConnection, request
from tests.daemonproc import DaemonProcess, image_bytes, make_image, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    r.mkdir()
    return r


@pytest.fixture
def daemon(tmp_path: Path, root: Path, wd_model_dir: Path):
    procs: list[DaemonProcess] = []

    def make(
        roots: list[Path] | None = None,
        model: Path | None = None,
        restart: DaemonProcess | None = None,
        **kw,
    ) -> DaemonProcess:
        if restart is not None:  # the same state directory: a restart
            restart.stop()
            procs.append(restart)
            return restart.start()
        run = tmp_path / f"run{len(procs)}"
        run.mkdir()
        kw.setdefault("sections", {})
        kw["sections"] = {"scan": {"on_start": True}} | kw["sections"]
        d = DaemonProcess(run, roots or [root], model or wd_model_dir, **kw)
        procs.append(d)
        return d

    yield make
    for d in procs:
        d.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, wd_model_dir: Path):
    """One daemon for the tests that only read or are refused (no state changes):
    a root with fine.png, and beside it a folder 'outside' that symlinks in the root
    point into (link.png is excluded: the scanner would follow it)."""
    base = tmp_path_factory.mktemp("shared")
    root, outside = base / "data", base / "outside"
    make_image(outside / "secret.png", "red")
    (outside / "secret.txt").write_text("untouched\n")
    make_image(root / "fine.png", "green")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    (base / "run").mkdir()
    d = DaemonProcess(
        base / "run",
        [root],
        wd_model_dir,
        watch={"exclude": ["link.png"]},
        sections={"scan": {"on_start": True}},
    ).start()
    wait_for(lambda: ready(d))
    yield d, root, outside
    d.stop()


def ready(d: DaemonProcess) -> bool:
    """Idle, and the tagger loaded (a request now is answered, not queued)."""
    return d.idle() and d.status()["generators"]["wd_tagger"]["state"] == "loaded"


def call(d: DaemonProcess, method: str, url: str, body: Any = None, timeout: float = 30):
    raw = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return request(d.socket, method, url, raw, timeout=timeout)


def stream(d: DaemonProcess, body: Any) -> Iterator[dict[str, Any]]:
    conn = UnixHTTPConnection(d.socket, timeout=30)
    conn.request(
        "POST",
        "/api/batch-generate-captions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Transfer-Encoding") == "chunked"
    try:
        for line in resp:
            line = line.strip()
            if line:
                assert line.startswith(b"data: "), line
                yield json.loads(line[6:])
    finally:
        conn.close()


# --------------------------------------------------------------------- captioning


def test_generate_caption_success_conflict_force_and_raw(daemon, root):
    d = daemon(watch={"trigger_word": "zzz"}).start()
    wait_for(lambda: ready(d))
    make_image(root / "sub" / "red.png", "red")
    code, body = call(d, "POST", "/api/generate-caption/data/sub/red.png")
    assert code == 200, body
    assert body["success"] is True
    assert body["generator"] == "wd_tagger" and body["caption_type"] == "tags"
    assert "red background" in body["caption"] and body["caption"].startswith("zzz, ")
    assert body["processing_time"] >= 0 and body["sidecar"] == "data/sub/red.txt"
    assert (root / "sub" / "red.txt").read_text() == body["caption"] + "\n"

    # existing caption, no force: caption_exists; the single-root shorthand works
    code, body = call(d, "POST", "/api/generate-caption/_/sub/red.png")
    assert (code, body["error_type"], body["retryable"]) == (409, "caption_exists", False)

    # force replaces even a person's caption; post_process=false gives the raw output
    (root / "sub" / "red.txt").write_text("a person's words\n")
    code, body = call(d, "POST", "/api/generate-caption/_/sub/red.png?force=true&post_process=0")
    assert code == 200, body
    assert "red background" in body["caption"] and "zzz" not in body["caption"]
    assert (root / "sub" / "red.txt").read_text() == body["caption"] + "\n"


def test_generate_caption_errors(daemon, root, tmp_path):
    make_image(root / "ok.png", "green")
    (root / "notes.txt").write_text("hello")
    (root / "broken.png").write_text("not an image at all\n")
    old = time.time() - 60
    os.utime(root / "broken.png", (old, old))
    d = daemon(watch={"exclude": ["broken.png"]}).start()
    wait_for(lambda: ready(d))
    cases = {
        "/api/generate-caption/nope/ok.png": (404, "not_found"),
        "/api/generate-caption/_/missing.png": (404, "not_found"),
        "/api/generate-caption/_/notes.txt": (422, "invalid"),
        "/api/generate-caption/_/ok.png?generator=nosuch": (404, "not_found"),
        "/api/generate-caption/_/ok.png?generator=vlm": (422, "model_unavailable"),
        "/api/generate-caption/_/ok.png?force=maybe": (422, "invalid"),
        "/api/generate-caption/data": (422, "invalid"),
    }
    for url, (status, etype) in cases.items():
        code, body = call(d, "POST", url)
        assert (code, body.get("error_type")) == (status, etype), (url, body)
        assert set(body) >= {"error", "error_type", "retryable"}
    # a file the watch excludes is refused; a bad image fails as bad_image
    code, body = call(d, "POST", "/api/generate-caption/_/broken.png")
    assert code == 422
    d.stop()
    d2 = daemon().start()
    wait_for(lambda: ready(d2))
    code, body = call(d2, "POST", "/api/generate-caption/_/broken.png?force=1")
    assert (code, body["error_type"], body["retryable"]) == (422, "bad_image", False), body
    assert not (root / "broken.txt").exists()


def test_queued_while_model_missing_then_completes_and_cancel(daemon, root, tmp_path, wd_model_dir):
    model = tmp_path / "late_model"  # appears later: the load fails and is retried
    make_image(root / "a.png", "red")
    make_image(root / "b.png", "blue")
    d = daemon(
        sections={"scan": {"on_start": False}, "worker": {"load_retry_seconds": 0.3}},
        model=model,
    ).start()
    wait_for(lambda: d.status()["generators"]["wd_tagger"]["state"] in ("failed", "waiting"))
    t0 = time.monotonic()
    code, queued = call(d, "POST", "/api/generate-caption/_/a.png")
    assert time.monotonic() - t0 < 5, "a request for a failed model must not block"
    assert code == 202, queued
    assert queued["queued"] is True and queued["message"] and queued["request_id"]
    rid = queued["request_id"]
    code, st = call(d, "GET", f"/api/caption-request-status/{rid}")
    assert code == 200 and st["state"] == "queued" and st["path"] == "data/a.png"

    code, other = call(d, "POST", "/api/generate-caption/_/b.png")
    assert code == 202
    code, qs = call(d, "GET", "/api/caption-request-queue-status")
    assert code == 200 and qs["counts"].get("queued") == 2
    code, cancelled = call(d, "DELETE", f"/api/caption-request/{other['request_id']}")
    assert code == 200 and cancelled["state"] == "cancelled"
    code, again = call(d, "DELETE", f"/api/caption-request/{other['request_id']}")
    assert code == 200 and again["state"] == "cancelled"  # idempotent
    assert call(d, "DELETE", "/api/caption-request/nope")[0] == 404

    shutil.copytree(wd_model_dir, model)
    wait_for(
        lambda: call(d, "GET", f"/api/caption-request-status/{rid}")[1]["state"] == "completed",
        timeout=30,
    )
    st = call(d, "GET", f"/api/caption-request-status/{rid}")[1]
    assert st["result"]["success"] is True and "red background" in st["result"]["caption"]
    assert (root / "a.txt").exists()
    # b's job was the cancelled request's own (no scan, no watcher event): it is gone,
    # so nothing is left that could caption b.png later
    wait_for(lambda: not d.totals().get("pending") and not d.totals().get("leased"))
    assert d.totals() == {"pending": 0, "leased": 0, "done": 1, "failed": 0, "dead": 0}
    assert not (root / "b.txt").exists(), "a cancelled request must not be captioned"
    assert call(d, "GET", "/api/caption-request-status/nope")[0] == 404


def test_batch_stream_order_counts_and_skip(daemon, root):
    d = daemon().start()
    wait_for(lambda: ready(d))
    for i, c in enumerate(["red", "green", "blue"]):
        make_image(root / f"b{i}.png", c)
    (root / "b3.png").write_bytes(image_bytes("red"))
    (root / "b3.txt").write_text("keep me\n")
    items = [
        "_/b0.png",
        {"path": "", "name": "b1.png"},
        {"path": "data", "name": "b2.png"},
        "_/b3.png",
        "_/../etc/passwd.png",
    ]
    events = list(stream(d, {"items": items, "generator": "wd_tagger"}))
    start = events[0]
    assert start.keys() == {"type", "total", "batch_id"}
    assert (start["type"], start["total"]) == ("start", 5)
    assert str(uuid.UUID(start["batch_id"])) == start["batch_id"]  # a UUID, as documented
    assert events[-1]["type"] == "complete"
    assert (
        events[-1]["processed"],
        events[-1]["successful"],
        events[-1]["failed"],
        events[-1]["skipped"],
    ) == (5, 3, 1, 1)
    done = [e for e in events if e["type"] == "item_complete"]
    assert sorted(e["index"] for e in done) == [0, 1, 2, 3, 4]
    by = {e["index"]: e["item_result"] for e in done}
    assert "red background" in by[0]["caption"] and "blue background" in by[2]["caption"]
    assert by[3]["skipped"] and by[3]["error_type"] == "caption_exists"
    assert by[4]["error_type"] == "forbidden" and by[4]["retryable"] is False
    assert (root / "b3.txt").read_text() == "keep me\n"
    # force replaces it
    events = list(stream(d, {"items": ["_/b3.png"], "config": {"force": True}}))
    assert events[-1]["successful"] == 1
    assert events[0]["batch_id"] != start["batch_id"]  # one id per batch
    assert "red background" in (root / "b3.txt").read_text()
    # malformed bodies: 4xx before any streaming
    assert call(d, "POST", "/api/batch-generate-captions", b"{not json")[0] == 400
    assert call(d, "POST", "/api/batch-generate-captions", {"items": "x"})[0] == 422
    assert (
        call(d, "POST", "/api/batch-generate-captions", {"items": [], "config": {"force": "yes"}})[
            0
        ]
        == 422
    )


def test_batch_client_disconnect_cancels_what_has_not_started(daemon, root):
    d = daemon().start()
    wait_for(lambda: ready(d))
    assert call(d, "POST", "/api/queue/pause", {})[0] == 200
    for i in range(6):
        make_image(root / f"c{i}.png", "green")
    conn = UnixHTTPConnection(d.socket, timeout=10)
    conn.request(
        "POST",
        "/api/batch-generate-captions",
        body=json.dumps({"items": [f"_/c{i}.png" for i in range(6)]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert json.loads(resp.readline()[6:])["type"] == "start"
    wait_for(
        lambda: call(d, "GET", "/api/caption-request-queue-status")[1]["counts"].get("queued") == 6
    )
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(
        lambda: (
            call(d, "GET", "/api/caption-request-queue-status")[1]["counts"].get("cancelled") == 6
        ),
        timeout=10,
    )
    assert d.events("batch_cancelled")[0]["cancelled"] == 6
    # the watcher's own jobs for the new files were pending before the batch: they stay
    # (paused until now) and caption the images once the queue is resumed
    assert d.totals()["pending"] == 6
    assert not list(root.glob("c*.txt"))
    assert call(d, "POST", "/api/queue/resume", {})[0] == 200
    wait_for(lambda: len(list(root.glob("c*.txt"))) == 6)
    wait_for(d.idle)
    assert d.status()["queue"]["outcomes"]["wd_tagger"] == {"written": 6}


# ------------------------------------------------------------------ caption files


def test_put_and_delete_caption_is_a_persons_caption(daemon, root):
    make_image(root / "p.png", "red")
    d = daemon().start()
    wait_for(lambda: (root / "p.txt").exists())
    wait_for(lambda: ready(d))
    code, body = call(d, "PUT", "/api/caption/_/p.png", {"type": "txt", "caption": "my words"})
    assert code == 200 and body["sidecar"] == "data/p.txt"
    assert (root / "p.txt").read_text() == "my words\n"
    # the image changes: captiond must leave the person's caption alone
    (root / "p.png").write_bytes(image_bytes("blue"))
    wait_for(
        lambda: d.status()["queue"]["outcomes"].get("wd_tagger", {}).get("caption_edited") == 1
    )
    assert (root / "p.txt").read_text() == "my words\n"
    # an unknown type, wrong types, malformed JSON: 4xx
    assert call(d, "PUT", "/api/caption/_/p.png", {"type": "zzz", "caption": "x"})[0] == 422
    assert call(d, "PUT", "/api/caption/_/p.png", {"type": "txt", "caption": 5})[0] == 422
    assert call(d, "PUT", "/api/caption/_/p.png", {"type": "txt"})[0] == 422
    assert call(d, "PUT", "/api/caption/_/p.png", b"[1,")[0] == 400
    assert call(d, "PUT", "/api/caption/_/p.png", b'"a string"')[0] == 422
    # another recognised type goes beside it; delete removes it
    code, body = call(d, "PUT", "/api/caption/_/p.png", {"type": "caption", "caption": "prose"})
    assert code == 200 and (root / "p.caption").read_text() == "prose\n"
    assert call(d, "DELETE", "/api/caption/_/p.png")[0] == 422  # caption_type required
    code, body = call(d, "DELETE", "/api/caption/_/p.png?caption_type=caption")
    assert code == 200 and not (root / "p.caption").exists()
    assert call(d, "DELETE", "/api/caption/_/p.png?caption_type=caption")[0] == 404
    assert (root / "p.txt").exists()


@pytest.mark.xdist_group("api_shared_daemon")  # one daemon for these (--dist loadgroup)
def test_path_escapes_are_refused_and_nothing_outside_is_touched(shared):
    d, root, outside = shared
    before = sorted(p.name for p in outside.iterdir())
    attacks = [
        "_/../outside/secret.png",
        "_/%2e%2e/outside/secret.png",
        "_/%2E%2E%2Foutside%2Fsecret.png",
        "data/./fine.png",
        "data//fine.png",
        "%2F" + str(outside / "secret.png").lstrip("/").replace("/", "%2F"),
        "/" + str(outside / "secret.png"),
        "_/fine.png%00.png",
        "_/linkdir/secret.png",
        "_/link.png",
    ]
    for a in attacks:
        for method, url, body in [
            ("POST", f"/api/generate-caption/{a}?force=true", None),
            ("PUT", f"/api/caption/{a}", {"type": "txt", "caption": "pwned"}),
            ("DELETE", f"/api/caption/{a}?caption_type=txt", None),
        ]:
            code, resp = call(d, method, url, body)
            assert code in (403, 404, 422), (method, url, code, resp)
            assert set(resp) >= {"error", "error_type", "retryable"}
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret.txt").read_text() == "untouched\n"
    assert not (root / "link.txt").exists()
    assert not list(outside.parent.glob("*.txt"))


# ----------------------------------------------------------------------- settings


def test_generators_and_captioner_config(daemon, root):
    make_image(root / "g.png", "red")
    d = daemon().start()
    wait_for(lambda: ready(d))
    code, body = call(d, "GET", "/api/generators")
    gens = {g["name"]: g for g in body["generators"]}
    wd = gens["wd_tagger"]
    assert wd["available"] and wd["loaded"] and wd["in_use"] and wd["weight"] == "light"
    assert wd["caption_type"] == "tags" and wd["version"] and wd["description"]
    assert "general_threshold" in wd["config_schema"]["properties"]
    assert wd["config"]["general_threshold"] == 0.35
    assert "vlm" in gens and gens["vlm"]["in_use"] is False

    code, body = call(d, "PUT", "/api/captioner-config/wd_tagger", {"general_threshold": "x"})
    assert code == 422 and body["details"][0]["loc"] == ["general_threshold"]
    code, body = call(d, "PUT", "/api/captioner-config/wd_tagger", {"no_such_key": 1})
    assert code == 422
    assert call(d, "PUT", "/api/captioner-config/nosuch", {})[0] == 404
    assert call(d, "PUT", "/api/captioner-config/wd_tagger", b"[]")[0] == 422
    code, body = call(
        d, "PUT", "/api/captioner-config/wd_tagger", {"undesired_tags": ["red_background"]}
    )
    assert code == 200 and body["applied"] is True
    code, body = call(d, "POST", "/api/generate-caption/_/g.png?force=true")
    assert code == 200 and "red background" not in body["caption"], body
    # persisted: a restart keeps it
    d2 = daemon(restart=d)
    code, body = call(d2, "GET", "/api/generators")
    wd = {g["name"]: g for g in body["generators"]}["wd_tagger"]
    assert wd["config"]["undesired_tags"] == ["red_background"]


def test_caption_types_and_post_processing_persist(daemon, root):
    make_image(root / "q.png", "red")
    d = daemon(watch={"trigger_word": "zzz"}).start()
    wait_for(lambda: ready(d))
    code, body = call(d, "GET", "/api/caption-types")
    assert code == 200 and {"txt", "tags", "caption"} <= set(body["types"])
    assert "txt" in body["required"]
    code, body = call(d, "POST", "/api/caption-types", {"types": ["caption", "joy"]})
    assert code == 200 and "joy" in body["types"] and "florence" not in body["types"]
    assert call(d, "POST", "/api/caption-types", {"types": ["png"]})[0] == 422
    assert call(d, "POST", "/api/caption-types", {"types": ["../x"]})[0] == 422
    assert call(d, "POST", "/api/caption-types", {"types": "joy"})[0] == 422
    assert call(d, "PUT", "/api/caption/_/q.png", {"type": "joy", "caption": "hi"})[0] == 200

    code, pp = call(d, "GET", "/api/caption-post-processing")
    assert code == 200 and pp["steps"][0] == "replace_underscores"
    assert "dedupe_tags" in pp["available_steps"]
    code, body = call(d, "PUT", "/api/caption-post-processing", {"steps": ["no_such_step"]})
    assert code == 422
    code, body = call(
        d, "PUT", "/api/caption-post-processing", {"overrides": {"wd_tagger": ["trim"]}}
    )
    assert code == 200 and body["overrides"] == {"wd_tagger": ["trim"]}
    code, body = call(d, "POST", "/api/generate-caption/_/q.png?force=1")
    assert code == 200 and "red background" in body["caption"]
    assert "zzz" not in body["caption"]  # the override has no trigger_word step
    d2 = daemon(restart=d)
    assert "joy" in call(d2, "GET", "/api/caption-types")[1]["types"]
    assert call(d2, "GET", "/api/caption-post-processing")[1]["overrides"] == {
        "wd_tagger": ["trim"]
    }


def test_post_processing_in_reynards_shape(daemon, root):
    """A Reynard frontend drives the chain in its own document's shape (seeds/001):
    read it, switch rules and per-generator overrides, and get its shape back."""
    make_image(root / "q.png", "red")
    d = daemon(watch={"trigger_word": "zzz"}).start()
    wait_for(lambda: ready(d))
    code, doc = call(d, "GET", "/api/caption-post-processing?shape=reynard")
    assert code == 200 and doc["enabled"] is True
    assert doc["rules"]["replace_underscores"] is True and doc["rules"]["case_conversion"] == "none"
    assert doc["pipeline"][0] == "replace_underscores"
    code, body = call(
        d,
        "PUT",
        "/api/caption-post-processing",
        {
            "rules": {"trigger_word": False, "dedupe_tags": True},
            "overrides": {"other_gen": {"trigger_word": True}},
        },
    )
    assert code == 200, body
    assert body["rules"]["trigger_word"] is False  # answered in the shape sent
    assert body["overrides"]["other_gen"]["trigger_word"] is True
    code, body = call(d, "POST", "/api/generate-caption/_/q.png?force=1")
    assert code == 200 and "red background" in body["caption"] and "zzz" not in body["caption"]
    # the same settings in captiond's shape
    pp = call(d, "GET", "/api/caption-post-processing")[1]
    assert "trigger_word" not in pp["steps"] and "dedupe_tags" in pp["steps"]
    assert "trigger_word" in pp["overrides"]["other_gen"]
    # a rule switched on for one generator only: wd_tagger's own override
    code, body = call(
        d,
        "PUT",
        "/api/caption-post-processing",
        {"overrides": {"wd_tagger": {"trigger_word": True}}},
    )
    assert code == 200 and set(body["overrides"]) == {"wd_tagger"}
    code, body = call(d, "POST", "/api/generate-caption/_/q.png?force=1")
    assert code == 200 and body["caption"].startswith("zzz"), body
    # refused: a mix of the shapes, a case Reynard has but captiond has not, unknown rules
    for bad in (
        {"rules": {"trim_whitespace": True}, "steps": ["trim"]},
        {"rules": {"case_conversion": "upper"}},
        {"rules": {"no_such_rule": True}},
        {"enabled": "yes"},
    ):
        code, body = call(d, "PUT", "/api/caption-post-processing", bad)
        assert code == 422, (bad, body)
    assert call(d, "GET", "/api/caption-post-processing?shape=xml")[0] == 422
    # off, then on again: enabled false empties every chain
    code, body = call(d, "PUT", "/api/caption-post-processing", {"enabled": False})
    assert code == 200 and call(d, "GET", "/api/caption-post-processing")[1]["steps"] == []
    d2 = daemon(restart=d)  # persisted like any change through the API
    assert call(d2, "GET", "/api/caption-post-processing")[1]["steps"] == []


# -------------------------------------------------------------------- queue control


def test_pause_resume_root_retry_purge_rescan(daemon, tmp_path):
    r1, r2 = tmp_path / "one", tmp_path / "two"
    r1.mkdir()
    r2.mkdir()
    d = daemon(roots=[r1, r2]).start()
    wait_for(lambda: ready(d))
    code, st = call(d, "POST", "/api/queue/pause", {"root": "one"})
    assert code == 200 and st["paused_roots"] == ["one"] and st["paused"] is False
    assert call(d, "POST", "/api/queue/pause", {"root": "nope"})[0] == 404
    make_image(r1 / "x.png", "red")
    make_image(r2 / "y.png", "blue")
    wait_for(lambda: (r2 / "y.txt").exists())
    wait_for(lambda: call(d, "GET", "/api/queue")[1]["by_root"]["one"].get("pending") == 1)
    d.wait_worker_turns(2)  # two whole worker turns passed x.png over
    assert call(d, "GET", "/api/queue")[1]["by_root"]["one"] == {"pending": 1}
    assert not (r1 / "x.txt").exists()
    # the single-root shorthand is refused with two roots
    assert call(d, "POST", "/api/generate-caption/_/x.png")[0] == 404
    code, queued = call(d, "POST", "/api/generate-caption/one/x.png")
    assert code == 202 and queued["error_type"] == "paused"
    assert call(d, "POST", "/api/queue/resume", {"root": "one"})[0] == 200
    wait_for(lambda: (r1 / "x.txt").exists())

    # a bad image fails; fixed, retry runs it again
    bad = r2 / "bad.png"
    bad.write_text("nope")
    old = time.time() - 60
    os.utime(bad, (old, old))
    wait_for(lambda: d.totals().get("failed", 0) == 1)
    bad.write_bytes(image_bytes("green"))
    os.utime(bad, (old, old))  # same mtime and size class: let retry find it
    code, body = call(d, "POST", "/api/queue/retry", {"root": "two"})
    assert code == 200 and body["count"] == 1
    wait_for(lambda: (r2 / "bad.txt").exists())
    wait_for(lambda: ready(d))
    code, body = call(d, "POST", "/api/queue/purge", {"states": ["done"], "root": "one"})
    assert code == 200 and body["count"] >= 1
    assert call(d, "GET", "/api/queue")[1]["by_root"]["one"] == {}
    assert call(d, "POST", "/api/queue/purge", {"states": ["leased"]})[0] == 422

    # rescan with recaption: captiond's own unedited sidecars are redone, edits kept
    (r2 / "y.txt").write_text("edited by hand\n")
    code, body = call(d, "PUT", "/api/captioner-config/wd_tagger", {"max_tags": 1})
    assert code == 200
    code, body = call(d, "POST", "/api/queue/rescan", {"root": "two", "recaption": True})
    assert code == 200 and body["recaption_enqueued"] == 1  # bad.png only
    wait_for(lambda: (r2 / "bad.txt").read_text().count(",") == 0)
    assert (r2 / "y.txt").read_text() == "edited by hand\n"


@pytest.mark.xdist_group("api_shared_daemon")  # one daemon for these (--dist loadgroup)
def test_limits_and_malformed_requests(shared):
    d, _, _ = shared
    big = b'{"types": ["' + b"a" * (2 * 1024 * 1024) + b'"]}'
    assert call(d, "POST", "/api/caption-types", big)[0] == 413
    assert call(d, "POST", "/api/queue/pause", b"\xff\xfe")[0] == 400
    assert call(d, "POST", "/api/queue/pause", {"root": 5})[0] == 422
    assert call(d, "POST", "/api/queue/pause", {"extra": 1})[0] == 422
    assert call(d, "GET", "/api/generate-caption/_/x.png")[0] == 405
    assert d.healthy()
    assert call(d, "GET", "/api/queue")[1]["paused"] is False  # nothing was changed
    assert "a" * 100 not in json.dumps(call(d, "GET", "/api/caption-types")[1])


# ------------------------------------------------------------------ peer credentials

CLIENT = r"""
import json, os, socket, sys, http.client
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
groups = [int(g) for g in sys.argv[2].split(",") if g]
os.setgroups(groups); os.setgid(65534); os.setuid(65534)
out = []
for method, url, body in json.loads(sys.argv[3]):
    c = C("localhost", timeout=30)
    c.request(method, url, body=None if body is None else json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse(); out.append([r.status, json.loads(r.read() or b"{}")]); c.close()
print(json.dumps(out))
"""


def as_nobody(d: DaemonProcess, calls: list, groups: list[int]) -> list:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            str(d.socket),
            ",".join(map(str, groups)),
            json.dumps(calls),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, (
        f"the client as nobody failed:\n{out.stderr[-2000:]}\ndaemon log:\n{d.logs()[-6000:]}"
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_other_users_may_read_but_not_mutate(daemon, root):
    make_image(root / "n.png", "red")
    sockdir = Path(tempfile.mkdtemp(prefix="cdp-", dir="/tmp"))
    os.chmod(sockdir, 0o755)
    try:
        d = daemon(
            top={"socket_path": str(sockdir / "s.sock"), "socket_mode": 0o666},
            sections={"api": {"admin_group": "users"}},
        )
        d.socket = sockdir / "s.sock"
        d.start()
        wait_for(lambda: ready(d))
        calls = [
            ["GET", "/status", None],
            ["GET", "/api/generators", None],
            ["POST", "/api/generate-caption/_/n.png?force=true", None],
            ["PUT", "/api/caption/_/n.png", {"type": "txt", "caption": "x"}],
            ["POST", "/api/queue/pause", {}],
            ["DELETE", "/api/caption/_/n.png?caption_type=txt", None],
        ]
        res = as_nobody(d, calls, [])
        assert [r[0] for r in res] == [200, 200, 403, 403, 403, 403], res
        assert res[2][1]["error_type"] == "forbidden"
        assert (root / "n.txt").exists() and "red" in (root / "n.txt").read_text()
        assert call(d, "GET", "/api/queue")[1]["paused"] is False
        # a member of the admin group (supplementary group 100) may
        res = as_nobody(
            d, [["POST", "/api/queue/pause", {}], ["POST", "/api/queue/resume", {}]], [100]
        )
        assert [r[0] for r in res] == [200, 200], res
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# ---------------------------------------------------------------------- TCP listener


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_listener_needs_a_private_token_file(daemon, root, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    os.chmod(token, 0o644)
    port = free_port()
    api = {"api.tcp": {"enabled": True, "port": port, "token_file": str(token)}}
    d = daemon(sections=api)
    d.start(wait=False)
    assert d.proc.wait(30) == 1
    assert "must be 0600" in d.logs()
    os.chmod(token, 0o600)
    d = daemon(sections=api).start()
    import http.client

    def get(headers: dict) -> int:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/api/queue", headers=headers)
        r = c.getresponse()
        r.read()
        return r.status

    assert get({}) == 401
    assert get({"Authorization": "Bearer wrong"}) == 401
    assert get({"Authorization": "Bearer s3cret-token-0123456789"}) == 200
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(
        "POST",
        "/api/queue/pause",
        body=b"{}",
        headers={"Authorization": "Bearer s3cret-token-0123456789"},
    )
    assert c.getresponse().status == 200  # the token grants mutation


@pytest.mark.xdist_group("api_shared_daemon")  # one daemon for these (--dist loadgroup)
def test_openapi_describes_every_route(shared):
    d, _, _ = shared
    code, spec = call(d, "GET", "/openapi.json")
    assert code == 200 and spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for p in [
        "/api/generate-caption/{path}",
        "/api/batch-generate-captions",
        "/api/caption/{path}",
        "/api/caption-types",
        "/api/captioner-config/{name}",
        "/api/caption-post-processing",
        "/api/caption-request-status/{request_id}",
        "/api/caption-request-queue-status",
        "/api/caption-request/{request_id}",
        "/api/queue/pause",
        "/api/queue/retry",
        "/api/generators",
        "/health",
    ]:
        assert p in paths, p
    assert set(paths["/api/caption/{path}"]) == {"put", "delete"}
    for item in paths.values():
        for op in item.values():
            assert "default" in op["responses"]  # errors: {error, error_type, retryable}
            for ref in json.dumps(op).split('"$ref": "#/components/schemas/')[1:]:
                assert ref.split('"')[0] in spec["components"]["schemas"]


def test_same_image_twice_in_a_batch_and_in_two_requests(daemon, root):
    d = daemon().start()
    wait_for(lambda: ready(d))
    make_image(root / "dup.png", "red")
    wait_for(lambda: (root / "dup.txt").exists())
    wait_for(lambda: ready(d))
    events = list(stream(d, {"items": ["_/dup.png", "data/dup.png"], "config": {"force": True}}))
    end = events[-1]
    assert end["type"] == "complete", events  # used to wait forever
    assert (end["processed"], end["successful"], end["skipped"], end["failed"]) == (2, 1, 1, 0)
    dup = [e["item_result"] for e in events if e["type"] == "item_complete" and e["index"] == 1]
    assert dup[0]["error_type"] == "duplicate" and dup[0]["duplicate_of"] == 0
    # two requests for one image while paused: both finish once it runs
    assert call(d, "POST", "/api/queue/pause", {})[0] == 200
    url = "/api/generate-caption/_/dup.png?force=1"
    ids = [call(d, "POST", url)[1]["request_id"] for _ in "ab"]
    assert call(d, "POST", "/api/queue/resume", {})[0] == 200
    for rid in ids:
        wait_for(
            lambda rid=rid: (
                call(d, "GET", f"/api/caption-request-status/{rid}")[1]["state"] == "completed"
            ),
            timeout=20,
        )


def test_settings_from_the_api_are_validated_as_the_file_is_and_only_changes_persist(daemon, root):
    """Absurd settings are refused before anything is saved; what is saved is only what
    the API changed (config.toml keeps deciding the rest); overrides are listed and can
    be dropped again."""
    d = daemon(sections={"generators.wd_tagger": {"intra_op_threads": 2}}).start()
    wait_for(lambda: ready(d))
    settings_file = d.state_dir / "runtime-settings.json"
    for body in (
        {"providers": ["evil"]},
        {"max_tags": int("9" * 4000)},
        {"general_threshold": 7},
    ):
        code, answer = call(d, "PUT", "/api/captioner-config/wd_tagger", body)
        assert code in (400, 422), (body, code, answer)
        assert not settings_file.exists()
    assert call(d, "POST", "/api/models/wd_tagger/load", {"keep_alive": -5})[0] == 422
    assert call(d, "POST", "/api/models/wd_tagger/load", {"keep_alive": 1e30})[0] == 422
    code, _ = call(d, "PUT", "/api/captioner-config/wd_tagger", {"max_tags": 3})
    assert code == 200
    saved = json.loads(settings_file.read_text())
    assert saved["generators"] == {"wd_tagger": {"max_tags": 3}}  # not intra_op_threads
    gens = {g["name"]: g for g in call(d, "GET", "/api/generators")[1]["generators"]}
    assert gens["wd_tagger"]["overrides"] == ["max_tags"]
    assert gens["wd_tagger"]["config"]["intra_op_threads"] == 2
    status = d.status()
    assert status["overrides"] == {"generators.wd_tagger": ["max_tags"]}
    d2 = daemon(restart=d)
    started = d2.events("settings_overridden")
    assert started and started[-1]["keys"] == ["max_tags"]
    assert str(settings_file) == started[-1]["file"]
    code, body = call(d2, "DELETE", "/api/captioner-config/wd_tagger?key=max_tags")
    assert code == 200 and body["dropped"] == ["generators.wd_tagger.max_tags"]
    gens = {g["name"]: g for g in call(d2, "GET", "/api/generators")[1]["generators"]}
    assert gens["wd_tagger"]["config"]["max_tags"] == 0 and gens["wd_tagger"]["overrides"] == []
    assert call(d2, "DELETE", "/api/captioner-config/wd_tagger?key=max_tags")[0] == 404


def test_a_purge_never_makes_an_image_invisible(daemon, root):
    """Purged pending jobs come back with the next scan; an empty purge is refused."""
    d = daemon().start()
    wait_for(lambda: ready(d))
    assert call(d, "POST", "/api/queue/pause", {})[0] == 200
    make_image(root / "p.png", "red")
    wait_for(lambda: d.totals().get("pending", 0) == 1)
    code, body = call(d, "POST", "/api/queue/purge", {})
    assert code == 422 and "states" in json.dumps(body)
    assert d.totals().get("pending", 0) == 1
    code, body = call(d, "POST", "/api/queue/purge", {"states": ["pending"]})
    assert code == 200 and body["count"] == 1
    assert call(d, "POST", "/api/queue/resume", {})[0] == 200
    assert call(d, "POST", "/api/queue/rescan", {})[0] == 200
    wait_for(lambda: (root / "p.txt").exists())
    assert "red background" in (root / "p.txt").read_text()
