"""What differs between SQLite, PostgreSQL and MariaDB/MySQL, written once each:
connecting, bulk inserts, claiming, wake-ups and the migration lock.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from itertools import chain
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from .._causes import store_away
from .._timestamps import utc_text
from ._base import JOB_CHANGES, NEW_JOBS, StoreUnavailable
from ._errors import cause_of
from ._schema import jobs, naive_utc

logger = logging.getLogger("deferred_middleware")

# Enough pooled connections for every thread that uses them (the request
# thread pool, the writer, the dispatcher), so none is opened per request.
POOL_SIZE = 24
NOTIFY_PAYLOAD_LIMIT = 7999  # PostgreSQL's, in bytes
MIGRATION_LOCK_ID = 7235012298
PING_AFTER_IDLE = 1.0  # seconds in the pool before a connection is checked
HEARD_ON = {NEW_JOBS: "new jobs", JOB_CHANGES: "changes to jobs"}


class Dialect:
    """The portable behaviour; each database overrides what it does better."""

    reads_are_local = False
    pushes_wakeups = False
    claims_announce = False
    """Whether a claim statement, once :meth:`announcing`, tells other
    processes of the jobs it claims itself (no :meth:`announce_changes`)."""
    updates_returning = True
    """Whether a claim marks and reads its rows in one ``UPDATE ... RETURNING``."""
    skips_locked = False
    """Whether a claim passes over rows another worker is claiming, rather
    than waiting for them (SQLite has one writer at a time anyway)."""
    finishes_in_one_run = False
    """Whether a run of outcomes is stored in one statement rather than
    row by row (see :mod:`._finish`)."""
    commits_without_sync = False
    """Whether a commit returns without waiting for the disk (see
    :meth:`JobStore.insert_at_once`)."""
    lone_statements_autocommit = False
    """Whether a write that is one statement runs without a BEGIN and a
    COMMIT of its own: a statement alone is atomic, and where each of those
    is a round trip to a server, they cost more than the statement does.
    (A read does the same through the dialect's :meth:`read_row`.)"""

    def create_engine(self, url: sa.URL, lock_timeout: float) -> sa.Engine:
        engine = sa.create_engine(url, pool_recycle=3600, **_pool(), **self.engine_options())
        _ping_after_idle(engine)
        return engine

    def engine_options(self) -> dict[str, Any]:
        return {}

    def datetime_param(self, when: datetime) -> Any:
        """A timestamp in the type the raw driver binds: naive UTC, as the
        table's columns hold it."""
        return naive_utc(when)

    def insert(
        self,
        connection: sa.Connection,
        sql: str,
        keys: tuple[str, ...],
        named: bool,
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        if named:
            connection.exec_driver_sql(sql, [dict(zip(keys, r, strict=True)) for r in rows])
        else:
            connection.exec_driver_sql(sql, list(rows))

    def claim(
        self,
        connection: sa.Connection,
        due: sa.Select[Any],
        values: dict[str, Any],
        columns: Sequence[sa.Column[Any]],
    ) -> sa.CursorResult[Any]:
        """Mark the due rows running and read them back, in one statement."""
        statement = jobs.update().where(jobs.c.id.in_(self.lock_due(due).scalar_subquery()))
        return connection.execute(statement.values(values).returning(*columns))

    def read_row(self, connection: Any, sql: str, params: Any) -> tuple[Any, ...] | None:
        """One row read on a driver connection, and the read ended, so the
        next one sees what was committed since."""
        cursor = connection.cursor()
        cursor.execute(sql, params)
        row = cursor.fetchone()
        cursor.close()
        connection.rollback()
        return row  # type: ignore[no-any-return]

    def lock_due(self, due: sa.Select[Any]) -> sa.Select[Any]:
        """The due rows as a claim selects them."""
        return due.with_for_update(skip_locked=True) if self.skips_locked else due

    def announcing(self, changing: sa.Update) -> sa.Executable:
        """``changing`` (an ``UPDATE ... RETURNING`` the ids among its
        columns) made to announce what it changes, where the database can
        in the same statement."""
        return changing

    def lock_migrations(self, connection: sa.Connection) -> None:
        """Serialise processes that migrate at the same moment."""

    def unlock_migrations(self, connection: sa.Connection) -> None:
        pass

    def announce_changes(self, connection: sa.Connection, job_ids: Iterable[str]) -> None:
        """Tell other processes, on commit, which jobs changed (where the
        database can push; elsewhere they poll)."""

    def listen(
        self,
        url: sa.URL,
        channel: str,
        heard: Callable[[str | None], None],
        stopped: threading.Event,
    ) -> None:
        return


SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
"""The SQLite sync levels a job table may use: OFF could lose committed
jobs, and corrupt the file, in a power loss."""


class SQLite(Dialect):
    """One writer at a time: an immediate transaction is the claim's lock.
    Reads are local file access in WAL mode, cheap enough to do in place."""

    reads_are_local = True

    def __init__(self, synchronous: str = "NORMAL") -> None:
        self.synchronous = synchronous
        # In WAL mode with NORMAL, a commit writes the log into the system's
        # memory; only a checkpoint syncs the file.
        self.commits_without_sync = synchronous == "NORMAL"

    @classmethod
    def of(cls, url: sa.URL) -> SQLite:
        """``?synchronous=full`` on the URL: a committed job survives a power
        loss or a kernel crash too, for a sync of the log at every commit
        (``NORMAL``, the default, survives the process being killed)."""
        level = url.query.get("synchronous", "normal")
        if not isinstance(level, str) or level.upper() not in SYNCHRONOUS:
            allowed = ", ".join(s.lower() for s in SYNCHRONOUS)
            raise ValueError(f"database_url: synchronous={level!r}; use one of {allowed}")
        return cls(level.upper())

    def create_engine(self, url: sa.URL, lock_timeout: float) -> sa.Engine:
        url = url.difference_update_query(["synchronous"])  # ours, not the driver's
        in_memory = url.database in (None, "", ":memory:")
        engine = sa.create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": lock_timeout},
            **({"poolclass": StaticPool} if in_memory else _pool()),
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={int(lock_timeout * 1000)}")
            if not in_memory:
                _enable_wal(cursor, lock_timeout)
            cursor.execute(f"PRAGMA synchronous={self.synchronous}")
            # A multi-row INSERT keeps a statement journal: in memory, not in
            # a temporary file opened and removed on every commit.
            cursor.execute("PRAGMA temp_store=MEMORY")
            # Freed and overwritten content is zeroed, so erased credentials
            # do not linger in the file's free space.
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(connection: sa.Connection) -> None:
            # A write takes the lock at once, so it never has to upgrade a read
            # lock midway (which fails under concurrency instead of waiting).
            immediate = connection.get_execution_options().get("sqlite_immediate")
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def datetime_param(self, when: datetime) -> Any:
        # SQLAlchemy's own storage format for DateTime on SQLite. A time in
        # UTC, as the clock gives it, is written as it is: naive_utc would copy
        # it only to drop a zone that the text leaves out anyway.
        return utc_text(naive_utc(when) if when.tzinfo is not timezone.utc else when, " ")

    def insert(
        self,
        connection: sa.Connection,
        sql: str,
        keys: tuple[str, ...],
        named: bool,
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        connection.exec_driver_sql(*self.many_rows(sql, rows))

    @staticmethod
    def many_rows(sql: str, rows: Sequence[tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
        """One multi-row statement rather than executemany: sqlite3 lets go of
        the GIL around every statement it steps, and each hand-back waits on
        a busy event loop."""
        head, _, values = sql.partition("VALUES")
        return f"{head}VALUES{', '.join([values] * len(rows))}", tuple(chain.from_iterable(rows))


class PostgreSQL(Dialect):
    """Claims skip rows other workers hold; idle workers wake on NOTIFY."""

    pushes_wakeups = True
    skips_locked = True
    claims_announce = True
    finishes_in_one_run = True
    lone_statements_autocommit = True

    def read_row(self, connection: Any, sql: str, params: Any) -> tuple[Any, ...] | None:
        """In autocommit for the one statement: no BEGIN, no ROLLBACK, one
        round trip. The pool's connection is left as it was found."""
        driver = connection.dbapi_connection
        driver.autocommit = True
        try:
            row = super().read_row(connection, sql, params)
        except Exception:
            # A lost connection refuses even this; it is thrown away anyway.
            with contextlib.suppress(Exception):
                driver.autocommit = False
            raise
        driver.autocommit = False
        return row

    def insert(
        self,
        connection: sa.Connection,
        sql: str,
        keys: tuple[str, ...],
        named: bool,
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        # Idle workers wake on commit rather than at their next poll. The
        # wake-up rides on each row's statement, a round trip fewer than a
        # NOTIFY of its own; PostgreSQL delivers a transaction's identical
        # notifications once.
        waking = f"WITH inserted AS ({sql}) SELECT pg_notify('{NEW_JOBS}', '')"
        super().insert(connection, waking, keys, named, rows)

    def announce_changes(self, connection: sa.Connection, job_ids: Iterable[str]) -> None:
        """One notification per transaction (ids joined by commas, split
        only where a payload would exceed PostgreSQL's limit)."""
        ids = list(dict.fromkeys(job_ids))
        per_payload = NOTIFY_PAYLOAD_LIMIT // 33  # 32 hex digits and a comma
        for start in range(0, len(ids), per_payload):
            payload = ",".join(ids[start : start + per_payload])
            connection.exec_driver_sql(
                "SELECT pg_notify(%(channel)s, %(payload)s)",
                {"channel": JOB_CHANGES, "payload": payload},
            )

    def announcing(self, changing: sa.Update) -> sa.Executable:
        """As :meth:`announce_changes` does after a statement, within it: a
        round trip fewer on every claim. A CTE that only selects runs only
        if something reads it; counting its rows in the WHERE does."""
        changed = changing.cte("changed")
        part = (sa.func.row_number().over() - 1) // (NOTIFY_PAYLOAD_LIMIT // 33)
        numbered = sa.select(changed.c.id, part.label("part")).subquery("numbered")
        payload = sa.func.string_agg(numbered.c.id, ",")
        told = sa.select(sa.func.pg_notify(JOB_CHANGES, payload)).group_by(numbered.c.part)
        everyone_told = sa.select(sa.func.count()).select_from(told.cte("told")).scalar_subquery()
        return sa.select(changed).where(everyone_told >= 0)

    def lock_migrations(self, connection: sa.Connection) -> None:
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")

    def listen(
        self,
        url: sa.URL,
        channel: str,
        heard: Callable[[str | None], None],
        stopped: threading.Event,
    ) -> None:
        """Reconnects after the server restarts. ``heard`` gets each payload,
        and None on each (re)connection, for whatever was notified while
        nobody listened."""
        import psycopg

        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stopped.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {channel}")
                    logger.info("listening for %s on %s", HEARD_ON[channel], channel)
                    heard(None)
                    while not stopped.is_set():
                        for notification in connection.notifies(timeout=1.0):
                            heard(notification.payload)
            except psycopg.Error as exc:
                what = f"LISTEN connection for {HEARD_ON[channel]} lost; reconnecting"
                store_away.warn(what, StoreUnavailable(cause_of(exc)))
                stopped.wait(1.0)


class MySQL(Dialect):
    """No UPDATE ... RETURNING: lock the due ids (skipping locked ones), then
    update and read them in the same transaction."""

    updates_returning = False
    skips_locked = True

    def engine_options(self) -> dict[str, Any]:
        return {"isolation_level": "READ COMMITTED"}

    def claim(
        self,
        connection: sa.Connection,
        due: sa.Select[Any],
        values: dict[str, Any],
        columns: Sequence[sa.Column[Any]],
    ) -> sa.CursorResult[Any]:
        ids = list(connection.scalars(self.lock_due(due)))
        connection.execute(jobs.update().where(jobs.c.id.in_(ids)).values(values))
        return connection.execute(sa.select(*columns).where(jobs.c.id.in_(ids)))

    def lock_migrations(self, connection: sa.Connection) -> None:
        connection.exec_driver_sql("SELECT GET_LOCK('deferred_middleware_migrate', 60)")

    def unlock_migrations(self, connection: sa.Connection) -> None:
        connection.exec_driver_sql("SELECT RELEASE_LOCK('deferred_middleware_migrate')")


def for_url(url: sa.URL) -> Dialect:
    backend = url.get_backend_name()
    if backend == "sqlite":
        return SQLite.of(url)
    if backend == "postgresql":
        return PostgreSQL()
    if backend in ("mysql", "mariadb"):
        return MySQL()
    return Dialect()


def _pool() -> dict[str, Any]:
    return {"pool_size": POOL_SIZE, "max_overflow": POOL_SIZE}


def _ping_after_idle(engine: sa.Engine) -> None:
    """A connection that sat in the pool for a while is checked before use:
    a server restarted meanwhile must not fail the next request. One used
    within the last moment is not: a ping is a round trip, as costly as the
    statement it guards, on every accept and every claim. Should the server
    have gone in that moment, the statement fails before anything is
    committed, and SQLAlchemy then replaces every pooled connection."""

    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE:
            return  # a new connection, or one that just worked
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DisconnectionError(str(exc)) from exc  # the pool connects anew


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
