"""In-process wake-ups for long-polls when a job in this process changes.

Jobs run by another process are seen by polling at ``poll_interval``; the
notifier only makes the common single-process case answer at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Callable[[], None]]] = {}

    def subscribe(self, job_id: str, wake: Callable[[], None]) -> None:
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(wake)

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
