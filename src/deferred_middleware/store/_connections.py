"""The driver's own connections, for the hot paths where SQLAlchemy's
Connection would cost more than the statement: a status poll and the
writer's insert into an SQLite file.

A thread's reading connection on an SQLite file also remembers the jobs it
read, for as long as SQLite's ``data_version`` says that no other
connection (of this process or another) has committed since: a poll of a
job that has not changed then costs one pragma, and a job deleted or
retried anywhere is never served from memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from .._jobs import Job
from ._base import StoreUnavailable
from ._errors import cause_of, translate_errors

REMEMBERED_JOBS = 1024
REMEMBERED_BODY = 64 * 1024
"""A result larger than this is read again each time rather than kept."""


class ReadingConnection:
    """A thread's own driver connection, kept between reads. It only ever
    reads: ``data_version`` counts commits by other connections only."""

    def __init__(self, engine: sa.Engine, connection: Any, remembers: bool) -> None:
        self.engine = engine
        self.connection = connection
        self.remembers = remembers
        self._version: object = None
        self._jobs: dict[object, Job] = {}

    def recall(self, key: object) -> Job | None:
        """The job read under ``key``, if nothing was committed since."""
        if not self.remembers:
            return None
        version = self.connection.dbapi_connection.execute("PRAGMA data_version").fetchone()
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
    _readers: threading.local
    _remembers: bool

    @contextlib.contextmanager
    def _own_connection(self) -> Iterator[ReadingConnection]:
        """This thread's own driver connection, kept between reads: a status
        poll then costs the statement, not a checkout from the pool."""
        engine = self.engine
        held = getattr(self._readers, "held", None)
        if held is None or held.engine is not engine:
            connection = self._checkout(engine)
            held = self._readers.held = ReadingConnection(engine, connection, self._remembers)
        with self._thrown_away_on_failure(held.connection):
            yield held

    @contextlib.contextmanager
    def _driver_connection(self) -> Iterator[Any]:
        """A driver connection from the pool for one hot write, where
        SQLAlchemy's Connection would cost more than the statement."""
        connection = self._checkout(self.engine)
        try:
            with self._thrown_away_on_failure(connection):
                yield connection
        finally:
            connection.close()

    def _checkout(self, engine: sa.Engine) -> Any:
        dbapi = engine.dialect.loaded_dbapi
        try:
            with translate_errors():
                return engine.raw_connection()
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            raise StoreUnavailable(cause_of(exc)) from exc

    @contextlib.contextmanager
    def _thrown_away_on_failure(self, connection: Any) -> Iterator[None]:
        """A connection that failed is not used again: StoreUnavailable."""
        dbapi = self.engine.dialect.loaded_dbapi
        try:
            yield
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            held = getattr(self._readers, "held", None)
            if held is not None and held.connection is connection:
                self._readers.held = None
            connection.invalidate()
            raise StoreUnavailable(cause_of(exc)) from exc
