"""What every job store does: the contract the core, the dispatcher and the
writer rely on, implemented in SQL (:mod:`._sql`) and in memory (:mod:`._memory`).

One contract test suite holds every implementation to the same behaviour.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import Protocol

from .._jobs import DEFAULT_QUEUE, AttemptWrite, Job, Status, WebhookAttempt, WebhookDue

Clock = Callable[[], datetime]


NEW_JOBS = "deferred_jobs"
"""The channel notified on commit of inserted jobs: idle executors wake."""
JOB_CHANGES = "deferred_job_changes"
"""The channel notified with the ids of jobs whose status document changed:
long-polls and event streams in other processes answer at once."""


@dataclasses.dataclass(frozen=True)
class QueueCount:
    """How many jobs of one queue are in one status, and the oldest one's age."""

    queue: str
    status: Status
    count: int
    oldest_created_at: datetime

    def waited(self, now: datetime) -> float:
        """Seconds since the oldest one was made (never below 0: clocks differ)."""
        return max(0.0, (now - self.oldest_created_at).total_seconds())


@dataclasses.dataclass(frozen=True)
class WorkerLoad:
    """An executor that holds running jobs, as the table knows it."""

    worker: str
    running: int
    lease_expires_at: datetime
    """The soonest of its leases: in the past, it stopped renewing (lost)."""


class StoreUnavailable(Exception):
    """The database could not be reached or stayed locked: answer 503, never 202."""


class Unstorable(Exception):
    """The database refused this one request as it is (not the database
    being away): answer 4xx for it alone, never fail the others."""


class JobStore(Protocol):
    """The job table. Thread-safe; every method is one short transaction."""

    reads_are_local: bool
    """Whether a read is cheaper done in place than handed to a thread
    (SQLite in WAL mode, memory): the ASGI adapter then reads on the loop."""

    pushes_wakeups: bool
    """Whether :meth:`listen` tells idle executors about new jobs at once."""

    def commit_watch(self) -> Callable[[], bool] | None:
        """Where no wake-up is pushed, a cheap test an idle executor may run
        every few milliseconds: whether anything was committed since the
        test last answered (the first answer it can give is yes). None
        where there is no such test; the executor then polls every
        ``poll_interval``."""

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the table in place; safe to race."""

    def close(self) -> None: ...

    def insert(self, jobs: Sequence[Job]) -> None:
        """Store accepted jobs in one transaction: one commit for a burst."""

    def insert_at_once(self, jobs: Sequence[Job]) -> bool:
        """Store accepted jobs as :meth:`insert` does, in the calling thread
        (an event loop's), only if that costs no wait: no lock that someone
        else holds, no sync to disk at the commit. False, having stored
        nothing, where it would wait: the writer's thread then stores them.
        Raises as :meth:`insert` does, having stored nothing."""

    def checkpoint_due(self) -> bool:
        """Whether inserts at once have left enough work for :meth:`checkpoint`
        (each time it says yes, it starts counting again)."""

    def checkpoint(self) -> None:
        """What inserts at once put off because it syncs to disk, done in the
        writer's thread: on an SQLite file, copying the write-ahead log into
        the file, as SQLite does itself at a commit that grows the log past
        a thousand pages. Elsewhere nothing."""

    def insert_once(self, job: Job) -> Job:
        """Store a job that claims an Idempotency-Key unless another job holds
        that key: answers the job stored under it (``job`` itself, or the
        holder, with its request digest). Concurrent calls store one."""

    def get(self, job_id: str, *, request: bool = False, response: bool = False) -> Job | None:
        """One job by id, with its stored request and response if asked."""

    def list(
        self,
        statuses: Iterable[Status] = (),
        *,
        created_before: datetime | None = None,
        queues: Iterable[str] = (),
        limit: int = 100,
    ) -> list[Job]:
        """Jobs newest first, without their request and response; only
        those of ``statuses`` and ``queues`` where either is given."""

    def count(self, status: Status) -> int: ...

    def counts(self) -> list[QueueCount]:
        """Jobs per queue and status, for operators."""

    def workers(self) -> list[WorkerLoad]:
        """The executors holding running jobs, by name, for operators."""

    def ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids that start with ``prefix`` (lower-case hex), at most ``limit``."""

    def ids_ending(self, suffix: str, limit: int = 2) -> list[str]:
        """Ids that end with ``suffix`` (lower-case hex), at most ``limit``."""

    def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        queues: Collection[str] = (DEFAULT_QUEUE,),
    ) -> list[Job]:
        """Take up to ``limit`` due queued jobs of ``queues`` for ``worker``,
        atomically, with their requests: each becomes running with a new attempt."""

    def renew(self, worker: str, held: dict[str, int], lease_seconds: float) -> set[str]:
        """Extend the leases ``worker`` holds (job id -> attempt); answers which
        are still its own (a job missing from the answer was canceled or taken back)."""

    def write(self, writes: Sequence[AttemptWrite]) -> int:
        """Apply attempt writes in order, in one transaction, each fenced by
        its attempt; answers how many landed."""

    def reap_expired(self, error: str) -> tuple[list[str], list[str]]:
        """Take back running jobs whose lease ran out: re-queue those with
        attempts left, fail the rest. Answers (re-queued ids, failed ids)."""

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job; a finished one is left as it is."""

    def retry(self, job_id: str) -> bool:
        """Queue a failed or canceled job again, with a fresh set of attempts."""

    def delete(self, job_id: str) -> bool: ...

    def error_detail(self, job_id: str) -> str | None:
        """What the last failed attempt raised (type and traceback), for
        operators; never part of what a client is sent."""

    def prune(self, finished_before: datetime, batch: int = 500) -> int:
        """Delete finished jobs older than the retention time, in bounded batches."""

    def claim_webhooks(self, worker: str, limit: int, lease_seconds: float) -> list[WebhookDue]:
        """Take up to ``limit`` due webhook deliveries for one attempt each,
        under a lease (a delivery whose worker died is due again after it)."""

    def record_webhook(self, attempt: WebhookAttempt, state: str, due_at: datetime | None) -> bool:
        """Keep an attempt; set the delivery's state (pending again at
        ``due_at``, delivered or failed) if the attempt's worker still holds it."""

    def webhook_attempts_of(self, job_id: str) -> list[WebhookAttempt]: ...

    def redeliver(self, job_id: str) -> bool:
        """Make a finished job's webhook due again, with fresh attempts."""

    def listen(
        self, channel: str, heard: Callable[[str | None], None], stopped: threading.Event
    ) -> None:
        """Until ``stopped`` is set, call ``heard`` with each notification on
        ``channel`` (``NEW_JOBS``: inserts; ``JOB_CHANGES``: the ids of changed
        jobs, comma-separated), and with None on each (re)connection.
        Returns at once where the store cannot push (its users poll)."""
