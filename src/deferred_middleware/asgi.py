"""``DeferredMiddleware``: deferred routes for Starlette and any ASGI app."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from asgiref.typing import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)

from . import _protocol as protocol
from ._asgi_io import (
    conditions,
    has_header,
    preferences,
    request_headers,
    request_info,
    route_path,
    send_reply,
    send_stream,
    stored_request,
    varying_on_prefer,
)
from ._assemble import assemble
from ._dashboard import ACTION_HEADER
from ._freeze import freeze_what_was_loaded
from ._jobs import DeferredOptions, Headers, StoredRequest, owner_key
from ._operator import METRICS
from ._prefer import Preferences
from ._refusals import Refusal
from ._routes import NEVER_DEFERRED, queues_of
from .runner.asgi import TaskLauncher
from .store import StoreUnavailable, Unstorable

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._config import Options


def find_routes(app: Any) -> Any:
    """The routes of the router inside ``app``, following wrapping middleware."""
    for _ in range(32):
        routes = getattr(app, "routes", None)
        if routes is not None:
            return routes
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


class DeferredMiddleware:
    """Answer requests to deferred routes with ``202 Accepted`` and run them later.

    Routes are deferred by marking their endpoint with ``@deferred`` (found
    through the Starlette router) or by naming them in ``routes``, for apps
    that cannot be edited. The job routes under ``prefix`` are served here;
    every other request passes through untouched. Options: see
    :class:`deferred_middleware._config.Options`.
    """

    def __init__(
        self,
        app: ASGI3Application,
        *,
        find_options: Callable[[HTTPScope], DeferredOptions | None] | None = None,
        find_queues: Callable[[], Iterable[str]] | None = None,
        **options: Unpack[Options],
    ) -> None:
        """``find_options`` and ``find_queues`` let a framework other than
        Starlette tell which views are marked (see :mod:`deferred_middleware.django`)."""
        self.app = app
        self.find_options = find_options
        self.find_queues = find_queues
        self.launcher = TaskLauncher(app)
        parts = assemble(self.launcher, **options)
        self.config = parts.config
        self.patterns = parts.patterns
        self.core = parts.core
        self.dispatcher = parts.dispatcher
        self.operator = parts.operator
        self.metrics = parts.metrics
        self._executing = False
        self._marked: Any = None
        self._fastapi: Any = _UNSEEN
        """The app's FastAPI glue, found at the first request (None: not FastAPI)."""
        self.run_queues: frozenset[str] = frozenset()
        """Set by ``deferred-middleware worker --queue``: exactly these queues."""

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if self._fastapi is _UNSEEN:
            self._fastapi = fastapi_support([scope.get("app"), self.app], self.config.prefix)
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        tail = protocol.job_route_tail(self.config.prefix, path, scope.get("raw_path"))
        if tail is not None:
            await self._answer_job_route(scope, receive, send, tail)
            return
        options = self._deferred_options(scope, path)
        if options is None:
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        wanted = preferences(headers)
        if options.mode == "prefer" and not wanted.respond_async:
            await self.app(scope, receive, varying_on_prefer(send))
            return
        if self.config.execute and not self._executing:
            self.start_executor(scope.get("state"))  # type: ignore[arg-type]
        await DeferringResponder(self, options, wanted, headers)(scope, receive, send)

    async def _answer_job_route(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, tail: str
    ) -> None:
        operator_route = self.operator.route_of(tail)
        if operator_route is not None:
            await send_reply(send, await self._answer_operator(scope, operator_route))
            return
        reply = await self.core.answer_async(
            tail,
            scope["method"],
            scope.get("query_string", b""),
            scope.get("root_path", ""),
            conditions(scope),
            await self.owner_of(scope),
        )
        if reply.stream is None:
            await send_reply(send, reply)
        else:
            await send_stream(receive, send, reply)

    async def _answer_operator(self, scope: HTTPScope, route: str) -> protocol.Reply:
        method, operator = scope["method"], self.operator
        if route == METRICS:
            return await self.core.offload(operator.metrics, method)
        allowed = bool(await self._ask(self.config.dashboard, scope))
        from_page = has_header(scope, ACTION_HEADER)
        query = scope.get("query_string", b"")
        return await self.core.offload(operator.dashboard, method, query, allowed, from_page)

    async def owner_of(self, scope: HTTPScope, request: StoredRequest | None = None) -> str | None:
        """Who is asking, as ``owner=fn`` names them (None without one)."""
        if self.config.owner is None:
            return None
        return owner_key(await self._ask(self.config.owner, scope, request))

    @staticmethod
    async def _ask(
        fn: Callable[..., Any] | None, scope: HTTPScope, request: StoredRequest | None = None
    ) -> Any:
        """What ``owner=fn`` or ``dashboard=fn`` says of this request; either
        may be a coroutine function here, to reuse an async authentication
        backend."""
        if fn is None:
            return None
        said = fn(request_info(scope, request))
        if inspect.isawaitable(said):
            said = await said
        return said

    def _deferred_options(self, scope: HTTPScope, path: str) -> DeferredOptions | None:
        method = scope["method"]
        if method in NEVER_DEFERRED:
            return None
        options = self.patterns.match(method, path) if self.patterns else None
        if options is None and self.find_options is not None:
            return self.find_options(scope)
        if options is None:
            options = self._marked_options(scope, method, path)
        return options

    def _marked_options(self, scope: HTTPScope, method: str, path: str) -> DeferredOptions | None:
        routes = find_routes(scope.get("app") or self.app)  # type: ignore[typeddict-item]
        if routes is None:
            return None
        if self._marked is None:
            from .starlette import MarkedRoutes

            self._marked = MarkedRoutes()
        return self._marked.lookup(routes, scope, method, path)  # type: ignore[no-any-return]

    # -- running jobs in this process -------------------------------------

    async def _lifespan(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Start the executor once the app has started (its lifespan state is
        ready for the jobs), drain it before the app shuts down. What the app
        loaded is frozen out of garbage collection then (see ``_freeze``)."""
        state = scope.get("state")

        async def lifespan_receive() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        async def lifespan_send(message: ASGISendEvent) -> None:
            if message["type"] == "lifespan.startup.complete":
                freeze_what_was_loaded()
                self.core.check_store_soon()
                if self.config.execute:
                    self._start_executor(state)  # type: ignore[arg-type]
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    def _start_executor(self, state: dict[str, Any] | None) -> None:
        """From the lifespan: jobs run on the server's loop."""
        if not self._executing:
            self._executing = True
            self.launcher.bind(asyncio.get_running_loop(), state)
            self.dispatcher.start(self.run_queues or self._queues_to_run())

    def start_executor(self, state: dict[str, Any] | None = None) -> None:
        """Without a lifespan: jobs run on an event loop of their own, in a
        thread, since nothing says how long the caller's loop lives (a test
        client makes one per request)."""
        if not self._executing:
            self._executing = True
            self.launcher.bind_own_loop(state)
            self.dispatcher.start(self.run_queues or self._queues_to_run())

    def stop_executor(self) -> None:
        """Let running jobs finish within the grace period, return the rest
        to the queue, and stop claiming (blocking)."""
        if self._executing:
            self._executing = False
            self.dispatcher.stop(self.config.grace_seconds)
            self.launcher.close()

    def _queues_to_run(self) -> set[str]:
        """Its own queue, and those its marked endpoints name."""
        queues = {self.config.queue}
        if self.find_queues is not None:
            queues |= set(self.find_queues())
        routes = find_routes(self.app)
        if routes is not None:
            from .starlette import endpoints

            queues |= queues_of(endpoints(routes))
        return queues

    async def shutdown(self) -> None:
        """Let running jobs finish within the grace period; return the rest to the queue."""
        await self.core.offload(self.stop_executor)
        await self.core.offload(self.core.close)


_UNSEEN = object()


def fastapi_support(apps: list[Any], prefix: str) -> Any:
    """The FastAPI glue for the FastAPI app the middleware serves (the app
    a request names, or one the middleware wraps), if there is one."""
    fastapi = sys.modules.get("fastapi")
    if fastapi is None:  # a FastAPI app would have imported it
        return None
    for app in apps:
        for _ in range(32):  # through wrapping middleware
            if app is None:
                break
            if isinstance(app, fastapi.FastAPI):
                from .fastapi import FastAPISupport

                return FastAPISupport(app, prefix)
            app = getattr(app, "app", None)
    return None


class ClientDisconnected(Exception):
    pass


class DeferringResponder:
    """One deferred request: read the body under the limit, store the job,
    answer 202 once the row is committed (a 202 is a promise)."""

    def __init__(
        self,
        middleware: DeferredMiddleware,
        options: DeferredOptions,
        wanted: Preferences,
        headers: Headers,
    ) -> None:
        self.middleware = middleware
        self.options = options
        self.wanted = wanted
        self.headers = headers

    async def __call__(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        core = self.middleware.core
        limit = self.middleware.config.max_body_size
        try:
            body = await self._read_body(self.headers, receive, limit)
        except ClientDisconnected:
            return  # the client left before sending its body: nothing was promised
        if body is None:
            await send_reply(send, core.too_large())
            return
        fastapi = self.middleware._fastapi
        if fastapi is not None:
            refusal = await fastapi.refusal(scope, body)
            if refusal is not None:  # invalid: the app's own answer, and no job
                await refusal(scope, receive, send)
                return
        request = stored_request(scope, body, self.headers)
        try:
            owner = None
            if core.config.owner is not None:
                owner = await self.middleware.owner_of(scope, request)
            job = await core.accept_async(request, self.options, owner)
        except (Refusal, StoreUnavailable, Unstorable) as error:
            await send_reply(send, core.refused(error))
            return
        root_path = scope.get("root_path", "")
        if self.wanted.wait is None:  # the 202 at once, without a coroutine to wait in
            reply = core.accepted(job, root_path, self.wanted)
        else:
            reply = await core.accepted_async(job, root_path, self.wanted)
        await send_reply(send, reply)

    @staticmethod
    async def _read_body(
        headers: Headers, receive: ASGIReceiveCallable, limit: int
    ) -> bytes | None:
        for name, value in headers:
            if name == "content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
