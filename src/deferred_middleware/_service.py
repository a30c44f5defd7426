"""What both adapters do, in their shared vocabulary: accept a request as a job,
answer the job routes, record outcomes. Blocking calls only; the ASGI adapter
runs them off the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import _protocol as protocol
from ._config import Config
from ._jobs import DeferredOptions, Job, Status, StoredRequest, StoredResponse, new_job_id, utcnow
from ._notify import Notifier
from .store import JobStore
from .store._writer import BatchWriter

if TYPE_CHECKING:
    from .runner._dispatch import Dispatcher

logger = logging.getLogger("deferred_middleware")

LOST_WORKER = "The worker running this job was lost before it finished."
MAX_BACKOFF = 300.0
QUEUE_CHECK_EVERY = 0.5


@dataclasses.dataclass(frozen=True)
class Failure:
    """An attempt that produced no response. ``error`` is shown to clients,
    so it is always one of our own sentences, never an exception's text."""

    error: str


Outcome = StoredResponse | Failure


def worker_name() -> str:
    return f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"


class JobService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = JobStore(
            config.database_url,
            lock_timeout=config.lock_timeout,
            credential_headers=config.credential_headers,
        )
        self.writer = BatchWriter(self.store)
        self.notifier = Notifier()
        self.worker = worker_name()
        self.dispatcher: Dispatcher | None = None
        self.ready = False
        self._ready_lock = threading.Lock()
        self._queued_seen = 0
        self._queued_checked = -QUEUE_CHECK_EVERY

    def ensure_ready(self) -> None:
        """Create or upgrade the table on first use. Raises StoreUnavailable
        while the database is down; the next request tries again."""
        if self.ready:
            return
        with self._ready_lock:
            if not self.ready:
                self.store.migrate()
                self.ready = True

    # -- accepting ---------------------------------------------------------

    def new_job(
        self, request: StoredRequest, options: DeferredOptions
    ) -> tuple[Job, tuple[object, ...]]:
        """A queued job and its row, for the writer to commit."""
        job = Job(
            id=new_job_id(),
            status=Status.QUEUED,
            created_at=utcnow(),
            request=request,
            options=options,
        )
        return job, self.store.new_row(job)

    def queue_full(self) -> bool:
        """Whether ``max_queued`` jobs are waiting. The count is read from the
        table at most twice a second and raised by this process's own accepts
        in between, so a burst cannot overshoot by much nor cost a query each."""
        bound = self.config.max_queued
        if bound is None:
            return False
        now = time.monotonic()
        if now - self._queued_checked >= QUEUE_CHECK_EVERY:
            self._queued_seen = self.store.count(Status.QUEUED)
            self._queued_checked = now
        if self._queued_seen >= bound:
            return True
        self._queued_seen += 1
        return False

    def committed(self) -> None:
        """A row was committed: wake this process's executor, if it has one."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    # -- the job routes ----------------------------------------------------

    def answer(
        self, route: protocol.JobRoute, method: str, urls: protocol.JobURLs
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
            reply = protocol.status_reply(job, urls, retry_after)
        if method == "HEAD":
            reply.body = b""
        return reply

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.cancel(job_id)
        if job is not None and job.status is Status.CANCELED:
            if self.dispatcher is not None:
                self.dispatcher.cancel_local(job_id)
            self.notifier.notify(job_id)
        return job

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

    # -- outcomes ----------------------------------------------------------

    def settle(self, job: Job, attempt: int, outcome: Outcome) -> Future[Any]:
        """Queue an attempt's outcome for the writer: a response below 500
        succeeds; a failure is retried while attempts remain, with exponential
        backoff. The future resolves once it is committed."""
        store = self.store
        if isinstance(outcome, StoredResponse):
            ok = outcome.status < 500
            error = None if ok else f"The handler answered {outcome.status}."
            status = Status.SUCCEEDED if ok else Status.FAILED
            written = self.writer.finish(
                store.finish_parameters(job.id, attempt, status, response=outcome, error=error)
            )
        elif attempt < job.max_attempts:
            delay = min(self.config.retry_backoff * 2 ** (attempt - 1), MAX_BACKOFF)
            written = self.writer.call(store.retry_later, job.id, attempt, delay, outcome.error)
        else:
            written = self.writer.finish(
                store.finish_parameters(job.id, attempt, Status.FAILED, error=outcome.error)
            )
        written.add_done_callback(lambda _: self.notifier.notify(job.id))
        return written

    def progress_reporter(
        self, job_id: str, attempt: int
    ) -> Callable[[float | None, str | None], None]:
        def report(fraction: float | None, message: str | None) -> None:
            future = self.writer.call(self.store.set_progress, job_id, attempt, fraction, message)
            future.add_done_callback(lambda _: self.notifier.notify(job_id))

        return report

    # -- housekeeping ------------------------------------------------------

    def reap(self) -> None:
        retried, failed = self.store.reap_expired(LOST_WORKER)
        for job_id in (*retried, *failed):
            logger.warning(
                "job %s: its worker was lost; %s",
                job_id,
                "re-queued" if job_id in retried else "failed",
            )
            self.notifier.notify(job_id)

    def prune(self) -> int:
        before = utcnow() - timedelta(seconds=self.config.retention_seconds)
        return self.store.prune(before)
