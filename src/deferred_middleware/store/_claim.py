"""Claiming queued jobs: the statement every free slot of every worker runs.

Built and compiled through SQLAlchemy once per engine and number of
queues, then run as the driver's own SQL: building the statement anew cost
several times what the database spends on a small claim, and a claim sits
between every accepted job and its handler starting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Hashable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._jobs import DEFAULT_QUEUE, Job, Status
from . import _codec as codec
from ._dialects import Dialect
from ._driver_sql import DriverStatement
from ._schema import jobs
from ._sqlite_file import DatabaseFile

CLAIMED_COLUMNS = (*codec.STATUS_COLUMNS, *codec.REQUEST_COLUMNS)


def _due(queues: Sequence[Any], now: Any, limit: Any) -> sa.Select[Any]:
    """The oldest due jobs of ``queues``: values, or bind parameters."""
    return (
        sa.select(jobs.c.id)
        .where(
            jobs.c.status == Status.QUEUED.value,
            jobs.c.queue.in_(queues),
            jobs.c.run_after <= now,
        )
        .order_by(jobs.c.run_after)
        .limit(limit)
    )


def claim_statement(dialect: Dialect, queues: int) -> sa.Executable:
    """Mark the due rows of ``queues`` queues running and read them back."""
    names = [sa.bindparam(f"c_queue_{i}") for i in range(queues)]
    due = _due(names, sa.bindparam("c_now"), sa.bindparam("c_limit"))
    claim = (
        jobs.update()
        .where(jobs.c.id.in_(dialect.lock_due(due).scalar_subquery()))
        .values(
            revision=codec.NEXT_REVISION,
            status=Status.RUNNING.value,
            attempts=jobs.c.attempts + 1,
            worker=sa.bindparam("c_worker"),
            started_at=sa.bindparam("c_now"),
            lease_expires_at=sa.bindparam("c_lease_expires_at"),
        )
        .returning(*CLAIMED_COLUMNS)
    )
    return dialect.announcing(claim)


class ClaimQueries:
    """Mixed into :class:`SQLJobStore`, which supplies the compiled
    statements and the transaction."""

    clock: Any
    dialect: Dialect
    _file: DatabaseFile | None

    if TYPE_CHECKING:

        def _driver_statement(self, key: Hashable, build: Callable[[], Any]) -> DriverStatement: ...

        def _in_place(self) -> contextlib.AbstractContextManager[Any]: ...

        def _transaction(
            self, erasing: Sequence[str] = ()
        ) -> contextlib.AbstractContextManager[sa.Connection]: ...

    def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        queues: Collection[str] = (DEFAULT_QUEUE,),
    ) -> list[Job]:
        now = self.clock()
        expires = now + timedelta(seconds=lease_seconds)
        names = sorted(set(queues))
        if self._file is not None:
            return self._claim_in_place(worker, limit, names, now, expires)
        one_statement = self.dialect.updates_returning and self.dialect.claims_announce
        with self._transaction(one_statement=one_statement) as connection:
            if self.dialect.updates_returning:
                rows = self._claim_compiled(connection, worker, limit, names, now, expires)
            else:  # no RETURNING: the dialect's own steps
                values = codec.claim_values(worker, now, lease_seconds)
                due = _due(names, now, limit)
                rows = self.dialect.claim(connection, due, values, CLAIMED_COLUMNS)
            claimed = codec.jobs_from_result(rows)
            if not self.dialect.claims_announce:
                self.dialect.announce_changes(connection, [job.id for job in claimed])
            return claimed

    def _claim_in_place(
        self, worker: str, limit: int, queues: Sequence[str], now: datetime, expires: datetime
    ) -> list[Job]:
        """An SQLite file's claim, as its inserts are written: one statement
        on the claiming thread's own driver connection (:meth:`_in_place`). The statement is its
        own transaction, and as an ``UPDATE`` it takes the write lock as it
        starts; SQLAlchemy's begin and commit around it cost more than the
        claim of a few rows, and a worker claims a few at a time, as slots
        free up."""
        assert self._file is not None
        count = len(queues)
        statement = self._driver_statement(
            ("claim", count), lambda: claim_statement(self.dialect, count)
        )
        values = claim_binds(self.dialect, worker, limit, queues, now, expires)
        with self._in_place() as driver:
            self._file.check()
            cursor = driver.execute(statement.sql, statement.parameters(values))
            rows = cursor.fetchall()
        return codec.jobs_from_rows([column[0] for column in cursor.description], rows)

    def _claim_compiled(
        self,
        connection: sa.Connection,
        worker: str,
        limit: int,
        queues: Sequence[str],
        now: datetime,
        expires: datetime,
    ) -> sa.CursorResult[Any]:
        count = len(queues)
        statement = self._driver_statement(
            ("claim", count), lambda: claim_statement(self.dialect, count)
        )
        values = claim_binds(self.dialect, worker, limit, queues, now, expires)
        return connection.exec_driver_sql(statement.sql, statement.parameters(values))


def claim_binds(
    dialect: Dialect,
    worker: str,
    limit: int,
    queues: Sequence[str],
    now: datetime,
    expires: datetime,
) -> dict[str, Any]:
    """What :func:`claim_statement` binds, in the driver's own types."""
    as_driver = dialect.datetime_param
    return {
        "c_now": as_driver(now),
        "c_lease_expires_at": as_driver(expires),
        "c_limit": limit,
        "c_worker": worker,
        **{f"c_queue_{i}": name for i, name in enumerate(queues)},
    }
