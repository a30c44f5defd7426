"""On PostgreSQL, the hot statements go alone: an accept, a claim and a
status read each cost one round trip, with no BEGIN, COMMIT or ROLLBACK
of their own, while the writes of several statements keep their
transaction. What goes over the wire is read from libpq's own trace."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import sqlalchemy as sa

from deferred_middleware._jobs import Finish, Status
from deferred_middleware.store import SQLJobStore, StoreUnavailable

from .support import make_job

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

TRANSACTION_CONTROL = re.compile(r"\tF\t\d+\t(?:Query\t|Parse\t \"\") \"(BEGIN|COMMIT|ROLLBACK)\b")


class Wire:
    """What the store's connections send, each connection traced to a file
    of its own from the moment it is checked out."""

    def __init__(self, store: SQLJobStore, folder: Path) -> None:
        self.folder = folder
        self.files: list[tuple[object, IO[str]]] = []
        sa.event.listen(store.engine, "checkout", lambda c, _r, _p: self.watch(c))

    def watch(self, dbapi_connection) -> None:
        """Trace this connection too (from now on, if not already)."""
        if all(c is not dbapi_connection for c, _ in self.files):
            file = (self.folder / f"trace-{len(self.files)}.txt").open("w+")
            self.files.append((dbapi_connection, file))
            dbapi_connection.pgconn.trace(file.fileno())

    def sent(self) -> list[str]:
        """Each message sent since the last call (libpq flushes as it stops
        tracing a connection, and starts again on an emptied file)."""
        lines = []
        for connection, file in self.files:
            connection.pgconn.untrace()
            file.seek(0)
            lines += [line for line in file.read().splitlines() if "\tF\t" in line]
            file.seek(0)
            file.truncate()
            connection.pgconn.trace(file.fileno())
        return lines

    def round_trips(self, do) -> tuple[int, list[str]]:
        """How many times ``do`` waited on the server (a Sync or a simple
        Query each), and the transaction control it sent."""
        self.sent()
        do()
        sent = self.sent()
        waits = sum(bool(re.search(r"\tF\t\d+\t(Sync|Query)\b", line)) for line in sent)
        return waits, [m[1] for line in sent if (m := TRANSACTION_CONTROL.search(line))]

    def close(self) -> None:
        for connection, file in self.files:
            with contextlib.suppress(Exception):
                connection.pgconn.untrace()
            file.close()


@pytest.fixture
def wire(store: SQLJobStore, tmp_path: Path) -> Iterator[Wire]:
    watched = Wire(store, tmp_path)
    yield watched
    watched.close()


def test_an_accept_a_claim_and_a_status_read_are_one_round_trip_each(store, wire):
    job = make_job()
    accept = wire.round_trips(lambda: store.insert([job, make_job()]))
    store.get(job.id)  # this thread's reading connection, checked out once
    wire.watch(store._readers.held.connection.dbapi_connection)
    status = wire.round_trips(lambda: store.get(job.id))
    claim = wire.round_trips(lambda: store.claim("w", 1, 30))
    assert (accept, status, claim) == ((1, []), (1, []), (1, []))


def test_writes_of_several_statements_keep_their_transaction(store, wire):
    """The trace sees transaction control where it is sent, and the pool's
    connections come back from a lone statement as they were."""
    job = make_job()
    store.insert([job])
    [claimed] = store.claim("w", 1, 30)
    _, control = wire.round_trips(
        lambda: store.write([Finish(job.id, claimed.attempts, Status.SUCCEEDED, None)])
    )
    assert control == ["BEGIN", "COMMIT"]
    with store.engine.connect() as connection:
        assert connection.connection.dbapi_connection.autocommit is False
    store.get(job.id)
    assert store._readers.held.connection.dbapi_connection.autocommit is False


def test_a_batch_of_accepts_alone_is_still_all_or_nothing(store):
    clash = [make_job(), make_job(), make_job()]
    clash[2].id = clash[0].id
    refused = (sa.exc.IntegrityError, store.engine.dialect.loaded_dbapi.IntegrityError)
    with pytest.raises(refused):
        store.insert(clash)
    assert [store.get(job.id) for job in clash[:2]] == [None, None]


def test_a_status_read_on_a_lost_connection_is_unavailable_then_recovers(store):
    job = make_job()
    store.insert([job])
    store.get(job.id)
    reader = store._readers.held.connection.dbapi_connection
    pid = reader.info.backend_pid
    killer = sa.create_engine(store.url, poolclass=sa.pool.NullPool)
    with killer.connect() as connection:
        connection.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
    killer.dispose()
    with pytest.raises(StoreUnavailable):
        store.get(job.id)
    assert store.get(job.id).status is Status.QUEUED  # on a new connection
