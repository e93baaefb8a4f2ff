"""The web UI's routes: server-rendered pages (Jinja2) over the control facade.

Every handler goes through :meth:`WebUI.handler`, which applies the rules of
:mod:`daemon.web.security` (who may look, who may change, CSRF, the Host check on the
socket), renders refusals as pages (or JSON for the page's scripts) and adds the
security headers. Image paths are API paths (``ROOT/sub/file.png``) checked by the
same :func:`~daemon.api.security.resolve_image` as the API's, then read confined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import structlog
from PIL import Image

from daemon.api.control import Control, Queued
from daemon.api.http import HTTPError, Request, Response, Router
from daemon.api.problems import Problem
from daemon.api.security import ImageRef
from daemon.confined import ConfinementError, Root
from daemon.queue.index import GALLERY_STATES, GalleryFilter
from daemon.web.security import (
    CSRF_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    SESSION_SECONDS,
    UI_PREFIX,
    WebAuth,
    cookie_header,
    cookies,
    load_secret,
    new_csrf_cookie,
)
from daemon.web.thumbs import SIZES, ThumbnailCache

log = structlog.get_logger(__name__)

PAGE_SIZE = 60
LIVE_SECONDS = 2.0  # the overview's update interval
STREAM_SECONDS = 600  # an event stream ends after this (the browser reconnects)
MAX_STREAMS = 8  # event streams at once (each holds a connection's thread)
FOLDERS_TTL = 15.0  # seconds the folder counts are reused
ORIGINAL_CHUNK = 1 << 20
STATE_LABELS = {
    "captioned": "captioned",
    "pending": "pending",
    "failed": "failed",
    "dead": "dead",
    "person": "a person's caption",
    "flagged": "flagged",
}
IMAGE_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "tif": "image/tiff",
    "avif": "image/avif",
}


@dataclass(slots=True)
class Ctx:
    """What a handler knows of the browser: how it came in, whether it may change
    things, and its CSRF cookie and token (a new cookie is set with the answer)."""

    req: Request
    admin: bool
    csrf_cookie: str
    new_cookie: bool
    csrf: str
    form: dict[str, str] = field(default_factory=dict)

    @property
    def wants_json(self) -> bool:
        return "application/json" in (self.req.headers.get("Accept") or "")


def _form(req: Request) -> dict[str, str]:
    ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if not req.body:
        return {}
    if ctype != "application/x-www-form-urlencoded":
        raise HTTPError(415, "send the form as application/x-www-form-urlencoded")
    try:
        text = req.body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the form is not UTF-8") from None
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def quote_path(rel: str) -> str:
    return quote(rel, safe="/")


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{_duration(max(0.0, time.time() - ts))} ago"


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "—"


class WebUI:
    """The UI's state: the facade, the templates, the thumbnail cache, sessions."""

    def __init__(
        self,
        control: Control,
        *,
        status: Callable[[], dict[str, Any]],
        token: bytes | None,
    ) -> None:
        settings = control.settings
        self.c = control
        self.status = status
        self.tcp = token is not None
        self.auth = WebAuth(
            token=token,
            secret=load_secret(settings.state_dir / "web-secret"),
            allowed_hosts=settings.ui.allowed_hosts,
        )
        self.thumbs = ThumbnailCache(
            settings.cache_dir / "thumbnails",
            max_bytes=settings.ui.thumbnail_cache_mb << 20,
            max_pixels=settings.worker.max_image_pixels,
        )
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("daemon.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            qpath=quote_path, ago=_ago, duration=_duration, bytes=_bytes, when=_when
        )
        self.static = self._load_static()
        self.env.globals.update(
            static=lambda name: f"{UI_PREFIX}/static/{name}?v={self.static[name][1][:10]}",
            state_labels=STATE_LABELS,
            tcp=self.tcp,
        )
        self._folders: tuple[float, list[dict[str, Any]]] | None = None
        self._folders_lock = threading.Lock()
        self._streams = threading.BoundedSemaphore(MAX_STREAMS)

    @staticmethod
    def _load_static() -> dict[str, tuple[bytes, str, str]]:
        out = {}
        for entry in resources.files("daemon.web").joinpath("static").iterdir():
            if entry.is_file():
                data = entry.read_bytes()
                ctype = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
                if ctype.startswith("text/") or ctype.endswith("javascript"):
                    ctype += "; charset=utf-8"
                out[entry.name] = (data, hashlib.sha256(data).hexdigest()[:32], ctype)
        return out

    # -- the guard around every handler ---------------------------------------------
    def handler(
        self,
        fn: Callable[[Ctx], Response],
        *,
        public: bool = False,
        change: bool = False,
        admin: bool = True,
    ) -> Callable[[Request], Response]:
        """``public``: served to anonymous TCP browsers too (login, static files);
        ``change``: a POST that must pass the CSRF checks and (``admin``) be an
        admin's."""

        def run(req: Request) -> Response:
            jar = cookies(req.headers)
            csrf_cookie = jar.get(CSRF_COOKIE) or ""
            new_cookie = not (16 <= len(csrf_cookie) <= 64 and csrf_cookie.isascii())
            if new_cookie:
                csrf_cookie = new_csrf_cookie()
            ctx = Ctx(
                req=req,
                admin=self._admin(req),
                csrf_cookie=csrf_cookie,
                new_cookie=new_cookie,
                csrf=self.auth.csrf_token(csrf_cookie),
            )
            try:
                if req.auth == "peer" and not self.auth.host_ok(req):
                    raise HTTPError(
                        403,
                        "this host name may not reach captiond's socket UI: open it as "
                        "http://localhost:PORT/ui/ or add the name to ui.allowed_hosts",
                        "forbidden",
                    )
                if req.auth == "anonymous" and not public:
                    if req.method in ("GET", "HEAD") and not ctx.wants_json:
                        query = urlencode(req.query, doseq=True)
                        nxt = req.path + (f"?{query}" if query else "")
                        return self._finish(
                            ctx, Response(303, b"", {"Location": self._login_url(nxt)})
                        )
                    raise HTTPError(401, "log in first", "unauthorized")
                if change:
                    ctx.form = _form(req)
                    self.auth.check_change(req, ctx.form)
                    if admin and not ctx.admin:
                        self.c.auth.require_admin(req)  # raises Problem with the reason
                resp = fn(ctx)
            except Problem as p:
                resp = self._error(ctx, p.status, p.message, p.error_type)
            except HTTPError as e:
                resp = self._error(ctx, e.status, e.message, e.error_type)
                resp.headers.update(e.headers)
            return self._finish(ctx, resp)

        return run

    def _admin(self, req: Request) -> bool:
        if req.auth in ("token", "session"):
            return True
        return req.auth == "peer" and self.c.auth.may_mutate(req)

    @staticmethod
    def _login_url(nxt: str) -> str:
        return f"{UI_PREFIX}/login?" + urlencode({"next": nxt})

    def _finish(self, ctx: Ctx, resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        resp.headers.setdefault("Cache-Control", "no-store")
        if ctx.new_cookie and "Set-Cookie" not in resp.headers:
            resp.headers["Set-Cookie"] = cookie_header(CSRF_COOKIE, ctx.csrf_cookie)
        return resp

    def _error(self, ctx: Ctx, status: int, message: str, error_type: str) -> Response:
        if ctx.wants_json or ctx.req.method not in ("GET", "HEAD", "POST"):
            body = {"error": message, "error_type": error_type, "retryable": False}
            return Response(status, body)
        if ctx.req.path.startswith((f"{UI_PREFIX}/thumb/", f"{UI_PREFIX}/original/")):
            return Response(status, message + "\n", content_type="text/plain; charset=utf-8")
        return self.page(
            ctx, "error.html", status=status, code=status, message=message, error_type=error_type
        )

    def page(self, ctx: Ctx, template: str, *, status: int = 200, **values: Any) -> Response:
        html = self.env.get_template(template).render(
            csrf=ctx.csrf, admin=ctx.admin, auth=ctx.req.auth, path=ctx.req.path, **values
        )
        return Response(status, html, content_type="text/html; charset=utf-8")

    def _back(self, ctx: Ctx, default: str, data: dict[str, Any]) -> Response:
        """The answer to a change: JSON for the page's scripts, else back to the page."""
        if ctx.wants_json:
            return Response(200, data)
        nxt = ctx.form.get("next") or default
        if not nxt.startswith(UI_PREFIX + "/") or nxt.startswith("//"):
            nxt = default
        return Response(303, b"", {"Location": nxt})

    # -- registration ----------------------------------------------------------------
    def register(self, router: Router) -> None:
        h = self.handler
        add = router.add
        add("GET", UI_PREFIX, h(lambda ctx: Response(308, b"", {"Location": UI_PREFIX + "/"})))
        add("GET", f"{UI_PREFIX}/", h(self._overview))
        add("GET", f"{UI_PREFIX}/live", h(self._live_json))
        add("GET", f"{UI_PREFIX}/events", h(self._events))
        add("GET", f"{UI_PREFIX}/folders", h(self._folders_page))
        add("GET", f"{UI_PREFIX}/gallery", h(self._gallery))
        add("GET", f"{UI_PREFIX}/image/{{path:path}}", h(self._image))
        add("GET", f"{UI_PREFIX}/thumb/{{path:path}}", h(self._thumb))
        add("GET", f"{UI_PREFIX}/original/{{path:path}}", h(self._original))
        add("GET", f"{UI_PREFIX}/request/{{request_id}}", h(self._request_status))
        add("GET", f"{UI_PREFIX}/static/{{name}}", h(self._static, public=True))
        add("GET", f"{UI_PREFIX}/login", h(self._login_page, public=True))
        add("POST", f"{UI_PREFIX}/login", h(self._login, public=True, change=True, admin=False))
        add("POST", f"{UI_PREFIX}/logout", h(self._logout, change=True))
        add("POST", f"{UI_PREFIX}/caption/{{path:path}}", h(self._save, change=True))
        add("POST", f"{UI_PREFIX}/regenerate/{{path:path}}", h(self._regenerate, change=True))
        add("POST", f"{UI_PREFIX}/retry", h(self._retry, change=True))

    # -- static files, login -----------------------------------------------------------
    def _static(self, ctx: Ctx) -> Response:
        found = self.static.get(ctx.req.params["name"])
        if found is None:
            raise HTTPError(404, "no such file")
        data, etag, ctype = found
        headers = {"ETag": f'"{etag}"', "Cache-Control": "public, max-age=31536000, immutable"}
        if ctx.req.headers.get("If-None-Match") == f'"{etag}"':
            return Response(304, b"", headers)
        return Response(200, data, headers, content_type=ctype)

    def _login_page(self, ctx: Ctx, *, error: str | None = None, status: int = 200) -> Response:
        nxt = ctx.req.query_one("next") or ctx.form.get("next") or f"{UI_PREFIX}/"
        if not nxt.startswith(UI_PREFIX + "/") or nxt.startswith("//"):
            nxt = f"{UI_PREFIX}/"
        if ctx.req.auth != "anonymous" and error is None:
            return Response(303, b"", {"Location": nxt})
        return self.page(ctx, "login.html", status=status, error=error, next=nxt)

    def _login(self, ctx: Ctx) -> Response:
        if not self.tcp:
            return Response(303, b"", {"Location": f"{UI_PREFIX}/"})
        if not self.auth.login(ctx.form.get("token", "")):
            log.warning("ui_login_refused")
            return self._login_page(ctx, error="That is not the token.", status=401)
        log.info("ui_login")
        nxt = ctx.form.get("next") or f"{UI_PREFIX}/"
        if not nxt.startswith(UI_PREFIX + "/") or nxt.startswith("//"):
            nxt = f"{UI_PREFIX}/"
        cookie = cookie_header(SESSION_COOKIE, self.auth.new_session(), max_age=SESSION_SECONDS)
        return Response(303, b"", {"Location": nxt, "Set-Cookie": cookie})

    def _logout(self, ctx: Ctx) -> Response:
        if value := cookies(ctx.req.headers).get(SESSION_COOKIE):
            self.auth.revoke(value)
        return Response(
            303,
            b"",
            {
                "Location": f"{UI_PREFIX}/login",
                "Set-Cookie": cookie_header(SESSION_COOKIE, "", max_age=0),
            },
        )

    # -- overview ----------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        st = self.status()
        q = st["queue"]
        return {
            "version": st["version"],
            "uptime": st["uptime_seconds"],
            "totals": q["totals"],
            "by_generator": q["by_generator"],
            "outcomes": q["outcomes"],
            "oldest_pending": q["oldest_pending_seconds"],
            "activity": self.c.activity(),
            "generators": st["generators"],
            "residency": st["residency"],
            "watchers": st["watchers"],
            "scans": st["scans"],
            "intake_backlog": st["intake_backlog"],
            "conditions": st["conditions"],
            "worker": st["worker"],
            "files_indexed": st["files_indexed"],
            "errors": self.c.recent_errors(12),
            "warnings": st["warnings"],
            "thumbnails": self.thumbs.status(),
        }

    def _live_sections(self, ctx: Ctx) -> dict[str, str]:
        data = self.overview()
        tpl = self.env.get_template("overview_live.html")
        mod = tpl.make_module(
            {"o": data, "csrf": ctx.csrf, "admin": ctx.admin, "auth": ctx.req.auth, "path": ""}
        )
        return {name: str(getattr(mod, name)()).strip() for name in _LIVE_SECTIONS}

    def _overview(self, ctx: Ctx) -> Response:
        return self.page(ctx, "overview.html", live=self._live_sections(ctx))

    def _live_json(self, ctx: Ctx) -> Response:
        return Response(200, {"sections": self._live_sections(ctx), "at": time.time()})

    def _events(self, ctx: Ctx) -> Response:
        """The overview's sections as server-sent events, sent when they change."""
        if not self._streams.acquire(blocking=False):
            raise HTTPError(503, "too many live pages open; this one polls instead", "busy")

        def events() -> Iterator[bytes | None]:
            try:
                last: dict[str, str] = {}
                end = time.monotonic() + STREAM_SECONDS
                yield b"retry: 2000\n\n"
                while time.monotonic() < end:
                    sections = self._live_sections(ctx)
                    changed = {k: v for k, v in sections.items() if last.get(k) != v}
                    if changed:
                        last = sections
                        yield b"data: " + json.dumps({"sections": changed}).encode() + b"\n\n"
                    else:
                        yield b": idle\n\n"
                    wake = time.monotonic() + LIVE_SECONDS
                    while time.monotonic() < wake:
                        yield None  # is the browser still there?
                        time.sleep(0.25)
            finally:
                self._streams.release()

        return Response(200, stream=events(), content_type="text/event-stream; charset=utf-8")

    # -- folders -------------------------------------------------------------------------
    def folder_rows(self) -> list[dict[str, Any]]:
        with self._folders_lock:
            now = time.monotonic()
            if self._folders is None or now - self._folders[0] > FOLDERS_TTL:
                self._folders = (now, self.c.folders())
            return self._folders[1]

    def _folders_page(self, ctx: Ctx) -> Response:
        return self.page(ctx, "folders.html", rows=self.folder_rows(), ttl=FOLDERS_TTL)

    # -- gallery -------------------------------------------------------------------------
    def _filter(self, req: Request) -> tuple[GalleryFilter, dict[str, str]]:
        """The gallery filter of a request, and its query parameters as given."""
        params = {}
        for key in ("folder", "state", "generator", "q"):
            v = (req.query_one(key) or "").strip()
            if v:
                if len(v) > 1024 or "\x00" in v:
                    raise Problem("invalid", f"the {key} filter is too long or invalid")
                params[key] = v
        state = params.get("state")
        if state is not None and state not in GALLERY_STATES:
            raise Problem("invalid", f"unknown state {state!r}; one of {list(GALLERY_STATES)}")
        gen = params.get("generator")
        if gen is not None and gen not in self._generators():
            raise Problem("invalid", f"unknown generator {gen!r}")
        folder = self.c.folder_path(params["folder"]) if "folder" in params else None
        return GalleryFilter(folder, state, gen, params.get("q")), params

    def _generators(self) -> list[str]:
        names = {g for w in self.c.watches for g in w.generators} | set(self.c.models.slots)
        return sorted(names)

    def _gallery(self, ctx: Ctx) -> Response:
        f, params = self._filter(ctx.req)
        after, before = ctx.req.query_one("after"), ctx.req.query_one("before")
        page = self.c.gallery(f, after=after or None, before=before or None, limit=PAGE_SIZE)
        qs = urlencode(params)
        return self.page(
            ctx,
            "gallery.html",
            page=page,
            tiles=[_tile(it) for it in page["items"]],
            params=params,
            qs=qs,
            roots=[w.name for w in self.c.watches],
            generators=self._generators(),
            states=GALLERY_STATES,
        )

    # -- one image ---------------------------------------------------------------------
    def _image(self, ctx: Ctx) -> Response:
        rel = ctx.req.params["path"]
        ref = self.c.image(rel)
        f, params = self._filter(ctx.req)
        prev, nxt = self.c.neighbours(f, ref)
        sidecars = self.c.sidecars(ref)
        history = self.c.image_history(ref)
        gens = list(ref.watch.generators)
        at_risk = {}
        for g in gens:
            with contextlib.suppress(Problem, OSError, ConfinementError):
                at_risk[g] = self.c.person_caption_at_risk(ref, g)
        editable = [s for s in sidecars if s["generators"]]
        return self.page(
            ctx,
            "image.html",
            ref=ref,
            rel=ref.rel,
            folder=ref.rel.rsplit("/", 1)[0],
            name=ref.path.name,
            qs=urlencode(params),
            params=params,
            prev=prev,
            next=nxt,
            sidecars=sidecars,
            editable=editable,
            history=history,
            generators=gens,
            at_risk=at_risk,
            mtime=history["mtime_ns"] or 0,
            dimensions=_header_size(ref),
        )

    def _thumb(self, ctx: Ctx) -> Response:
        size = SIZES.get(ctx.req.query_one("size") or "s")
        if size is None:
            raise HTTPError(422, f"size is one of {sorted(SIZES)}")
        ref = self.c.image(ctx.req.params["path"])
        try:
            thumb = self.thumbs.get(ref, size)
        except ConfinementError as exc:
            raise Problem("forbidden", f"the path leaves its watched root: {exc}") from None
        except FileNotFoundError:
            raise Problem("not_found", f"no such image: {ref.rel}") from None
        except OSError as exc:  # unreadable (permissions, a vanished share): a placeholder
            thumb = None
            why = exc.strerror or "cannot be read"
        etag = f'"{thumb.etag}"' if thumb is not None else None
        headers = {"Cache-Control": "private, max-age=86400"}
        if thumb is None or thumb.placeholder:
            data, _, ctype = self.static["placeholder.svg"]
            headers["Cache-Control"] = "private, no-cache"
            headers["X-Thumbnail"] = "placeholder; " + (thumb.placeholder if thumb else why)
            if etag:
                headers["ETag"] = etag
            return Response(200, data, headers, content_type=ctype)
        headers["ETag"] = etag
        if ctx.req.headers.get("If-None-Match") == etag:
            return Response(304, b"", headers)
        return Response(200, thumb.data, headers, content_type="image/jpeg")

    def _original(self, ctx: Ctx) -> Response:
        """The image file itself, read confined and streamed; never interpreted by the
        browser as anything but its image type (nosniff, a sandboxing CSP)."""
        ref = self.c.image(ctx.req.params["path"])
        ctype = IMAGE_TYPES.get(ref.path.suffix.lower().lstrip("."), "application/octet-stream")
        fd, size = _open_confined(ref)

        def chunks() -> Iterator[bytes | None]:
            try:
                while chunk := os.read(fd, ORIGINAL_CHUNK):
                    yield chunk
            finally:
                os.close(fd)

        headers = {
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-cache",
            "Content-Disposition": "inline",
            "X-Image-Size": str(size),
        }
        return Response(200, stream=chunks(), headers=headers, content_type=ctype)

    def _request_status(self, ctx: Ctx) -> Response:
        return Response(200, self.c.request_status(ctx.req.params["request_id"]))

    # -- changes -----------------------------------------------------------------------
    def _save(self, ctx: Ctx) -> Response:
        ref = self.c.image(ctx.req.params["path"])
        ctype = ctx.form.get("type", "")
        caption = ctx.form.get("caption", "").replace("\r\n", "\n").replace("\r", "\n")
        out = self.c.write_caption(ref, ctype, caption)
        log.info("ui_caption_saved", path=ref.rel, type=ctype)
        return self._back(ctx, f"{UI_PREFIX}/image/{quote_path(ref.rel)}", out)

    def _regenerate(self, ctx: Ctx) -> Response:
        ref = self.c.image(ctx.req.params["path"])
        gen = ctx.form.get("generator") or ref.watch.generators[0]
        replace = ctx.form.get("replace_person") in ("1", "on", "true")
        person = self.c.person_caption_at_risk(ref, gen) if gen in self.c.models.slots else None
        if person and not replace:
            raise Problem(
                "conflict",
                f"{person} holds a person's caption: regenerating with {gen} replaces it. "
                "Tick \u201creplace the person's caption\u201d to go ahead.",
                "caption_exists",
            )
        out = self.c.generate(ref, gen, force=True, post_process=True)
        if isinstance(out, Queued):
            data: dict[str, Any] = {
                "queued": True,
                "request_id": out.request_id,
                "message": out.message,
            }
        else:
            data = out
        log.info("ui_regenerate", path=ref.rel, generator=gen, replaced_person=bool(person))
        return self._back(ctx, f"{UI_PREFIX}/image/{quote_path(ref.rel)}", data)

    def _retry(self, ctx: Ctx) -> Response:
        rel = ctx.form.get("path")
        if rel:
            gen = ctx.form.get("generator", "")
            ok = self.c.retry_job(self.c.image(rel), gen)
            data = {"count": int(ok)}
        else:
            data = {"count": self.c.retry(None, None, ["failed", "dead"])}
        return self._back(ctx, f"{UI_PREFIX}/", data)


def _tile(it: dict[str, Any]) -> dict[str, Any]:
    """What a gallery tile shows of an image (plain values: the template only prints)."""
    sub = it["rel"].split("/", 1)[1]
    folder, _, name = sub.rpartition("/")
    states = {j["state"] for j in it["jobs"].values()}
    person = any(c["by_person"] for c in it["captions"].values()) or any(
        j["outcome"] in ("caption_edited", "caption_exists") for j in it["jobs"].values()
    )
    badge = next((s for s in ("failed", "dead") if s in states), None)
    if badge is None and states & {"pending", "leased"}:
        badge = "pending"
    return {
        "rel": it["rel"],
        "folder": folder,
        "name": name,
        "v": it["mtime_ns"] or 0,
        "badge": badge,
        "person": person,
        "flags": "; ".join(f["reason"] for f in it["flags"]),
        "text": next((c["text"] for c in it["captions"].values() if c["text"]), None),
    }


_LIVE_SECTIONS = ("queue", "activity", "generators", "watchers", "errors", "backfill")


def _open_confined(ref: ImageRef) -> tuple[int, int]:
    """A read descriptor of the image, opened beneath its root (the API's rule), and
    its size."""
    root = Root(str(ref.watch.path), ref.watch.follow_symlinks)
    rel_dir = root.rel(str(ref.path.parent))
    try:
        with root.folder(rel_dir) as folder:
            fd = folder.open_file(ref.path.name)
    except ConfinementError as exc:
        raise Problem("forbidden", f"the path leaves its watched root: {exc}") from None
    except FileNotFoundError:
        raise Problem("not_found", f"no such image: {ref.rel}") from None
    except OSError as exc:
        raise Problem("not_found", f"cannot open the image: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Problem("invalid", "not a regular file")
    return fd, st.st_size


def _header_size(ref: ImageRef) -> tuple[int, int] | None:
    """The image's size as its header declares it (read confined; None when it cannot
    be read), without decoding the pixels."""
    try:
        fd, _ = _open_confined(ref)
    except Problem:
        return None
    try:
        with os.fdopen(fd, "rb") as fh, Image.open(fh) as img:
            return img.size
    except Exception:
        return None


def register_web(
    router: Router,
    control: Control,
    *,
    status: Callable[[], dict[str, Any]],
    token: bytes | None,
) -> WebUI:
    """Add the UI's routes under ``/ui/`` to ``router``; the returned ``WebUI`` holds
    the TCP gate for the listener (``ui.auth.tcp_gate``)."""
    ui = WebUI(control, status=status, token=token)
    ui.register(router)
    return ui
