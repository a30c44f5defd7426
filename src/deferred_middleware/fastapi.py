"""FastAPI: validate a deferred path operation's request before it is
accepted, and document deferred operations and the job routes in
``/openapi.json``.

:class:`DeferredMiddleware` finds a FastAPI app by itself (around it or
through ``app.add_middleware``); nothing here is called by users.

What runs when:

- At accept time, only FastAPI's own validation of the request: the path,
  query, header, cookie and body parameters that the operation *and every
  dependency it uses* declare. An invalid request gets the app's own
  ``RequestValidationError`` answer (FastAPI's ``422`` unless the app set
  another handler) and no job. No dependency and no endpoint code runs.
- In the job, the whole operation as FastAPI always runs it: dependencies
  (a database session, security schemes, ``yield`` dependencies and their
  cleanup), then the endpoint, once per attempt.
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Scope

from ._openapi import document_jobs
from ._routes import options_of
from .starlette import endpoints_with_routes, matched


class FastAPISupport:
    """The FastAPI app a middleware wraps: checks requests, documents jobs."""

    def __init__(self, app: FastAPI, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        _document(app, prefix)

    async def refusal(self, scope: Scope, body: bytes) -> ASGIApp | None:
        """The app's answer to an invalid deferred request, or None when
        the request may be accepted."""
        found = matched(self.app.routes, scope)
        if found is None or not isinstance(found[0], APIRoute):
            return None
        route, route_scope = found
        request = Request(route_scope, _replaying(body))
        try:
            errors = await request_errors(route, request)
        except Exception:  # as FastAPI answers a body it cannot parse
            unreadable = HTTPException(400, "There was an error parsing the body")
            return await self._answer(request, unreadable, http_exception_handler)
        if not errors:
            return None
        invalid = RequestValidationError(errors, body=body)
        return await self._answer(request, invalid, request_validation_exception_handler)

    async def _answer(self, request: Request, error: Exception, default: Any) -> ASGIApp:
        """The app's own handler for ``error``, or FastAPI's ``default``."""
        handler = self.app.exception_handlers.get(type(error), default)
        return await handler(request, error)  # type: ignore[no-any-return]


async def request_errors(route: APIRoute, request: Request) -> list[Any]:
    """FastAPI's validation errors for this request, as its router would
    find them, without calling any dependency or the endpoint."""
    body, errors = await _parsed_body(route, request)
    if errors:
        return errors
    embed = getattr(route, "_embed_body_fields", False)
    for dependant in _dependants(route.dependant):
        for fields, received in (
            (dependant.path_params, request.path_params),
            (dependant.query_params, request.query_params),
            (dependant.header_params, request.headers),
            (dependant.cookie_params, request.cookies),
        ):
            errors += request_params_to_args(fields, received)[1]
        if dependant.body_params:
            found = await request_body_to_args(
                body_fields=dependant.body_params, received_body=body, embed_body_fields=embed
            )
            errors += found[1]
    return errors


def _dependants(root: Dependant) -> Iterator[Dependant]:
    """The operation and each dependency once, as FastAPI solves them (a
    cached dependency used twice is solved once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        dependant = stack.pop()
        key = id(dependant.call)
        if dependant.call is not None and dependant.use_cache and key in seen:
            continue
        seen.add(key)
        yield dependant
        stack.extend(reversed(dependant.dependencies))


async def _parsed_body(route: APIRoute, request: Request) -> tuple[Any, list[Any]]:
    """The body as FastAPI hands it to validation: a form for form
    parameters, JSON for a JSON content type, the bytes otherwise."""
    field = route.body_field
    if field is None:
        return None, []
    if isinstance(field.field_info, params.Form):
        return await request.form(), []
    raw = await request.body()
    if not raw:
        return None, []
    message = email.message.Message()
    message["content-type"] = request.headers.get("content-type", "application/json")
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        return raw, []
    try:
        return json.loads(raw), []
    except json.JSONDecodeError as error:
        invalid = {
            "type": "json_invalid",
            "loc": ("body", error.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": error.msg},
        }
        return None, [invalid]


def _replaying(body: bytes) -> Any:
    """``receive`` for a body already read: given once, then a disconnect."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _document(app: FastAPI, prefix: str) -> None:
    """``app.openapi`` adds the 202 of each deferred operation and the job routes."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            deferred = [
                (route.path_format, method, options)
                for route, endpoint in endpoints_with_routes(app.routes)
                if isinstance(route, APIRoute) and route.include_in_schema
                if (options := options_of(endpoint)) is not None
                for method in route.methods
            ]
            document_jobs(schema, prefix, deferred)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
