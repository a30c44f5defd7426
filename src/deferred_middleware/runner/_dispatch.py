"""The executor loop shared by in-process execution and ``deferred-middleware worker``.

It claims jobs while it has capacity, owns each attempt's life (its
``current_job``, progress, timeout, outcome), keeps leases alive, takes back
jobs whose worker died, and prunes old ones. How a request is replayed (an
asyncio task, a thread) is the launcher's business, and only that.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from datetime import timedelta

from .. import _joblog as joblog
from .. import _policy as policy
from .._causes import store_away
from .._config import Config
from .._context import set_current
from .._jobs import (
    LOST_WORKER,
    NOT_STARTED,
    RAISED,
    AttemptWrite,
    Finish,
    Job,
    Outcome,
    Progress,
    Requeue,
    RetryLater,
    timed_out,
    utcnow,
)
from .._metrics import Metrics
from .._notify import Notifier
from ..store import NEW_JOBS, Clock, JobStore, StoreUnavailable
from ..store._writer import BatchWriter
from ._attempt import Attempt, Ended, Launcher, SideLoop, State
from ._identity import worker_name
from ._idle import wait_for_work

__all__ = ["Dispatcher", "Ended", "Launcher", "SideLoop"]

logger = logging.getLogger("deferred_middleware")

PRUNE_EVERY = 60.0
TICK = 0.25
MAX_WRITE_DELAY = 5.0
RENEW_RETRY = 1.0  # seconds between renewals while the store is away


class Dispatcher:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        writer: BatchWriter,
        notifier: Notifier,
        launcher: Launcher,
        *,
        side_loops: Sequence[SideLoop] = (),
        clock: Clock = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        """``side_loops`` run beside the claiming (webhook deliveries) until
        the executor stops. ``clock`` and ``monotonic`` are the wall and the
        interval clocks; the tests pass their own."""
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.store = store
        self.writer = writer
        self.notifier = notifier
        self.launcher = launcher
        self.side_loops = side_loops
        self.metrics = metrics or Metrics()
        self.worker = worker_name()
        self.queues: frozenset[str] = frozenset({config.queue})
        self.running: dict[str, Attempt] = {}
        # Those of ``running`` whose outcome is being written, kept as they go.
        self._settling: set[Attempt] = set()
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._migrated = False
        self._next_reap = self._next_prune = 0.0
        self._last_claim = float("-inf")
        self._next_renew = monotonic() + config.lease_seconds / 3

    @property
    def _min_claim(self) -> int:
        return max(1, self.config.concurrency // 4)

    # -- lifecycle ---------------------------------------------------------

    def start(self, queues: Iterable[str] = ()) -> None:
        """Run the jobs of ``queues`` (default: the middleware's own queue)."""
        self.queues = frozenset(queues) or frozenset({self.config.queue})
        self._stopping.clear()
        loops = [(self._claim_loop, "claim"), (self._lease_loop, "lease")]
        if self.store.pushes_wakeups:
            loops.append((self._listen_loop, "listen"))
        loops += [
            (functools.partial(loop.run, self._stopping), loop.name) for loop in self.side_loops
        ]
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
        with self._lock:
            while self.running and (left := deadline - time.monotonic()) > 0:
                self._released.wait(left)
            attempts = list(self.running.values())
            self.running.clear()
            self._settling.clear()
            for attempt in attempts:
                attempt.state = State.INTERRUPTED
        for attempt in attempts:
            if attempt.handle is not None:
                attempt.handle.cancel()
            self._give_back(attempt)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def _give_back(self, attempt: Attempt) -> None:
        try:
            self.store.write([Requeue(attempt.job.id, attempt.number)])
            logger.warning("job %s: returned to the queue at shutdown", attempt.job.id)
        except StoreUnavailable:
            logger.error("job %s: not returned to the queue; its lease will expire", attempt.job.id)

    def wait_released(self, timeout: float) -> None:
        """Block until an attempt ends here, or ``timeout`` passes."""
        with self._lock:
            self._released.wait(timeout)

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def wake(self) -> None:
        if self.started:  # an executor that was never started has nothing to wake
            self._wake.set()

    def cancel_local(self, job_id: str) -> None:
        """The job was canceled in the table; stop it here if it runs here."""
        with self._lock:
            attempt = self.running.get(job_id)
            if attempt is None or attempt.state is State.SETTLING:
                return
            attempt.state = State.INTERRUPTED
        if attempt.handle is not None:
            attempt.handle.cancel()
        self._release(attempt)

    # -- one attempt -------------------------------------------------------

    def _launch(self, job: Job) -> None:
        attempt = Attempt(job, self.monotonic(), self._report)
        with self._lock:
            if (replaced := self.running.get(job.id)) is not None:
                self._settling.discard(replaced)
            self.running[job.id] = attempt
        context = contextvars.copy_context()
        context.run(set_current, attempt.running_job)
        assert job.request is not None  # claimed jobs carry their request
        joblog.started(job, attempt.number, self.worker)
        try:
            attempt.handle = self.launcher.launch(
                job.request, context, lambda outcome: self._ended(attempt, outcome)
            )
        except Exception:
            logger.exception("job %s: could not be started", job.id)
            self._settle(attempt, NOT_STARTED)

    def _ended(self, attempt: Attempt, outcome: Outcome | None) -> None:
        """The replay returned (or was cancelled), in whatever thread ran it."""
        with self._lock:
            state = attempt.state
        if state is State.RUNNING and outcome is not None:
            if attempt.running_job.raised:  # the app rendered its own page for a raise
                outcome = policy.raised(attempt.running_job.exception)
            self._settle(attempt, outcome)
        elif state is State.TIMED_OUT:
            self._settle(attempt, timed_out(attempt.job))
        elif state is not State.SETTLING:
            self._release(attempt)

    def _settle(self, attempt: Attempt, outcome: Outcome) -> None:
        """The one way an attempt's outcome reaches the table."""
        if outcome == RAISED:
            logger.error("job %s: attempt %d raised", attempt.job.id, attempt.number)
        with self._lock:
            if attempt.state in (State.INTERRUPTED, State.DONE, State.SETTLING):
                return
            attempt.state = State.SETTLING
            if self.running.get(attempt.job.id) is attempt:
                self._settling.add(attempt)
        write = policy.settle(attempt.job, attempt.number, outcome, self.config.retry_backoff)
        self._submit(attempt, write)
        # Claims held back for want of slots may go on. (With slots to spare
        # a claim now would only contend with this write: it waits for it.)
        self._wake_if_a_claim_fits(up_to=self._min_claim)

    def _submit(self, attempt: Attempt, write: AttemptWrite) -> None:
        future = self.writer.write(write)
        future.add_done_callback(lambda done: self._written(attempt, write, done))

    def _written(self, attempt: Attempt, write: AttemptWrite, future: Future[None]) -> None:
        if isinstance(future.exception(), StoreUnavailable):
            # The lease keeps the job ours meanwhile; the lease loop writes it again.
            logger.warning("job %s: the store is unavailable; will write again", write.job_id)
            attempt.unwritten = write
            attempt.write_again_at = self.monotonic() + attempt.write_delay
            attempt.write_delay = min(attempt.write_delay * 2, MAX_WRITE_DELAY)
            return
        attempt.unwritten = None
        if isinstance(write, (Finish, RetryLater)):
            seconds = self.monotonic() - attempt.started
            joblog.settled(attempt.job, write, seconds)
            self.metrics.settled(attempt.job, write, seconds)
        self.notifier.notify(write.job_id)
        self._release(attempt)

    def _release(self, attempt: Attempt) -> None:
        with self._lock:
            if attempt.state is not State.INTERRUPTED:
                attempt.state = State.DONE
            if self.running.get(attempt.job.id) is attempt:
                del self.running[attempt.job.id]
            self._settling.discard(attempt)
            self._released.notify_all()
        self._wake_if_a_claim_fits()

    def _wake_if_a_claim_fits(self, up_to: int | None = None) -> None:
        """Wake the claim loop only if its next step would claim (with at most
        ``up_to`` slots free): a wake-up per ended attempt cost a thread switch."""
        free = self.config.concurrency - self._busy()
        if (up_to is None or free <= up_to) and self._claim_fits(free, self.monotonic()):
            self._wake.set()

    def _claim_fits(self, free: int, now: float) -> bool:
        """A useful batch at once; any free slot at least once a poll interval
        (long jobs must not keep a queued one waiting for a batch to fit)."""
        polled = now - self._last_claim >= self.config.poll_interval
        return free >= self._min_claim or (free > 0 and polled)

    def _busy(self) -> int:
        """Slots taken: attempts whose handler still runs. One whose outcome
        waits for its write frees its slot at once, so the next claim need
        not wait a commit; at most ``concurrency`` of those are held."""
        with self._lock:
            settling = len(self._settling)
            handlers = len(self.running) - settling
            return max(handlers, handlers + settling - self.config.concurrency)

    def _report(
        self, job_id: str, attempt: int, fraction: float | None, message: str | None
    ) -> None:
        future = self.writer.write(Progress(job_id, attempt, fraction, message))
        future.add_done_callback(lambda _: self.notifier.notify(job_id))

    # -- loops, each step on its own for the tests --------------------------

    def _claim_loop(self) -> None:
        committed = self.store.commit_watch()
        while not self._stopping.is_set():
            self._wake.clear()
            claimed = self.claim_step()
            full = self._busy() >= self.config.concurrency
            if claimed < self._min_claim or full:
                wait_for_work(self._wake, self.config.poll_interval, None if full else committed)

    def claim_step(self) -> int:
        """Housekeeping when due, then claim what fits (while busy, a useful
        batch, not a write transaction per finished job, but at least once a
        poll interval). Answers how many jobs were launched."""
        now = self.monotonic()
        claimed: list[Job] = []
        try:
            if not self._migrated:
                self.store.migrate()
                self._migrated = True
            # Our own leases first: after an outage longer than a lease, every
            # running job looks lost, ours included, until we renew.
            if now >= self._next_reap and self._renew():
                self._reap()
                self._next_reap = now + self.config.lease_seconds / 2
            if now >= self._next_prune:
                self._prune()
                self._next_prune = now + PRUNE_EVERY
            free = self.config.concurrency - self._busy()
            if self._claim_fits(free, now):
                lease = self.config.lease_seconds
                self._last_claim = now
                claimed = self.store.claim(self.worker, free, lease, self.queues)
        except StoreUnavailable as exc:
            store_away.warn("the job store is unavailable; claiming again shortly", exc)
        except Exception:
            logger.exception("claiming jobs failed")
        for job in claimed:
            self._launch(job)
        return len(claimed)

    def _reap(self) -> None:
        retried, failed = self.store.reap_expired(LOST_WORKER)
        for job_ids, requeued in ((retried, True), (failed, False)):
            for job_id in job_ids:
                joblog.reaped(job_id, requeued=requeued)
                self.metrics.reaped(requeued)
        for job_id in (*retried, *failed):
            self.notifier.notify(job_id)

    def _prune(self) -> int:
        before = self.clock() - timedelta(seconds=self.config.retention_seconds)
        return self.store.prune(before)

    def _lease_loop(self) -> None:
        while not self._stopping.wait(TICK) or self.running:
            self.tend_step()
            if self._stopping.is_set() and not self.running:
                return

    def tend_step(self) -> None:
        """Time out overdue attempts, write again what could not be written,
        and renew the leases when a third of their time has passed."""
        self._expire_overdue()
        self._write_again()
        now = self.monotonic()
        if now >= self._next_renew:
            renewed = self._renew()
            self._next_renew = now + (self.config.lease_seconds / 3 if renewed else RENEW_RETRY)

    def _listen_loop(self) -> None:
        self.store.listen(NEW_JOBS, lambda _: self._wake.set(), self._stopping)

    def _renew(self) -> bool:
        """Extend our leases; abandon attempts whose job is no longer ours.
        False while the store is away."""
        with self._lock:
            held = {job_id: a.number for job_id, a in self.running.items()}
        try:
            owned = self.store.renew(self.worker, held, self.config.lease_seconds)
        except StoreUnavailable as exc:
            store_away.warn("could not renew leases: the job store is unavailable", exc)
            return False
        for job_id in held.keys() - owned:
            attempt = self.running.get(job_id)
            if attempt is None or attempt.state is State.SETTLING:
                continue  # its outcome was just written: it is not running any more
            logger.warning("job %s: canceled or taken back; abandoning it here", job_id)
            self.cancel_local(job_id)
        return True

    def _write_again(self) -> None:
        now = self.monotonic()
        with self._lock:
            due = [
                a
                for a in self.running.values()
                if a.unwritten is not None and a.write_again_at <= now
            ]
        for attempt in due:
            write, attempt.unwritten = attempt.unwritten, None
            if write is not None:
                self._submit(attempt, write)

    def _expire_overdue(self) -> None:
        """An asyncio replay is cancelled and then settled as timed out. A
        thread cannot be stopped, only abandoned: with retries left it keeps
        its slot and lease until it returns, so the job never runs twice at
        the same time; the last attempt fails at once."""
        now = self.monotonic()
        with self._lock:
            overdue = [
                a for a in self.running.values() if a.state is State.RUNNING and a.overdue(now)
            ]
            for attempt in overdue:
                attempt.state = State.TIMED_OUT
        for attempt in overdue:
            logger.warning("job %s: attempt %d timed out", attempt.job.id, attempt.number)
            interrupted = attempt.handle is not None and attempt.handle.cancel()
            if not interrupted and attempt.last:
                self._settle(attempt, timed_out(attempt.job))
