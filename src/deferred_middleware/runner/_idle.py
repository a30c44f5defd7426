"""How an executor with free slots waits for work it has not been told of.

On PostgreSQL a notification wakes it; elsewhere it polls the table every
``poll_interval``, which a web process storing a job in another process
cannot shorten. Where the store can tell cheaply that something was
committed (an SQLite file's commit mark), the executor looks every few
milliseconds and claims as soon as anything was: a job stored by another
process then waits milliseconds, not up to a poll interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LOOK_EVERY = 0.005
"""Seconds between looks at the commit mark: one ``pread`` each."""


def wait_for_work(
    wake: threading.Event,
    timeout: float,
    committed: Callable[[], bool] | None,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Until ``wake`` is set, ``timeout`` passes, or ``committed`` says
    something was committed since it last answered."""
    if committed is None:
        wake.wait(timeout)
        return
    deadline = monotonic() + timeout
    while not wake.wait(min(LOOK_EVERY, max(0.0, deadline - monotonic()))):
        if committed() or monotonic() >= deadline:
            return
