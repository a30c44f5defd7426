"""The job table's inserts: a burst of accepted jobs in one statement, and
the job that claims an Idempotency-Key."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._jobs import Job
from . import _codec as codec
from ._base import Unstorable
from ._dialects import Dialect, SQLite
from ._errors import translate_errors
from ._schema import jobs
from ._sqlite_file import DatabaseFile, checkpoint_on

SPARSE_KEYS = (
    "timeout",
    "request_credentials",
    "callback_url",
    "owner",
    "idempotency_key",
    "request_digest",
)
"""Columns of a new row that most jobs leave NULL, their default."""
_SPARSE_AT = tuple(codec.INSERT_KEYS.index(key) for key in SPARSE_KEYS)
_sparse_values = operator.itemgetter(*_SPARSE_AT)
_ALL_NULL = (None,) * len(SPARSE_KEYS)
_DENSE_AT = tuple(at for at in range(len(codec.INSERT_KEYS)) if at not in _SPARSE_AT)
_DENSE_KEYS = tuple(codec.INSERT_KEYS[at] for at in _DENSE_AT)
_dense_values = operator.itemgetter(*_DENSE_AT)


def without_unused_columns(
    rows: list[tuple[Any, ...]],
) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """The columns a burst of new rows needs, and the rows cut to them: a
    sparse column that every row leaves NULL is left out of the statement
    (the table fills in its default, NULL). Every bound column costs work
    per row; leaving out the six a typical job does not use takes a tenth
    off the writer's cost per accepted row. The keys keep the order of
    ``INSERT_KEYS``, and so the table's."""
    sparse = list(map(_sparse_values, rows))
    if sparse.count(_ALL_NULL) == len(sparse):
        return _DENSE_KEYS, list(map(_dense_values, rows))
    unused = {at for n, at in enumerate(_SPARSE_AT) if all(s[n] is None for s in sparse)}
    if not unused:
        return codec.INSERT_KEYS, rows
    kept = [at for at in range(len(codec.INSERT_KEYS)) if at not in unused]
    return tuple(codec.INSERT_KEYS[at] for at in kept), list(map(operator.itemgetter(*kept), rows))


AT_ONCE_BODIES = 256 * 1024
"""The most body a burst inserted at once may hold: its write into the
log then keeps the event loop a fraction of a millisecond. A larger burst
is the writer thread's to store."""

CHECKPOINT_PAGES = 1000
"""As SQLite's own checkpoint at a commit (``wal_autocheckpoint``)."""
LOG_PAGES_PER_COMMIT, ROWS_PER_LOG_PAGE = 5, 3
"""What an insert adds to the log, over-estimated: 4.3 pages for one row,
9 for 8, 22 for 64, 84 for 512 (the table's last page and each index's)."""

SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def is_busy(error: Exception) -> bool:
    """Whether SQLite said no because another connection holds its lock."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)


class AcceptQueries:
    """Mixed into :class:`SQLJobStore`, which supplies the engine and the transaction."""

    credential_headers: frozenset[str]
    dialect: Dialect
    engine: sa.Engine
    _inserts: dict[tuple[str, ...], tuple[str, bool]]
    _file: DatabaseFile | None
    _log_pages: int
    """What inserts at once added to the log since :meth:`checkpoint_due` said yes."""

    if TYPE_CHECKING:

        def _in_place(self) -> contextlib.AbstractContextManager[Any]: ...

        def _at_once_connection(self) -> Any: ...

        def _thrown_away_on_failure(self, connection: Any) -> Any: ...

        def _transaction(
            self, erasing: Sequence[str] = ()
        ) -> contextlib.AbstractContextManager[sa.Connection]: ...

    def insert(self, jobs_: Sequence[Job]) -> None:
        keys, rows = self._rows_of(jobs_)
        sql, named = self._insert_statement(keys)
        if self._file is not None:
            self._insert_in_place(sql, rows)
            return
        with self._transaction(one_statement=True) as connection:
            self.dialect.insert(connection, sql, keys, named, rows)

    def _rows_of(self, jobs_: Sequence[Job]) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        credentials, as_driver = self.credential_headers, self.dialect.datetime_param
        rows = [codec.insert_row(job, credentials, as_driver(job.created_at)) for job in jobs_]
        return without_unused_columns(rows)

    def insert_at_once(self, jobs_: Sequence[Job]) -> bool:
        """See :meth:`JobStore.insert_at_once`: on an SQLite file whose
        commits do not sync (``synchronous=normal``), when no other thread of
        this process writes, for a burst whose bodies are small. The
        statement is :meth:`_insert_in_place`'s, on this thread's own
        connection, which declines rather than wait for another process's
        lock, and leaves checkpoints to :meth:`checkpoint`."""
        file = self._file
        if file is None or file.lost or not self.dialect.commits_without_sync:
            return False
        if sum(len(job.request.body) for job in jobs_ if job.request) > AT_ONCE_BODIES:
            return False
        keys, rows = self._rows_of(jobs_)
        statement, params = SQLite.many_rows(self._insert_statement(keys)[0], rows)
        with file.one_writer_if_free() as free:
            if not free:
                return False
            connection = self._at_once_connection()
            with self._thrown_away_on_failure(connection):
                file.check()
                try:
                    connection.dbapi_connection.execute(statement, params)
                except self.engine.dialect.loaded_dbapi.OperationalError as exc:
                    if is_busy(exc):  # another process writes: nothing was stored
                        return False
                    raise
            self._log_pages += LOG_PAGES_PER_COMMIT + len(rows) // ROWS_PER_LOG_PAGE
        return True

    def checkpoint_due(self) -> bool:
        if self._log_pages < CHECKPOINT_PAGES:
            return False
        self._log_pages = 0
        return True

    def checkpoint(self) -> None:
        """Under the one-writer lock, as SQLite's own checkpoint is part of a
        commit: this process's inserts wait (or go to the writer's thread)
        meanwhile, so the checkpoint reaches the end of the log and the next
        commit starts the log again from its beginning. With inserts going
        on beside it, the log kept growing, every page lookup searched more
        of its index, and an accept cost a tenth more CPU."""
        if self._file is None:
            return
        with self._in_place() as driver:
            checkpoint_on(driver, "PASSIVE")

    def _insert_in_place(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """An SQLite file's inserts on the writing thread's own driver
        connection (:meth:`_in_place`): for
        a burst of a few rows, SQLAlchemy's begin and commit cost more than
        SQLite's. One statement is its own transaction, all rows or none,
        and it takes the write lock as it starts, as BEGIN IMMEDIATE would;
        without a BEGIN and a COMMIT around it, the writer lets go of the
        interpreter lock a third as often, and each time it must win it back
        from the threads of a WSGI server. The same promises
        as :meth:`_transaction`: one writer of this process at a time, and
        nothing committed into a file that was removed or replaced."""
        assert self._file is not None
        statement, params = SQLite.many_rows(sql, rows)
        with self._in_place() as driver:
            self._file.check()
            driver.execute(statement, params)

    def insert_once(self, job: Job) -> Job:
        """A job that claims an Idempotency-Key, unless another job holds it
        (the unique index decides, so concurrent duplicates make one row):
        answers the job stored under the key, this one or the one before."""
        assert job.idempotency is not None
        for _ in range(3):  # again if the holder went between our two statements
            try:
                self.insert([job])
                return job
            except (sa.exc.IntegrityError, self.engine.dialect.loaded_dbapi.IntegrityError):
                held = self._holding(job.idempotency.key)
                if held is not None:
                    return held
        raise Unstorable

    def _holding(self, key: str) -> Job | None:
        """Read in a transaction of its own: it begins after the insert that
        collided waited for the holder's commit, so it sees the holder."""
        columns = (*codec.STATUS_COLUMNS, *codec.IDEMPOTENCY_COLUMNS)
        query = sa.select(*columns).where(jobs.c.idempotency_key == key)
        with translate_errors(), self.engine.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else codec.job_from_row(row._mapping)

    def _insert_statement(self, keys: tuple[str, ...]) -> tuple[str, bool]:
        """The INSERT of ``keys`` compiled once per engine for the driver's
        parameter style (and whether that style is named); a burst of accepts
        then costs one statement, without SQLAlchemy's per-row parameter
        processing. A positional style binds the columns in the table's
        order, which is that of ``keys`` and so of a row."""
        statement = self._inserts.get(keys)
        if statement is None:
            compiled = jobs.insert().compile(dialect=self.engine.dialect, column_keys=keys)
            statement = self._inserts[keys] = (str(compiled), compiled.positiontup is None)
        return statement
