"""The orchestration both adapters share: accept a request as a job, answer
the job routes, wait for a job. Each operation has a blocking face (WSGI)
and an awaitable one (ASGI) over the same rules; neither adapter touches
the store or the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

from . import _events as events
from . import _joblog as joblog
from . import _protocol as protocol
from ._admission import Admission, refusal_reason, refusal_reply
from ._causes import check_soon
from ._config import Config
from ._jobs import DeferredOptions, Job, RequestInfo, Status, StoredRequest, owner_key, utcnow
from ._metrics import Metrics
from ._notify import Notifier
from ._prefer import NONE, Preferences
from ._refusals import Refusal
from ._webhooks import Callbacks
from .store import Clock, JobStore, StoreUnavailable, Unstorable, safe_url
from .store._writer import BatchWriter

logger = logging.getLogger("deferred_middleware")

OFFLOAD_THREADS = 16
T = TypeVar("T")


class Executor(Protocol):
    """What the core asks of whatever runs jobs in this process."""

    def wake(self) -> None:
        """A job was committed: look for work now rather than at the next poll."""

    def cancel_local(self, job_id: str) -> None:
        """The job was canceled in the table: stop it if it runs here."""


class JobCore:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        writer: BatchWriter,
        notifier: Notifier,
        executor: Executor | None = None,
        *,
        clock: Clock = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store
        self.writer = writer
        self.notifier = notifier
        self.executor = executor
        self.callbacks = Callbacks(config.webhook_secret, config.webhook_allowlist)
        self.ready = False
        self._ready_lock = threading.Lock()
        self.clock = clock
        self.admission = Admission(config, store, clock=clock, monotonic=monotonic)
        self._pool: ThreadPoolExecutor | None = None
        self.status_replies = protocol.StatusReplies()
        self._urls = protocol.JobURLsByRootPath(config.prefix, config.public_url)
        writer.tell_committed(self._committed)

    def prepare(self) -> None:
        """Create or upgrade the table on first use. Raises StoreUnavailable
        while the database is down; the next request tries again."""
        if self.ready:
            return
        with self._ready_lock:
            if not self.ready:
                self.store.migrate()
                self.ready = True

    def check_store_soon(self) -> None:
        """At start-up: say at once when the job store cannot be reached."""
        check_soon(self.prepare, safe_url(self.config.database_url), StoreUnavailable)

    def close(self) -> None:
        """Write what is queued; end the writer, the offloading threads and
        the listener for changes."""
        self.writer.stop()
        self.notifier.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- accepting ---------------------------------------------------------

    def accept(
        self, request: StoredRequest, options: DeferredOptions, owner: str | None = None
    ) -> Job:
        """Store the request as a queued job of ``owner``; returns once its
        row is committed (or, for a repeated Idempotency-Key, the job stored
        the first time). Raises a Refusal (queue full, headers too large, not
        storable, a callback refused, no owner, a key reused), StoreUnavailable
        or Unstorable: then no job was made, and :meth:`refused` says what
        to answer."""
        self.prepare()
        if self.admission.count_due():
            self.admission.count_queued()
        callback = self.callbacks.url_for(request, options)
        job = self.admission.new_job(request, options, owner, callback)
        if job.idempotency is not None:
            held: Future[Job] = Future()
            self.writer.insert_once(job, held)
            return self._stored_once(job, held.result())
        committed: Future[None] = Future()
        self.writer.insert(job, committed)
        committed.result()
        return job

    async def accept_async(
        self, request: StoredRequest, options: DeferredOptions, owner: str | None = None
    ) -> Job:
        """As :meth:`accept`; the event loop waits only on a future."""
        if not self.ready:
            await self.offload(self.prepare)
        if self.admission.count_due():
            await self.offload(self.admission.count_queued)
        callback = None
        if self.callbacks.asked(request, options):  # may look up a host name: off the loop
            callback = await self.offload(self.callbacks.url_for, request, options)
        job = self.admission.new_job(request, options, owner, callback)
        loop = asyncio.get_running_loop()
        if job.idempotency is not None:
            held: asyncio.Future[Job] = loop.create_future()
            self.writer.insert_once(job, held)
            return self._stored_once(job, await held)
        committed: asyncio.Future[None] = loop.create_future()
        self.writer.insert(job, committed)
        await committed
        return job

    def _stored_once(self, job: Job, stored: Job) -> Job:
        """The job to answer for a request that named an Idempotency-Key."""
        if stored is job:
            return job
        return self.admission.same_request(job, stored)

    def owner_of(self, request: RequestInfo) -> str | None:
        """Who is asking, as ``owner=fn`` names them (None without one)."""
        if self.config.owner is None:
            return None
        return owner_key(self.config.owner(request))

    def _committed(self, jobs: list[Job]) -> None:
        """New rows were committed (in the writer's thread, before their
        requests hear of it): counted even if the client has gone since."""
        for job in jobs:
            joblog.accepted(job)
            self.metrics.accepted(job)
        if self.executor is not None:
            self.executor.wake()

    def accepted(self, job: Job, root_path: str, preferences: Preferences = NONE) -> protocol.Reply:
        """The answer to a stored request: its result if the client asked to
        wait (``Prefer: wait=N``) and the job ended in time, else the 202."""
        wait = preferences.wait_within(self.config.max_wait)
        if wait:
            with contextlib.suppress(StoreUnavailable):  # the row is committed: 202
                self.wait(job.id, wait)
                return self._answer_within(job, root_path, preferences, self._finished(job.id))
        return self._answer_within(job, root_path, preferences, None)

    async def accepted_async(
        self, job: Job, root_path: str, preferences: Preferences = NONE
    ) -> protocol.Reply:
        """As :meth:`accepted`, waiting without holding a thread."""
        wait = preferences.wait_within(self.config.max_wait)
        if wait:
            with contextlib.suppress(StoreUnavailable):
                await self.wait_async(job.id, wait)
                done = await self.read(self._finished, job.id)
                return self._answer_within(job, root_path, preferences, done)
        return self._answer_within(job, root_path, preferences, None)

    def _finished(self, job_id: str) -> Job | None:
        job = self.store.get(job_id, response=True)
        return job if job is not None and job.status.finished else None

    def _answer_within(
        self, job: Job, root_path: str, preferences: Preferences, done: Job | None
    ) -> protocol.Reply:
        urls, retry_after = self.urls(root_path), self.config.retry_after
        if done is not None:
            wait = preferences.wait_within(self.config.max_wait)
            return protocol.answered_within_wait(done, urls, retry_after, wait)
        applied = "respond-async" if preferences.respond_async else None
        return protocol.accepted(job, urls, retry_after, applied)

    def refused(self, error: Refusal | StoreUnavailable | Unstorable) -> protocol.Reply:
        """The problem a request that got no job is answered with."""
        self.metrics.refused(refusal_reason(error))
        return refusal_reply(error, self.config)

    def too_large(self) -> protocol.Reply:
        """The answer to a body over ``max_body_size``: 413, and no job."""
        self.metrics.refused("body_too_large")
        return protocol.too_large(self.config.max_body_size)

    def urls(self, root_path: str) -> protocol.JobURLs:
        return self._urls.of(root_path)

    # -- the job routes ----------------------------------------------------

    def answer(
        self,
        tail: str,
        method: str,
        query: bytes,
        root_path: str,
        conditions: protocol.Conditions = protocol.NO_CONDITIONS,
        owner: str | None = None,
    ) -> protocol.Reply:
        """A job route's answer to ``owner`` (see :meth:`owner_of`)."""
        route = protocol.parse_job_route(tail, query, self.config.max_wait)
        if route is None:
            return protocol.not_found()
        if method == "OPTIONS":
            return protocol.options(route.action)
        try:
            self.prepare()
            if not self._visible_to(route.job_id, owner):
                return protocol.unknown(method)
            if route.action == "events" and method in protocol.ALLOWED["events"]:
                resumed = conditions.last_event_id
                return events.answer(self, route.job_id, method, resumed, self.urls(root_path))
            if route.wait and method in ("GET", "HEAD"):
                self.wait(route.job_id, route.wait)
            return self._reply(route, method, self.urls(root_path), conditions)
        except StoreUnavailable:
            return protocol.unavailable(self.config.retry_after)

    async def answer_async(
        self,
        tail: str,
        method: str,
        query: bytes,
        root_path: str,
        conditions: protocol.Conditions = protocol.NO_CONDITIONS,
        owner: str | None = None,
    ) -> protocol.Reply:
        route = protocol.parse_job_route(tail, query, self.config.max_wait)
        if route is None:
            return protocol.not_found()
        if method == "OPTIONS":
            return protocol.options(route.action)
        try:
            if not self.ready:
                await self.offload(self.prepare)
            owned = self.config.owner is not None
            if owned and not await self.read(self._visible_to, route.job_id, owner):
                return protocol.unknown(method)
            if route.action == "events" and method in protocol.ALLOWED["events"]:
                resumed, urls = conditions.last_event_id, self.urls(root_path)
                return await events.answer_async(self, route.job_id, method, resumed, urls)
            reading = method in ("GET", "HEAD")
            if route.wait and reading:
                await self.wait_async(route.job_id, route.wait)
            run = self.read if reading else self.offload
            return await run(self._reply, route, method, self.urls(root_path), conditions)
        except StoreUnavailable:
            return protocol.unavailable(self.config.retry_after)

    def _reply(
        self,
        route: protocol.JobRoute,
        method: str,
        urls: protocol.JobURLs,
        conditions: protocol.Conditions = protocol.NO_CONDITIONS,
    ) -> protocol.Reply:
        if method not in protocol.ALLOWED[route.action]:
            return protocol.method_not_allowed(route.action)
        retry_after = self.config.retry_after
        if route.action == "cancel":
            job = self.cancel(route.job_id)
            if job is None:
                return protocol.not_found()
            if job.status is not Status.CANCELED:
                return protocol.problem(409, "Conflict", "The job has already finished.")
            return protocol.status_reply(job, urls, retry_after)
        if method == "DELETE":
            self.cancel(route.job_id)
            if not self.store.delete(route.job_id):
                return protocol.not_found()
            return protocol.Reply(204, [])
        job = self.store.get(route.job_id, response=route.action == "result")
        if job is None:
            return protocol.not_found()
        if route.action == "result":
            reply = protocol.result_reply(job, urls, retry_after)
        else:
            reply = self.status_replies.reply(job, urls, retry_after)
            reply = protocol.unless_unchanged(reply, conditions.if_none_match)
        return protocol.for_method(reply, method)

    def _visible_to(self, job_id: str, owner: str | None) -> bool:
        """With owners, a job exists only for the one who submitted it: to
        anyone else (and to no one) its routes answer as for an unknown id."""
        if self.config.owner is None:
            return True
        job = self.store.get(job_id)
        return job is not None and owner is not None and job.owner == owner

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.cancel(job_id)
        if job is not None and job.status is Status.CANCELED:
            if self.executor is not None:
                self.executor.cancel_local(job_id)
            self.notifier.notify(job_id)
        return job

    def retry(self, job_id: str) -> bool:
        """Queue a failed or canceled job again (False for any other)."""
        if not self.store.retry(job_id):
            return False
        self.notifier.notify(job_id)
        if self.executor is not None:
            self.executor.wake()
        return True

    # -- waiting -----------------------------------------------------------

    def is_finished(self, job_id: str) -> bool:
        """True when there is nothing more to wait for (finished or gone)."""
        job = self.store.get(job_id)
        return job is None or job.status.finished

    def wait(self, job_id: str, timeout: float) -> None:
        """Block until the job finishes or ``timeout`` passes: woken at once by
        jobs run in this process, polling for jobs run elsewhere."""
        deadline = time.monotonic() + timeout
        changed = threading.Event()
        self.notifier.subscribe(job_id, changed.set)
        try:
            while not self.is_finished(job_id):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                changed.wait(min(remaining, self.config.poll_interval))
                changed.clear()
        finally:
            self.notifier.unsubscribe(job_id, changed.set)

    async def wait_async(self, job_id: str, timeout: float) -> None:
        """As :meth:`wait`, without holding a thread."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(changed.set)

        deadline = loop.time() + timeout
        self.notifier.subscribe(job_id, wake)
        try:
            while not await self.read(self.is_finished, job_id):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(), min(remaining, self.config.poll_interval)
                    )
                changed.clear()
        finally:
            self.notifier.unsubscribe(job_id, wake)

    # -- off the event loop ------------------------------------------------

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """Blocking store work, in a thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="deferred-io")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        """A read in place where reads are local and cheap, off the loop otherwise."""
        if self.store.reads_are_local:
            return fn(*args)
        return await self.offload(fn, *args)
