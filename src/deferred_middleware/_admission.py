"""Whether a request becomes a job: the rules a submit passes before its row
is written (sizes, storability, an owner, an Idempotency-Key, room in the
queue), and the problem each refusal is answered with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import _protocol as protocol
from ._causes import store_away
from ._config import Config
from ._ids import new_job_id
from ._jobs import (
    HEADERS_TOO_LARGE,
    DeferredOptions,
    Idempotency,
    Job,
    Status,
    StoredRequest,
    utcnow,
)
from ._refusals import (
    BadRequest,
    HeadersTooLarge,
    KeyReused,
    NoOwner,
    NotStorable,
    QueueFull,
    Refusal,
)
from .store import Clock, JobStore, StoreUnavailable, Unstorable

logger = logging.getLogger("deferred_middleware")

QUEUE_CHECK_EVERY = 0.5
KEY_REUSED = "This Idempotency-Key was used for a different request."


class Admission:
    """The rules one process applies to each submit, with its running
    estimate of the queue's depth (``max_queued``)."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        *,
        clock: Clock = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.monotonic = monotonic
        self._queued_seen = 0
        self._queued_checked = -QUEUE_CHECK_EVERY

    def new_job(
        self,
        request: StoredRequest,
        options: DeferredOptions,
        owner: str | None = None,
        callback: str | None = None,
    ) -> Job:
        """The queued job for an admissible request (which it takes over and
        readies for storing); raises a Refusal otherwise."""
        reason = request.admit(self.config.max_header_size)
        if reason == HEADERS_TOO_LARGE:
            raise HeadersTooLarge
        if reason is not None:
            raise NotStorable(reason)
        if self.config.owner is not None and owner is None:
            raise NoOwner
        idempotency = Idempotency.of(request, owner)
        if self._queue_is_full():
            raise QueueFull
        created = self.clock()
        return Job(
            id=new_job_id(created),
            status=Status.QUEUED,
            created_at=created,
            request=request,
            options=options,
            queue=options.queue or self.config.queue,
            callback_url=callback,
            owner=owner,
            idempotency=idempotency,
        )

    @staticmethod
    def same_request(job: Job, held: Job) -> Job:
        """The job an earlier request with the same Idempotency-Key made, if
        this request asks the same; KeyReused otherwise."""
        assert held.idempotency is not None and job.idempotency is not None
        if held.idempotency.request != job.idempotency.request:
            raise KeyReused
        return held

    # -- room in the queue ---------------------------------------------------

    def count_due(self) -> bool:
        return (
            self.config.max_queued is not None
            and self.monotonic() - self._queued_checked >= QUEUE_CHECK_EVERY
        )

    def count_queued(self) -> None:
        self._queued_seen = self.store.count(Status.QUEUED)
        self._queued_checked = self.monotonic()

    def _queue_is_full(self) -> bool:
        """The count is read from the table at most twice a second and raised
        by this process's own accepts in between, so a burst cannot overshoot
        by much nor cost a query each."""
        bound = self.config.max_queued
        if bound is None:
            return False
        if self._queued_seen >= bound:
            return True
        self._queued_seen += 1
        return False


def refusal_reason(error: Refusal | StoreUnavailable | Unstorable) -> str:
    """The ``reason`` label a refusal is counted under."""
    if isinstance(error, Refusal):
        return error.reason
    return "unstorable" if isinstance(error, Unstorable) else "unavailable"


def refusal_reply(error: Refusal | StoreUnavailable | Unstorable, config: Config) -> protocol.Reply:
    """The problem a request that got no job is answered with."""
    if isinstance(error, QueueFull):
        return protocol.unavailable(config.retry_after, protocol.QUEUE_FULL)
    if isinstance(error, HeadersTooLarge):
        return protocol.headers_too_large(config.max_header_size)
    if isinstance(error, BadRequest):
        return protocol.bad_request(error.detail)
    if isinstance(error, NoOwner):
        return protocol.problem(403, "Forbidden", "The request names no owner for its job.")
    if isinstance(error, KeyReused):
        return protocol.problem(422, "Unprocessable Content", KEY_REUSED)
    if isinstance(error, Unstorable):
        return protocol.bad_request("The request could not be stored.")
    store_away.warn("could not store a job: the job store is unavailable", error)
    return protocol.unavailable(config.retry_after)
