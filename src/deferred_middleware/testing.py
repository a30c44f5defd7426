"""Testing an app that uses the middleware: run the queued jobs to their end,
without sleeping.

::

    accepted = client.post("/reports")          # 202
    run_jobs(app)                               # every job accepted so far has ended
    client.get(accepted.headers["location"])    # the handler's response

``app`` is whatever the test client was given: a Starlette or FastAPI app, a
Flask app, a WSGI or ASGI callable wrapped in the middleware, or the
middleware itself. In an async test driving an ASGI app through httpx's
``ASGITransport``, ``await arun_jobs(app)``.

An app built with ``execute=False`` runs nothing by itself; ``run_jobs``
runs its jobs then and stops again, so a test decides when jobs run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._jobs import Status
from .worker import Middleware, find_middleware

__all__ = ["arun_jobs", "run_jobs"]

WAITING = (Status.QUEUED, Status.RUNNING)
TICK = 0.05


def run_jobs(app: Any, *, timeout: float = 30.0) -> None:
    """Block until no job of the app's queues is queued or running, running
    them in this process. Raises TimeoutError when some are still at it
    after ``timeout`` seconds (a job waiting out its retry backoff counts)."""
    middleware = find_middleware(app)
    started_here = not middleware.dispatcher.started
    middleware.start_executor()
    try:
        _until_idle(middleware, timeout)
    finally:
        if started_here and not middleware.config.execute:
            middleware.stop_executor()


async def arun_jobs(app: Any, *, timeout: float = 30.0) -> None:
    """:func:`run_jobs` for an async test: waits in a thread, so that the
    test's event loop stays free for jobs running on it."""
    await asyncio.to_thread(run_jobs, app, timeout=timeout)


def _until_idle(middleware: Middleware, timeout: float) -> None:
    dispatcher, store = middleware.dispatcher, middleware.core.store
    middleware.core.prepare()
    deadline = time.monotonic() + timeout
    while True:
        waiting = sum(
            count.count
            for count in store.counts()
            if count.status in WAITING and count.queue in dispatcher.queues
        )
        if not waiting and not dispatcher.running:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{waiting} jobs were still queued or running after {timeout} s")
        dispatcher.wake()
        dispatcher.wait_released(min(TICK, left))
