"""The job table in SQL: the queries, portable through SQLAlchemy Core, with
what differs per database in :mod:`._dialects` and what each column holds
in :mod:`._codec`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .._ids import is_hex
from .._jobs import AttemptWrite, Finish, Job, Status, utcnow
from .._process import current_pid
from . import _codec as codec
from . import _finish as finish
from ._accept import AcceptQueries
from ._base import Clock, QueueCount, WorkerLoad
from ._claim import ClaimQueries
from ._connections import DriverConnections
from ._dialects import Dialect, for_url
from ._driver_sql import DriverStatement
from ._errors import translate_errors
from ._in_place import InPlaceWrites, erases
from ._migrate import migrate
from ._schema import jobs
from ._sqlite_file import DatabaseFile, checkpoint
from ._urls import database_url as normalize_url
from ._webhooks import WebhookQueries, forget_attempts


def _fenced(job_id: str, attempt: int) -> Any:
    return sa.and_(
        jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == Status.RUNNING.value
    )


class SQLJobStore(AcceptQueries, ClaimQueries, InPlaceWrites, WebhookQueries, DriverConnections):
    """The job table in any database SQLAlchemy reaches."""

    def __init__(
        self,
        database_url: str,
        *,
        lock_timeout: float = 5.0,
        credential_headers: frozenset[str] = frozenset(),
        clock: Clock = utcnow,
    ) -> None:
        self.database_url = database_url
        self.url = normalize_url(database_url)
        self.dialect: Dialect = for_url(self.url)
        self.reads_are_local = self.dialect.reads_are_local
        self.pushes_wakeups = self.dialect.pushes_wakeups
        self.lock_timeout = lock_timeout
        self.credential_headers = credential_headers
        self.clock = clock
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._inserts: dict[tuple[str, ...], tuple[str, bool]] = {}
        self._log_pages = 0
        self._selects: dict[tuple[bool, bool], tuple[str, list[str], bool]] = {}
        self._statements: dict[Hashable, DriverStatement] = {}
        self._readers = threading.local()
        self._start_keeping()
        self._file = DatabaseFile.of(self.url)

    @property
    def engine(self) -> sa.Engine:
        """Created on first use in each process: a forked server worker must
        never share the parent's connections."""
        if self._engine is None or self._pid != current_pid():
            if self._engine is not None:  # in a forked child
                self._engine.dispose(close=False)
                self._start_keeping()
            self._engine = self.dialect.create_engine(self.url, self.lock_timeout)
            self._pid = current_pid()
            self._inserts = {}
            self._selects = {}
            self._statements = {}
        return self._engine

    def migrate(self, revision: str = "head") -> None:
        with translate_errors():
            migrate(self.engine, self.dialect, revision)
        if self._file is not None:
            self._file.remember()

    def close(self) -> None:
        self._close_kept(readers=True)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- reading -----------------------------------------------------------

    def get(self, job_id: str, *, request: bool = False, response: bool = False) -> Job | None:
        """The hot read behind every status poll: a statement compiled once,
        on a connection this thread keeps."""
        key = (job_id, request, response)
        held = self._own_connection()
        with self._thrown_away_on_failure(held.connection):
            job = held.recall(key)
            if job is None:
                job = self._select(held.connection, job_id, request, response)
                if job is None:
                    return None
                held.keep(key, job)
        return held.copy_of(job) if held.remembers else job

    def _select(self, connection: Any, job_id: str, request: bool, response: bool) -> Job | None:
        sql, names, positional = self._select_statement(request, response)
        row = self.dialect.read_row(connection, sql, (job_id,) if positional else {"b_id": job_id})
        return None if row is None else codec.job_from_row(dict(zip(names, row, strict=True)))

    def _select_statement(self, request: bool, response: bool) -> tuple[str, list[str], bool]:
        key = (request, response)
        if key not in self._selects:
            columns = [
                *codec.STATUS_COLUMNS,
                *(codec.REQUEST_COLUMNS if request else ()),
                *(codec.RESPONSE_COLUMNS if response else ()),
            ]
            query = sa.select(*columns).where(jobs.c.id == sa.bindparam("b_id"))
            compiled = query.compile(dialect=self.engine.dialect)
            names = [column.name for column in columns]
            self._selects[key] = (str(compiled), names, compiled.positiontup is not None)
        return self._selects[key]

    def list(
        self,
        statuses: Iterable[Status] = (),
        *,
        created_before: datetime | None = None,
        queues: Iterable[str] = (),
        limit: int = 100,
    ) -> list[Job]:
        columns = (*codec.STATUS_COLUMNS, *codec.ROUTE_COLUMNS)
        query = sa.select(*columns).order_by(jobs.c.created_at.desc()).limit(limit)
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        if queues := list(queues):
            query = query.where(jobs.c.queue.in_(queues))
        with translate_errors(), self.engine.connect() as connection:
            return codec.jobs_from_result(connection.execute(query))

    def count(self, status: Status) -> int:
        query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == status.value)
        with translate_errors(), self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def counts(self) -> list[QueueCount]:
        query = (
            sa.select(jobs.c.queue, jobs.c.status, sa.func.count(), sa.func.min(jobs.c.created_at))
            .group_by(jobs.c.queue, jobs.c.status)
            .order_by(jobs.c.queue, jobs.c.status)
        )
        with translate_errors(), self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [QueueCount(q, Status(s), n, codec.utc(oldest)) for q, s, n, oldest in rows]  # type: ignore[arg-type]

    def workers(self) -> list[WorkerLoad]:
        running = jobs.c.status == Status.RUNNING.value
        query = (
            sa.select(jobs.c.worker, sa.func.count(), sa.func.min(jobs.c.lease_expires_at))
            .where(running)
            .group_by(jobs.c.worker)
            .order_by(jobs.c.worker)
        )
        with translate_errors(), self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [WorkerLoad(w, n, codec.utc(lease)) for w, n, lease in rows]  # type: ignore[arg-type]

    def ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        return self._ids_like(prefix, prefix + "%", limit)

    def ids_ending(self, suffix: str, limit: int = 2) -> list[str]:
        """Read through the whole table (no index helps): for operators."""
        return self._ids_like(suffix, "%" + suffix, limit)

    def _ids_like(self, part: str, pattern: str, limit: int) -> list[str]:
        if not is_hex(part):
            return []  # ids are lower-case hex: nothing else is part of one (nor a LIKE pattern)
        query = sa.select(jobs.c.id).where(jobs.c.id.like(pattern)).order_by(jobs.c.id).limit(limit)
        with translate_errors(), self.engine.connect() as connection:
            return list(connection.scalars(query))

    # -- running -----------------------------------------------------------

    def renew(self, worker: str, held: dict[str, int], lease_seconds: float) -> set[str]:
        if not held:
            return set()
        expires = self.clock() + timedelta(seconds=lease_seconds)
        owned = sa.and_(
            jobs.c.id.in_(list(held)),
            jobs.c.status == Status.RUNNING.value,
            jobs.c.worker == worker,
        )
        with self._transaction() as connection:
            connection.execute(jobs.update().where(owned).values(lease_expires_at=expires))
            rows = connection.execute(sa.select(jobs.c.id, jobs.c.attempts).where(owned))
            return {row.id for row in rows if held.get(row.id) == row.attempts}

    def write(self, writes: Sequence[AttemptWrite]) -> int:
        """Runs of finishes go in one statement each; order is kept, so a
        handler's last progress lands before the outcome that ends its attempt."""
        if self._file and writes and all(isinstance(write, Finish) for write in writes):
            return self._finish_in_place(writes)  # type: ignore[arg-type]
        now = self.clock()
        finished_at = self.dialect.datetime_param(now)
        in_one_run = self.dialect.finishes_in_one_run
        landed = 0
        ending = [write.job_id for write in writes if isinstance(write, Finish)]
        with self._transaction(erasing=ending) as connection:
            outcomes: list[tuple[Any, ...]] = []
            for write in writes:
                if isinstance(write, Finish):
                    outcomes.append(finish.outcome(write, finished_at))
                    continue
                if outcomes:
                    landed += finish.land(connection, self._driver_statement, outcomes, in_one_run)
                    outcomes = []
                statement = jobs.update().where(_fenced(write.job_id, write.attempt))
                landed += connection.execute(
                    statement.values(codec.attempt_values(write, now))
                ).rowcount
            if outcomes:
                landed += finish.land(connection, self._driver_statement, outcomes, in_one_run)
            self.dialect.announce_changes(connection, [write.job_id for write in writes])
        return landed

    def _driver_statement(self, key: Hashable, build: Callable[[], Any]) -> DriverStatement:
        """``build()``'s statement, compiled once per engine (a new engine,
        as after a fork, starts with none)."""
        engine = self.engine
        statement = self._statements.get(key)
        if statement is None:
            statement = self._statements[key] = DriverStatement(build(), engine.dialect)
        return statement

    def reap_expired(self, error: str) -> tuple[list[str], list[str]]:
        now = self.clock()
        expired = sa.and_(jobs.c.status == Status.RUNNING.value, jobs.c.lease_expires_at < now)
        with self._transaction() as connection:
            rows = list(
                connection.execute(
                    sa.select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts).where(expired)
                )
            )
            retry = [r.id for r in rows if r.attempts < r.max_attempts]
            fail = [r.id for r in rows if r.attempts >= r.max_attempts]
            erases = self._erases(connection, fail)
            if retry:
                connection.execute(
                    jobs.update()
                    .where(expired, jobs.c.id.in_(retry))
                    .values(codec.requeue_lost_values(now, error))
                )
            if fail:
                connection.execute(
                    jobs.update()
                    .where(expired, jobs.c.id.in_(fail))
                    .values(codec.final_values(Status.FAILED, now, error))
                )
            self.dialect.announce_changes(connection, retry + fail)
        if erases:
            self._scrub()
        return retry, fail

    # -- operator actions -------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        active = sa.and_(jobs.c.id == job_id, jobs.c.status.in_(codec.ACTIVE_VALUES))
        with self._transaction(erasing=[job_id]) as connection:
            values = codec.final_values(Status.CANCELED, self.clock())
            if connection.execute(jobs.update().where(active).values(values)).rowcount:
                self.dialect.announce_changes(connection, [job_id])
        return self.get(job_id)

    def retry(self, job_id: str) -> bool:
        finished = sa.and_(
            jobs.c.id == job_id,
            jobs.c.status.in_([Status.FAILED.value, Status.CANCELED.value]),
        )
        with self._transaction() as connection:
            statement = jobs.update().where(finished).values(codec.retry_values(self.clock()))
            retried = connection.execute(statement).rowcount == 1
            if retried:
                self.dialect.announce_changes(connection, [job_id])
            return retried

    def error_detail(self, job_id: str) -> str | None:
        query = sa.select(jobs.c.error_detail).where(jobs.c.id == job_id)
        with translate_errors(), self.engine.connect() as connection:
            return connection.execute(query).scalar_one_or_none()  # type: ignore[no-any-return]

    def delete(self, job_id: str) -> bool:
        with self._transaction() as connection:
            deleted = connection.execute(jobs.delete().where(jobs.c.id == job_id)).rowcount == 1
            if deleted:
                forget_attempts(connection, [job_id])
                self.dialect.announce_changes(connection, [job_id])
            return deleted

    def prune(self, finished_before: datetime, batch: int = 500) -> int:
        finished = sa.and_(
            jobs.c.status.in_(codec.FINISHED_VALUES),
            jobs.c.finished_at < finished_before,
            codec.NO_WEBHOOK_PENDING,  # kept until delivered or given up
        )
        total = 0
        while True:
            with self._transaction() as connection:
                ids = list(connection.scalars(sa.select(jobs.c.id).where(finished).limit(batch)))
                if ids:
                    connection.execute(jobs.delete().where(jobs.c.id.in_(ids), finished))
                    forget_attempts(connection, ids)
            total += len(ids)
            if len(ids) < batch:
                return total

    def listen(
        self, channel: str, heard: Callable[[str | None], None], stopped: threading.Event
    ) -> None:
        self.dialect.listen(self.engine.url, channel, heard, stopped)

    # -- helpers -----------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(
        self, erasing: Sequence[str] = (), *, one_statement: bool = False
    ) -> Iterator[sa.Connection]:
        """A write transaction (on SQLite, one that takes the lock at once).
        With ``one_statement`` the caller runs a single statement, which is
        its own transaction where the dialect says so.

        A connection that failed is thrown away rather than pooled, so the
        store recovers by itself once the cause is gone (a server back up, a
        file writable again). On an SQLite file, nothing is committed into a
        file that was removed or replaced since it was opened."""
        if self._file is not None and self._file.lost:
            self._reopen()
        with self._one_writer(), translate_errors():
            connection = self.engine.connect()
            if one_statement and self.dialect.lone_statements_autocommit:
                # The statement is the transaction: a round trip each saved
                # for BEGIN and COMMIT. SQLAlchemy restores the connection's
                # isolation when it returns to the pool.
                connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            else:
                connection = connection.execution_options(sqlite_immediate=True)
            try:
                with connection.begin():
                    erases = self._erases(connection, erasing)
                    yield connection
                    if self._file is not None:
                        self._file.check()
                if erases:
                    checkpoint(connection)
            except sa.exc.IntegrityError:
                raise  # a constraint said no: the connection is sound
            except sa.exc.DBAPIError:
                connection.invalidate()
                raise
            finally:
                connection.close()

    def _erases(self, connection: sa.Connection, job_ids: Sequence[str]) -> bool:
        """On an SQLite file, whether erasing these jobs' stored credentials
        erases any: their old copies must then leave the write-ahead log."""
        if self._file is None:
            return False
        return erases(connection.connection.dbapi_connection, job_ids)

    def _scrub(self) -> None:
        with translate_errors(), self.engine.connect() as connection:
            checkpoint(connection)

    def _reopen(self) -> None:
        """Open the file anew (creating it again if it is gone) and migrate it."""
        with self._one_writer():
            self._close_kept(readers=False)
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self.migrate()
