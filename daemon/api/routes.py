"""The control API's route table: HTTP in, the control facade, HTTP out.

Every route is declared once (:class:`~daemon.api.openapi.Endpoint`), with what OpenAPI
needs and whether it mutates (``admin``): mutating routes check the peer
(``Authoriser.require_admin``) before they parse anything else. Handlers parse the
request, call :class:`~daemon.api.control.Control`, and turn its results and its
:class:`~daemon.api.problems.Problem` refusals into status codes and bodies here, and
nowhere else.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from daemon import __version__
from daemon.api import schemas as s
from daemon.api.control import Control, Queued
from daemon.api.http import HandlerResult, HTTPError, Request, Response, Router
from daemon.api.openapi import Endpoint, Query, build_openapi
from daemon.api.problems import Problem

# error_type of a failed explicit request -> HTTP status
_RESULT_STATUS = {
    "caption_exists": 409,
    "caption_edited": 409,
    "bad_image": 422,
    "model_unavailable": 503,
    "cancelled": 409,
    "unexpected": 500,
    "worker_crash": 500,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def qbool(req: Request, name: str, default: bool) -> bool:
    raw = req.query_one(name)
    if raw is None or raw == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise Problem("invalid", f"query parameter {name} must be true or false, not {raw!r}")


def qstr(req: Request, name: str, *, max_len: int = 256) -> str | None:
    raw = req.query_one(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len or "\x00" in raw:
        raise Problem("invalid", f"query parameter {name} is invalid")
    return raw


def result_response(result: dict[str, Any]) -> Response:
    """An explicit request's result: 200 on success, else a status by its error type."""
    if result.get("success"):
        return Response(200, result)
    error_type = result.get("error_type", "unexpected")
    status = _RESULT_STATUS.get(error_type, 503 if result.get("retryable") else 422)
    return Response(status, result)


def queued_response(q: Queued) -> Response:
    body = {
        "success": False,
        "queued": True,
        "request_id": q.request_id,
        "message": f"{q.message}; the request is queued (ID {q.request_id}): follow it with "
        f"GET /api/caption-request-status/{q.request_id}",
        "error": f"Request queued (ID: {q.request_id})",
        "error_type": q.error_type,
        "retryable": True,
    }
    return Response(202, body, {"Location": f"/api/caption-request-status/{q.request_id}"})


def event_stream(events: Iterator[dict[str, Any] | None]) -> Iterator[bytes | None]:
    """``data: {json}`` framing of a stream of events; None passes through (a check
    that the client is still there). Closing this closes ``events`` (it cancels)."""
    try:
        for event in events:
            if event is None:
                yield None
            else:
                yield b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def health_handler(health: Callable[[], dict[str, Any]]) -> Callable[[Request], Response]:
    """``GET /health``: cheap; ``{"status": "ok", "uptime_seconds", "version", "pid"}``
    plus what ``health()`` adds. Any status but ``ok`` (``degraded``: paused by a
    condition it resolves by itself, with the reason) answers 503."""
    started = time.monotonic()

    def handler(req: Request) -> Response:
        body: dict[str, Any] = {
            "status": "ok",
            "uptime_seconds": round(time.monotonic() - started, 3),
            "version": __version__,
            "pid": os.getpid(),
        }
        body.update(health())
        return Response(200 if body["status"] == "ok" else 503, body)

    return handler


def endpoints(
    c: Control,
    *,
    status: Callable[[], dict[str, Any]],
    health: Callable[[], dict[str, Any]],
    metrics: Callable[[], tuple[bytes, str]],
) -> list[Endpoint]:
    """The API's routes, bound to ``c`` and the daemon's status providers."""
    health_route = health_handler(health)

    def status_route(req: Request) -> dict[str, Any]:
        return status()

    def metrics_route(req: Request) -> Response:
        payload, content_type = metrics()
        return Response(200, payload, content_type=content_type)

    def image(req: Request) -> Any:
        return c.image(req.params["path"])

    def generate(req: Request) -> Response:
        ref = image(req)
        out = c.generate(
            ref,
            qstr(req, "generator"),
            force=qbool(req, "force", False),
            post_process=qbool(req, "post_process", True),
        )
        return queued_response(out) if isinstance(out, Queued) else result_response(out)

    def batch(req: Request) -> Response:
        events = c.batch(s.parse_body(req, s.BatchRequest))
        return Response(200, stream=event_stream(events), content_type="text/plain; charset=utf-8")

    def put_caption(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.CaptionWrite)
        return c.write_caption(image(req), body.type, body.caption)

    def delete_caption(req: Request) -> dict[str, Any]:
        ctype = qstr(req, "caption_type", max_len=64)
        if ctype is None:
            raise Problem("invalid", "the caption_type query parameter is required")
        return c.delete_caption(image(req), ctype)

    def captioner_config(req: Request) -> dict[str, Any]:
        data = req.json()
        if not isinstance(data, dict):
            raise Problem("invalid", "the request body must be a JSON object of settings")
        return c.set_generator_config(req.params["name"], data)

    def pp_shape(req: Request) -> str:
        shape = qstr(req, "shape", max_len=16) or "captiond"
        if shape not in ("captiond", "reynard"):
            raise Problem("invalid", "shape must be captiond or reynard")
        return shape

    def set_postprocess(req: Request) -> dict[str, Any]:
        data = req.json()
        if not isinstance(data, dict):
            raise Problem("invalid", "the request body must be a JSON object")
        return c.set_postprocess(data)

    def reset_config(req: Request) -> dict[str, Any]:
        name = req.params["name"]
        return c.reset_overrides(None if name == "_all" else name, qstr(req, "key", max_len=128))

    def model_name(req: Request) -> str:
        name = req.params["name"]
        if c.models.get(name) is None:
            if name in c.discovered:
                c.slot(name)  # explains how to put it in use
            raise Problem("not_found", f"no generator {name!r} is in use", "not_found")
        return name

    def model_load(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.ModelLoadRequest, required=False)
        return c.models.preload(model_name(req), wait=body.wait, keep_alive=body.keep_alive)

    def retry(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.RetryRequest, required=False)
        return {"count": c.retry(body.root, body.generator, list(body.states))}

    def purge(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.PurgeRequest)
        return {"count": c.purge(body.root, body.generator, list(body.states))}

    def report(req: Request) -> dict[str, Any]:
        scopes = req.query.get("scope", [])
        if len(scopes) > 100 or any(len(x) > 1024 or "\x00" in x for x in scopes):
            raise Problem("invalid", "at most 100 scopes of at most 1024 characters")
        options: dict[str, Any] = {}
        for name in _REPORT_INTS:
            raw = qstr(req, name, max_len=12)
            if raw is not None:
                try:
                    options[name] = int(raw)
                except ValueError:
                    raise Problem("invalid", f"{name} must be a whole number") from None
        if (trigger := qstr(req, "trigger", max_len=200)) is not None:
            options["trigger"] = trigger
        return c.report(scopes, options)

    def refresh(req: Request) -> dict[str, Any]:
        return c.refresh_report(s.parse_body(req, s.ReportRefresh, required=False).scopes)

    def dismiss(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.FlagDismiss)
        return c.dismiss_flag(body.path, body.generator, body.check)

    gen_q = [
        Query("generator", description="generator name (default: the root's first)"),
        Query("force", "boolean", description="replace an existing caption (default false)"),
        Query("post_process", "boolean", description="run post-processing (default true)"),
    ]
    E = Endpoint
    return [
        E("GET", "/health",
          "Liveness (cheap): 200 ok; 503 degraded (paused by a condition, with the reason)",
          "daemon",
          handler=health_route),
        E("GET", "/status", "Queue, generators, watchers, conditions, recent errors", "daemon",
          handler=status_route),
        E("GET", "/metrics", "Prometheus metrics", "daemon", handler=metrics_route,
          content_type="text/plain; version=0.0.4"),
        E("GET", "/api/roots", "The watched roots as the daemon resolved them", "daemon",
          handler=lambda req: {"roots": c.roots()}),
        E("GET", "/api/backfills",
          "Backfills on a Ray cluster (captiond backfill): progress, actors, leased jobs",
          "queue", handler=lambda req: c.backfills()),
        E("GET", "/api/models", "Models in memory or loading, most recently used first", "models",
          handler=lambda req: {"models": c.models.list(), "residency": c.models.summary()}),
        E("POST", "/api/models/{name}/load",
          "Load a generator's model now (keep_alive: seconds, -1 = keep)", "models", admin=True,
          body=s.ModelLoadRequest, handler=model_load),
        E("POST", "/api/models/{name}/unload", "Unload a generator's model after its running batch",
          "models", admin=True, handler=lambda req: c.models.unload(model_name(req))),
        E("GET", "/api/generators", "Generators, their state and config schema", "generators",
          handler=lambda req: {"generators": c.generators()}, responses={200: s.GeneratorList}),
        E("POST", "/api/generate-caption/{path:path}",
          "Caption one image now (answers queued when the model is not ready)", "captions",
          admin=True, query=gen_q, handler=generate,
          responses={200: s.CaptionResult, 202: s.Queued}),
        E("GET", "/api/caption-request-status/{request_id}", "One queued request", "requests",
          handler=lambda req: c.request_status(req.params["request_id"]),
          responses={200: s.RequestStatus}),
        E("GET", "/api/caption-request-queue-status", "Explicit requests and the queue", "requests",
          handler=lambda req: c.request_queue_status(), responses={200: s.RequestQueueStatus}),
        E("DELETE", "/api/caption-request/{request_id}", "Cancel a request not yet started",
          "requests", admin=True, handler=lambda req: c.cancel_request(req.params["request_id"]),
          responses={200: s.RequestStatus}),
        E("POST", "/api/batch-generate-captions",
          "Caption many images; streams `data: {json}` lines (start, item_complete, waiting, "
          "complete); a client that disconnects cancels what has not started", "captions",
          admin=True, body=s.BatchRequest, handler=batch, stream=True,
          responses={200: s.StreamEvent}),
        E("PUT", "/api/caption/{path:path}",
          "Write a caption sidecar (atomically; a person's caption: never overwritten)",
          "captions", admin=True, body=s.CaptionWrite, handler=put_caption,
          responses={200: s.CaptionWritten}),
        E("DELETE", "/api/caption/{path:path}", "Remove a caption sidecar", "captions", admin=True,
          query=[Query("caption_type", required=True)], handler=delete_caption,
          responses={200: s.CaptionWritten}),
        E("GET", "/api/caption-types", "Recognised caption sidecar types", "settings",
          handler=lambda req: c.caption_types(), responses={200: s.CaptionTypes}),
        E("POST", "/api/caption-types", "Replace the user-managed caption types", "settings",
          admin=True, body=s.CaptionTypesUpdate,
          handler=lambda req: c.set_caption_types(s.parse_body(req, s.CaptionTypesUpdate).types),
          responses={200: s.CaptionTypes}),
        E("PUT", "/api/captioner-config/{name}",
          "Change a generator's settings (validated like config.toml, persisted; the generator "
          "is reloaded)", "settings", admin=True,
          body={"type": "object", "additionalProperties": True}, handler=captioner_config,
          responses={200: s.CaptionerConfig}),
        E("DELETE", "/api/captioner-config/{name}",
          "Drop settings changed through the API (all of a generator's, one key with ?key=, or "
          "every override with the name _all): config.toml applies again", "settings", admin=True,
          query=[Query("key")], handler=reset_config),
        E("GET", "/api/caption-post-processing",
          "The post-processing chain (captiond's shape, or Reynard's with ?shape=reynard)",
          "settings", query=[Query("shape", description="captiond (default) or reynard")],
          handler=lambda req: c.postprocess(pp_shape(req)),
          responses={200: s.PostProcessSettings}),
        E("PUT", "/api/caption-post-processing",
          "Change the post-processing chain: a partial document in captiond's shape or in "
          "Reynard's (enabled, rules, pipeline, overrides of rules); the answer is in the "
          "shape sent", "settings", admin=True,
          body={"oneOf": [s.PostProcessUpdate.model_json_schema(),
                          s.ReynardPostProcessing.model_json_schema()]},
          handler=set_postprocess, responses={200: s.PostProcessSettings}),
        E("GET", "/api/queue", "Queue state by root, paused roots", "queue",
          handler=lambda req: c.queue_state(), responses={200: s.QueueState}),
        E("POST", "/api/queue/pause", "Pause the worker (all, or one root)", "queue", admin=True,
          body=s.PauseRequest,
          handler=lambda req: c.pause(s.parse_body(req, s.PauseRequest, required=False).root),
          responses={200: s.QueueState}),
        E("POST", "/api/queue/resume", "Resume (all, or one root)", "queue", admin=True,
          body=s.PauseRequest,
          handler=lambda req: c.resume(s.parse_body(req, s.PauseRequest, required=False).root),
          responses={200: s.QueueState}),
        E("POST", "/api/queue/rescan",
          "Rescan a root (or all); recaption=true also re-captions what captiond wrote and "
          "nobody edited", "queue", admin=True, body=s.RescanRequest,
          handler=lambda req: c.rescan(*_rescan_args(req))),
        E("POST", "/api/queue/retry", "Retry failed or dead jobs", "queue", admin=True,
          body=s.RetryRequest, handler=retry, responses={200: s.CountResult}),
        E("POST", "/api/queue/purge",
          "Delete jobs in the states named (never running ones); images whose unfinished jobs "
          "are purged are found again by the next scan", "queue", admin=True,
          body=s.PurgeRequest, handler=purge, responses={200: s.CountResult}),
        E("GET", "/api/report",
          "The dataset report (coverage, tags, length, images, flags) of watched roots or "
          "folders, from the index", "report", handler=report,
          query=[Query("scope", description="ROOT or ROOT/sub/folder (repeatable; default "
                       "all)"), *[Query(n, "integer") for n in _REPORT_INTS],
                 Query("trigger", description="the trigger word (default: each root's)")]),
        E("POST", "/api/report/refresh",
          "Read caption sidecars back: the texts of captions edited on disk since captiond "
          "wrote them", "report", admin=True, body=s.ReportRefresh, handler=refresh),
        E("POST", "/api/flags/dismiss",
          "Dismiss an image's caption-check flags (until the image changes)", "report",
          admin=True, body=s.FlagDismiss, handler=dismiss, responses={200: s.CountResult}),
    ]  # fmt: skip


_REPORT_INTS = ("resolution", "bucket_step", "min_bucket", "max_bucket", "near_distance", "top",
                "examples", "folders")  # fmt: skip


def _rescan_args(req: Request) -> tuple[str | None, bool]:
    body = s.parse_body(req, s.RescanRequest, required=False)
    return body.root, body.recaption


def _http(handler: Callable[[Request], HandlerResult]) -> Callable[[Request], HandlerResult]:
    """A Problem from the facade becomes the HTTP error of its kind."""

    def run(req: Request) -> HandlerResult:
        try:
            return handler(req)
        except Problem as p:
            raise HTTPError(
                p.status,
                p.message,
                p.error_type,
                retryable=p.retryable,
                details=p.details,
                extra=p.extra,
            ) from None

    return run


def register_api(
    router: Router,
    control: Control,
    *,
    status: Callable[[], dict[str, Any]],
    health: Callable[[], dict[str, Any]],
    metrics: Callable[[], tuple[bytes, str]],
) -> list[Endpoint]:
    """Add the API's routes (and ``GET /openapi.json``) to ``router``."""
    eps = endpoints(control, status=status, health=health, metrics=metrics)

    def admin(req: Request) -> None:
        _http(control.auth.require_admin)(req)

    for ep in eps:
        assert ep.handler is not None
        # Mutating routes check the peer before the body is read (and before parsing).
        router.add(ep.method, ep.pattern, _http(ep.handler), guard=admin if ep.admin else None)
    spec = build_openapi(eps)
    router.add("GET", "/openapi.json", lambda req: spec)
    return eps
