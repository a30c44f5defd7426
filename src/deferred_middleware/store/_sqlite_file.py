"""What an SQLite file needs beyond SQL: knowing it is still the file that
was opened, whether anything was committed into it since a moment ago, and
scrubbing its write-ahead log after credentials are erased."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
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


WAL_INDEX_HEADER = 48
"""Bytes in each of the two copies of the WAL-index header that open an
SQLite file's ``-shm`` file (https://sqlite.org/walformat.html)."""
IS_INIT = 12
"""The header's byte that is 0 until the WAL-index has been built."""
REOPEN_EVERY = 1.0
"""Seconds a :class:`CommitWatch` reads one ``-shm`` file before opening it again."""


class CommitMark:
    """What an SQLite file in WAL mode was last committed as: the WAL-index
    header, which SQLite rewrites on every commit (its change counter
    among the fields) and which it compares itself to decide whether
    ``PRAGMA data_version`` moves. One ``pread`` of it replaces that
    pragma, whose read transaction takes and drops a lock (two ``fcntl``
    calls): half of what reading a remembered job cost. Its
    layout cannot change under us: processes on different SQLite releases
    share it. :meth:`read` is None whenever it cannot be read whole and
    consistent (the two copies differ mid-commit, no ``-shm`` file); the
    caller then asks SQLite."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = None
        if not hasattr(os, "pread"):  # Windows: SQLite is asked each time
            return
        try:
            self._fd = os.open(path + "-shm", os.O_RDONLY)
        except OSError:
            return
        weakref.finalize(self, os.close, self._fd)

    @property
    def opened(self) -> bool:
        return self._fd is not None

    def read(self) -> bytes | None:
        if self._fd is None:
            return None
        try:
            both = os.pread(self._fd, 2 * WAL_INDEX_HEADER, 0)
        except OSError:
            return None
        first, second = both[:WAL_INDEX_HEADER], both[WAL_INDEX_HEADER:]
        if len(second) < WAL_INDEX_HEADER or first != second or not first[IS_INIT]:
            return None
        return first


class CommitWatch:
    """Whether anything was committed into an SQLite file since the last
    look, by any connection of any process: one ``pread`` of the commit
    mark. An idle worker looks every few milliseconds instead of claiming
    once a poll interval, so a job a web process stores starts at once, as
    a notification makes it on PostgreSQL. Where the mark cannot be read,
    nothing is said to have changed, and the poll interval still bounds
    the wait."""

    def __init__(self, path: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._monotonic = monotonic
        self._mark: CommitMark | None = None
        self._opened_at = 0.0
        self._seen: bytes | None = None

    def changed(self) -> bool:
        now = self._monotonic()
        mark = self._mark
        # Opened again now and then: SQLite removes the -shm file when its
        # last connection closes, and the one made next would go unseen.
        if mark is None or not mark.opened or now - self._opened_at >= REOPEN_EVERY:
            mark, self._opened_at = CommitMark(self._path), now
            self._mark = mark
        header = mark.read()
        if header is None:
            return False
        changed, self._seen = header != self._seen, header
        return changed


def checkpoint(connection: sa.Connection) -> None:
    """Erased means erased on disk: see :func:`checkpoint_on`."""
    checkpoint_on(connection.connection.dbapi_connection)


def checkpoint_on(driver: Any) -> None:
    """Copy SQLite's write-ahead log into the file (where secure_delete
    zeroes what was freed) and truncate it, so no frame holding old
    credentials is left. If readers keep the log busy, the next checkpoint
    does it. On the driver's connection: outside any transaction, as SQLite
    requires."""
    driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
