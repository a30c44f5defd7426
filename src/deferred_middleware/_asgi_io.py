"""Reading an ASGI request and sending a :class:`~._protocol.Reply`: the
ASGI adapter's I/O, apart from its decisions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, HTTPScope

from . import _protocol as protocol
from ._jobs import Headers, RequestInfo, StoredRequest
from ._prefer import NONE as NO_PREFERENCES
from ._prefer import Preferences, parse_prefer


def route_path(scope: HTTPScope) -> str:
    """The path below ``root_path``, as the app's router sees it."""
    path = scope["path"]
    root_path = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :][:1] in ("", "/"):
        return path[len(root_path) :]
    return path


def request_headers(scope: HTTPScope) -> Headers:
    """The request's headers as text, names in lower case: decoded once for
    a deferred request, whose headers are read three times (its ``Prefer``,
    its length, and the copy that is stored)."""
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]


def stored_request(scope: HTTPScope, body: bytes, headers: Headers) -> StoredRequest:
    """The request to store; ``headers`` are :func:`request_headers`."""
    server, client = scope.get("server"), scope.get("client")
    return StoredRequest(
        method=scope["method"],
        path=route_path(scope),
        query_string=scope.get("query_string", b""),
        headers=headers,
        body=body,
        scheme=scope.get("scheme", "http"),
        root_path=scope.get("root_path", ""),
        http_version=scope.get("http_version", "1.1"),
        server=(server[0], server[1] or 0) if server else None,
        client=(client[0], client[1]) if client else None,
    )


def request_info(scope: HTTPScope, request: StoredRequest | None = None) -> RequestInfo:
    """What ``owner=fn`` sees: the stored request, or the request line and headers."""
    if request is not None:
        return RequestInfo.of(request, scope=scope)  # type: ignore[arg-type]
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
    path, query = route_path(scope), scope.get("query_string", b"")
    return RequestInfo(scope["method"], path, query, headers, scope=scope)  # type: ignore[arg-type]


def has_header(scope: HTTPScope, name: str) -> bool:
    wanted = name.encode("latin-1")
    return any(key.lower() == wanted for key, _ in scope["headers"])


def preferences(headers: Headers) -> Preferences:
    """What ``Prefer`` asks; ``headers`` are :func:`request_headers`."""
    values = [value for name, value in headers if name == "prefer"]
    return parse_prefer(values) if values else NO_PREFERENCES


def conditions(scope: HTTPScope) -> protocol.Conditions:
    """The headers the job routes read, in one pass."""
    if_none_match = last_event_id = None
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"if-none-match":
            if_none_match = value.decode("latin-1")
        elif name == b"last-event-id":
            last_event_id = value.decode("latin-1")
    return protocol.Conditions(if_none_match, last_event_id)


def varying_on_prefer(send: ASGISendCallable) -> ASGISendCallable:
    """``send`` adding ``Vary: Prefer`` to the response: the answer of a
    ``mode="prefer"`` route depends on that header."""

    async def send_varying(message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"vary", b"Prefer")]
            message = {**message, "headers": headers}  # type: ignore[assignment]
        await send(message)

    return send_varying


async def send_reply(send: ASGISendCallable, reply: protocol.Reply) -> None:
    await _start(send, reply)
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _start(send: ASGISendCallable, reply: protocol.Reply) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": headers,
            "trailers": False,
        }
    )


async def send_stream(
    receive: ASGIReceiveCallable, send: ASGISendCallable, reply: protocol.Reply
) -> None:
    """Send an event stream until it ends or the client disconnects, then
    stop it at once (which drops its subscription)."""
    stream = reply.stream
    assert isinstance(stream, AsyncIterator)
    await _start(send, reply)

    async def pump() -> None:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    sending = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, watching):
            task.cancel()
        await asyncio.gather(sending, watching, return_exceptions=True)
        await stream.aclose()  # type: ignore[attr-defined]
    if not sending.cancelled() and sending.exception() is not None:
        raise sending.exception()  # type: ignore[misc]
