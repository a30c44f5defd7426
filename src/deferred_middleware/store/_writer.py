"""One thread that owns the hot writes: accepts and outcomes.

Whatever is queued when the thread looks is written in one transaction
(group commit): a burst of requests costs one commit, not one each. The
event loop never waits on the database, only on a future, and a whole
batch's asyncio futures are resolved with one wake-up of their loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import JobStore

MAX_BATCH = 512
_STOP = object()

Waiter = Future | asyncio.Future  # type: ignore[type-arg]


class BatchWriter:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def insert(self, row: tuple[Any, ...]) -> Future[None]:
        """Queue a row; the future resolves once it is committed."""
        future: Future[None] = Future()
        self._put(("insert", row, future))
        return future

    def insert_async(self, row: tuple[Any, ...]) -> asyncio.Future[None]:
        """As :meth:`insert`, for a coroutine on the running event loop."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._put(("insert", row, future))
        return future

    def finish(self, parameters: dict[str, Any]) -> Future[None]:
        """Queue a finished attempt's outcome; those queued together are
        written with one statement."""
        future: Future[None] = Future()
        self._put(("finish", parameters, future))
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run a write in this thread, in the next batch's transaction."""
        future: Future[Any] = Future()
        self._put(("call", (fn, args), future))
        return future

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(_STOP)
            thread.join()
        self._thread = None

    def _put(self, item: tuple[str, Any, Waiter]) -> None:
        if self._thread is None or self._pid != os.getpid():
            self._start()
        self._queue.put(item)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="deferred-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            items = [item for item in batch if item is not _STOP]
            if items:
                self._write(items)
            if stop:
                return

    def _write(self, items: list[tuple[str, Any, Waiter]]) -> None:
        """One transaction per kind of write, so that a failing outcome write
        can never cost an accept its row: accepts in one statement, other
        writes (progress, retries) together, finished outcomes in one statement."""
        groups: dict[str, list[tuple[Any, Waiter]]] = {"insert": [], "finish": [], "call": []}
        for kind, payload, waiter in items:
            groups[kind].append((payload, waiter))
        if groups["insert"]:
            rows = [row for row, _ in groups["insert"]]
            self._together(lambda: self.store.insert_rows(rows), groups["insert"])
        calls = groups["call"]
        if calls:
            try:
                with self.store.batch():
                    results = [fn(*args) for (fn, args), _ in calls]
            except BaseException:
                for call in calls:  # one at a time, so one failure fails only itself
                    self._call_alone(*call)
            else:
                _resolve([(waiter, r) for (_, waiter), r in zip(calls, results, strict=True)], None)
        # Last: a handler's final progress must be written before its
        # outcome, which ends the attempt that fences it.
        if groups["finish"]:
            outcomes = [parameters for parameters, _ in groups["finish"]]
            self._together(lambda: self.store.finish_many(outcomes), groups["finish"])

    def _together(self, write: Callable[[], None], waiting: list[tuple[Any, Waiter]]) -> None:
        try:
            with self.store.batch():
                write()
        except BaseException as exc:
            _resolve([(waiter, None) for _, waiter in waiting], exc)
        else:
            _resolve([(waiter, None) for _, waiter in waiting], None)

    def _call_alone(self, call: tuple[Callable[..., Any], tuple[Any, ...]], waiter: Waiter) -> None:
        fn, args = call
        try:
            with self.store.batch():
                result = fn(*args)
        except BaseException as exc:
            _resolve([(waiter, None)], exc)
        else:
            _resolve([(waiter, result)], None)


def _resolve(outcomes: list[tuple[Waiter, Any]], error: BaseException | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = defaultdict(
        list
    )
    for waiter, result in outcomes:
        if isinstance(waiter, asyncio.Future):
            by_loop[waiter.get_loop()].append((waiter, result))
        elif error is not None:
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
