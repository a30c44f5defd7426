"""The job store in memory: the same contract as the SQL table, for fast
unit tests of the policy and for trying the middleware without a database
(``database_url="memory://"``). Nothing survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta

from .._jobs import (
    DEFAULT_QUEUE,
    WEBHOOK_PENDING,
    AttemptWrite,
    Job,
    Status,
    WebhookAttempt,
    WebhookDue,
    utcnow,
)
from ._base import Clock, QueueCount, WorkerLoad
from ._credentials import split_credentials
from ._memory_rows import Row, apply, back_in_the_queue, detached, end, webhook_due

ACTIVE = (Status.QUEUED, Status.RUNNING)


class MemoryJobStore:
    reads_are_local = True
    pushes_wakeups = False

    def __init__(
        self, *, credential_headers: frozenset[str] = frozenset(), clock: Clock = utcnow
    ) -> None:
        self.credential_headers = credential_headers
        self.clock = clock
        self._rows: dict[str, Row] = {}
        self._webhook_attempts: list[WebhookAttempt] = []
        self._lock = threading.Lock()

    def migrate(self, revision: str = "head") -> None:
        return

    def close(self) -> None:
        return

    def insert(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            self._insert(jobs)

    def insert_at_once(self, jobs: Sequence[Job]) -> bool:
        """At once unless another thread holds the table: as an SQLite file,
        where another writer would make the caller wait."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._insert(jobs)
        finally:
            self._lock.release()
        return True

    def checkpoint_due(self) -> bool:
        return False

    def checkpoint(self) -> None:
        return

    def insert_once(self, job: Job) -> Job:
        assert job.idempotency is not None
        with self._lock:
            held = self._holding(job.idempotency.key)
            if held is not None:
                return detached(held)
            self._insert([job])
            return job

    def _holding(self, key: str) -> Row | None:
        for row in self._rows.values():
            if row.job.idempotency is not None and row.job.idempotency.key == key:
                return row
        return None

    def _insert(self, jobs: Sequence[Job]) -> None:
        """As the table's primary key and unique index would: all or nothing."""
        keys = [job.idempotency.key for job in jobs if job.idempotency is not None]
        if len(set(keys)) < len(keys) or any(self._holding(key) for key in keys):
            raise ValueError("an Idempotency-Key is held by another job")
        for job in jobs:
            if job.id in self._rows:
                raise ValueError(f"job {job.id} exists")
        for job in jobs:
            assert job.request is not None
            headers, credentials = split_credentials(job.request.headers, self.credential_headers)
            request = dataclasses.replace(job.request, headers=headers)
            stored = dataclasses.replace(job, request=request, attempts=0, revision=0)
            self._rows[job.id] = Row(stored, job.created_at, credentials)

    def get(self, job_id: str, *, request: bool = False, response: bool = False) -> Job | None:
        with self._lock:
            row = self._rows.get(job_id)
            return None if row is None else detached(row, request=request, response=response)

    def list(
        self,
        statuses: Iterable[Status] = (),
        *,
        created_before: datetime | None = None,
        queues: Iterable[str] = (),
        limit: int = 100,
    ) -> list[Job]:
        wanted, in_queues = set(statuses), set(queues)
        with self._lock:
            rows = [
                row
                for row in self._rows.values()
                if (not wanted or row.job.status in wanted)
                and (not in_queues or row.job.queue in in_queues)
                and (created_before is None or row.job.created_at < created_before)
            ]
            rows.sort(key=lambda row: row.job.created_at, reverse=True)
            return [detached(row, route=True) for row in rows[:limit]]

    def count(self, status: Status) -> int:
        with self._lock:
            return sum(1 for row in self._rows.values() if row.job.status is status)

    def counts(self) -> list[QueueCount]:
        found: dict[tuple[str, Status], tuple[int, datetime]] = {}
        with self._lock:
            for row in self._rows.values():
                key = (row.job.queue, row.job.status)
                count, oldest = found.get(key, (0, row.job.created_at))
                found[key] = (count + 1, min(oldest, row.job.created_at))
        return [QueueCount(q, s, n, oldest) for (q, s), (n, oldest) in sorted(found.items())]

    def workers(self) -> list[WorkerLoad]:
        found: dict[str, tuple[int, datetime]] = {}
        with self._lock:
            for row in self._rows.values():
                if row.job.status is Status.RUNNING and row.worker and row.lease_expires_at:
                    count, soonest = found.get(row.worker, (0, row.lease_expires_at))
                    found[row.worker] = (count + 1, min(soonest, row.lease_expires_at))
        return [WorkerLoad(w, n, lease) for w, (n, lease) in sorted(found.items())]

    def ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        with self._lock:
            return sorted(i for i in self._rows if i.startswith(prefix))[:limit]

    def ids_ending(self, suffix: str, limit: int = 2) -> list[str]:
        with self._lock:
            return sorted(i for i in self._rows if i.endswith(suffix))[:limit]

    def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        queues: Collection[str] = (DEFAULT_QUEUE,),
    ) -> list[Job]:
        now = self.clock()
        with self._lock:
            due = [
                row
                for row in self._rows.values()
                if row.job.status is Status.QUEUED
                and row.job.queue in queues
                and row.run_after <= now
            ]
            due.sort(key=lambda row: row.run_after)
            claimed = []
            for row in due[:limit]:
                job = row.job
                job.status = Status.RUNNING
                job.attempts += 1
                job.revision += 1
                job.started_at = now
                row.worker = worker
                row.lease_expires_at = now + timedelta(seconds=lease_seconds)
                claimed.append(detached(row, request=True))
            return claimed

    def renew(self, worker: str, held: dict[str, int], lease_seconds: float) -> set[str]:
        expires = self.clock() + timedelta(seconds=lease_seconds)
        owned = set()
        with self._lock:
            for job_id, attempt in held.items():
                row = self._rows.get(job_id)
                if row is None or row.job.status is not Status.RUNNING or row.worker != worker:
                    continue
                row.lease_expires_at = expires
                if row.job.attempts == attempt:
                    owned.add(job_id)
        return owned

    def write(self, writes: Sequence[AttemptWrite]) -> int:
        now = self.clock()
        landed = 0
        with self._lock:
            for write in writes:
                row = self._rows.get(write.job_id)
                if row is None or row.job.status is not Status.RUNNING:
                    continue
                if row.job.attempts != write.attempt:
                    continue
                apply(row, write, now)
                landed += 1
        return landed

    def reap_expired(self, error: str) -> tuple[list[str], list[str]]:
        now = self.clock()
        retried: list[str] = []
        failed: list[str] = []
        with self._lock:
            for row in self._rows.values():
                job = row.job
                expires = row.lease_expires_at
                if job.status is not Status.RUNNING or expires is None or expires >= now:
                    continue
                job.error, row.error_detail = error, None
                if job.attempts < job.max_attempts:
                    back_in_the_queue(row)
                    row.run_after = now
                    retried.append(job.id)
                else:
                    end(row, Status.FAILED, now)
                    failed.append(job.id)
        return retried, failed

    def cancel(self, job_id: str) -> Job | None:
        now = self.clock()
        with self._lock:
            row = self._rows.get(job_id)
            if row is None:
                return None
            if row.job.status in ACTIVE:
                end(row, Status.CANCELED, now)
            return detached(row)

    def retry(self, job_id: str) -> bool:
        with self._lock:
            row = self._rows.get(job_id)
            if row is None or row.job.status not in (Status.FAILED, Status.CANCELED):
                return False
            job = row.job
            job.status = Status.QUEUED
            job.revision += 1
            job.webhook_state = None
            job.options = dataclasses.replace(
                job.options, retries=job.attempts + job.options.retries
            )
            job.finished_at = job.error = job.response = row.error_detail = None
            row.run_after = self.clock()
            return True

    def delete(self, job_id: str) -> bool:
        with self._lock:
            self._forget_attempts({job_id})
            return self._rows.pop(job_id, None) is not None

    def prune(self, finished_before: datetime, batch: int = 500) -> int:
        with self._lock:
            old = [
                job_id
                for job_id, row in self._rows.items()
                if row.job.status.finished
                and row.job.finished_at is not None
                and row.job.finished_at < finished_before
                and row.job.webhook_state != WEBHOOK_PENDING
            ]
            for job_id in old:
                del self._rows[job_id]
            self._forget_attempts(set(old))
            return len(old)

    # -- webhooks ------------------------------------------------------------

    def claim_webhooks(self, worker: str, limit: int, lease_seconds: float) -> list[WebhookDue]:
        now = self.clock()
        with self._lock:
            due = [
                row
                for row in self._rows.values()
                if row.job.webhook_state == WEBHOOK_PENDING
                and row.webhook_due_at is not None
                and row.webhook_due_at <= now
                and (row.webhook_lease_until is None or row.webhook_lease_until < now)
            ]
            due.sort(key=lambda row: row.webhook_due_at)  # type: ignore[arg-type, return-value]
            claimed = []
            for row in due[:limit]:
                row.job.webhook_attempts += 1
                row.webhook_worker = worker
                row.webhook_lease_until = now + timedelta(seconds=lease_seconds)
                root_path = row.job.request.root_path if row.job.request else ""
                claimed.append(WebhookDue(detached(row), root_path, worker))
            return claimed

    def record_webhook(self, attempt: WebhookAttempt, state: str, due_at: datetime | None) -> bool:
        with self._lock:
            self._webhook_attempts.append(attempt)
            row = self._rows.get(attempt.job_id)
            if (
                row is None
                or row.job.webhook_state != WEBHOOK_PENDING
                or row.webhook_worker != attempt.worker
                or row.job.webhook_attempts != attempt.attempt
            ):
                return False
            row.job.webhook_state = state
            row.webhook_due_at = due_at
            row.webhook_lease_until = None
            return True

    def webhook_attempts_of(self, job_id: str) -> list[WebhookAttempt]:
        with self._lock:
            return [a for a in self._webhook_attempts if a.job_id == job_id]

    def redeliver(self, job_id: str) -> bool:
        with self._lock:
            row = self._rows.get(job_id)
            if row is None or not row.job.status.finished or row.job.callback_url is None:
                return False
            webhook_due(row, self.clock())
            return True

    def _forget_attempts(self, job_ids: set[str]) -> None:
        self._webhook_attempts = [a for a in self._webhook_attempts if a.job_id not in job_ids]

    def listen(
        self, channel: str, heard: Callable[[str | None], None], stopped: threading.Event
    ) -> None:
        return

    def commit_watch(self) -> None:
        return None  # one process: whoever stores a job wakes the executor itself

    def error_detail(self, job_id: str) -> str | None:
        with self._lock:
            row = self._rows.get(job_id)
            return None if row is None else row.error_detail

    def credentials_of(self, job_id: str) -> list[tuple[int, str, str]]:
        """What is still kept of a job's credentials (for tests of erasure)."""
        with self._lock:
            row = self._rows.get(job_id)
            return list(row.credentials) if row is not None else []
