"""``DeferredMiddleware``: deferred routes for Starlette and any ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import _protocol as protocol
from ._config import Config
from ._jobs import DeferredOptions, StoredRequest
from ._routes import NEVER_DEFERRED, RoutePatterns, options_of
from ._service import JobService
from .runner._dispatch import Dispatcher, start_dispatcher
from .runner.asgi import TaskLauncher
from .store import StoreUnavailable

logger = logging.getLogger("deferred_middleware")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]
T = TypeVar("T")


def route_path(scope: Scope) -> str:
    """The path below ``root_path``, as the app's router sees it."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :][:1] in ("", "/"):
        return path[len(root_path) :]
    return path


def stored_request(scope: Scope, body: bytes) -> StoredRequest:
    return StoredRequest(
        method=scope["method"],
        path=route_path(scope),
        query_string=scope.get("query_string", b""),
        headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]],
        body=body,
        scheme=scope.get("scheme", "http"),
        root_path=scope.get("root_path", ""),
        http_version=scope.get("http_version", "1.1"),
        server=tuple(scope["server"]) if scope.get("server") else None,  # type: ignore[arg-type]
        client=tuple(scope["client"]) if scope.get("client") else None,  # type: ignore[arg-type]
    )


async def send_reply(send: Send, reply: protocol.Reply) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def marked_options(routes: Iterable[Any], scope: Scope) -> DeferredOptions | None:
    """The ``@deferred`` options of the Starlette route that will serve this
    request, found the way Starlette's router finds it (first full match)."""
    from starlette.routing import Match

    for route in routes:
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        sub_routes = getattr(route, "routes", None)  # Mount and Host
        if sub_routes is not None:
            return marked_options(sub_routes, {**scope, **child_scope})
        return options_of(child_scope.get("endpoint"))
    return None


class MarkedRouteCache:
    """Remembers which (method, path) pairs are deferred, so the routes are not
    searched again on every request. Starlette routing that looks at more than
    the method and path (``Host`` routes) is never cached; the cache is
    forgotten when the routes change or when it grows past its bound."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], DeferredOptions | None] = {}
        self._routes_seen: tuple[int, int] = (0, 0)
        self._cacheable = True

    def lookup(self, routes: Any, scope: Scope, method: str, path: str) -> DeferredOptions | None:
        fingerprint = (id(routes), len(routes))
        if fingerprint != self._routes_seen:
            self._answers.clear()
            self._routes_seen = fingerprint
            self._cacheable = not _has_host_routes(routes)
        if not self._cacheable:
            return marked_options(routes, scope)
        key = (method, path)
        try:
            return self._answers[key]
        except KeyError:
            pass
        if len(self._answers) >= self.LIMIT:
            self._answers.clear()
        answer = self._answers[key] = marked_options(routes, scope)
        return answer


def _has_host_routes(routes: Iterable[Any]) -> bool:
    from starlette.routing import Host

    for route in routes:
        if isinstance(route, Host):
            return True
        sub_routes = getattr(route, "routes", None)
        if sub_routes and _has_host_routes(sub_routes):
            return True
    return False


class DeferredMiddleware:
    """Answer requests to deferred routes with ``202 Accepted`` and run them later.

    Routes are deferred by marking their endpoint with ``@deferred`` (found
    through the Starlette router) or by naming them in ``routes``, for apps
    that cannot be edited. The job routes under ``prefix`` are served here;
    every other request passes through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        database_url: str | None = None,
        routes: Iterable[str] = (),
        retries: int = 0,
        timeout: float | None = None,
        credential_headers: Iterable[str] = (),
        **options: Any,
    ) -> None:
        self.app = app
        self.config = Config.build(
            credential_headers=credential_headers, database_url=database_url, **options
        )
        self.patterns = RoutePatterns(routes, DeferredOptions(retries=retries, timeout=timeout))
        self.service = JobService(self.config)
        self._threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="deferred-io")
        self._dispatcher: Dispatcher | None = None
        self._marked = MarkedRouteCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        prefix = self.config.prefix
        if path == prefix or path.startswith(prefix + "/"):
            await self._answer_job_route(scope, send, path[len(prefix) :])
            return
        options = self._deferred_options(scope, path)
        if options is None:
            await self.app(scope, receive, send)
            return
        if self.config.execute and self._dispatcher is None:
            self._start_executor(scope.get("state"))
        await DeferringResponder(self, options)(scope, receive, send)

    # -- which requests ----------------------------------------------------

    def _deferred_options(self, scope: Scope, path: str) -> DeferredOptions | None:
        method = scope["method"]
        if method in NEVER_DEFERRED:
            return None
        options = self.patterns.match(method, path) if self.patterns else None
        if options is None:
            routes = self._routes(scope)
            if routes is not None:
                options = self._marked.lookup(routes, scope, method, path)
        return options

    def _routes(self, scope: Scope) -> Any:
        app: Any = scope.get("app") or self.app
        for _ in range(32):  # follow wrapping middleware down to a router
            routes = getattr(app, "routes", None)
            if routes is not None:
                return routes
            app = getattr(app, "app", None)
            if app is None:
                break
        return None

    # -- the job routes ----------------------------------------------------

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking store work, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read of the store: in place where reads are local and cheap
        (SQLite in WAL mode), off the event loop otherwise."""
        if self.service.store.reads_are_local:
            return fn(*args)
        return await self.run_sync(fn, *args)

    async def _answer_job_route(self, scope: Scope, send: Send, tail: str) -> None:
        config = self.config
        route = protocol.parse_job_route(tail, scope.get("query_string", b""), config.max_wait)
        if route is None:
            await send_reply(send, protocol.not_found())
            return
        urls = protocol.JobURLs.for_request(
            config.prefix, scope.get("root_path", ""), config.public_url
        )
        method = scope["method"]
        try:
            if not self.service.ready:
                await self.run_sync(self.service.ensure_ready)
            reading = method in ("GET", "HEAD")
            if route.wait and reading:
                await self._wait(route.job_id, route.wait)
            run = self.run_read if reading else self.run_sync
            reply = await run(self.service.answer, route, method, urls)
        except StoreUnavailable:
            reply = protocol.unavailable(config.retry_after)
        await send_reply(send, reply)

    async def _wait(self, job_id: str, timeout: float) -> None:
        """Long-poll: woken at once by a job run in this process, polling
        at ``poll_interval`` for one run elsewhere."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(changed.set)

        deadline = loop.time() + timeout
        self.service.notifier.subscribe(job_id, wake)
        try:
            while not await self.run_read(self.service.is_finished, job_id):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(), min(remaining, self.config.poll_interval)
                    )
                changed.clear()
        finally:
            self.service.notifier.unsubscribe(job_id, wake)

    # -- running jobs in this process -------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the executor once the app has started (its lifespan state is
        ready for the jobs), drain it before the app shuts down."""
        state = scope.get("state")

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.config.execute:
                self._start_executor(state)
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

    def _start_executor(self, state: dict[str, Any] | None) -> None:
        if self._dispatcher is not None:
            return
        launcher = TaskLauncher(self.app, asyncio.get_running_loop(), state)
        self._dispatcher = start_dispatcher(self.service, launcher, enforce_timeouts=False)

    async def shutdown(self) -> None:
        """Let running jobs finish within the grace period; return the rest to the queue."""
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            await self.run_sync(dispatcher.stop, self.config.grace_seconds)
            self.service.dispatcher = None
        await self.run_sync(self.service.writer.stop)


class ClientDisconnected(Exception):
    pass


class DeferringResponder:
    """One deferred request: read the body under the limit, store the job,
    answer 202 once the row is committed (a 202 is a promise)."""

    def __init__(self, middleware: DeferredMiddleware, options: DeferredOptions) -> None:
        self.middleware = middleware
        self.options = options

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        middleware = self.middleware
        config = middleware.config
        try:
            body = await self._read_body(scope, receive, config.max_body_size)
        except ClientDisconnected:
            return  # the client left before sending its body: nothing was promised
        if body is None:
            await send_reply(send, protocol.too_large(config.max_body_size))
            return
        service = middleware.service
        try:
            if not service.ready:
                await middleware.run_sync(service.ensure_ready)
            if config.max_queued is not None and await middleware.run_sync(service.queue_full):
                await send_reply(
                    send, protocol.unavailable(config.retry_after, protocol.QUEUE_FULL)
                )
                return
            job, row = service.new_job(stored_request(scope, body), self.options)
            await service.writer.insert_async(row)
        except StoreUnavailable:
            logger.warning("could not store a job: the store is unavailable")
            await send_reply(send, protocol.unavailable(config.retry_after))
            return
        service.committed()
        urls = protocol.JobURLs.for_request(
            config.prefix, scope.get("root_path", ""), config.public_url
        )
        await send_reply(send, protocol.accepted(job, urls, config.retry_after))

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        for name, value in scope["headers"]:
            if name.lower() == b"content-length":
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
