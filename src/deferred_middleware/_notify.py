"""Wake-ups for long-polls and event streams when a job changes.

A job run in this process wakes its waiters at once. A job run by another
process wakes them through the store where it can push (PostgreSQL's
``LISTEN``: one connection per process, opened when the first waiter
arrives); elsewhere waiters poll at ``poll_interval``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ._process import current_pid

Heard = Callable[[str | None], None]
Listen = Callable[[Heard, threading.Event], None]
"""Listen for changed job ids until the event is set (``JobStore.listen`` on
the ``JOB_CHANGES`` channel)."""


class Notifier:
    def __init__(self, listen: Listen | None = None) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Callable[[], None]]] = {}
        self._listen = listen
        self._listening_pid = 0
        self._stopped = threading.Event()

    def subscribe(self, job_id: str, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(wake)
            if self._listen is not None and self._listening_pid != current_pid():
                self._start_listening()

    def unsubscribe(self, job_id: str, wake: Callable[[], None]) -> None:
        with self._lock:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[job_id]

    def notify(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for wake in waiters:
            wake()

    def close(self) -> None:
        self._stopped.set()
        self._listening_pid = 0

    def _start_listening(self) -> None:
        """Once per process (a forked server worker listens for itself)."""
        assert self._listen is not None
        self._listening_pid = current_pid()
        self._stopped = threading.Event()
        thread = threading.Thread(
            target=self._listen,
            args=(self._heard, self._stopped),
            name="deferred-changes",
            daemon=True,
        )
        thread.start()

    def _heard(self, payload: str | None) -> None:
        """``None``: (re)connected, so anything may have changed meanwhile."""
        if payload is None:
            with self._lock:
                job_ids = list(self._waiters)
        else:
            job_ids = payload.split(",")
        for job_id in job_ids:
            self.notify(job_id)
