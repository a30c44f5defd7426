"""The executor loop shared by in-process execution and ``deferred-middleware worker``.

It claims jobs from the table while it has capacity, keeps their leases alive,
takes back jobs whose worker died, and prunes old ones. How a claimed job is
run (an asyncio task, a thread) is the launcher's business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .._jobs import Job
from .._service import Failure, JobService, Outcome
from ..store import StoreUnavailable

logger = logging.getLogger("deferred_middleware")

PRUNE_EVERY = 60.0
TICK = 0.25


class Running(Protocol):
    """A launched attempt, as much as the runtime lets us stop it."""

    def cancel(self) -> bool: ...


class Attempt:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.number = job.attempts
        self.started = time.monotonic()
        self.handle: Running | None = None
        self.interrupted = False  # canceled, timed out or shut down: do not settle
        self.settling = False  # its outcome is being written: the row may not be running
        self.timed_out = False

    @property
    def overdue(self) -> bool:
        timeout = self.job.options.timeout
        return timeout is not None and time.monotonic() - self.started > timeout


Launcher = Callable[[Attempt], Running]


class Dispatcher:
    def __init__(self, service: JobService, launch: Launcher, *, enforce_timeouts: bool) -> None:
        """``enforce_timeouts``: whether the dispatcher must watch deadlines
        itself (threads cannot be interrupted; asyncio tasks time out alone)."""
        self.service = service
        self.config = service.config
        self.launch = launch
        self.enforce_timeouts = enforce_timeouts
        self.running: dict[str, Attempt] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._min_claim = max(1, self.config.concurrency // 4)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        loops = [(self._claim_loop, "claim"), (self._lease_loop, "lease")]
        if self.service.store.dialect == "postgresql":
            loops.append((self._listen_loop, "listen"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"deferred-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, grace: float) -> None:
        """Stop claiming, give running attempts ``grace`` seconds to finish,
        then return the rest to the queue: nothing accepted is dropped."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            time.sleep(TICK / 5)
        with self._lock:
            left = list(self.running.values())
            self.running.clear()
        for attempt in left:
            attempt.interrupted = True
            if attempt.handle is not None:
                attempt.handle.cancel()
            try:
                self.service.store.requeue(attempt.job.id, attempt.number)
                logger.warning("job %s: returned to the queue at shutdown", attempt.job.id)
            except StoreUnavailable:
                logger.error(
                    "job %s: could not be returned to the queue; its lease "
                    "will expire and it will be taken back",
                    attempt.job.id,
                )
        for thread in self._threads:
            thread.join(timeout=5)

    def wake(self) -> None:
        self._wake.set()

    def cancel_local(self, job_id: str) -> None:
        """The job was canceled in the table; stop it here if it runs here."""
        with self._lock:
            attempt = self.running.pop(job_id, None)
        if attempt is not None:
            attempt.interrupted = True
            if attempt.handle is not None:
                attempt.handle.cancel()
            self._wake.set()

    def done(self, attempt: Attempt) -> None:
        """Called by the launcher when an attempt has ended, however it ended."""
        with self._lock:
            if self.running.get(attempt.job.id) is attempt:
                del self.running[attempt.job.id]
        self._wake.set()

    def settle(self, attempt: Attempt, outcome: Outcome) -> None:
        """Store an attempt's outcome, retrying while the database is away:
        the lease keeps the job ours meanwhile."""
        attempt.settling = True
        delay = 0.1
        while not attempt.interrupted:
            try:
                # Outcomes finishing together share one commit in the writer.
                self.service.settle(attempt.job, attempt.number, outcome).result()
                return
            except StoreUnavailable:
                logger.warning(
                    "job %s: the store is unavailable; retrying the write", attempt.job.id
                )
                if self._stopping.wait(delay):
                    return
                delay = min(delay * 2, 5.0)

    # -- loops -------------------------------------------------------------

    def _claim_loop(self) -> None:
        next_reap = next_prune = 0.0
        while not self._stopping.is_set():
            self._wake.clear()
            now = time.monotonic()
            claimed: list[Job] = []
            try:
                self.service.ensure_ready()
                if now >= next_reap:
                    self.service.reap()
                    next_reap = now + self.config.lease_seconds / 2
                if now >= next_prune:
                    self.service.prune()
                    next_prune = now + PRUNE_EVERY
                free = self.config.concurrency - len(self.running)
                # While busy, wait until a useful batch fits rather than
                # spending a write transaction on each job that finishes.
                if free >= self._min_claim or (free > 0 and not self.running):
                    claimed = self.service.store.claim(
                        self.service.worker, free, self.config.lease_seconds
                    )
            except StoreUnavailable:
                logger.warning("the job store is unavailable; claiming again shortly")
            except Exception:
                logger.exception("claiming jobs failed")
            for job in claimed:
                self._start(job)
            if len(claimed) < self._min_claim or len(self.running) >= self.config.concurrency:
                self._wake.wait(self.config.poll_interval)

    def _start(self, job: Job) -> None:
        attempt = Attempt(job)
        with self._lock:
            self.running[job.id] = attempt
        try:
            attempt.handle = self.launch(attempt)
        except Exception:
            logger.exception("job %s: could not be started", job.id)
            self.settle(attempt, Failure("The job could not be started."))
            self.done(attempt)

    def _lease_loop(self) -> None:
        renew_every = self.config.lease_seconds / 3
        next_renew = time.monotonic() + renew_every
        while not self._stopping.wait(TICK) or self.running:
            if self.enforce_timeouts:
                self._expire_overdue()
            if time.monotonic() >= next_renew:
                next_renew = time.monotonic() + renew_every
                self._renew()
            if self._stopping.is_set() and not self.running:
                return

    def _listen_loop(self) -> None:
        self.service.store.listen(self._wake.set, self._stopping)

    def _renew(self) -> None:
        with self._lock:
            held = {job_id: a.number for job_id, a in self.running.items()}
        try:
            owned = self.service.store.renew(self.service.worker, held, self.config.lease_seconds)
        except StoreUnavailable:
            logger.warning("could not renew leases: the job store is unavailable")
            return
        for job_id in held.keys() - owned:
            attempt = self.running.get(job_id)
            if attempt is None or attempt.settling:
                continue  # its outcome was just written: it is not running any more
            logger.warning("job %s: no longer ours (canceled or taken back); abandoning", job_id)
            self.cancel_local(job_id)

    def _expire_overdue(self) -> None:
        """A thread cannot be stopped, only abandoned. A timed-out attempt with
        retries left keeps its slot and lease until its thread returns, so the
        job never runs twice at the same time; the last attempt fails at once."""
        with self._lock:
            overdue = [a for a in self.running.values() if a.overdue and not a.timed_out]
        for attempt in overdue:
            attempt.timed_out = True
            logger.warning("job %s: attempt %d timed out", attempt.job.id, attempt.number)
            if attempt.number >= attempt.job.max_attempts:
                self.settle(attempt, timeout_failure(attempt.job))
                attempt.interrupted = True
                self.done(attempt)


def start_dispatcher(service: JobService, launcher: Any, *, enforce_timeouts: bool) -> Dispatcher:
    """Start running ``service``'s jobs with ``launcher`` in this process."""
    dispatcher = Dispatcher(service, launcher, enforce_timeouts=enforce_timeouts)
    launcher.dispatcher = dispatcher
    service.dispatcher = dispatcher
    dispatcher.start()
    return dispatcher


def timeout_failure(job: Job) -> Failure:
    return Failure(f"The job timed out after {job.options.timeout:g} seconds.")
