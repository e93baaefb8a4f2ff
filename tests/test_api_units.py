"""In-process pieces of the control API: path confinement, peer authorisation, token
files, per-job options in the queue (cancel restores, claim skips paused roots)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.api.http import PeerCredentials, Request
from daemon.api.problems import Problem
from daemon.api.security import Authoriser, StartupError, load_token, resolve_image
from daemon.config import WatchConfig
from daemon.confined import ConfinementError, Root
from daemon.queue import Database, JobQueue
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
    with pytest.raises(Problem) as exc:
        resolve_image([watch], rel)
    assert exc.value.status == status


def test_resolve_accepts_and_follows_links_only_inside(watch: WatchConfig, tmp_path: Path) -> None:
    ref = resolve_image([watch], "_/sub/a.png")
    assert ref.path == watch.path / "sub" / "a.png" and ref.rel == "ds/sub/a.png"
    os.symlink(watch.path / "sub" / "a.png", watch.path / "inside.png")
    assert resolve_image([watch], "ds/inside.png").path == watch.path / "inside.png"
    make_image(tmp_path / "out.png")
    os.symlink(tmp_path / "out.png", watch.path / "escape.png")
    with pytest.raises(Problem) as exc:
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
    with pytest.raises(Problem) as exc:
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
    # a token file is read whole or refused: never a silently cut token
    t.write_text("x" * 4095 + "\n")
    assert load_token(t) == b"x" * 4095
    t.write_text("x" * 4097)
    with pytest.raises(StartupError, match="over 4096 bytes"):
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
    assert q.get("/r/a.png", "g").options == {"request": "x", "force": True, "requeued": True}
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
    assert len(q.purge(["done"])) == 1 and q.get("/other/c.png", "g") is None


def test_cancel_after_a_rescan_requeued_the_job_keeps_it_pending(tmp_path: Path) -> None:
    """The scanner re-queued the job (the image changed) while the request waited:
    cancelling must not put back the old ``done`` state (the change would be lost)."""
    now = [1000.0]
    q = JobQueue(Database(tmp_path / "q.db"), clock=lambda: now[0])
    q.enqueue("/r/a.png", "g", 100)
    j = q.claim("g", 1)[0]
    q.ack(j.id, "written")
    done = q.get("/r/a.png", "g")
    assert done.state == "done"
    opts = {"request": "x", "force": False}
    now[0] += 1
    q.enqueue("/r/a.png", "g", 200, options=opts)
    now[0] += 1
    q.enqueue_many([("/r/a.png", "g", 100)])  # the scanner: the image changed
    assert q.cancel(j.id, done, opts)
    after = q.get("/r/a.png", "g")
    assert (after.state, after.options) == ("pending", None)
    # the same for a request on a new image: the scanner's job stays
    q.enqueue("/r/b.png", "g", 200, options={"request": "y"})
    q.enqueue_many([("/r/b.png", "g", 100)])
    assert q.cancel(q.get("/r/b.png", "g").id, None, {"request": "y"})
    assert q.get("/r/b.png", "g").state == "pending"
    # not re-queued: the done state comes back (nothing to caption)
    q.enqueue("/r/c.png", "h", 100)
    q.ack(q.claim("h", 1)[0].id, "written")
    before = q.get("/r/c.png", "h")
    q.enqueue("/r/c.png", "h", 200, options={"request": "z"})
    assert q.cancel(before.id, before, {"request": "z"})
    assert q.get("/r/c.png", "h").state == "done"


# ----------------------------------------------------------- request registry


def _registry(tmp_path: Path, **kw):
    from daemon.api.requests import RequestRegistry

    q = JobQueue(Database(tmp_path / "r.db"))
    return q, RequestRegistry(q, **kw)


def _create(reg, path: str = "/r/a.png"):
    return reg.create(
        path=path,
        rel="ds/" + path.rsplit("/", 1)[-1],
        generator="g",
        caption_type="tags",
        priority=200,
        force=False,
        post_process=True,
    )


def _done(job):
    from daemon.worker import JobResult

    return JobResult(job.id, job.path, "g", job.options, "done", outcome="written", caption="x")


def test_two_requests_for_one_image_both_finish(tmp_path: Path) -> None:
    q, reg = _registry(tmp_path)
    first, second = _create(reg), _create(reg)
    assert first.job_id == second.job_id
    job = q.claim("g", 1)[0]
    assert job.options["request"] == second.id  # the second replaced the first's options
    assert reg.get(first.id).state == "processing"  # follows the second
    reg.on_result(_done(job))
    assert first.state == second.state == "completed"
    assert reg.wait(first, 0.1) and first.result["request_id"] == first.id


def test_a_request_whose_job_vanished_fails_instead_of_waiting_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import daemon.api.requests as requests_module

    monkeypatch.setattr(requests_module, "GONE_GRACE_SECONDS", 0.0)
    q, reg = _registry(tmp_path)
    req = _create(reg)
    assert len(q.purge(["pending"])) == 1
    assert reg.get(req.id).state == "failed" and req.result["error_type"] == "job_gone"
    # the job finished without it (its options replaced by an unknown run): failed too
    other = _create(reg, "/r/b.png")
    q.ack(q.claim("g", 1)[0].id, "written", options=None)
    assert reg.wait_any([other], 0.05) == [other] and other.state == "failed"
    # a follower can be cancelled on its own; the job stays for the later request
    a, b = _create(reg, "/r/c.png"), _create(reg, "/r/c.png")
    assert reg.cancel(a) == "cancelled" and b.state == "queued"
    assert q.get("/r/c.png", "g").options["request"] == b.id


def test_registry_prune_is_cheap_and_bounded(tmp_path: Path) -> None:
    q, reg = _registry(tmp_path, max_finished=100)
    reqs = [_create(reg, f"/r/{i}.png") for i in range(300)]
    for job in q.claim("g", 300):
        reg.on_result(_done(job))
    assert all(r.state == "completed" for r in reqs)
    assert len(reg._requests) == 100 and len(reg._finished) == 100
    assert [r.id for r in reg.all()] == [r.id for r in reqs[-100:]]
    calls = []
    orig = q.get_many
    monkey = lambda ids: calls.append(1) or orig(ids)  # noqa: E731
    q.get_many = monkey  # type: ignore[method-assign]
    more = [_create(reg, f"/r/m{i}.png") for i in range(50)]
    calls.clear()
    assert len(reg.all()) == 150 and len(calls) == 1  # one query, not one per request
    assert all(r.state == "queued" for r in more)


# ------------------------------------------------------- control, in process


@pytest.fixture
def control(tmp_path: Path, wd_model_dir: Path):
    import daemon.app as app_module
    from daemon.config import Settings

    root = tmp_path / "pics"
    make_image(root / "a.png")
    settings = Settings(
        state_dir=tmp_path / "state",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, name="ds", sidecar_extension="txt")],
        generators={
            "wd_tagger": {"model": str(wd_model_dir)},
            "multi_person": {"mode": "lora_tags"},
        },
        worker={"preload": ["wd_tagger", "multi_person"]},  # in use, never started here
    )
    d = app_module.Daemon(settings)
    try:
        yield d.control
    finally:
        d.worker.stop(1)
        d.db.close()


def test_code_bearing_settings_are_config_file_only(control) -> None:

    for name, body in [
        ("wd_tagger", {"model": "/tmp/evil"}),
        ("wd_tagger", {"revision": "main"}),
        ("vlm", {"trust_remote_code": True}),
        ("multi_person", {"detector_model": "/tmp/evil.pt"}),
        ("multi_person", {"tagger": {"model": "/tmp/evil"}}),
        ("multi_person", {"describer": {"trust_remote_code": True}}),
        ("wd_tagger", {"use": "vlm"}),
    ]:
        with pytest.raises(Problem) as exc:
            control.set_generator_config(name, body)
        key = next(iter(body))
        assert exc.value.status == 403, (name, body)
        assert key in exc.value.message and "config.toml" in exc.value.message
    # the same value as now is no change; other settings still may be changed
    model = control.settings.generators["wd_tagger"]["model"]
    out = control.set_generator_config("wd_tagger", {"model": model, "max_tags": 3})
    assert out["config"]["max_tags"] == 3
    assert "model" not in control.overrides.generators["wd_tagger"]  # config.toml decides


def test_switching_multi_person_mode_at_runtime_rebuilds_the_generator(control) -> None:
    """The seed's users toggle lora_tags / fine_tune_caption: the generator is rebuilt
    with its new caption type and weight (heavy, in a child process), unloaded, and the
    change is persisted; switching back works the same way."""
    before = control.models.get("multi_person")
    assert (before.generator.caption_type, before.weight.value) == ("tags", "light")
    out = control.set_generator_config("multi_person", {"mode": "fine_tune_caption"})
    assert out["applied"] and out["config"]["mode"] == "fine_tune_caption"
    after = control.models.get("multi_person")
    assert after is not before and after.state.value == "unloaded"
    assert (after.generator.caption_type, after.weight.value) == ("caption", "heavy")
    assert after.isolated
    assert control.worker.pipelines["multi_person"].generator.caption_type == "caption"
    assert control.overrides.generators["multi_person"] == {"mode": "fine_tune_caption"}
    control.set_generator_config("multi_person", {"mode": "lora_tags"})
    assert control.models.get("multi_person").generator.caption_type == "tags"


def test_api_caption_writes_run_on_the_writer_thread(control, monkeypatch) -> None:
    import threading

    from daemon.api.security import resolve_image

    seen = []
    real = control.index.record_captions

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(control.index, "record_captions", spy)
    ref = resolve_image(control.watches, "ds/a.png")
    assert control.write_caption(ref, "txt", "mine")["success"]
    assert seen and all(n.startswith("captiond-write") for n in seen), seen
    import os as _os

    deleted = []
    real_unlink = _os.unlink

    def unlink_spy(p, *a, **kw):
        deleted.append(threading.current_thread().name)
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr("daemon.confined.os.unlink", unlink_spy)
    assert control.delete_caption(ref, "txt")["success"]
    assert deleted and deleted[0].startswith("captiond-write")


def test_a_folder_removed_or_swapped_after_the_check_is_404_or_403(control, tmp_path) -> None:
    """The path was checked, then the disk changed before the read or write: the API
    answers 404 (gone) or 403 (now a link out), never a 500."""
    import shutil

    root = control.watches[0].path
    make_image(root / "sub" / "b.png")
    ref = resolve_image(control.watches, "ds/sub/b.png")
    shutil.rmtree(root / "sub")
    for call in (
        lambda: control.write_caption(ref, "txt", "mine"),
        lambda: control.delete_caption(ref, "txt"),
        lambda: control.sidecars(ref),
    ):
        with pytest.raises(Problem) as exc:
            call()
        assert exc.value.status == 404 and "removed" in exc.value.message
    outside = tmp_path / "outside"
    make_image(outside / "b.png")
    os.symlink(outside, root / "sub")  # the folder is now a link out of the root
    for call in (
        lambda: control.write_caption(ref, "txt", "mine"),
        lambda: control.sidecars(ref),
    ):
        with pytest.raises(Problem) as exc:
            call()
        assert exc.value.status == 403
        assert str(outside) not in exc.value.message  # where the link points is not told
    assert not (outside / "b.txt").exists()


def test_connections_beyond_the_limit_get_503(tmp_path: Path) -> None:
    import http.client
    import json
    import socket

    from daemon.api.listeners import ControlServer
    from daemon.client import UnixHTTPConnection

    server = ControlServer(tmp_path / "c.sock", max_connections=4)
    server.add_route("GET", "/x", lambda req: {"ok": True})
    server.start()
    idle = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(server.path))
            idle.append(s)
        # each holds a thread (and a slot), waiting for a request line
        deadline = time.monotonic() + 10
        while server.connections()["socket"] < 4:
            assert time.monotonic() < deadline, "the idle connections were never accepted"
            time.sleep(0.01)
        # the fifth is answered 503 and closed as soon as it is accepted: read that
        # answer without sending first (a request sent after the close could meet
        # EPIPE before the client ever reads the 503; seen under load)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(5)
            extra.connect(str(server.path))
            r = http.client.HTTPResponse(extra)
            r.begin()
            body = json.loads(r.read())
        assert r.status == 503 and body["error_type"] == "unavailable" and body["retryable"]
        for s in idle:
            s.close()
        idle.clear()

        def ok() -> bool:
            c = UnixHTTPConnection(server.path, timeout=5)
            try:
                c.request("GET", "/x")
                return c.getresponse().status == 200
            except (OSError, http.client.HTTPException):
                return False
            finally:
                c.close()

        deadline = time.monotonic() + 5
        while not ok():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_later_request_keeps_an_earlier_force(tmp_path: Path) -> None:
    """Two requests for one pending image run as one job: an earlier force=true must
    not be lost to a later request without it."""
    q, reg = _registry(tmp_path)
    first = reg.create(
        path="/r/f.png", rel="ds/f.png", generator="g", caption_type="tags",
        priority=200, force=True, post_process=True,
    )  # fmt: skip
    second = _create(reg, "/r/f.png")
    assert first.job_id == second.job_id
    job = q.claim("g", 1)[0]
    assert job.options["request"] == second.id and job.options["force"] is True


# -- requests a browser sends on a page's behalf (daemon.api.browsers) -----------------

CHROME = "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0"


def browser_refusal(method: str = "POST", path: str = "/v1/x", **kw) -> tuple[int, str] | None:
    """(status, error type) of the refusal, or None when the request may go on."""
    from daemon.api.browsers import check_browser_request
    from daemon.api.http import HTTPError

    headers = kw.pop("headers")
    kw.setdefault("on_socket", True)
    try:
        check_browser_request(method, path, headers, **kw)
    except HTTPError as exc:
        return exc.status, exc.error_type
    return None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST:8765", True),
        (" app.localhost ", True),
        ("127.0.0.1", True),
        ("127.9.8.7:80", True),
        ("[::1]:8765", True),
        ("[::1]", True),
        ("::1", True),  # a bare IPv6 address: more than one colon, no port taken off
        ("localhost.evil.example", False),
        ("notlocalhost", False),
        ("128.0.0.1", False),
        ("[::2]:80", False),
        ("evil.example:8765", False),
        ("", False),
    ],
)
def test_loopback_host_names(host: str, loopback: bool) -> None:
    from daemon.api.browsers import is_loopback_host

    assert is_loopback_host(host) is loopback


def test_hosts_allowed_on_the_socket() -> None:
    from daemon.api.browsers import host_allowed

    assert host_allowed("", ())  # no Host at all: an HTTP/1.0 tool, never a browser
    assert host_allowed("localhost:1", ())
    assert host_allowed("NAS.lan", {"nas.lan"}) and host_allowed("nas.lan:8765", {"nas.lan"})
    assert host_allowed("nas.lan:8765", {"nas.lan:8765"})
    assert not host_allowed("nas.lan", {"nas.lan:8765"})
    assert not host_allowed("evil.example", {"nas.lan"})


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"User-Agent": CHROME, "Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_request_from_another_site_is_refused(headers: dict) -> None:
    assert browser_refusal("GET", headers={"Host": "localhost:8765"} | headers) == (403, "csrf")


def test_the_origin_must_be_the_host_it_was_sent_to() -> None:
    base = {"Host": "localhost:8765", "Sec-Fetch-Site": "same-origin"}
    for origin in ("null", "http://localhost:9999", "http://127.0.0.1:8765", "http://evil"):
        assert browser_refusal("GET", headers=base | {"Origin": origin}) == (403, "csrf"), origin
    assert browser_refusal("GET", headers=base | {"Origin": "http://LOCALHOST:8765"}) is None
    assert browser_refusal("GET", headers=base | {"Origin": "http://localhost:8765"}) is None
    # an Origin with no Host header to match: refused, as every other mismatch
    assert browser_refusal("GET", headers={"Origin": "http://localhost:8765"}) == (403, "csrf")


def test_programs_are_not_browsers() -> None:
    for headers in ({}, {"User-Agent": "curl/8.5"}, {"User-Agent": "captiond-cli"}):
        # no browser headers: whatever the host, method or body
        assert browser_refusal(headers=headers | {"Host": "evil.example"}, has_body=True) is None
    # a browser by its user agent alone
    assert browser_refusal(headers={"Host": "evil.example", "User-Agent": CHROME}) == (
        403,
        "forbidden",
    )


def test_a_rebound_dns_name_reaches_the_socket_only_when_allowed() -> None:
    hdr = {"User-Agent": CHROME, "Sec-Fetch-Site": "same-origin", "Host": "nas.lan:8765"}
    assert browser_refusal("GET", headers=hdr) == (403, "forbidden")
    assert browser_refusal("GET", headers=hdr, allowed_hosts={"nas.lan"}) is None
    assert browser_refusal("GET", headers=hdr, on_socket=False) is None  # TCP: the token
    hdr["Host"] = "localhost:8765"
    assert browser_refusal("GET", headers=hdr) is None
    assert browser_refusal("GET", headers=hdr | {"Sec-Fetch-Site": "none"}) is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_a_browsers_change_must_carry_json(method: str) -> None:
    hdr = {"User-Agent": CHROME, "Sec-Fetch-Site": "same-origin", "Host": "localhost"}
    assert browser_refusal(method, headers=hdr, has_body=True) == (415, "unsupported_media_type")
    assert browser_refusal(method, headers=hdr | {"Content-Type": "text/plain"}) == (
        415,
        "unsupported_media_type",
    )
    for ctype in ("application/json", "Application/JSON; charset=utf-8"):
        assert browser_refusal(method, headers=hdr | {"Content-Type": ctype}) is None
    assert browser_refusal(method, headers=hdr) is None  # no body, no content type
    # the web UI's forms carry a CSRF token instead
    form = hdr | {"Content-Type": "application/x-www-form-urlencoded"}
    assert browser_refusal(method, "/ui", headers=form, has_body=True) is None
    assert browser_refusal(method, "/ui/watches", headers=form, has_body=True) is None
    assert browser_refusal(method, "/uix", headers=form, has_body=True) == (
        415,
        "unsupported_media_type",
    )


def test_reads_by_a_browser_need_no_json() -> None:
    hdr = {"User-Agent": CHROME, "Sec-Fetch-Site": "same-origin", "Host": "localhost"}
    for method in ("GET", "HEAD", "OPTIONS"):
        assert browser_refusal(method, headers=hdr | {"Content-Type": "text/plain"}) is None


def test_browser_refusals_say_why() -> None:
    from daemon.api.browsers import check_browser_request
    from daemon.api.http import HTTPError

    def message(headers: dict, method: str = "GET") -> str:
        with pytest.raises(HTTPError) as info:
            check_browser_request(method, "/v1/x", headers, on_socket=True)
        return info.value.message

    assert message({"Sec-Fetch-Site": "cross-site"}) == (
        "cross-site request refused (Sec-Fetch-Site: cross-site)"
    )
    assert message({"Host": "localhost", "Origin": "http://evil"}) == (
        "cross-site request refused (Origin)"
    )
    assert message({"Host": "nas.lan", "User-Agent": CHROME}) == (
        "this host name may not reach captiond's socket from a browser: use "
        "http://localhost:PORT/ or add the name to ui.allowed_hosts"
    )
    hdr = {"Host": "localhost", "User-Agent": CHROME, "Content-Type": "text/plain"}
    assert message(hdr, "POST") == "a browser's request body must be application/json"


def test_what_makes_a_request_a_browsers() -> None:
    # Sec-Fetch-Mode alone gives a browser away (and then the host is checked)
    assert browser_refusal(headers={"Host": "evil.example", "Sec-Fetch-Mode": "cors"}) == (
        403,
        "forbidden",
    )
    # no Host at all is no DNS name rebound to the socket
    assert browser_refusal("GET", headers={"User-Agent": CHROME}) is None
    # an opaque origin ("null": a sandboxed page, a file) is never ours, Host or not
    assert browser_refusal("GET", headers={"Origin": "null"}) == (403, "csrf")


def fake_proc_status(monkeypatch, text: str) -> None:
    import daemon.api.security as security

    class FakePath:
        def __init__(self, path: str) -> None:
            assert path == "/proc/77/status"

        def read_text(self) -> str:
            return text

    monkeypatch.setattr(security, "Path", FakePath)


def test_supplementary_groups_come_from_proc_for_the_effective_uid(monkeypatch) -> None:
    """/proc/<pid>/status lists real, effective, saved and filesystem uids: the groups
    count only while the process still runs as the peer (effective uid), not a reused pid."""
    from daemon.api.security import _proc_groups

    status = "Name:\tcli\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t5\t5\t5\nGroups:\t4 24 27 \n"
    fake_proc_status(monkeypatch, status)
    assert _proc_groups(77, 1001) == {4, 24, 27}
    assert _proc_groups(77, 1000) is None and _proc_groups(77, 1002) is None
    fake_proc_status(monkeypatch, "Uid:\t1000\t1001\n")  # no Groups line: none
    assert _proc_groups(77, 1001) == set()
    fake_proc_status(monkeypatch, "Uid:\t1001\nGroups:\t4\n")  # no effective uid
    assert _proc_groups(77, 1001) is None
    fake_proc_status(monkeypatch, "Groups:\t4\n")
    assert _proc_groups(77, 1001) is None


def test_refusals_to_change_name_the_caller_and_the_way_in() -> None:
    a = Authoriser(admin_gid=4242, own_uid=1000)
    for req, who in [
        (_req(PeerCredentials(1, 2000, 2000)), "uid 2000"),
        (_req(None), "this client"),
    ]:
        with pytest.raises(Problem) as exc:
            a.require_admin(req)
        assert str(exc.value) == (
            f"{who} may read but not change anything: run as root or the daemon's user, "
            "or join the [api].admin_group"
        )


def test_token_file_refusals_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as info:
        load_token(None)
    assert str(info.value) == "[api.tcp] is enabled but token_file is not set"
    t = tmp_path / "tok"
    t.write_text("0123456789abcdef\n")  # 16 characters: enough
    os.chmod(t, 0o604)
    with pytest.raises(StartupError) as info:
        load_token(t)
    assert str(info.value) == (
        f"[api.tcp].token_file {t} has mode 0o604; it must be 0600 (chmod 600 {t})"
    )
    os.chmod(t, 0o600)
    assert load_token(t) == b"0123456789abcdef"
    t.write_text("0123456789abcde\n")
    with pytest.raises(StartupError, match="the token must be 16"):
        load_token(t)
    with pytest.raises(StartupError) as info:
        load_token(tmp_path)
    assert str(info.value) == f"[api.tcp].token_file {tmp_path} is not a regular file"
    os.symlink(t, tmp_path / "link")  # never read through a link
    with pytest.raises(StartupError) as info:
        load_token(tmp_path / "link")
    assert str(info.value) == (
        f"[api.tcp].token_file {tmp_path / 'link'}: Too many levels of symbolic links"
    )


def test_api_names_are_root_name_then_the_path_below_it(tmp_path: Path) -> None:
    from daemon.api.security import api_path

    w = WatchConfig(path=tmp_path, name="set")
    assert api_path(w, tmp_path / "sub" / "a.png") == "set/sub/a.png"
    assert api_path(w, str(tmp_path / "a.png")) == "set/a.png"


ABSOLUTE = "absolute paths are refused: name a file as ROOT/sub/file.png"
SEGMENTS = "'.', '..' and empty path segments are refused"


@pytest.mark.parametrize(
    ("rel", "kind", "message"),
    [
        ("set/a\x00.png", "invalid", "the path contains a NUL byte"),
        ("/etc/passwd", "forbidden", ABSOLUTE),
        ("\\\\server\\share\\a.png", "forbidden", ABSOLUTE),
        ("C:/a.png", "forbidden", ABSOLUTE),
        ("c:", "forbidden", ABSOLUTE),
        ("set//a.png", "forbidden", SEGMENTS),
        ("set/./a.png", "forbidden", SEGMENTS),
        ("set/../a.png", "forbidden", SEGMENTS),
        ("set/a.png/", "forbidden", SEGMENTS),
        ("set/sub\\a.png", "forbidden", "backslashes are refused in paths"),
        ("nope/a.png", "not_found", "no watched root named 'nope'; roots: more, set"),
        (
            "_/a.png",
            "not_found",
            "no watched root named '_' ('_' needs exactly one watched root); roots: more, set",
        ),
        ("set", "invalid", "the path names a root, not an image: ROOT/sub/file.png"),
    ],
)
def test_api_paths_are_refused_before_the_disk_is_asked(tmp_path, rel, kind, message) -> None:
    from daemon.api.security import split_api_path

    watches = [
        WatchConfig(path=tmp_path / "s", name="set"),
        WatchConfig(path=tmp_path / "m", name="more"),
    ]
    with pytest.raises(Problem) as info:
        split_api_path(watches, rel)
    assert (info.value.kind, str(info.value)) == (kind, message)


def test_an_api_path_names_a_root_then_the_segments_below_it(tmp_path) -> None:
    from daemon.api.security import split_api_path

    one = WatchConfig(path=tmp_path, name="set")
    assert split_api_path([one], "_/sub/a.png") == (one, ["sub", "a.png"])
    assert split_api_path([one], "set/a.png") == (one, ["a.png"])
    assert split_api_path([one], "set/a:b.png") == (one, ["a:b.png"])


# -- the API's early answer agrees with the confined read, whatever the link policy ---


def _read_confined(watch: WatchConfig, rel: str) -> str:
    """What a read of the image named ``rel`` does (the worker's and the web's way)."""
    parts = rel.split("/")[1:]
    try:
        with Root(str(watch.path), watch.follow_symlinks).folder("/".join(parts[:-1])) as f:
            f.read_file(parts[-1])
    except ConfinementError:
        return "forbidden"
    except FileNotFoundError:
        return "not_found"
    return "ok"


def _resolve(watch: WatchConfig, rel: str) -> str:
    try:
        resolve_image([watch], rel)
    except Problem as exc:
        return exc.kind
    return "ok"


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        # ds/inside.png: absolute link to an image in the root; ds/rel.png: relative link
        # to it; ds/escape.png: link to an image outside; ds/hop.png: a link inside to the
        # escaping link; ds/linked/a.png: through a symlinked folder (never followed)
        ("never", {"inside": "forbidden", "rel": "forbidden", "escape": "forbidden"}),
        ("inside", {"inside": "ok", "rel": "ok", "escape": "forbidden"}),
        ("all", {"inside": "ok", "rel": "ok", "escape": "ok"}),
    ],
)
def test_the_apis_answer_for_a_symlink_is_what_the_confined_read_does(
    tmp_path: Path, policy: str, want: dict[str, str]
) -> None:
    root = tmp_path / "root"
    make_image(root / "sub" / "a.png")
    make_image(tmp_path / "secret.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")
    os.symlink("sub/a.png", root / "rel.png")
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink("escape.png", root / "hop.png")
    os.symlink(root / "sub", root / "linked")
    os.symlink(tmp_path, root / "out")
    make_image(root / "sub" / "deep" / "b.png")
    os.symlink(tmp_path / "secret.png", root / "sub" / "deep" / "escape.png")
    watch = WatchConfig(path=root, name="ds", follow_symlinks=policy)
    want = {
        **want,
        "hop": want["escape"],
        "sub/deep/escape": want["escape"],
        "sub/deep/b": "ok",
        "linked/a": "forbidden",
        "out/secret": "forbidden",
    }
    for name, answer in want.items():
        rel = f"ds/{name}.png"
        assert (_resolve(watch, rel), _read_confined(watch, rel)) == (answer, answer), rel
    assert _resolve(watch, "ds/sub/a.png") == _read_confined(watch, "ds/sub/a.png") == "ok"


@pytest.mark.parametrize(
    "rel",
    ["ds/nosuch/a.png", "ds/nosuch/deeper/a.png", "ds/sub/gone/a.png", "ds/sub/missing.png"],
)
def test_an_image_in_a_folder_that_does_not_exist_is_404(watch: WatchConfig, rel: str) -> None:
    with pytest.raises(Problem) as exc:
        resolve_image([watch], rel)
    assert (exc.value.kind, exc.value.status) == ("not_found", 404)
    assert str(exc.value) == f"no such image: {rel}"
    assert _read_confined(watch, rel) == "not_found"


def test_what_is_not_a_regular_image_file_is_refused_with_the_reason(
    watch: WatchConfig,
) -> None:
    """A FIFO named like an image would block a read; a folder named so is no image."""
    os.mkfifo(watch.path / "fifo.png")
    (watch.path / "folder.png").mkdir()
    exts = sorted(watch.image_extensions)
    cases = {
        "ds/fifo.png": ("invalid", "not a regular file"),
        "ds/folder.png": ("invalid", "not a regular file"),
        "ds/sub/a.txt": ("invalid", f"not an image: sub/a.txt (extensions: {exts})"),
        "ds/sub/b/a.txt": ("invalid", f"not an image: sub/b/a.txt (extensions: {exts})"),
        "ds/sub/.a.png": (
            "invalid",
            "this watch does not caption that file (hidden, temporary or excluded)",
        ),
        # a name longer than the filesystem allows: its stat fails, not the daemon
        f"ds/{'n' * 300}.png": ("not_found", "cannot stat the image: File name too long"),
        # one character: no drive letter to look at, just no such root
        "x": ("not_found", "no watched root named 'x'; roots: ds"),
    }
    for rel, (kind, message) in cases.items():
        with pytest.raises(Problem) as exc:
            resolve_image([watch], rel)
        assert (exc.value.kind, str(exc.value)) == (kind, message), rel


def test_the_daemons_own_user_may_change_things_by_default(monkeypatch) -> None:
    """The daemon builds its Authoriser without ``own_uid``: its effective uid counts."""
    from daemon.api import security

    monkeypatch.setattr(security.os, "geteuid", lambda: 4321)
    a = Authoriser(admin_gid=None)
    assert a.own_uid == 4321
    assert a.may_mutate(_req(PeerCredentials(1, 4321, 4321)))
    assert not a.may_mutate(_req(PeerCredentials(1, 4322, 4321)))


def test_a_token_file_of_another_user_and_an_unknown_admin_group_say_what_is_wrong(
    tmp_path: Path,
) -> None:
    from daemon.api.security import resolve_admin_group

    t = tmp_path / "tok"
    t.write_text("0123456789abcdef\n")
    os.chmod(t, 0o600)
    other = os.geteuid() + 1
    try:
        os.chown(t, other, -1)
    except PermissionError:
        pytest.skip("giving a file to another user needs root")
    with pytest.raises(StartupError) as info:
        load_token(t)
    assert str(info.value) == (
        f"[api.tcp].token_file {t} must be owned by the daemon's user "
        f"(uid {os.geteuid()}), not uid {other}"
    )
    with pytest.raises(StartupError) as info:
        resolve_admin_group("captiond-no-such-group")
    assert str(info.value) == "[api].admin_group 'captiond-no-such-group' does not exist"
    assert resolve_admin_group("4242") == 4242 and resolve_admin_group(None) is None
