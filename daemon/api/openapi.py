"""The declaration of an endpoint, and the OpenAPI 3.1 description built from the
route table and the pydantic schemas (nothing is written by hand twice)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from daemon import __version__
from daemon.api import schemas as s
from daemon.api.http import HandlerResult, Request


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    type: str = "string"  # string | boolean
    required: bool = False
    description: str = ""


@dataclass(slots=True)
class Endpoint:
    """One route with what OpenAPI needs, and whether it mutates (``admin``)."""

    method: str
    pattern: str
    summary: str
    tag: str
    admin: bool = False
    body: type[BaseModel] | dict[str, Any] | None = None  # a dict: a raw JSON schema
    query: list[Query] = field(default_factory=list)
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    stream: bool = False
    content_type: str = "application/json"  # of the 200 answer
    handler: Callable[[Request], HandlerResult] | None = None


_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::path)?\}")


def _add_schema(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    if model.__name__ not in components:
        schema = model.model_json_schema(ref_template=_REF)
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def build_openapi(endpoints: list[Endpoint]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    error = _add_schema(components, s.Error)
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        path = _PARAM.sub(r"{\1}", ep.pattern)
        op: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": (ep.method.lower() + "_" + re.sub(r"\W+", "_", path).strip("_")),
            "tags": [ep.tag],
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(ep.pattern)
        ]
        params += [
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "schema": {"type": q.type},
                **({"description": q.description} if q.description else {}),
            }
            for q in ep.query
        ]
        if params:
            op["parameters"] = params
        if ep.body is not None:
            schema = ep.body if isinstance(ep.body, dict) else _add_schema(components, ep.body)
            op["requestBody"] = {
                "required": isinstance(ep.body, dict)
                or bool(ep.body.model_json_schema().get("required")),
                "content": _json(schema),
            }
        responses: dict[str, Any] = {}
        for code, model in (ep.responses or {200: None}).items():
            if ep.stream:
                desc = "a stream of `data: {json}` lines, each a StreamEvent"
                if model is not None:
                    _add_schema(components, model)
                responses[str(code)] = {
                    "description": desc,
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            elif ep.content_type != "application/json":
                responses[str(code)] = {
                    "description": "success",
                    "content": {ep.content_type: {"schema": {"type": "string"}}},
                }
            else:
                schema = _add_schema(components, model) if model else {"type": "object"}
                responses[str(code)] = {"description": "success", "content": _json(schema)}
        responses["default"] = {
            "description": "error: {error, error_type, retryable}",
            "content": _json(error),
        }
        if ep.admin:
            op["description"] = (
                "Mutating: allowed for root, the daemon's user and [api].admin_group "
                "members (Unix socket), or any bearer-token holder (TCP listener)."
            )
        op["responses"] = responses
        paths.setdefault(path, {})[ep.method.lower()] = op
    paths["/openapi.json"] = {
        "get": {
            "summary": "This description",
            "operationId": "get_openapi",
            "tags": ["daemon"],
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": _json({"type": "object"})}
            },
        }
    }
    for item in paths.values():
        for op in item.values():
            op["responses"].setdefault(
                "default",
                {"description": "error: {error, error_type, retryable}", "content": _json(error)},
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "captiond control API",
            "version": __version__,
            "description": "HTTP over captiond's Unix socket (curl --unix-socket PATH "
            "http://localhost/...), or the optional loopback TCP listener with a bearer token.",
        },
        "servers": [{"url": "http://localhost"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
