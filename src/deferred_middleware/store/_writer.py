"""One thread that owns every write on the accept path.

Concurrent accepts are gathered into one ``executemany`` and one commit
(group commit): a burst of requests costs one fsync, not one each, and the
event loop never waits on the database itself, only on a future.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import JobStore

logger = logging.getLogger("deferred_middleware")

MAX_BATCH = 512
_STOP = object()


class BatchWriter:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def insert(self, row: dict[str, Any]) -> Future[None]:
        """Queue a row; the future resolves once it is committed."""
        future: Future[None] = Future()
        self._ensure_thread()
        self._queue.put((row, future))
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run a write in order with the inserts (progress, outcomes)."""
        future: Future[Any] = Future()
        self._ensure_thread()
        self._queue.put((fn, args, future))
        return future

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(_STOP)
            thread.join()
        self._thread = None

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="deferred-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            inserts: list[tuple[dict[str, Any], Future[None]]] = []
            calls: list[Any] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif len(item) == 2:
                    inserts.append(item)
                else:
                    calls.append(item)
                if len(inserts) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if inserts:
                self._insert(inserts)
            for fn, args, future in calls:
                self._call(fn, args, future)
            if stop:
                return

    def _insert(self, batch: list[tuple[dict[str, Any], Future[None]]]) -> None:
        try:
            self.store.insert_rows([row for row, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                future.set_exception(exc)
        else:
            for _, future in batch:
                future.set_result(None)

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], future: Future[Any]) -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
