"""The web UI without a browser: its routes called in process as the listener calls
them (injected peer credentials and headers), the thumbnail cache, the TCP gate and
login, and the queue's browsing queries against a brute-force filter."""

from __future__ import annotations

import email.message
import io
import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image

from daemon.api.http import PeerCredentials, Request, Response, to_response
from daemon.config import Settings, WatchConfig
from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
from daemon.queue.db import HISTORY_KEEP
from daemon.queue.index import GALLERY_STATES, GalleryFilter
from daemon.web.security import CSRF_COOKIE, SESSION_COOKIE, WebAuth
from daemon.web.thumbs import ThumbnailCache
from tests.daemonproc import make_image

ROOT = PeerCredentials(os.getpid(), 0, 0)
STRANGER = PeerCredentials(os.getpid(), 54321, 54321)  # may connect, may not change
SECRET = b"top secret bytes outside the root"


# --------------------------------------------------------------------- in process


class UI:
    """An in-process daemon (not started: nothing captions) and its router."""

    def __init__(self, d: Any) -> None:
        self.d = d
        self.cookie = "c" * 32
        self.csrf = d.ui.auth.csrf_token(self.cookie)

    def call(
        self,
        method: str,
        url: str,
        *,
        peer: PeerCredentials | None = ROOT,
        auth: str = "peer",
        headers: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        csrf: bool = True,
    ) -> Response:
        split = urlsplit(url)
        route, params = self.d.server.router.match(method, split.path)
        msg = email.message.Message()  # case-insensitive, like http.client's
        base = {"Host": "localhost:8080", "Cookie": f"{CSRF_COOKIE}={self.cookie}"}
        if form is not None:
            base["Content-Type"] = "application/x-www-form-urlencoded"
            if csrf:
                form = {"csrf": self.csrf} | form
        for k, v in (base | (headers or {})).items():
            msg[k] = v
        body = urlencode(form).encode() if form is not None else b""
        req = Request(method, split.path, parse_qs(split.query), msg, body, peer, params, auth)
        return to_response(route.handler(req))


@pytest.fixture
def ui(tmp_path: Path, wd_model_dir: Path):
    import daemon.app as app_module

    root = tmp_path / "pics"
    make_image(root / "a.png", "red")
    make_image(root / "sub" / "b.jpg", "blue", size=(900, 600))
    (root / "a.txt").write_text("red background\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "PNG")
    (outside / "secret.png").write_bytes(buf.getvalue() + SECRET)
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    settings = Settings(
        state_dir=tmp_path / "state",
        cache_dir=tmp_path / "cache",
        socket_path=tmp_path / "s.sock",
        watch=[WatchConfig(path=root, name="ds", sidecar_extension="txt")],
        generators={"wd_tagger": {"model": str(wd_model_dir)}},
        ui={"thumbnail_cache_mb": 1, "allowed_hosts": ["nas.lan"]},
    )
    d = app_module.Daemon(settings)
    try:
        yield UI(d)
    finally:
        d.worker.stop(1)
        d.db.close()


def _status_and_body(resp: Response) -> tuple[int, bytes]:
    body = resp.encode() if resp.stream is None else b"".join(c for c in resp.stream if c)
    return resp.status, body


ESCAPES = [
    "ds/../outside/secret.png",
    "ds/%2e%2e/outside/secret.png",
    "ds/%2E%2E%2Foutside%2Fsecret.png",
    "ds/sub/%2e%2e/%2e%2e/outside/secret.png",
    "ds/link.png",  # a symlink to a file outside the root
    "ds/linkdir/secret.png",  # through a symlinked folder
    "ds//etc/passwd.png",
    "%2Fetc%2Fpasswd.png",
    "ds/a.png%00.png",
    "ds/..%5C..%5Coutside%5Csecret.png",
]


@pytest.mark.parametrize("kind", ["thumb", "original", "image"])
@pytest.mark.parametrize("rel", ESCAPES)
def test_paths_that_leave_the_root_are_refused(ui: UI, kind: str, rel: str) -> None:
    status, body = _status_and_body(ui.call("GET", f"/ui/{kind}/{rel}"))
    assert status in (403, 404, 422), (status, body[:200])
    assert SECRET not in body and b"\x89PNG" not in body and not body.startswith(b"\xff\xd8")


@pytest.mark.parametrize("kind", ["thumb", "original", "image"])
def test_the_same_urls_serve_an_image_inside_the_root(ui: UI, kind: str) -> None:
    """The refusals above are about the paths: these requests, the same but for the
    path, succeed."""
    status, body = _status_and_body(ui.call("GET", f"/ui/{kind}/ds/sub/b.jpg"))
    assert status == 200
    if kind == "thumb":
        assert Image.open(io.BytesIO(body)).size == (320, 213)
    elif kind == "original":
        assert body == (ui.d.settings.watch[0].path / "sub" / "b.jpg").read_bytes()


def test_a_link_inside_the_root_is_followed(ui: UI) -> None:
    root = ui.d.settings.watch[0].path
    os.symlink(root / "sub" / "b.jpg", root / "alias.jpg")
    assert ui.call("GET", "/ui/thumb/ds/alias.jpg").status == 200


def test_a_non_admin_socket_peer_may_look_but_not_change(ui: UI) -> None:
    sidecar = ui.d.settings.watch[0].path / "a.txt"
    page = ui.call("GET", "/ui/image/ds/a.png", peer=STRANGER)
    assert page.status == 200
    html = page.encode().decode()
    assert "read-only" in html and "data-save" not in html and 'id="regenerate"' not in html
    for url, form in [
        ("/ui/caption/ds/a.png", {"type": "txt", "caption": "vandalised"}),
        ("/ui/regenerate/ds/a.png", {"generator": "wd_tagger", "replace_person": "1"}),
        ("/ui/retry", {}),
    ]:
        resp = ui.call("POST", url, peer=STRANGER, form=form,
                       headers={"Accept": "application/json"})  # fmt: skip
        assert resp.status == 403, (url, resp.body)
        assert "may read but not change" in resp.body["error"]
    assert sidecar.read_text() == "red background\n"
    # the same request from root (an admin) is what changes the file
    resp = ui.call("POST", "/ui/caption/ds/a.png", form={"type": "txt", "caption": "mine"})
    assert resp.status == 303
    assert sidecar.read_text() == "mine\n"
    assert ui.d.index.get_caption(str(sidecar.with_suffix(".png")), "wd_tagger") is not None


def test_changes_need_the_csrf_token_and_a_same_origin_request(ui: UI) -> None:
    sidecar = ui.d.settings.watch[0].path / "a.txt"
    form = {"type": "txt", "caption": "forged"}
    refused = [
        dict(csrf=False),
        dict(headers={"Cookie": f"{CSRF_COOKIE}={'d' * 32}"}),  # token of another cookie
        dict(headers={"Cookie": ""}),  # no cookie at all
        dict(headers={"Origin": "http://evil.example"}),
        dict(headers={"Origin": "null"}),
        dict(headers={"Origin": "http://localhost:9999"}),  # another port: another origin
        dict(headers={"Sec-Fetch-Site": "cross-site"}),
        dict(headers={"Sec-Fetch-Site": "same-site"}),
    ]
    for kw in refused:
        resp = ui.call("POST", "/ui/caption/ds/a.png", form=dict(form), **kw)
        assert resp.status == 403, kw
    assert sidecar.read_text() == "red background\n"
    ok = ui.call(
        "POST",
        "/ui/caption/ds/a.png",
        form=dict(form, caption="through the page"),
        headers={"Origin": "http://localhost:8080", "Sec-Fetch-Site": "same-origin"},
    )
    assert ok.status == 303 and sidecar.read_text() == "through the page\n"
    header = ui.call(
        "POST",
        "/ui/caption/ds/a.png",
        form={"type": "txt", "caption": "by script"},
        csrf=False,
        headers={"X-CSRF-Token": ui.csrf, "Accept": "application/json"},
    )
    assert header.status == 200 and header.body["success"]


def test_the_socket_ui_refuses_host_names_that_are_not_loopback(ui: UI) -> None:
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 must not borrow the
    SSH forward's peer credentials."""
    assert ui.call("GET", "/ui/", headers={"Host": "evil.example:8080"}).status == 403
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "nas.lan", "ui.localhost"):
        assert ui.call("GET", "/ui/gallery", headers={"Host": host}).status == 200, host


def test_every_answer_carries_the_security_headers(ui: UI) -> None:
    urls = ["/ui/", "/ui/gallery", "/ui/folders", "/ui/image/ds/a.png", "/ui/thumb/ds/a.png"]
    for url in [*urls, "/ui/image/ds/missing.png", "/ui/static/app.css"]:
        resp = ui.call("GET", url)
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, url
        assert "unsafe-inline" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff", url
    page = ui.call("GET", "/ui/gallery", headers={"Cookie": ""})
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith(CSRF_COOKIE) and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    original = ui.call("GET", "/ui/original/ds/a.png")
    assert original.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert original.content_type == "image/png"


def test_anonymous_tcp_browsers_see_only_the_login_page(ui: UI) -> None:
    resp = ui.call("GET", "/ui/gallery?state=failed", peer=None, auth="anonymous")
    assert resp.status == 303
    assert resp.headers["Location"] == "/ui/login?next=%2Fui%2Fgallery%3Fstate%3Dfailed"
    for url in ("/ui/thumb/ds/a.png", "/ui/live"):
        r = ui.call("GET", url, peer=None, auth="anonymous", headers={"Accept": "application/json"})
        assert r.status == 401
    post = ui.call("POST", "/ui/caption/ds/a.png", peer=None, auth="anonymous",
                   form={"type": "txt", "caption": "x"})  # fmt: skip
    assert post.status == 401
    assert ui.call("GET", "/ui/login", peer=None, auth="anonymous").status == 200
    assert ui.call("GET", "/ui/static/app.js", peer=None, auth="anonymous").status == 200
    # a session (the cookie) and the bearer token may change things
    ok = ui.call("POST", "/ui/caption/ds/a.png", peer=None, auth="session",
                 form={"type": "txt", "caption": "x"})  # fmt: skip
    assert ok.status == 303


def test_regenerate_refuses_to_replace_a_persons_caption_unconfirmed(ui: UI) -> None:
    (ui.d.settings.watch[0].path / "a.txt").write_text("a person wrote this\n")
    resp = ui.call("POST", "/ui/regenerate/ds/a.png", form={"generator": "wd_tagger"},
                   headers={"Accept": "application/json"})  # fmt: skip
    assert resp.status == 409 and "a person's caption" in resp.body["error"]
    assert (ui.d.settings.watch[0].path / "a.txt").read_text() == "a person wrote this\n"


# ------------------------------------------------------------------------- thumbnails


def _jpeg(path: Path, color: tuple[int, int, int], size=(1200, 900)) -> Path:
    Image.new("RGB", size, color).save(path, "JPEG", quality=90)
    return path


def _ref(watch: WatchConfig, path: Path):
    from daemon.api.security import resolve_image

    return resolve_image([watch], f"{watch.name}/{path.relative_to(watch.path).as_posix()}")


def test_thumbnail_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    watch = WatchConfig(path=root, name="r")
    imgs = [_jpeg(root / f"{i}.jpg", (i * 40, 90, 200 - i * 30)) for i in range(4)]
    probe = ThumbnailCache(tmp_path / "probe", max_bytes=1 << 30, max_pixels=10**9)
    one = len(probe.get(_ref(watch, imgs[0]), 320).data)
    cache = ThumbnailCache(tmp_path / "c", max_bytes=int(one * 3.5), max_pixels=10**9)
    keys = [cache.get(_ref(watch, p), 320).etag for p in imgs[:3]]
    time.sleep(0.01)
    assert cache.get(_ref(watch, imgs[0]), 320).etag == keys[0]  # a hit: 0 is now recent
    assert cache.status()["hits"] == 1
    cache.get(_ref(watch, imgs[3]), 320)  # over the bound: 1 (least recent) goes
    files = {p.name for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert keys[1] not in files and {keys[0], keys[2]} <= files
    assert cache.status()["evicted"] == 1 and cache.total <= cache.max_bytes
    # a restart reads the folder back, least recently used first
    again = ThumbnailCache(tmp_path / "c", max_bytes=int(one * 2.5), max_pixels=10**9)
    left = {p.name for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert keys[2] not in left and keys[0] in left and again.total <= again.max_bytes


def test_a_changed_image_gets_a_new_thumbnail(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    watch = WatchConfig(path=root, name="r")
    img = _jpeg(root / "a.jpg", (255, 0, 0))
    cache = ThumbnailCache(tmp_path / "c", max_bytes=1 << 20, max_pixels=10**9)
    first = cache.get(_ref(watch, img), 320)
    _jpeg(img, (0, 0, 255), size=(1000, 900))
    second = cache.get(_ref(watch, img), 320)
    assert first.etag != second.etag
    assert Image.open(io.BytesIO(second.data)).getpixel((10, 10))[2] > 200


def _broken_files(root: Path) -> dict[str, bytes]:
    real = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 99, 199)).save(real, "JPEG")
    return {
        "garbage.png": b"this is not an image at all",
        "empty.jpg": b"",
        "truncated.jpg": real.getvalue()[: len(real.getvalue()) // 3],
        "header-only.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "big.jpg": real.getvalue(),  # over the pixel limit set below: a "bomb"
    }


def test_broken_images_get_a_placeholder_never_a_500(ui: UI) -> None:
    root = ui.d.settings.watch[0].path
    for name, data in _broken_files(root).items():
        (root / name).write_bytes(data)
    ui.d.ui.thumbs.max_pixels = 50_000  # big.jpg (120,000 pixels) is refused as a bomb
    for name in _broken_files(root):
        for _ in range(2):  # made, then remembered
            resp = ui.call("GET", f"/ui/thumb/ds/{name}")
            assert resp.status == 200, (name, resp.body)
            assert resp.content_type.startswith("image/svg+xml"), name
            assert resp.headers["X-Thumbnail"].startswith("placeholder"), name
    assert ui.d.ui.thumbs.status()["made"] == len(_broken_files(root))
    # the page of a broken image renders too
    assert ui.call("GET", "/ui/image/ds/garbage.png").status == 200


def test_thumbnails_have_an_etag_and_answer_304(ui: UI) -> None:
    first = ui.call("GET", "/ui/thumb/ds/a.png?size=m")
    assert first.status == 200 and first.content_type == "image/jpeg"
    assert first.headers["Cache-Control"].startswith("private, max-age=")
    again = ui.call("GET", "/ui/thumb/ds/a.png?size=m",
                    headers={"If-None-Match": first.headers["ETag"]})  # fmt: skip
    assert again.status == 304 and again.encode() == b""
    assert ui.call("GET", "/ui/thumb/ds/a.png?size=huge").status == 422


# --------------------------------------------------------------------- TCP: gate, login


def test_tcp_gate_lets_only_ui_paths_through_without_the_bearer() -> None:
    now = [1_000_000.0]
    auth = WebAuth(token=b"t" * 20, secret=b"s" * 32, clock=lambda: now[0])
    cookie = auth.new_session()
    jar = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    assert auth.tcp_gate("/status", jar) is None
    assert auth.tcp_gate("/api/queue", jar) is None
    assert auth.tcp_gate("/uix", jar) is None
    assert auth.tcp_gate("/ui/", {}) == "anonymous"
    assert auth.tcp_gate("/ui/gallery", jar) == "session"
    issued, nonce, mac = cookie.split(".")
    forged = {"Cookie": f"{SESSION_COOKIE}={issued}.{nonce}.{'0' * 64}"}
    assert auth.tcp_gate("/ui/", forged) == "anonymous"
    later = {"Cookie": f"{SESSION_COOKIE}={int(issued) + 99}.{nonce}.{mac}"}
    assert auth.tcp_gate("/ui/", later) == "anonymous"  # the MAC covers the issue time
    other = WebAuth(token=b"x" * 20, secret=b"s" * 32, clock=lambda: now[0])
    assert other.tcp_gate("/ui/", jar) == "anonymous"  # a new token ends every session
    now[0] += 8 * 24 * 3600
    assert auth.tcp_gate("/ui/", jar) == "anonymous"  # expired
    now[0] -= 8 * 24 * 3600
    auth.revoke(cookie)
    assert auth.tcp_gate("/ui/", jar) == "anonymous"  # logged out


def test_login_is_rate_limited() -> None:
    from daemon.api.http import HTTPError

    now = [1_000.0]
    auth = WebAuth(token=b"the-right-token-123", secret=b"s" * 32, clock=lambda: now[0])
    for _ in range(10):
        assert not auth.login("wrong")
    with pytest.raises(HTTPError) as exc:
        auth.login("the-right-token-123")
    assert exc.value.status == 429
    now[0] += 61
    assert auth.login("the-right-token-123")


def test_the_listener_gives_the_cookie_nothing_but_the_ui(tmp_path: Path) -> None:
    """Through the real TCP listener: without the bearer header the API answers 401,
    also on paths that start with /ui/ but climb out of it."""
    import http.client

    from daemon.api.listeners import ControlServer

    auth = WebAuth(token=b"a-token-of-20-chars!", secret=b"s" * 32)
    server = ControlServer(tmp_path / "s.sock")
    server.router.add("GET", "/status", lambda req: {"auth": req.auth})
    server.router.add("GET", "/ui/", lambda req: {"auth": req.auth})
    server.enable_tcp("127.0.0.1", 0, b"a-token-of-20-chars!")
    server.tcp_gate = auth.tcp_gate
    server.start()
    try:
        port = server.tcp_address[1]

        def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            return r.status, r.read()

        session = {"Cookie": f"{SESSION_COOKIE}={auth.new_session()}"}
        assert get("/status", session)[0] == 401
        for path in ("/ui/../status", "/ui/%2e%2e/status", "/ui//status"):
            assert get(path, session)[0] in (401, 404), path
        assert get("/ui/", session) == (200, b'{"auth": "session"}')
        assert get("/ui/", {}) == (200, b'{"auth": "anonymous"}')
        bearer = {"Authorization": "Bearer a-token-of-20-chars!"}
        assert get("/status", bearer) == (200, b'{"auth": "token"}')
        wrong = {"Authorization": "Bearer nope"} | session  # a wrong bearer is not a cookie
        assert get("/ui/", wrong)[0] == 401
    finally:
        server.stop()


def test_the_csrf_secret_is_private_and_kept(tmp_path: Path) -> None:
    from daemon.web.security import load_secret

    path = tmp_path / "web-secret"
    first = load_secret(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_secret(path) == first  # open pages keep working across a restart
    os.chmod(path, 0o644)
    assert load_secret(path) != first  # a secret others could read is replaced


# --------------------------------------------------------- the queue's browsing queries


def _dataset(tmp_path: Path, n: int = 300, seed: int = 7):
    rng = random.Random(seed)
    db = Database(tmp_path / "g.db")
    q, ix = JobQueue(db, clock=lambda: 100.0), FileIndex(db)
    root = "/data/set"
    dirs = ["", "a", "a/b", "a b", "a-b", "z", "a/b/c"]
    truth: dict[str, dict[str, Any]] = {}
    rows = []
    for i in range(n):
        d = rng.choice(dirs)
        name = f"img_{rng.randrange(10**6):06d}_{i}.jpg"
        path = f"{root}/{d}/{name}" if d else f"{root}/{name}"
        rows.append((d, name, 1, 1))
        truth[path] = {"jobs": {}, "text": {}, "person": set(), "flags": set()}
    ix.upsert_files(root, rows)
    words = ["red", "blue", "1girl", "solo", "50%_off", "smile"]
    for path, t in truth.items():
        for gen in ("wd", "vlm"):
            if rng.random() < 0.15:
                continue
            state = rng.choice(["pending", "done", "done", "done", "failed", "dead", "leased"])
            outcome = rng.choice(["written", "caption_edited", "caption_exists"]) if (
                state == "done") else None  # fmt: skip
            q.enqueue(path, gen, 1)
            db.execute("UPDATE jobs SET state = ?, outcome = ? WHERE path = ? AND generator = ?",
                       (state, outcome, path, gen))  # fmt: skip
            t["jobs"][gen] = (state, outcome)
            if state == "done" and outcome == "written" and rng.random() < 0.9:
                text = ", ".join(rng.sample(words, 3))
                person = rng.random() < 0.1
                h = "human-edit:abc" if person else "abc"
                ix.record_captions([CaptionRecord(path, gen, "c", path + ".txt", h, 0, text=text)])
                t["text"][gen] = text
                if person:
                    t["person"].add(gen)
            if rng.random() < 0.05:
                db.execute("INSERT INTO flags VALUES (?, ?, 'check', 'why', 'c', 1, ?)",
                           (path, gen, None if rng.random() < 0.7 else 2.0))  # fmt: skip
                if db.execute("SELECT dismissed_at IS NULL FROM flags WHERE image_path = ? "
                              "AND generator = ?", (path, gen)).fetchone()[0]:  # fmt: skip
                    t["flags"].add(gen)
    return db, ix, truth


def _matches(t: dict[str, Any], f: GalleryFilter, path: str) -> bool:
    gens = [f.generator] if f.generator else ["wd", "vlm"]
    if f.folder and not path.startswith(f.folder.rstrip("/") + "/"):
        return False
    if f.generator and f.generator not in t["jobs"] and f.generator not in t["text"]:
        return False
    if f.text and not any(f.text.lower() in t["text"].get(g, "").lower() for g in gens):
        return False
    states = {"captioned": {"done"}, "pending": {"pending", "leased"}, "failed": {"failed"},
              "dead": {"dead"}}  # fmt: skip
    if f.state in states:
        return any(g in t["jobs"] and t["jobs"][g][0] in states[f.state] for g in gens)
    if f.state == "person":
        return any(g in t["person"] or (g in t["jobs"] and t["jobs"][g][1] in (
            "caption_edited", "caption_exists")) for g in gens)  # fmt: skip
    if f.state == "flagged":
        return any(g in t["flags"] for g in gens)
    return True


FILTERS = [GalleryFilter()] + [
    GalleryFilter(folder=folder, state=state, generator=gen, text=text)
    for folder in (None, "/data/set/a", "/data/set/a b")
    for state in (None, *GALLERY_STATES)
    for gen in (None, "vlm")
    for text in (None, "red", "50%_")
]


@pytest.mark.parametrize("sparse_pending", [2000, 0], ids=["few-pending", "many-pending"])
def test_gallery_pages_list_exactly_what_a_brute_force_filter_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_pending: int
) -> None:
    """Both ways of listing pending jobs (read and sorted, or a walk of the images
    with a probe each) are checked: the threshold is moved below the dataset's count."""
    monkeypatch.setattr("daemon.queue.index.SPARSE_PENDING", sparse_pending)
    db, ix, truth = _dataset(tmp_path)
    for f in FILTERS:
        want = sorted(p for p, t in truth.items() if _matches(t, f, p))
        got, after = [], None
        while page := ix.gallery_paths(f, after=after, limit=7):
            got += page
            after = page[-1]
        assert got == want, f
        back, before = [], None
        if want:  # backwards from past the end
            before = want[-1] + "\uffff"
            while page := ix.gallery_paths(f, before=before, limit=7):
                back = page + back
                before = page[0]
        assert back == want, f
    db.close()


def test_gallery_items_tell_jobs_captions_and_flags(tmp_path: Path) -> None:
    db, ix, truth = _dataset(tmp_path, n=60)
    paths = sorted(truth)[:20]
    items = ix.gallery_items(paths)
    for p in paths:
        assert {g: (j["state"], j["outcome"]) for g, j in items[p]["jobs"].items()} == truth[p][
            "jobs"
        ]
        assert {g: c["text"] for g, c in items[p]["captions"].items()} == truth[p]["text"]
        assert {g for g, c in items[p]["captions"].items() if c["by_person"]} == truth[p]["person"]
        assert {fl["generator"] for fl in items[p]["flags"]} == truth[p]["flags"]
        assert items[p]["size"] == 1
    db.close()


def test_folder_counts_add_up(tmp_path: Path) -> None:
    db, ix, truth = _dataset(tmp_path, n=120)
    counts = ix.folder_counts(["/data/set"])["/data/set"]
    assert sum(c.get("images", 0) for c in counts.values()) == 120
    failed = sum(1 for t in truth.values() for s, _ in t["jobs"].values() if s == "failed")
    assert sum(c.get("failed", 0) for c in counts.values()) == failed
    assert counts["a b"]["images"] == sum(1 for p in truth if p.startswith("/data/set/a b/"))
    db.close()


def test_failed_attempts_are_kept_and_releases_are_not(tmp_path: Path) -> None:
    now = [1000.0]
    db = Database(tmp_path / "h.db")
    q = JobQueue(db, max_attempts=3, clock=lambda: now[0], rng=lambda: 0.5)
    q.enqueue("/r/a.png", "wd", 1)
    (job,) = q.claim("wd", 1)
    q.fail(job.id, "io", "disk hiccup", retryable=True)
    now[0] += 100
    (job,) = q.claim("wd", 1)
    q.release([job.id])  # never ran: not an attempt
    (job,) = q.claim("wd", 1)
    q.fail(job.id, "io", "disk hiccup", retryable=True)  # the same error again: kept
    now[0] += 100
    (job,) = q.claim("wd", 1)
    q.ack(job.id, "written")  # a success leaves no row
    rows = q.failed_attempts("/r/a.png")
    assert [(r["state"], r["error_type"], r["attempt"]) for r in rows] == [
        ("pending", "io", 2),
        ("pending", "io", 1),
    ]
    q.enqueue("/r/a.png", "wd", 1)
    for _ in range(HISTORY_KEEP + 5):
        (job,) = q.claim("wd", 1)
        q.fail(job.id, "generation", "bad", retryable=False)
        q.retry(["failed"])
    assert len(q.failed_attempts("/r/a.png")) == HISTORY_KEEP
    assert q.forget("/r/a.png") == 1
    assert q.failed_attempts("/r/a.png") == []
    db.close()


def test_captions_written_per_minute(tmp_path: Path) -> None:
    db = Database(tmp_path / "w.db")
    t = [600.0]
    ix = FileIndex(db, clock=lambda: t[0])
    for at in (600.0, 610.0, 700.0, 1000.0):
        t[0] = at
        ix.record_captions([CaptionRecord(f"/r/{at}.png", "wd", "c", "/r/x.txt", "h", 0)])
    assert ix.written_per_minute(600.0, 6) == [2, 1, 0, 0, 0, 0]
    assert ix.written_per_minute(960.0, 2) == [1, 0]
    db.close()


def test_overview_rate_and_eta(ui: UI) -> None:
    while time.time() % 60 > 55:  # all of it within one minute
        time.sleep(0.5)
    c = ui.d.control
    c.queue.enqueue_many((f"/nowhere/{i}.png", "wd_tagger", 0) for i in range(30))
    c.index.record_captions(
        CaptionRecord(f"/nowhere/w{i}.png", "wd_tagger", "c", "/nowhere/x.txt", "h", 0)
        for i in range(6)
    )
    a = c.activity()
    assert a["written_last_hour"] == 6 and a["per_minute"][-1] == 6
    assert a["rate_per_minute"] == 6.0  # started this minute: a minute's rate, not an hour's
    assert a["backlog"] == {"explicit": 0, "new": 0, "backfill": 30}
    assert a["eta_seconds"] == 300
    html = ui.call("GET", "/ui/").encode().decode()
    assert 'id="count-pending">30<' in html and "5 min" in html


def test_durations_and_ages_read_as_people_say_them(monkeypatch):
    from daemon.web import routes

    assert routes._duration(None) == "—"
    assert [routes._duration(s) for s in (0, 59, 60, 3599, 3600, 86399, 86400 * 2.5)] == [
        "0 s",
        "59 s",
        "1 min",
        "60 min",
        "1.0 h",
        "24.0 h",
        "2.5 days",
    ]
    monkeypatch.setattr(routes.time, "time", lambda: 1_000_000.0)
    assert routes._ago(None) == routes._ago(0) == "never"
    assert routes._ago(1_000_000.0 - 90) == "2 min ago"
    assert routes._ago(1_000_000.0 + 5) == "0 s ago"  # a clock step back is not the future
