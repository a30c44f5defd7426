"""``deferred-middleware worker MODULE:ATTR``: run an app's jobs out of process.

The worker loads the same app object a server would serve, finds the
deferred middleware inside it, and runs the same executor the middleware
would run in-process: an ASGI app is started through its own lifespan (so
jobs see the app's lifespan state), a WSGI app gets its job threads.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from typing import Any

from ._freeze import freeze_what_was_loaded
from ._jobs import check_queue_name
from .asgi import DeferredMiddleware
from .wsgi import DeferredWSGIMiddleware

logger = logging.getLogger("deferred_middleware")

Middleware = DeferredMiddleware | DeferredWSGIMiddleware


def load_app(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{target!r}: expected MODULE:ATTR, e.g. myapp.main:app")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like uvicorn and gunicorn: the working directory
    app: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        app = getattr(app, name)
    return app


def find_middleware(app: Any) -> Middleware:
    """The deferred middleware wrapped around (or inside) ``app``."""
    extensions = getattr(app, "extensions", None)
    if isinstance(extensions, dict) and "deferred_middleware" in extensions:
        return extensions["deferred_middleware"]  # type: ignore[no-any-return]
    if getattr(app, "middleware_stack", False) is None and hasattr(app, "build_middleware_stack"):
        # A Starlette app builds its middleware on first call; build it now,
        # as that first call would.
        app.middleware_stack = app.build_middleware_stack()
        app = app.middleware_stack
    seen = 0
    node = app
    while node is not None and seen < 64:
        if isinstance(node, (DeferredMiddleware, DeferredWSGIMiddleware)):
            return node
        node = getattr(node, "middleware_stack", None) or getattr(node, "app", None)
        seen += 1
    raise LookupError("no DeferredMiddleware, DeferredWSGIMiddleware or FlaskDeferred in this app")


def run(
    target: str,
    *,
    concurrency: int | None = None,
    grace: float | None = None,
    queues: tuple[str, ...] = (),
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
) -> None:
    """Run jobs until SIGTERM or SIGINT; then let running jobs finish within
    the grace period and return the rest to the queue. ``queues``: exactly
    these (default: the app's own queue and those its marked routes name).
    ``metrics_port``: serve Prometheus metrics there, whatever the app's
    ``metrics`` option says."""
    app = load_app(target)
    middleware = find_middleware(app)
    config = middleware.config
    config.execute = True  # a web tier's enqueue-only setting does not apply here
    if concurrency is not None:
        config.concurrency = concurrency
    if grace is not None:
        config.grace_seconds = grace
    middleware.run_queues = frozenset(check_queue_name(name) for name in queues)
    if metrics_port is not None:
        serve_metrics(middleware, metrics_host, metrics_port)
    # No database check here: a worker started while its database is down
    # waits for it, claiming (and creating the table) once it is back.
    logger.warning(
        "worker %s: running jobs of %s (concurrency %d)",
        middleware.dispatcher.worker,
        target,
        config.concurrency,
    )
    if isinstance(middleware, DeferredMiddleware):
        asyncio.run(_run_asgi(app))
    else:
        _run_wsgi(middleware)


def serve_metrics(middleware: Middleware, host: str, port: int) -> None:
    """Prometheus metrics of this worker at ``http://host:port/``, from a thread."""
    metrics = middleware.metrics
    metrics.switch_on(middleware.core.store)
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=metrics.registry)
    logger.warning("worker: metrics at http://%s:%d/metrics", host, port)


def _stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event that SIGTERM and SIGINT set. The loop hears of a signal
    through its wake-up file, whichever thread the kernel gave it to. A
    main thread blocked on a lock (``threading.Event.wait``) never ran the
    handler of a signal that one of the executor's threads took, and the
    worker went on as if it had not been asked to stop."""
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _run_wsgi(middleware: DeferredWSGIMiddleware) -> None:
    loop = asyncio.new_event_loop()
    try:
        stop = _stop_on_signals(loop)  # before the executor starts: a signal is never lost
        middleware.start_executor()
        freeze_what_was_loaded()
        loop.run_until_complete(stop.wait())
        logger.warning("worker: stopping; draining running jobs")
        middleware.shutdown()  # the handlers stay: a second signal cannot cut the drain short
    finally:
        loop.close()


async def _run_asgi(app: Any) -> None:
    """Drive the app's lifespan as a server would, without serving HTTP."""
    stop = _stop_on_signals(asyncio.get_running_loop())
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    lifespan = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app failed to start: {started.get('message', started)}")
    freeze_what_was_loaded()  # done already if the lifespan reached the middleware
    await stop.wait()
    logger.warning("worker: stopping; draining running jobs")
    await to_app.put({"type": "lifespan.shutdown"})
    await from_app.get()
    await lifespan
