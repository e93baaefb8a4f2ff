"""The control API's route table: HTTP parsing and authorisation, then ``Control``.

Every route is declared once, with what OpenAPI needs (summary, query parameters,
body and response models) and whether it mutates (``admin``): mutating routes check
the peer (``Authoriser.require_admin``) before they parse anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from daemon.api import schemas as s
from daemon.api.http import HandlerResult, Request, Response
from daemon.api.listeners import ControlServer
from daemon.api.security import resolve_image

if TYPE_CHECKING:
    from daemon.api.control import Control


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    type: str = "string"  # string | boolean
    required: bool = False
    description: str = ""


@dataclass(slots=True)
class Endpoint:
    method: str
    pattern: str
    summary: str
    tag: str
    admin: bool = False
    body: type[BaseModel] | dict[str, Any] | None = None  # a dict: a raw JSON schema
    query: list[Query] = field(default_factory=list)
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    stream: bool = False
    handler: Callable[[Request], HandlerResult] | None = None


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
    raise s.APIError(422, f"query parameter {name} must be true or false, not {raw!r}")


def qstr(req: Request, name: str, *, max_len: int = 256) -> str | None:
    raw = req.query_one(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len or "\x00" in raw:
        raise s.APIError(422, f"query parameter {name} is invalid")
    return raw


def endpoints(c: Control) -> list[Endpoint]:
    """The API's routes, bound to ``c``."""

    def image(req: Request) -> Any:
        return resolve_image(c.watches, req.params["path"])

    def generators(req: Request) -> dict[str, Any]:
        return {"generators": c.generators()}

    def generate(req: Request) -> Response:
        ref = image(req)
        return c.generate(
            ref,
            qstr(req, "generator"),
            force=qbool(req, "force", False),
            post_process=qbool(req, "post_process", True),
        )

    def request_status(req: Request) -> dict[str, Any]:
        return c.request_status(req.params["request_id"])

    def request_queue(req: Request) -> dict[str, Any]:
        return c.request_queue_status()

    def cancel(req: Request) -> dict[str, Any]:
        return c.cancel_request(req.params["request_id"])

    def batch(req: Request) -> Response:
        return c.batch(s.parse_body(req, s.BatchRequest))

    def put_caption(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.CaptionWrite)
        return c.write_caption(image(req), body.type, body.caption)

    def delete_caption(req: Request) -> dict[str, Any]:
        ctype = qstr(req, "caption_type", max_len=64)
        if ctype is None:
            raise s.APIError(422, "the caption_type query parameter is required")
        return c.delete_caption(image(req), ctype)

    def get_types(req: Request) -> dict[str, Any]:
        return c.caption_types()

    def set_types(req: Request) -> dict[str, Any]:
        return c.set_caption_types(s.parse_body(req, s.CaptionTypesUpdate).types)

    def captioner_config(req: Request) -> dict[str, Any]:
        data = req.json()
        if not isinstance(data, dict):
            raise s.APIError(422, "the request body must be a JSON object of settings")
        return c.set_generator_config(req.params["name"], data)

    def get_pp(req: Request) -> dict[str, Any]:
        return c.postprocess()

    def put_pp(req: Request) -> dict[str, Any]:
        return c.set_postprocess(s.parse_body(req, s.PostProcessUpdate))

    def queue_state(req: Request) -> dict[str, Any]:
        return c.queue_state()

    def pause(req: Request) -> dict[str, Any]:
        return c.pause(s.parse_body(req, s.PauseRequest, required=False).root)

    def resume(req: Request) -> dict[str, Any]:
        return c.resume(s.parse_body(req, s.PauseRequest, required=False).root)

    def rescan(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.RescanRequest, required=False)
        return c.rescan(body.root, body.recaption)

    def retry(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.RetryRequest, required=False)
        return {"count": c.retry(body.root, body.generator, list(body.states))}

    def purge(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.PurgeRequest, required=False)
        return {"count": c.purge(body.root, body.generator, list(body.states))}

    def models_list(req: Request) -> dict[str, Any]:
        return {"models": c.models.list(), "residency": c.models.summary()}

    def model_name(req: Request) -> str:
        name = req.params["name"]
        if c.models.get(name) is None:
            raise s.APIError(404, f"no generator {name!r} is in use", "not_found")
        return name

    def model_load(req: Request) -> dict[str, Any]:
        body = s.parse_body(req, s.ModelLoadRequest, required=False)
        return c.models.preload(model_name(req), wait=body.wait, keep_alive=body.keep_alive)

    def model_unload(req: Request) -> dict[str, Any]:
        return c.models.unload(model_name(req))

    gen_q = [
        Query("generator", description="generator name (default: the root's first)"),
        Query("force", "boolean", description="replace an existing caption (default false)"),
        Query("post_process", "boolean", description="run post-processing (default true)"),
    ]
    return [
        Endpoint(
            "GET",
            "/api/models",
            "Models in memory or loading, most recently used first",
            "models",
            handler=models_list,
        ),
        Endpoint(
            "POST",
            "/api/models/{name}/load",
            "Load a generator's model now (keep_alive: seconds, -1 = keep)",
            "models",
            admin=True,
            body=s.ModelLoadRequest,
            handler=model_load,
        ),
        Endpoint(
            "POST",
            "/api/models/{name}/unload",
            "Unload a generator's model after its running batch",
            "models",
            admin=True,
            handler=model_unload,
        ),
        Endpoint(
            "GET",
            "/api/generators",
            "Generators, their state and config schema",
            "generators",
            handler=generators,
            responses={200: s.GeneratorList},
        ),
        Endpoint(
            "POST",
            "/api/generate-caption/{path:path}",
            "Caption one image now (answers queued when the model is not ready)",
            "captions",
            admin=True,
            query=gen_q,
            handler=generate,
            responses={200: s.CaptionResult, 202: s.Queued},
        ),
        Endpoint(
            "GET",
            "/api/caption-request-status/{request_id}",
            "One queued request",
            "requests",
            handler=request_status,
            responses={200: s.RequestStatus},
        ),
        Endpoint(
            "GET",
            "/api/caption-request-queue-status",
            "Explicit requests and the queue",
            "requests",
            handler=request_queue,
            responses={200: s.RequestQueueStatus},
        ),
        Endpoint(
            "DELETE",
            "/api/caption-request/{request_id}",
            "Cancel a request not yet started",
            "requests",
            admin=True,
            handler=cancel,
            responses={200: s.RequestStatus},
        ),
        Endpoint(
            "POST",
            "/api/batch-generate-captions",
            "Caption many images; streams `data: {json}` lines (start, item_complete, "
            "complete); a client that disconnects cancels what has not started",
            "captions",
            admin=True,
            body=s.BatchRequest,
            handler=batch,
            stream=True,
            responses={200: s.StreamEvent},
        ),
        Endpoint(
            "PUT",
            "/api/caption/{path:path}",
            "Write a caption sidecar (atomically; a person's caption: never overwritten)",
            "captions",
            admin=True,
            body=s.CaptionWrite,
            handler=put_caption,
            responses={200: s.CaptionWritten},
        ),
        Endpoint(
            "DELETE",
            "/api/caption/{path:path}",
            "Remove a caption sidecar",
            "captions",
            admin=True,
            query=[Query("caption_type", required=True)],
            handler=delete_caption,
            responses={200: s.CaptionWritten},
        ),
        Endpoint(
            "GET",
            "/api/caption-types",
            "Recognised caption sidecar types",
            "settings",
            handler=get_types,
            responses={200: s.CaptionTypes},
        ),
        Endpoint(
            "POST",
            "/api/caption-types",
            "Replace the user-managed caption types",
            "settings",
            admin=True,
            body=s.CaptionTypesUpdate,
            handler=set_types,
            responses={200: s.CaptionTypes},
        ),
        Endpoint(
            "PUT",
            "/api/captioner-config/{name}",
            "Change a generator's settings (merged, validated, persisted; the generator is reset)",
            "settings",
            admin=True,
            body={"type": "object", "additionalProperties": True},
            handler=captioner_config,
            responses={200: s.CaptionerConfig},
        ),
        Endpoint(
            "GET",
            "/api/caption-post-processing",
            "The post-processing chain",
            "settings",
            handler=get_pp,
            responses={200: s.PostProcessSettings},
        ),
        Endpoint(
            "PUT",
            "/api/caption-post-processing",
            "Change the post-processing chain",
            "settings",
            admin=True,
            body=s.PostProcessUpdate,
            handler=put_pp,
            responses={200: s.PostProcessSettings},
        ),
        Endpoint(
            "GET",
            "/api/queue",
            "Queue state by root, paused roots",
            "queue",
            handler=queue_state,
            responses={200: s.QueueState},
        ),
        Endpoint(
            "POST",
            "/api/queue/pause",
            "Pause the worker (all, or one root)",
            "queue",
            admin=True,
            body=s.PauseRequest,
            handler=pause,
            responses={200: s.QueueState},
        ),
        Endpoint(
            "POST",
            "/api/queue/resume",
            "Resume (all, or one root)",
            "queue",
            admin=True,
            body=s.PauseRequest,
            handler=resume,
            responses={200: s.QueueState},
        ),
        Endpoint(
            "POST",
            "/api/queue/rescan",
            "Rescan a root (or all); recaption=true also re-captions what captiond wrote "
            "and nobody edited",
            "queue",
            admin=True,
            body=s.RescanRequest,
            handler=rescan,
        ),
        Endpoint(
            "POST",
            "/api/queue/retry",
            "Retry failed or dead jobs",
            "queue",
            admin=True,
            body=s.RetryRequest,
            handler=retry,
            responses={200: s.CountResult},
        ),
        Endpoint(
            "POST",
            "/api/queue/purge",
            "Delete jobs by state (never running ones)",
            "queue",
            admin=True,
            body=s.PurgeRequest,
            handler=purge,
            responses={200: s.CountResult},
        ),
    ]


def register_api(server: ControlServer, control: Control) -> list[Endpoint]:
    """Add the API's routes (and ``GET /openapi.json``) to ``server``."""
    from daemon.api.openapi import build_openapi

    eps = endpoints(control)

    def guarded(ep: Endpoint) -> Callable[[Request], HandlerResult]:
        handler = ep.handler
        assert handler is not None
        if not ep.admin:
            return handler

        def check(req: Request) -> HandlerResult:
            control.auth.require_admin(req)
            return handler(req)

        return check

    for ep in eps:
        server.add_route(ep.method, ep.pattern, guarded(ep))
    spec = build_openapi(eps)
    server.add_route("GET", "/openapi.json", lambda req: spec)
    return eps
