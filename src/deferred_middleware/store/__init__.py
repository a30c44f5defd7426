"""The job table: the only module that speaks SQL.

Every write that changes a running job is fenced by its attempt number, so a
worker that lost its lease (and was replaced) cannot overwrite the result of
the attempt that replaced it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from .._jobs import (
    DeferredOptions,
    Job,
    Status,
    StoredRequest,
    StoredResponse,
    merge_credentials,
    split_credentials,
    utcnow,
)
from ._schema import jobs, metadata

__all__ = ["JobStore", "StoreUnavailable", "create_engine", "metadata"]

VERSION_TABLE = "deferred_middleware_version"
POOL_SIZE = 24
NOTIFY_CHANNEL = "deferred_jobs"
logger = logging.getLogger("deferred_middleware")

STATUS_COLUMNS = (
    jobs.c.id,
    jobs.c.status,
    jobs.c.created_at,
    jobs.c.started_at,
    jobs.c.finished_at,
    jobs.c.attempts,
    jobs.c.max_attempts,
    jobs.c.timeout,
    jobs.c.progress,
    jobs.c.message,
    jobs.c.error,
)
REQUEST_COLUMNS = (
    jobs.c.request_method,
    jobs.c.request_path,
    jobs.c.request_query,
    jobs.c.request_headers,
    jobs.c.request_credentials,
    jobs.c.request_meta,
    jobs.c.request_body,
)
RESPONSE_COLUMNS = (jobs.c.response_status, jobs.c.response_headers, jobs.c.response_body)
ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
INSERT_KEYS = (
    "id",
    "status",
    "created_at",
    "run_after",
    "attempts",
    "max_attempts",
    "timeout",
    "request_method",
    "request_path",
    "request_query",
    "request_headers",
    "request_credentials",
    "request_meta",
    "request_body",
)


class StoreUnavailable(Exception):
    """The database could not be reached or stayed locked: answer 503, never 202."""


def create_engine(url: str, lock_timeout: float = 5.0) -> sa.Engine:
    """An engine tuned for a job table: WAL and a busy timeout on SQLite,
    connections checked before use elsewhere (a restarted server must not
    fail the next request)."""
    parsed = sa.make_url(url)
    # Enough pooled connections for every thread that uses them (the request
    # thread pool, the writer, the dispatcher), so none is opened per request.
    pool = {"pool_size": POOL_SIZE, "max_overflow": POOL_SIZE}
    if parsed.get_backend_name() != "sqlite":
        options: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": 3600, **pool}
        if parsed.get_backend_name() in ("mysql", "mariadb"):
            options["isolation_level"] = "READ COMMITTED"
        return sa.create_engine(parsed, **options)

    in_memory = parsed.database in (None, "", ":memory:")
    engine = sa.create_engine(
        parsed,
        connect_args={"check_same_thread": False, "timeout": lock_timeout},
        **({"poolclass": StaticPool} if in_memory else pool),
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
        if not in_memory:
            _enable_wal(cursor, lock_timeout)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        immediate = connection.get_execution_options().get("sqlite_immediate")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _enable_wal(cursor: Any, lock_timeout: float) -> None:
    """Switching a new file to WAL needs an exclusive lock, and SQLite does
    not always wait for it: processes starting together retry here."""
    deadline = time.monotonic() + lock_timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Create or upgrade the job table in place, once, even with several
    processes starting at the same moment."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", "deferred_middleware:migrations")
    dialect = engine.dialect.name
    with engine.connect().execution_options(sqlite_immediate=True) as connection:
        with connection.begin():
            if dialect == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7235012298)")
            elif dialect in ("mysql", "mariadb"):
                connection.exec_driver_sql("SELECT GET_LOCK('deferred_middleware_migrate', 60)")
            config.attributes["connection"] = connection
            config.attributes["version_table"] = VERSION_TABLE
            if _schema_is_newer(config, connection):
                logger.warning(
                    "the job table's schema is newer than this release; "
                    "using it as it is (schema changes are additive)"
                )
            else:
                command.upgrade(config, revision)
        if dialect in ("mysql", "mariadb"):
            connection.exec_driver_sql("SELECT RELEASE_LOCK('deferred_middleware_migrate')")


# Built once: an outcome is written for every job, and building the
# statement anew each time cost more than executing it.
FINISH = (
    jobs.update()
    .where(
        jobs.c.id == sa.bindparam("b_id"),
        jobs.c.attempts == sa.bindparam("b_attempt"),
        jobs.c.status == Status.RUNNING.value,
    )
    .values(
        status=sa.bindparam("b_status"),
        finished_at=sa.bindparam("b_finished_at"),
        lease_expires_at=None,
        error=sa.bindparam("b_error"),
        request_credentials=None,
        response_status=sa.bindparam("b_response_status"),
        response_headers=sa.bindparam("b_response_headers"),
        response_body=sa.bindparam("b_response_body"),
    )
)


def _schema_is_newer(config: Any, connection: sa.Connection) -> bool:
    """True during a rolling deploy, when a newer release has already
    upgraded the table that this older process is about to use."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    current = context.get_current_revision()
    if current is None:
        return False
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    return current not in known


def _request_row(request: StoredRequest, credential_names: frozenset[str]) -> dict[str, Any]:
    headers, credentials = split_credentials(request.headers, credential_names)
    meta = {
        "scheme": request.scheme,
        "root_path": request.root_path,
        "http_version": request.http_version,
        "server": request.server,
        "client": request.client,
    }
    return {
        "request_method": request.method,
        "request_path": request.path,
        "request_query": request.query_string.decode("latin-1"),
        # JSON is encoded here, once, rather than by a bind processor per row.
        "request_headers": json.dumps(headers),
        "request_credentials": json.dumps(credentials) if credentials else None,
        "request_meta": json.dumps(meta),
        "request_body": request.body,
    }


def _utc(value: Any) -> datetime | None:
    """A timestamp as SQLAlchemy or the raw driver hands it over (SQLite's
    text, or a naive datetime), made timezone-aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _from_json(value: Any) -> Any:
    """JSON columns arrive decoded from SQLAlchemy and psycopg, as text from
    the raw SQLite and MySQL drivers; they never hold a bare JSON string."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _request_from_row(row: Mapping[str, Any]) -> StoredRequest:
    meta = _from_json(row["request_meta"])
    headers = [(name, value) for name, value in _from_json(row["request_headers"])]
    credentials = _from_json(row["request_credentials"])
    if credentials:
        headers = merge_credentials(headers, [tuple(c) for c in credentials])
    return StoredRequest(
        method=row["request_method"],
        path=row["request_path"],
        query_string=row["request_query"].encode("latin-1"),
        headers=headers,
        body=bytes(row["request_body"]),
        scheme=meta["scheme"],
        root_path=meta["root_path"],
        http_version=meta["http_version"],
        server=tuple(meta["server"]) if meta.get("server") else None,
        client=tuple(meta["client"]) if meta.get("client") else None,
    )


def _job_from_row(row: Mapping[str, Any]) -> Job:
    """One decoder for every read, whether SQLAlchemy or the driver ran it."""
    job = Job(
        id=row["id"],
        status=Status(row["status"]),
        created_at=_utc(row["created_at"]),  # type: ignore[arg-type]
        options=DeferredOptions(retries=row["max_attempts"] - 1, timeout=row["timeout"]),
        started_at=_utc(row["started_at"]),
        finished_at=_utc(row["finished_at"]),
        attempts=row["attempts"],
        progress=row["progress"],
        message=row["message"],
        error=row["error"],
    )
    if "request_method" in row:
        job.request = _request_from_row(row)
    if row.get("response_status") is not None:
        job.response = StoredResponse(
            status=row["response_status"],
            headers=[(name, value) for name, value in _from_json(row["response_headers"])],
            body=bytes(row["response_body"]),
        )
    return job


class JobStore:
    """Queries on the job table. Thread-safe; every method is one short transaction."""

    def __init__(
        self,
        database_url: str,
        *,
        lock_timeout: float = 5.0,
        credential_headers: frozenset[str] = frozenset(),
    ) -> None:
        self.database_url = database_url
        self.lock_timeout = lock_timeout
        self.credential_headers = credential_headers
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._insert: tuple[str, tuple[str, ...], bool] | None = None
        self._batch = threading.local()
        self._readers = threading.local()
        self._selects: dict[tuple[bool, bool], tuple[str, list[str], bool]] = {}

    @property
    def engine(self) -> sa.Engine:
        """Created on first use in each process: a forked server worker must
        never share the parent's connections."""
        if self._engine is None or self._pid != os.getpid():
            if self._engine is not None:
                self._engine.dispose(close=False)
            self._engine = create_engine(self.database_url, self.lock_timeout)
            self._pid = os.getpid()
            self._insert = None
            self._selects = {}
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def reads_are_local(self) -> bool:
        """Whether a read is cheaper done in place than handed to a thread:
        SQLite in WAL mode, where readers never wait for writers and a
        primary-key read is a few dozen microseconds of local file access."""
        return self.dialect == "sqlite"

    def migrate(self, revision: str = "head") -> None:
        with _translate_errors():
            migrate(self.engine, revision)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- accepting ---------------------------------------------------------

    def new_row(self, job: Job) -> tuple[Any, ...]:
        """The job as the parameters of one insert, in the driver's own types."""
        assert job.request is not None
        created = self._datetime_param(job.created_at)
        row = {
            "id": job.id,
            "status": job.status.value,
            "created_at": created,
            "run_after": created,
            "attempts": 0,
            "max_attempts": job.max_attempts,
            "timeout": job.options.timeout,
            **_request_row(job.request, self.credential_headers),
        }
        return tuple(row[key] for key in self._insert_statement()[1])

    def _datetime_param(self, value: datetime) -> Any:
        naive = value.astimezone(timezone.utc).replace(tzinfo=None)
        if self.dialect == "sqlite":
            # SQLAlchemy's own storage format for DateTime on SQLite.
            return naive.isoformat(" ", "microseconds")
        return naive

    def _insert_statement(self) -> tuple[str, tuple[str, ...], bool]:
        """The INSERT compiled once per engine for the driver's parameter style
        (and whether that style is named); a burst of accepts then costs one
        executemany, without SQLAlchemy's per-row parameter processing."""
        if self._insert is None:
            compiled = jobs.insert().compile(dialect=self.engine.dialect, column_keys=INSERT_KEYS)
            positions = compiled.positiontup
            keys = tuple(positions) if positions is not None else INSERT_KEYS
            self._insert = (str(compiled), keys, positions is None)
        return self._insert

    def insert_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Many accepted jobs in one transaction: one commit for a whole burst."""
        sql, keys, named = self._insert_statement()
        with self._transaction() as connection:
            if self.dialect == "sqlite":
                # One multi-row statement rather than executemany: sqlite3 lets go
                # of the GIL around every statement it steps, and each hand-back
                # waits on a busy event loop.
                values = sql[sql.index("VALUES") + 6 :]
                multi = sql[: sql.index("VALUES") + 6] + ", ".join([values] * len(rows))
                connection.exec_driver_sql(multi, tuple(v for row in rows for v in row))
            elif named:
                connection.exec_driver_sql(sql, [dict(zip(keys, r, strict=True)) for r in rows])
            else:
                connection.exec_driver_sql(sql, list(rows))
            if self.dialect == "postgresql":
                # Delivered on commit: idle workers wake now rather than at their next poll.
                connection.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")

    def listen(self, wake: Callable[[], None], stopped: threading.Event) -> None:
        """PostgreSQL only: call ``wake`` whenever jobs are inserted, until
        ``stopped`` is set, reconnecting after the server restarts."""
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        conninfo = url.render_as_string(hide_password=False)
        while not stopped.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    logger.info("listening for new jobs on %s", NOTIFY_CHANNEL)
                    wake()  # anything inserted while we were not listening
                    while not stopped.is_set():
                        for _ in connection.notifies(timeout=1.0):
                            wake()
            except psycopg.Error:
                logger.warning("LISTEN connection lost; reconnecting")
                stopped.wait(1.0)

    # -- reading -----------------------------------------------------------

    def get(self, job_id: str, *, request: bool = False, response: bool = False) -> Job | None:
        """One job by id: the hot read behind every status poll, so it runs a
        statement compiled once on a connection this thread keeps."""
        sql, names, positional = self._select_statement(request, response)
        dbapi = self.engine.dialect.loaded_dbapi
        connection = self._reader()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, (job_id,) if positional else {"b_id": job_id})
            row = cursor.fetchone()
            cursor.close()
            connection.rollback()  # end the read: the next one sees new commits
        except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
            self._readers.held = None
            connection.invalidate()
            raise StoreUnavailable(exc.__class__.__name__) from exc
        return None if row is None else _job_from_row(dict(zip(names, row, strict=True)))

    def _select_statement(self, request: bool, response: bool) -> tuple[str, list[str], bool]:
        key = (request, response)
        if key not in self._selects:
            columns = [
                *STATUS_COLUMNS,
                *(REQUEST_COLUMNS if request else ()),
                *(RESPONSE_COLUMNS if response else ()),
            ]
            query = sa.select(*columns).where(jobs.c.id == sa.bindparam("b_id"))
            compiled = query.compile(dialect=self.engine.dialect)
            names = [column.name for column in columns]
            self._selects[key] = (str(compiled), names, compiled.positiontup is not None)
        return self._selects[key]

    def _reader(self) -> Any:
        """This thread's own pooled connection for reads, kept between calls."""
        engine = self.engine
        held = getattr(self._readers, "held", None)
        if held is None or held[0] is not engine:
            dbapi = engine.dialect.loaded_dbapi
            try:
                with _translate_errors():
                    connection = engine.raw_connection()
            except (dbapi.OperationalError, dbapi.InterfaceError) as exc:
                raise StoreUnavailable(exc.__class__.__name__) from exc
            held = self._readers.held = (engine, connection)
        return held[1]

    def list(
        self,
        statuses: Iterable[Status] = (),
        *,
        created_before: datetime | None = None,
        limit: int = 100,
    ) -> list[Job]:
        query = sa.select(*STATUS_COLUMNS).order_by(jobs.c.created_at.desc()).limit(limit)
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if created_before is not None:
            query = query.where(jobs.c.created_at < created_before)
        with _translate_errors(), self.engine.connect() as connection:
            return [_job_from_row(row._mapping) for row in connection.execute(query)]

    def count(self, status: Status) -> int:
        query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == status.value)
        with _translate_errors(), self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    # -- running -----------------------------------------------------------

    def claim(self, worker: str, limit: int, lease_seconds: float) -> list[Job]:
        """Take up to ``limit`` due queued jobs for ``worker``, atomically.

        PostgreSQL and MariaDB skip rows other workers hold locked; SQLite
        has one writer at a time, so one immediate transaction is enough.
        """
        now = utcnow()
        values = {
            "status": Status.RUNNING.value,
            "attempts": jobs.c.attempts + 1,
            "worker": worker,
            "started_at": now,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
        }
        due = (
            sa.select(jobs.c.id)
            .where(jobs.c.status == Status.QUEUED.value, jobs.c.run_after <= now)
            .order_by(jobs.c.run_after)
            .limit(limit)
        )
        columns = (*STATUS_COLUMNS, *REQUEST_COLUMNS)
        with self._transaction() as connection:
            if self.dialect in ("mysql", "mariadb"):
                ids = list(connection.scalars(due.with_for_update(skip_locked=True)))
                if not ids:
                    return []
                connection.execute(jobs.update().where(jobs.c.id.in_(ids)).values(values))
                rows = connection.execute(sa.select(*columns).where(jobs.c.id.in_(ids)))
            else:
                if self.dialect == "postgresql":
                    due = due.with_for_update(skip_locked=True)
                statement = jobs.update().where(jobs.c.id.in_(due.scalar_subquery()))
                rows = connection.execute(statement.values(values).returning(*columns))
            return [_job_from_row(row._mapping) for row in rows]

    def renew(self, worker: str, job_attempts: dict[str, int], lease_seconds: float) -> set[str]:
        """Extend the leases this worker holds; answers which jobs are still its own
        (a job missing from the answer was canceled or taken back)."""
        if not job_attempts:
            return set()
        expires = utcnow() + timedelta(seconds=lease_seconds)
        owned = sa.and_(
            jobs.c.id.in_(list(job_attempts)),
            jobs.c.status == Status.RUNNING.value,
            jobs.c.worker == worker,
        )
        with self._transaction() as connection:
            connection.execute(jobs.update().where(owned).values(lease_expires_at=expires))
            rows = connection.execute(sa.select(jobs.c.id, jobs.c.attempts).where(owned))
            return {row.id for row in rows if job_attempts.get(row.id) == row.attempts}

    def _fenced(self, job_id: str, attempt: int) -> Any:
        return sa.and_(
            jobs.c.id == job_id,
            jobs.c.attempts == attempt,
            jobs.c.status == Status.RUNNING.value,
        )

    def finish(
        self,
        job_id: str,
        attempt: int,
        status: Status,
        *,
        response: StoredResponse | None = None,
        error: str | None = None,
    ) -> bool:
        """Record an attempt's outcome and forget the stored credentials.
        False when the attempt no longer owns the job: its write is dropped."""
        parameters = self.finish_parameters(job_id, attempt, status, response=response, error=error)
        with self._transaction() as connection:
            return connection.execute(FINISH, parameters).rowcount == 1

    def finish_many(self, parameters: list[dict[str, Any]]) -> None:
        """Several outcomes in one statement; each is fenced by its attempt."""
        with self._transaction() as connection:
            connection.execute(FINISH, parameters)

    @staticmethod
    def finish_parameters(
        job_id: str,
        attempt: int,
        status: Status,
        *,
        response: StoredResponse | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        return {
            "b_id": job_id,
            "b_attempt": attempt,
            "b_status": status.value,
            "b_finished_at": utcnow(),
            "b_error": error,
            "b_response_status": response.status if response else None,
            "b_response_headers": response.headers if response else None,
            "b_response_body": response.body if response else None,
        }

    def retry_later(self, job_id: str, attempt: int, delay: float, error: str) -> bool:
        values = {
            "status": Status.QUEUED.value,
            "run_after": utcnow() + timedelta(seconds=delay),
            "lease_expires_at": None,
            "worker": None,
            "error": error,
        }
        return self._update(self._fenced(job_id, attempt), values) == 1

    def requeue(self, job_id: str, attempt: int) -> bool:
        """Give back an attempt that was interrupted by a shutdown: it does
        not count against the job's retries."""
        values = {
            "status": Status.QUEUED.value,
            "attempts": jobs.c.attempts - 1,
            "run_after": utcnow(),
            "lease_expires_at": None,
            "worker": None,
        }
        return self._update(self._fenced(job_id, attempt), values) == 1

    def set_progress(
        self, job_id: str, attempt: int, progress: float | None, message: str | None
    ) -> bool:
        values = {"progress": progress, "message": message}
        return self._update(self._fenced(job_id, attempt), values) == 1

    def reap_expired(self, error: str) -> tuple[list[str], list[str]]:
        """Take back running jobs whose lease ran out (their worker died):
        re-queue those with attempts left, fail the rest."""
        now = utcnow()
        expired = sa.and_(jobs.c.status == Status.RUNNING.value, jobs.c.lease_expires_at < now)
        with self._transaction() as connection:
            rows = list(
                connection.execute(
                    sa.select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts).where(expired)
                )
            )
            retry = [r.id for r in rows if r.attempts < r.max_attempts]
            fail = [r.id for r in rows if r.attempts >= r.max_attempts]
            if retry:
                connection.execute(
                    jobs.update()
                    .where(expired, jobs.c.id.in_(retry))
                    .values(
                        status=Status.QUEUED.value,
                        run_after=now,
                        worker=None,
                        lease_expires_at=None,
                        error=error,
                    )
                )
            if fail:
                connection.execute(
                    jobs.update()
                    .where(expired, jobs.c.id.in_(fail))
                    .values(
                        status=Status.FAILED.value,
                        finished_at=now,
                        error=error,
                        lease_expires_at=None,
                        request_credentials=None,
                    )
                )
        return retry, fail

    # -- operator actions -------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job; a finished one is left as it is."""
        values = {
            "status": Status.CANCELED.value,
            "finished_at": utcnow(),
            "lease_expires_at": None,
            "request_credentials": None,
        }
        self._update(sa.and_(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE)), values)
        return self.get(job_id)

    def retry(self, job_id: str) -> bool:
        """Run a failed or canceled job again, with a fresh set of attempts."""
        finished = sa.and_(
            jobs.c.id == job_id,
            jobs.c.status.in_([Status.FAILED.value, Status.CANCELED.value]),
        )
        values = {
            "status": Status.QUEUED.value,
            "run_after": utcnow(),
            "max_attempts": jobs.c.attempts + jobs.c.max_attempts,
            "finished_at": None,
            "error": None,
            "response_status": None,
            "response_headers": None,
            "response_body": None,
        }
        return self._update(finished, values) == 1

    def delete(self, job_id: str) -> bool:
        with self._transaction() as connection:
            return connection.execute(jobs.delete().where(jobs.c.id == job_id)).rowcount == 1

    def prune(self, finished_before: datetime, batch: int = 500) -> int:
        """Delete finished jobs older than the retention time, in bounded
        batches so a large backlog never holds a long lock."""
        finished = sa.and_(
            jobs.c.status.in_(
                [s.value for s in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)]
            ),
            jobs.c.finished_at < finished_before,
        )
        total = 0
        while True:
            with self._transaction() as connection:
                ids = list(connection.scalars(sa.select(jobs.c.id).where(finished).limit(batch)))
                if ids:
                    connection.execute(jobs.delete().where(jobs.c.id.in_(ids), finished))
            total += len(ids)
            if len(ids) < batch:
                return total

    # -- helpers -----------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        """A write transaction; inside :meth:`batch`, the batch's own one.
        On SQLite it takes the write lock at once, so it never has to upgrade
        a read lock midway (which fails under concurrency instead of waiting)."""
        shared = getattr(self._batch, "connection", None)
        if shared is not None:
            yield shared
            return
        with _translate_errors():
            connection = self.engine.connect().execution_options(sqlite_immediate=True)
            try:
                with connection.begin():
                    yield connection
            finally:
                connection.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run several writes of this thread in one transaction: one commit
        for a burst of outcomes, as for a burst of accepts."""
        with self._transaction() as connection:
            self._batch.connection = connection
            try:
                yield
            finally:
                self._batch.connection = None

    def _update(self, where: Any, values: dict[str, Any]) -> int:
        with self._transaction() as connection:
            return connection.execute(jobs.update().where(where).values(values)).rowcount


@contextlib.contextmanager
def _translate_errors() -> Iterator[None]:
    """Database trouble (down, locked, unreachable) becomes StoreUnavailable,
    which the adapters answer with 503; programming errors stay loud."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise StoreUnavailable(exc.__class__.__name__) from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(exc.__class__.__name__) from exc
        raise
