"""The driver's own connections, for the hot paths where SQLAlchemy's
Connection would cost more than the statement: a status poll and the
writer's insert into an SQLite file.

A thread's reading connection on an SQLite file also remembers the jobs it
read, for as long as SQLite's ``data_version`` says that no other
connection, of this process or another, has committed since: a poll of a
job that has not changed then costs that pragma, and a job deleted or
retried anywhere is never served from memory. The same pragma tells an
idle executor that something was committed (:meth:`commit_watch`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._jobs import Job
from ._base import StoreUnavailable
from ._errors import cause_of, translate_errors
from ._sqlite_file import DatabaseFile

REMEMBERED_JOBS = 1024
REMEMBERED_BODY = 64 * 1024
"""A result larger than this is read again each time rather than kept."""


class ReadingConnection:
    """A thread's own driver connection, kept between reads. It only ever
    reads, so ``data_version`` moves for every commit into the file."""

    def __init__(self, engine: sa.Engine, connection: Any, remembers: bool) -> None:
        """Only a file's jobs are remembered: in memory, all threads share
        one connection, whose ``data_version`` never moves for its own writes."""
        self.engine = engine
        self.connection = connection
        self.remembers = remembers
        self._version: object = None
        self._jobs: dict[object, Job] = {}

    def data_version(self) -> object:
        """SQLite's count of the commits by other connections that this one
        has seen (https://sqlite.org/pragma.html#pragma_data_version)."""
        return self.connection.dbapi_connection.execute("PRAGMA data_version").fetchone()[0]

    def recall(self, key: object) -> Job | None:
        """The job read under ``key``, if nothing was committed since."""
        if not self.remembers:
            return None
        version = self.data_version()
        if version != self._version:
            self._jobs.clear()
            self._version = version
        return self._jobs.get(key)

    @staticmethod
    def copy_of(job: Job) -> Job:
        """What a caller sets on the job it was given is not remembered
        (a third of ``copy.copy``'s cost: the fields are shared, not copied)."""
        twin = object.__new__(Job)
        twin.__dict__.update(job.__dict__)
        return twin

    def keep(self, key: object, job: Job) -> None:
        """Remember a job read after :meth:`recall` looked: a commit in
        between changes the version, so the next recall forgets it."""
        if not self.remembers or job.request is not None:
            return  # a stored request may be large, and hold credentials
        if job.response is not None and len(job.response.body) > REMEMBERED_BODY:
            return
        if len(self._jobs) >= REMEMBERED_JOBS:
            del self._jobs[next(iter(self._jobs))]
        self._jobs[key] = job


class DriverConnections:
    """Mixed into :class:`SQLJobStore`, which supplies the engine."""

    engine: sa.Engine
    lock_timeout: float
    _readers: threading.local
    _kept: weakref.WeakKeyDictionary[Any, bool]
    """Every thread's kept connections, each with whether it writes; one
    goes back to the pool when its thread ends."""
    _kept_lock: threading.Lock
    _file: DatabaseFile | None

    if TYPE_CHECKING:

        def _reopen(self) -> None: ...

    def commit_watch(self) -> Callable[[], bool] | None:
        """See :meth:`JobStore.commit_watch`: SQLite's ``data_version`` on the
        calling thread's reading connection. A connection replaced after a
        failure counts from its own start, so its first answer is yes. It
        never raises: the executor's idle wait calls it, and a claim
        within the poll interval meets the same trouble and says why."""
        if self._file is None:
            return None
        seen: list[object] = [None]

        def changed() -> bool:
            try:
                held = self._own_connection()
                with self._thrown_away_on_failure(held.connection):
                    version = (held, held.data_version())
            except (StoreUnavailable, self.engine.dialect.loaded_dbapi.Error):
                return False
            if version == seen[0]:
                return False
            seen[0] = version
            return True

        return changed

    def _own_connection(self) -> ReadingConnection:
        """This thread's own driver connection, kept between reads: a status
        poll then costs the statement, not a checkout from the pool. Used
        within :meth:`_thrown_away_on_failure`."""
        engine = self.engine
        held = getattr(self._readers, "held", None)
        if held is None or held.engine is not engine:
            connection = self._checkout_kept(engine, writing=False)
            held = self._readers.held = ReadingConnection(
                engine, connection, remembers=self._file is not None
            )
        return held

    def _writing_connection(self) -> Any:
        """This thread's own driver connection for its writes into an SQLite
        file (the writer's inserts, the claims), kept as a reader's is: taking
        one from the pool and giving it back cost more than writing a batch
        of a few rows (a WSGI server's usual batch) or claiming a few jobs.
        Used within :meth:`_one_writer` and :meth:`_thrown_away_on_failure`."""
        return self._kept_for_thread("writing")

    def _at_once_connection(self) -> Any:
        """This thread's own driver connection for inserting at once (an
        event loop's: see :meth:`AcceptQueries.insert_at_once`). It never
        waits for SQLite's lock, so a file another process is writing
        declines at once, and it leaves the log's checkpoints, which sync
        the file, to the writer's thread. Out of the pool, which would hand
        those settings to others. Used within the file's
        ``one_writer_if_free`` and :meth:`_thrown_away_on_failure`."""
        return self._kept_for_thread("at_once", _never_waiting)

    def _kept_for_thread(self, slot: str, set_up: Callable[[Any], None] | None = None) -> Any:
        """The writing connection this thread keeps in ``slot`` (one of
        :meth:`_forget_reader`'s), taken anew for a new engine."""
        engine = self.engine
        held = getattr(self._readers, slot, None)
        if held is None or held[0] is not engine:
            connection = self._checkout_kept(engine, writing=True)
            if set_up is not None:
                set_up(connection)
            held = (engine, connection)
            setattr(self._readers, slot, held)
        return held[1]

    @contextlib.contextmanager
    def _in_place(self) -> Iterator[Any]:
        """An SQLite file's hot write (the writer's inserts, a worker's
        claims and outcomes) on the driver connection this thread keeps,
        under the one-writer lock: the file opened anew first if it was
        lost, the connection thrown away if it fails. Yields the driver's
        connection; the caller checks the file (``self._file.check()``)
        before its commit, so nothing is committed into a file that was
        removed or replaced."""
        assert self._file is not None
        if self._file.lost:
            self._reopen()
        with self._one_writer():
            connection = self._writing_connection()
            with self._thrown_away_on_failure(connection):
                yield connection.dbapi_connection

    def _one_writer(self) -> contextlib.AbstractContextManager[None]:
        if self._file is None:
            return contextlib.nullcontext()
        return self._file.one_writer(self.lock_timeout)

    def _start_keeping(self) -> None:
        """Nothing kept yet. In a forked child, what the parent kept, and
        its lock (which another of its threads may have held), are not this
        process's to touch."""
        self._kept = weakref.WeakKeyDictionary()
        self._kept_lock = threading.Lock()

    def _checkout_kept(self, engine: sa.Engine, *, writing: bool) -> Any:
        connection = self._checkout(engine)
        with self._kept_lock:
            self._kept[connection] = writing
        return connection

    def _close_kept(self, *, readers: bool) -> None:
        """Close what the threads keep before the file is opened anew or the
        store closes: a connection left open on the old file keeps that
        file's log (``-wal`` and ``-shm``), which SQLite would then read as
        the new file's. Writing connections are used only under the
        one-writer lock, which the caller holds; reading ones of other
        threads only when ``readers`` (the store is closing). Each thread
        takes a new connection once it sees the new engine."""
        own = getattr(self._readers, "held", None)
        with self._kept_lock:
            closing = [
                connection
                for connection, writing in self._kept.items()
                if writing or readers or (own is not None and connection is own.connection)
            ]
            for connection in closing:
                del self._kept[connection]
        for connection in closing:
            with contextlib.suppress(Exception):  # it may have failed already
                connection.invalidate()

    def _checkout(self, engine: sa.Engine) -> Any:
        dbapi = engine.dialect.loaded_dbapi
        try:
            with translate_errors():
                return engine.raw_connection()
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            raise StoreUnavailable(cause_of(exc)) from exc

    def _thrown_away_on_failure(self, connection: Any) -> ThrownAwayOnFailure:
        return ThrownAwayOnFailure(self, connection)

    def _forget_reader(self, connection: Any) -> None:
        """A failed connection is this thread's no more, reading or writing."""
        held = getattr(self._readers, "held", None)
        if held is not None and held.connection is connection:
            self._readers.held = None
        for slot in ("writing", "at_once"):
            kept = getattr(self._readers, slot, None)
            if kept is not None and kept[1] is connection:
                setattr(self._readers, slot, None)
        with self._kept_lock:
            self._kept.pop(connection, None)


def _never_waiting(connection: Any) -> None:
    """Out of the pool; no wait for SQLite's lock, no checkpoint at a commit."""
    connection.detach()
    driver = connection.dbapi_connection
    driver.execute("PRAGMA busy_timeout=0")
    driver.execute("PRAGMA wal_autocheckpoint=0")


class ThrownAwayOnFailure:
    """A connection that failed is not used again: StoreUnavailable. (A
    class rather than a generator: it wraps every status poll, and costs a
    third as much.)"""

    __slots__ = ("connection", "connections")

    def __init__(self, connections: DriverConnections, connection: Any) -> None:
        self.connections = connections
        self.connection = connection

    def __enter__(self) -> None:
        return None

    def __exit__(self, _kind: object, exc: BaseException | None, _trace: object) -> None:
        dbapi = self.connections.engine.dialect.loaded_dbapi
        if isinstance(exc, (dbapi.OperationalError, dbapi.InterfaceError)):
            self.connections._forget_reader(self.connection)
            self.connection.invalidate()
            raise StoreUnavailable(cause_of(exc)) from exc
