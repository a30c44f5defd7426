"""One thread that owns the hot writes: accepts and attempt writes.

Whatever is queued when the thread looks is written in one transaction
(group commit): a burst of requests costs one commit, not one each. An
event loop never waits for the database's lock or for its disk: it waits
on a future, and a whole batch's asyncio futures are resolved with one
wake-up of their loop.

The jobs an event loop accepts in one round of its callbacks are stored
together, as that round ends: by the loop itself where the store can
without waiting (an SQLite file nobody else is writing, whose commits do
not sync), else handed to the thread as one item, with one wake-up (see
:meth:`BatchWriter.insert`).

Whoever must hear of new jobs (the log, the metrics, an executor waiting
for work) hears straight after the commit and before any waiter: an
executor in the same process then claims while the event loop is still
busy answering the 202, not after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from .._jobs import AttemptWrite, Job
from .._process import current_pid
from ._base import JobStore, StoreUnavailable, Unstorable

MAX_BATCH = 512
_STOP = object()
INSERT, INSERT_ONCE, WRITE, GATHERED = "insert", "insert once", "write", "gathered"
CHECKPOINT = "checkpoint"
LINGER_SECONDS = 0.001
"""The longest a threaded server's batch of accepts waits for the
threads that accepted lately and have not sent theirs yet."""
RECENT_SECONDS = 0.01
"""A thread that accepted within this long counts as accepting still."""
logger = logging.getLogger("deferred_middleware")

Waiter = Future | asyncio.Future  # type: ignore[type-arg]
T = TypeVar("T")
Committed = Callable[[list[Job]], None]


def _no_one(jobs: list[Job]) -> None:
    pass


class AcceptingThreads:
    """The threads that have sent an accept lately. Under load each comes
    back within a request's time, so a batch that lacks some of them is
    worth a brief wait; a thread that accepts alone is never waited for."""

    def __init__(self, recent: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.recent = recent
        self.clock = clock
        self._seen: dict[int, float] = {}

    def saw(self) -> None:
        self._seen[threading.get_ident()] = self.clock()

    def lately(self) -> int:
        since = self.clock() - self.recent
        for ident, at in list(self._seen.items()):  # a copy: other threads add to it
            if at < since:
                self._seen.pop(ident, None)
        return len(self._seen)


class BatchWriter:
    def __init__(
        self, store: JobStore, linger: float = LINGER_SECONDS, recent: float = RECENT_SECONDS
    ) -> None:
        """``linger`` and ``recent``: see :meth:`_next_batch`."""
        self.store = store
        self.linger = linger
        self._accepting = AcceptingThreads(recent)
        self._told: Committed = _no_one
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._running = False
        self._pid = 0
        self._lock = threading.Lock()
        self._gathered: dict[asyncio.AbstractEventLoop, list[tuple[str, Job, Waiter]]] = {}

    def insert(self, job: Job, waiter: Waiter) -> None:
        """Queue a new job's row; ``waiter`` resolves once it is committed.

        An asyncio waiter's job is held until its loop has run the
        callbacks that are ready now, and stored then with the others
        those accepted: on the loop itself where the store can without
        waiting (:meth:`_stored_at_once`), else queued as one item, so the
        thread wakes once per round. Woken at the first job of a round
        instead, it then waited for the interpreter lock while the loop
        went on through the round. On uvicorn under load this halved the
        thread's voluntary context switches per accept and cut the
        server's CPU per accept by about a twentieth (``bench/README.md``)."""
        if not isinstance(waiter, asyncio.Future):
            self._accepting.saw()
            self._put((INSERT, job, waiter))
            return
        loop = waiter.get_loop()
        gathered = self._gathered.get(loop)
        if gathered is None:
            gathered = self._gathered[loop] = []
            loop.call_soon(self._hand_over, loop)
        gathered.append((INSERT, job, waiter))

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``, whose jobs are only ever gathered on its own thread."""
        gathered = self._gathered.pop(loop)
        if self._stored_at_once(gathered):
            return
        try:
            self._put((GATHERED, gathered, None))
        except Exception:  # no thread to write them (it could not start): say so
            logger.exception("the job writer could not take accepted jobs")
            waiters = [(waiter, None) for _, _, waiter in gathered]
            _resolve_on_loop(waiters, StoreUnavailable("writer"))

    def _stored_at_once(self, gathered: list[tuple[str, Job, Waiter]]) -> bool:
        """Store the round on the loop itself where the store can without
        waiting (see :meth:`JobStore.insert_at_once`); whether it did. Every
        request of the round now waits for this commit, so the loop had
        nothing else to do while the thread wrote it; handing the round over
        cost more than the insert: a wake-up each way, and the interpreter
        lock passed back and forth. Anything that goes wrong leaves the round
        to the thread, which stores it or says why, as for every round it is
        given."""
        jobs = [job for _, job, _ in gathered]
        try:
            if not self.store.insert_at_once(jobs):
                return False
        except Exception:
            logger.debug("inserting at once failed; the writer thread stores", exc_info=True)
            return False
        self._tell(jobs)
        _resolve_on_loop([(waiter, None) for _, _, waiter in gathered], None)
        if self.store.checkpoint_due():
            try:
                self._put((CHECKPOINT, None, None))
            except Exception:  # the rows are committed; the next one due tries again
                logger.exception("the job writer could not take a checkpoint")
        return True

    def insert_once(self, job: Job, waiter: Waiter) -> None:
        """Queue a job that claims an Idempotency-Key; ``waiter`` resolves
        with the job committed under that key (``job``, or the one before)."""
        self._put((INSERT_ONCE, job, waiter))

    def write(self, write: AttemptWrite) -> Future[None]:
        """Queue an attempt write; written in order with the others queued."""
        future: Future[None] = Future()
        self._put((WRITE, write, future))
        return future

    def tell_committed(self, committed: Committed) -> None:
        """Call ``committed`` with each batch of new jobs once their rows are
        committed (not a repeated Idempotency-Key's), in the writer's thread."""
        self._told = committed

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == current_pid():
            self._queue.put(_STOP)
            thread.join()
        self._thread = None

    def _put(self, item: tuple[str, Any, Waiter]) -> None:
        if not self._running or self._pid != current_pid():
            self._start()
        self._queue.put(item)

    def _start(self) -> None:
        """A writer per process, started again if its thread is gone, or
        could not start (then the caller hears why, and the next one tries
        again rather than queue for a thread that never ran)."""
        with self._lock:
            if not self._running or self._pid != current_pid():
                thread = threading.Thread(target=self._run, name="deferred-writer", daemon=True)
                thread.start()
                self._thread, self._pid, self._running = thread, current_pid(), True

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._running = False

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            stop = _STOP in batch
            items = [item for item in batch if item is not _STOP]
            try:
                self._write(items)
            except BaseException:  # the thread must outlive anything a batch does
                logger.exception("the job writer failed a batch")
                unpacked = _unpacked(items)
                waiters = [(waiter, None) for _, _, waiter in unpacked if waiter is not None]
                _resolve(waiters, StoreUnavailable("writer"))
            if stop:
                return

    def _next_batch(self) -> list[Any]:
        """What is queued, once there is something; and, while a batch of a
        threaded server's accepts lacks threads that accepted lately, what
        they send within ``linger`` (as PostgreSQL's ``commit_delay`` waits
        only while other transactions are open). Each thread of a WSGI server
        waits for its own commit, so a batch holds at most one accept per
        thread, and without a wait it held whoever happened to be ready: on
        Flask under gunicorn (2 processes of 4 threads) 2.3 jobs a commit,
        3.9 with it. Accepts per second rose by a sixth, and the server's CPU
        per accept fell by an eighth (``bench/README.md``)."""
        batch = [self._queue.get()]
        deadline = None
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                if not self._others_coming(batch):
                    break
            deadline = deadline or time.monotonic() + self.linger
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _others_coming(self, batch: list[Any]) -> bool:
        """Whether threads that accepted lately have yet to send theirs."""
        if _STOP in batch:
            return False
        inserts = sum(1 for item in batch if item[0] == INSERT)
        return 0 < inserts < self._accepting.lately()

    def _write(self, items: list[tuple[str, Any, Waiter]]) -> None:
        """Accepts in one transaction, attempt writes in another, so that a
        failing outcome can never cost an accept its row. A job that claims
        an Idempotency-Key goes alone: a duplicate must not fail the rest."""
        items = _unpacked(items)
        inserts = [(job, waiter) for kind, job, waiter in items if kind == INSERT]
        writes = [(write, waiter) for kind, write, waiter in items if kind == WRITE]
        if inserts:
            self._together(self.store.insert, inserts, self._inserted)
        for kind, job, waiter in items:
            if kind == INSERT_ONCE:
                self._together(self._insert_once, [(job, waiter)], self._inserted_once)
        if writes:
            self._together(self.store.write, writes)
        if any(kind == CHECKPOINT for kind, _, _ in items):
            self._checkpoint()

    def _checkpoint(self) -> None:
        try:
            self.store.checkpoint()
        except Exception:  # it waits for the next one due, or a commit's own
            logger.exception("checkpointing the job table's log failed")

    def _insert_once(self, jobs: Sequence[Job]) -> list[Job]:
        """The job stored under the one job's key: its waiter's result."""
        [job] = jobs
        return [self.store.insert_once(job)]

    def _inserted(self, stored: list[tuple[Job, Any]]) -> None:
        self._tell([job for job, _ in stored])

    def _inserted_once(self, stored: list[tuple[Job, Any]]) -> None:
        self._tell([job for job, kept in stored if kept is job])

    def _tell(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            self._told(jobs)
        except Exception:  # the rows are committed all the same: answer their waiters
            logger.exception("telling of committed jobs failed")

    def _together(
        self,
        store: Callable[[Sequence[T]], object],
        items: list[tuple[T, Waiter]],
        stored: Callable[[list[tuple[T, Any]]], None] | None = None,
    ) -> None:
        """One transaction for all; if it fails for any reason but the store
        being unavailable, each item alone, so one bad item fails only itself.
        A store that answers a list gives each waiter its own result.
        ``stored`` hears of what was stored, with its results, before the
        waiters do."""
        try:
            results = store([item for item, _ in items])
        except StoreUnavailable as exc:
            _resolve([(waiter, None) for _, waiter in items], exc)
            return
        except Exception:
            if len(items) == 1:
                logger.exception("the job store refused a write")
                _resolve([(items[0][1], None)], Unstorable())
                return
            for item in items:
                self._together(store, [item], stored)
            return
        if not isinstance(results, list):
            results = [None] * len(items)
        if stored is not None:
            stored([(item, result) for (item, _), result in zip(items, results, strict=True)])
        _resolve(
            [(waiter, result) for (_, waiter), result in zip(items, results, strict=True)], None
        )


def _unpacked(items: list[Any]) -> list[tuple[str, Any, Waiter]]:
    """The items queued, with each loop's gathered jobs in their place."""
    return [each for item in items for each in (item[1] if item[0] == GATHERED else (item,))]


def _resolve(outcomes: list[tuple[Waiter, Any]], error: BaseException | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = defaultdict(
        list
    )
    for waiter, result in outcomes:
        if isinstance(waiter, asyncio.Future):
            by_loop[waiter.get_loop()].append((waiter, result))
            continue
        # InvalidStateError: the waiter gave up (cancelled); nobody is waiting.
        with contextlib.suppress(InvalidStateError):
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)
    for loop, futures in by_loop.items():
        # RuntimeError: the loop has closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_on_loop, futures, error)


def _resolve_on_loop(
    futures: list[tuple[asyncio.Future[Any], Any]], error: BaseException | None
) -> None:
    for future, result in futures:
        if future.done():  # the request was cancelled (client gone)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
