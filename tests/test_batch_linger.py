"""A threaded server's accepts wait briefly for each other, so that one
commit stores what its request threads send together; a thread that
accepts alone, an event loop's round and an attempt write never wait."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from deferred_middleware._jobs import Progress, Status
from deferred_middleware.store import MemoryJobStore
from deferred_middleware.store._writer import MAX_BATCH, AcceptingThreads, BatchWriter

from .support import make_job

LONG = 60.0
"""A linger no test may wait out: a batch that waits for it fails its test."""
SOON = 10.0
"""Time enough for what does not linger."""


class RecordingStore(MemoryJobStore):
    """Never inserts at once, and keeps the paths of each batch inserted."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def insert_at_once(self, jobs: Any) -> bool:
        return False

    def insert(self, jobs: Any) -> None:
        self.batches.append([job.request.path for job in jobs])
        super().insert(jobs)


class Threads:
    """Request threads that stay alive, as a WSGI server's do (an ended
    thread's identity may be given to the next), each inserting when told."""

    def __init__(self, writer: BatchWriter, count: int) -> None:
        self.writer = writer
        self.orders: list[Any] = [queue.SimpleQueue() for _ in range(count)]
        self.threads = [
            threading.Thread(target=self._serve, args=(orders,), daemon=True)
            for orders in self.orders
        ]
        for thread in self.threads:
            thread.start()

    def _serve(self, orders: Any) -> None:
        while (order := orders.get()) is not None:
            path, sent = order
            waiter: Future[None] = Future()
            self.writer.insert(make_job(path), waiter)
            sent.set_result(waiter)

    def accept(self, number: int, path: str) -> Future[None]:
        """Thread ``number`` inserts ``path``'s job; its waiter, once queued."""
        sent: Future[Future[None]] = Future()
        self.orders[number].put((path, sent))
        return sent.result(timeout=SOON)

    def stop(self) -> None:
        for orders in self.orders:
            orders.put(None)
        for thread in self.threads:
            thread.join(timeout=SOON)


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


def warmed_up(store: RecordingStore, count: int) -> tuple[BatchWriter, Threads]:
    """A writer whose ``count`` request threads have each accepted once,
    one after another, then told to linger for as long as a test lasts."""
    writer = BatchWriter(store, linger=0.0, recent=LONG)
    threads = Threads(writer, count)
    for number in range(count):
        threads.accept(number, f"/first{number}").result(timeout=SOON)
    writer.linger = LONG
    store.batches.clear()
    return writer, threads


def test_a_batch_waits_for_the_threads_that_accepted_lately(store):
    writer, threads = warmed_up(store, 3)
    first = threads.accept(0, "/a")
    rest = [threads.accept(1, "/b"), threads.accept(2, "/c")]
    for waiter in [first, *rest]:
        assert waiter.result(timeout=SOON) is None
    assert store.batches == [["/a", "/b", "/c"]]  # one commit, not three
    assert store.count(Status.QUEUED) == 6
    threads.stop()
    writer.stop()


def test_a_thread_that_accepts_alone_never_waits(store):
    writer, threads = warmed_up(store, 1)
    for path in ("/a", "/b"):
        assert threads.accept(0, path).result(timeout=SOON) is None
    assert store.batches == [["/a"], ["/b"]]
    threads.stop()
    writer.stop()


def test_threads_that_stopped_accepting_are_not_waited_for(store):
    """Out of the ``recent`` window, a thread no longer counts: the one
    still accepting is answered at once."""
    writer = BatchWriter(store, linger=0.0, recent=0.5)
    threads = Threads(writer, 2)
    for number in range(2):
        threads.accept(number, f"/first{number}").result(timeout=SOON)
    assert writer._accepting.lately() == 2
    passing = threading.Event()
    for _ in range(int(SOON / 0.01)):  # the window passes
        if not writer._accepting.lately():
            break
        passing.wait(0.01)
    writer.linger = LONG
    assert threads.accept(0, "/a").result(timeout=SOON) is None
    threads.stop()
    writer.stop()


def test_stopping_writes_a_batch_that_was_waiting_and_ends_at_once(store):
    writer, threads = warmed_up(store, 2)
    waiter = threads.accept(0, "/a")
    stopping = threading.Thread(target=writer.stop)
    stopping.start()
    stopping.join(timeout=SOON)
    assert not stopping.is_alive()
    assert waiter.result(timeout=SOON) is None
    assert store.batches == [["/a"]]
    threads.stop()


def test_an_attempt_write_never_waits_for_accepting_threads(store):
    writer, threads = warmed_up(store, 3)
    [claimed] = store.claim("worker", 1, 60)
    write = Progress(claimed.id, claimed.attempts, 0.5, "half")
    assert writer.write(write).result(timeout=SOON) is None
    assert store.get(claimed.id).message == "half"
    threads.stop()
    writer.stop()


def test_an_event_loops_round_never_waits_for_accepting_threads(store):
    writer, threads = warmed_up(store, 3)

    async def one_round() -> None:
        waiter = asyncio.get_running_loop().create_future()
        writer.insert(make_job("/loop"), waiter)
        await asyncio.wait_for(waiter, SOON)

    asyncio.run(one_round())
    assert store.batches == [["/loop"]]
    threads.stop()
    writer.stop()


def test_what_is_queued_while_the_writer_commits_goes_in_together_up_to_the_most(store):
    """Everything queued meanwhile is taken at once, up to ``MAX_BATCH``."""
    writer = BatchWriter(store, linger=0.0)
    committing, release = threading.Event(), threading.Event()
    insert = store.insert

    def held_first(jobs: Any) -> None:
        if not committing.is_set():
            committing.set()
            release.wait(SOON)
        insert(jobs)

    store.insert = held_first  # type: ignore[method-assign]
    first: Future[None] = Future()
    writer.insert(make_job("/first"), first)
    assert committing.wait(SOON)
    waiters: list[Future[None]] = [Future() for _ in range(MAX_BATCH + 1)]
    for number, waiter in enumerate(waiters):
        writer.insert(make_job(f"/{number}"), waiter)
    release.set()
    for waiter in [first, *waiters]:
        assert waiter.result(timeout=SOON) is None
    assert [len(batch) for batch in store.batches] == [1, MAX_BATCH, 1]
    writer.stop()


def test_accepting_threads_count_each_thread_once_within_the_window():
    now = [100.0]
    accepting = AcceptingThreads(recent=0.5, clock=lambda: now[0])
    for _ in range(3):
        accepting.saw()  # one thread, however often
    other = threading.Thread(target=accepting.saw)
    other.start()
    other.join()
    assert accepting.lately() == 2
    now[0] += 0.5
    assert accepting.lately() == 2  # the window's edge still counts
    now[0] += 0.25
    assert accepting.lately() == 0
    accepting.saw()
    assert accepting.lately() == 1
