"""``GET /jobs/{id}/events``: a job's status document as Server-Sent Events.

Each event carries the whole status document, and its id is the job's
revision, which every process reads from the same row: a client that
reconnects with ``Last-Event-ID`` gets the current state if it changed since,
whichever process answers. The stream ends right after a final status; a
reconnect after that gets ``204``, which tells an ``EventSource`` to stop.

What to send and when is decided without I/O (:class:`EventStream`); the two
drivers only read, wait and yield, one blocking (WSGI) and one async (ASGI).
The wire format is a few lines, so it is written here rather than taken from
an ASGI-only library: one implementation serves both adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol, TypeVar

from . import _protocol as protocol
from ._config import Config
from ._jobs import Job
from ._notify import Notifier
from .store import JobStore, StoreUnavailable

T = TypeVar("T")


class JobCore(Protocol):
    """What a stream needs of the core: the store, its wake-ups, its config."""

    store: JobStore
    notifier: Notifier
    config: Config

    async def read(self, fn: Callable[..., T], *args: object) -> T: ...


KEEP_ALIVE = b": keep-alive\n\n"
HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),  # proxies such as nginx: pass each event on at once
]


def last_event_id(value: str | None) -> int | None:
    """The revision a reconnecting client last saw; None for anything else."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


def status_event(job: Job, urls: protocol.JobURLs) -> bytes:
    data = protocol.compact_json(protocol.status_document(job, urls))
    return b"event: status\nid: %d\ndata: %s\n\n" % (job.revision, data)


class EventStream:
    """What one subscriber is sent, and how long to wait before looking again."""

    def __init__(
        self,
        urls: protocol.JobURLs,
        last_seen: int | None,
        keep_alive: float,
        poll_interval: float,
        now: float,
    ) -> None:
        self.urls = urls
        self.last_seen = last_seen
        self.keep_alive = keep_alive
        self.poll_interval = poll_interval
        self.quiet_until = now + keep_alive
        self.ended = False

    def read(self, job: Job | None, now: float) -> bytes:
        """The event for the job as just read (nothing if the client has
        it); the stream ends once the job is final or gone."""
        if job is None:
            self.ended = True
            return b""
        self.ended = job.status.finished
        if job.revision == self.last_seen:
            return b""
        self.last_seen = job.revision
        self.quiet_until = now + self.keep_alive
        return status_event(job, self.urls)

    def idle(self, now: float) -> tuple[bytes, float]:
        """A keep-alive when one is due, and the seconds to wait for a change
        (woken early by one; polling where changes are not pushed)."""
        if now >= self.quiet_until:
            self.quiet_until = now + self.keep_alive
            return KEEP_ALIVE, min(self.keep_alive, self.poll_interval)
        return b"", min(self.quiet_until - now, self.poll_interval)


def _opening(core: JobCore, job_id: str, last_seen: int | None) -> protocol.Reply:
    """The headers of a stream, or the answer when there is no stream to
    open: 404, 204 (nothing more will come), or HEAD's headers alone."""
    job = core.store.get(job_id)
    if job is None:
        return protocol.not_found()
    if job.status.finished and job.revision == last_seen:
        return protocol.Reply(204, [])
    return protocol.Reply(200, list(HEADERS))


def answer(
    core: JobCore, job_id: str, method: str, resumed: str | None, urls: protocol.JobURLs
) -> protocol.Reply:
    """``resumed``: the request's ``Last-Event-ID``, if any."""
    last_seen = last_event_id(resumed)
    reply = _opening(core, job_id, last_seen)
    if reply.status == 200 and method == "GET":
        events = EventStream(
            urls,
            last_seen,
            core.config.event_keep_alive,
            core.config.poll_interval,
            time.monotonic(),
        )
        reply.stream = _stream(core, job_id, events)
    return reply


async def answer_async(
    core: JobCore, job_id: str, method: str, resumed: str | None, urls: protocol.JobURLs
) -> protocol.Reply:
    last_seen = last_event_id(resumed)
    reply = await core.read(_opening, core, job_id, last_seen)
    if reply.status == 200 and method == "GET":
        events = EventStream(
            urls,
            last_seen,
            core.config.event_keep_alive,
            core.config.poll_interval,
            asyncio.get_running_loop().time(),
        )
        reply.stream = _astream(core, job_id, events)
    return reply


def _stream(core: JobCore, job_id: str, events: EventStream) -> Iterator[bytes]:
    """The blocking driver, a WSGI response body. The server closes it once
    the client has gone, which it notices at its next write (a keep-alive at
    the latest)."""
    changed = threading.Event()
    core.notifier.subscribe(job_id, changed.set)
    try:
        while True:
            changed.clear()
            with contextlib.suppress(StoreUnavailable):  # a stream outlives an outage
                chunk = events.read(core.store.get(job_id), time.monotonic())
                if chunk:
                    yield chunk
            if events.ended:
                return
            chunk, pause = events.idle(time.monotonic())
            if chunk:
                yield chunk
            changed.wait(pause)
    finally:
        core.notifier.unsubscribe(job_id, changed.set)


async def _astream(core: JobCore, job_id: str, events: EventStream) -> AsyncIterator[bytes]:
    """The async driver. The ASGI adapter stops it the moment the client
    disconnects, which frees its subscription at once."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake() -> None:
        loop.call_soon_threadsafe(changed.set)

    core.notifier.subscribe(job_id, wake)
    try:
        while True:
            changed.clear()
            with contextlib.suppress(StoreUnavailable):
                chunk = events.read(await core.read(core.store.get, job_id), loop.time())
                if chunk:
                    yield chunk
            if events.ended:
                return
            chunk, pause = events.idle(loop.time())
            if chunk:
                yield chunk
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), pause)
    finally:
        core.notifier.unsubscribe(job_id, wake)
