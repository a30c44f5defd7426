"""What an SQLite file needs beyond SQL: knowing it is still the file that
was opened, one writer at a time per process, and scrubbing its write-ahead
log after credentials are erased.

Nothing here opens the file or its ``-wal`` and ``-shm`` companions: closing
any descriptor of a file drops every POSIX lock the process holds on it,
SQLite's own included. Without its lock on ``-shm``, the next process to
connect takes itself for the first and rebuilds the WAL index under this
process's connections, which then read a truncated mapping (SIGBUS) or a
log index that no longer matches the log. ``os.stat`` opens nothing."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from ._base import StoreUnavailable


class DatabaseFile:
    """Which file an SQLite database is, so that a file removed or replaced
    under a running process is noticed before a 202 promises a row in it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None
        self.lost = False
        self._writing = threading.Lock()

    @contextlib.contextmanager
    def one_writer(self, timeout: float) -> Iterator[None]:
        """One write transaction at a time from this process. Threads that
        want SQLite's write lock together (the writer, the claims, the
        leases) would otherwise meet in SQLite's busy handler, which sleeps
        a millisecond or more while the lock is held for a fraction of
        one; a thread lock hands over the moment it is released."""
        if not self._writing.acquire(timeout=timeout):
            raise StoreUnavailable("the database file stayed locked by this process's writes")
        try:
            yield
        finally:
            self._writing.release()

    @contextlib.contextmanager
    def one_writer_if_free(self) -> Iterator[bool]:
        """As :meth:`one_writer` if no other thread of this process writes
        now: yields whether the caller is the one writer."""
        free = self._writing.acquire(blocking=False)
        try:
            yield free
        finally:
            if free:
                self._writing.release()

    @classmethod
    def of(cls, url: sa.URL) -> DatabaseFile | None:
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return cls(os.path.abspath(url.database))  # type: ignore[arg-type]

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (stat.st_dev, stat.st_ino)

    def remember(self) -> None:
        self.identity = self._stat()
        self.lost = False

    def check(self) -> None:
        """Raise StoreUnavailable (rolling back) if the file is not the one opened."""
        if self.identity is None:
            self.identity = self._stat()
        elif self._stat() != self.identity:
            self.lost = True
            raise StoreUnavailable("the database file was removed or replaced")


def checkpoint(connection: sa.Connection) -> None:
    """Erased means erased on disk: see :func:`checkpoint_on`."""
    checkpoint_on(connection.connection.dbapi_connection)


def checkpoint_on(driver: Any, mode: str = "TRUNCATE") -> None:
    """Copy SQLite's write-ahead log into the file (where secure_delete
    zeroes what was freed) and, by default, truncate it, so no frame
    holding old credentials is left; if readers keep the log busy, the
    next checkpoint does it. ``PASSIVE`` copies what it can without
    waiting for anyone, as SQLite's own checkpoint at a commit does. On
    the driver's connection: outside any transaction, as SQLite requires."""
    driver.execute(f"PRAGMA wal_checkpoint({mode})")
