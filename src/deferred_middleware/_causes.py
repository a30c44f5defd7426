"""Why the job store is away, said once per cause rather than once per poll.

A database that is down makes every request, claim and renewal fail the same
way; logging each would bury the one line that matters. Each distinct cause
is logged at WARNING once per interval, with how often it repeated since;
the repeats in between go to DEBUG.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("deferred_middleware")

INTERVAL = 60.0
MAX_CAUSES = 256


class CauseLog:
    def __init__(
        self, interval: float = INTERVAL, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.monotonic = monotonic
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warn(self, what: str, error: BaseException) -> None:
        """``what`` failed because of ``error`` (its text names the cause)."""
        cause = str(error) or type(error).__name__
        key, now = (what, cause), self.monotonic()
        with self._lock:
            last, repeats = self._seen.get(key, (None, 0))
            due = last is None or now - last >= self.interval
            if len(self._seen) >= MAX_CAUSES and key not in self._seen:
                self._seen.clear()
            self._seen[key] = (now, 0) if due else (last, repeats + 1)  # type: ignore[assignment]
        if not due:
            logger.debug("%s: %s", what, cause)
        elif repeats:
            logger.warning("%s: %s (%d more times since)", what, cause, repeats)
        else:
            logger.warning("%s: %s", what, cause)

    def forget(self) -> None:
        """Say every cause again at its next occurrence."""
        with self._lock:
            self._seen.clear()


store_away = CauseLog()
"""The process's one log of store outages, shared by every part that meets one."""


def check_soon(prepare: Callable[[], None], where: str, unavailable: type[BaseException]) -> None:
    """Run ``prepare`` (reaching the job store at ``where``) in a thread and
    say at once, naming the database and the cause, if it raises
    ``unavailable``: requests get 503 and the executor tries again until it can."""

    def check() -> None:
        try:
            prepare()
        except unavailable as exc:  # its text is the driver's own words
            store_away.warn(f"the job store {where} is unreachable at start-up", exc)

    threading.Thread(target=check, name="deferred-check", daemon=True).start()
