"""How an executor with free slots waits for work it has not been told of.

On PostgreSQL a notification wakes it. Without one it would learn of a job
that another process stored only at its next poll (``poll_interval``, a
second by default). Where the store can tell cheaply that something was
committed (an SQLite file's ``data_version``), the executor looks every few
milliseconds and claims as soon as anything was: such a job then waits
milliseconds, not up to a poll interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOOK_EVERY = 0.005
"""Seconds between looks: one ``PRAGMA data_version`` each."""


def wait_for_work(
    wake: threading.Event, timeout: float, committed: Callable[[], bool] | None
) -> None:
    """Block until ``wake`` is set, ``timeout`` passes, or ``committed``
    says that something was committed since it last answered."""
    if committed is None:
        wake.wait(timeout)
        return
    deadline = time.monotonic() + timeout
    while not wake.wait(min(LOOK_EVERY, deadline - time.monotonic())):  # <= 0: a look, no wait
        if committed() or time.monotonic() >= deadline:
            return
