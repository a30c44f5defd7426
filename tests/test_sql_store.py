"""What only the SQL store does: schema versions, concurrent migration, and
databases that are down, locked or from another release."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.mysql import pymysql
from sqlalchemy.dialects.postgresql import psycopg

from deferred_middleware import _protocol as protocol
from deferred_middleware import _timestamps, migrations
from deferred_middleware._ids import new_job_id
from deferred_middleware._jobs import Finish, Progress, Status, StoredRequest
from deferred_middleware._timestamps import utc_text
from deferred_middleware.runner._idle import wait_for_work
from deferred_middleware.store import (
    JOB_CHANGES,
    NEW_JOBS,
    MemoryJobStore,
    SQLJobStore,
    StoreUnavailable,
    _dialects,
    metadata,
)
from deferred_middleware.store import _codec as codec
from deferred_middleware.store._accept import SPARSE_KEYS, without_unused_columns
from deferred_middleware.store._connections import ReadingConnection
from deferred_middleware.store._finish import first_per_job
from deferred_middleware.store._in_place import ERASE_CHECK_CHUNK
from deferred_middleware.store._schema import jobs, naive_utc

from .support import eventually, make_job

HEAD = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()
MIGRATIONS = Path(migrations.__file__).parent / "versions"


def version_of(store: SQLJobStore) -> str:
    with store.engine.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT version_num FROM deferred_middleware_version"
        ).scalar_one()


def migrate_at_once(stores: list[SQLJobStore]) -> list[BaseException]:
    """Migrate every store from a thread of its own, all released together;
    what any of them raised."""
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def migrate(store: SQLJobStore) -> None:
        start.wait()
        try:
            store.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_migrating_is_idempotent_and_safe_to_race(database_url):
    stores = [SQLJobStore(database_url) for _ in range(4)]
    assert migrate_at_once(stores) == []
    stores[0].migrate()
    assert version_of(stores[0]) == HEAD
    for store in stores:
        store.close()


def test_migrating_separate_databases_at_once_in_one_process(tmp_path):
    """Alembic keeps its migration context in module globals: two job tables
    migrated at the same moment from one process must not trample it."""
    stores = [SQLJobStore(f"sqlite:///{tmp_path}/jobs{n}.db") for n in range(8)]
    assert migrate_at_once(stores) == []
    assert [version_of(store) for store in stores] == [HEAD] * len(stores)
    for store in stores:
        store.close()


def test_the_migrations_build_exactly_the_live_schema(database_url):
    """The Alembic head and the table the code queries never drift apart."""
    store = SQLJobStore(database_url)
    store.migrate()
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "version_table": "deferred_middleware_version"}
        )
        differences = compare_metadata(context, metadata)
    store.close()
    assert differences == []


def test_migrations_are_frozen_and_import_nothing_live():
    for script in MIGRATIONS.glob("[0-9]*.py"):
        assert "deferred_middleware" not in script.read_text(), script.name


def test_an_unreachable_database_is_reported_as_unavailable():
    store = SQLJobStore("postgresql+psycopg://postgres@127.0.0.1:1/test", lock_timeout=1)
    with pytest.raises(StoreUnavailable):
        store.migrate()
    with pytest.raises(StoreUnavailable):
        store.get(new_job_id())


@pytest.mark.parametrize(
    "query, synchronous", [("", 1), ("?synchronous=full", 2), ("?synchronous=EXTRA", 3)]
)
def test_every_sqlite_connection_is_set_up_for_the_job_table(sqlite_url, query, synchronous):
    """WAL, NORMAL sync unless the URL asks for more, zeroed free space
    (erased credentials), and temporary data in memory: a multi-row
    INSERT's statement journal is no file opened and removed on every
    commit."""
    store = SQLJobStore(sqlite_url + query)
    store.migrate()
    for connection in (store.engine.connect(), store.engine.connect()):  # each new one
        with connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "secure_delete", "temp_store")
            }
        expected = {"journal_mode": "wal", "synchronous": synchronous, "secure_delete": 1}
        assert pragmas == {**expected, "temp_store": 2}
    job = make_job()
    store.insert([job])
    assert SQLJobStore(sqlite_url).get(job.id) is not None  # the same file, whatever the query
    store.close()


@pytest.mark.parametrize("level", ["off", "sometimes", "2"])
def test_a_sync_level_that_could_lose_jobs_or_is_none_is_refused(sqlite_url, level):
    with pytest.raises(ValueError, match=r"synchronous=.*use one of normal, full, extra"):
        SQLJobStore(f"{sqlite_url}?synchronous={level}")


def test_a_locked_sqlite_database_is_reported_as_unavailable(sqlite_url):
    store = SQLJobStore(sqlite_url, lock_timeout=0.2)
    store.migrate()
    lock = sa.create_engine(sqlite_url).raw_connection()
    lock.isolation_level = None
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable):
            store.insert([make_job()])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    store.insert([make_job()])


def test_a_database_from_an_earlier_release_upgrades_in_place(database_url):
    old = SQLJobStore(database_url)
    old.migrate("0001")
    job = make_job()
    insert_as_before_queues(old, job)
    indexes = {ix["name"] for ix in sa.inspect(old.engine).get_indexes("deferred_jobs")}
    assert "ix_deferred_jobs_created" not in indexes
    old.close()

    new = SQLJobStore(database_url)
    new.migrate()
    indexes = {ix["name"] for ix in sa.inspect(new.engine).get_indexes("deferred_jobs")}
    assert "ix_deferred_jobs_created" in indexes
    assert version_of(new) == HEAD
    upgraded = new.get(job.id, request=True)
    assert upgraded.request == job.request
    assert upgraded.queue == "default"
    assert [j.id for j in new.claim("w", 10, 30, ["default"])] == [job.id]
    new.close()


def row_values(job, credential_names: frozenset[str], created) -> dict:
    """A new job's row by column name."""
    row = codec.insert_row(job, credential_names, created)
    return dict(zip(codec.INSERT_KEYS, row, strict=True))


@pytest.mark.parametrize(
    "dialect",
    [sqlite.dialect(), psycopg.dialect(), pymysql.dialect()],
    ids=lambda dialect: dialect.name,
)
def test_every_dialect_s_insert_binds_the_columns_in_a_row_s_order(dialect):
    plain = make_job(timeout=None)
    with_owner = make_job(timeout=None, owner="ann")
    for batch in ([plain], [plain, with_owner], [make_job(owner="ann", idempotency_key="k")]):
        rows = [codec.insert_row(job, frozenset(), "t") for job in batch]
        keys, _ = without_unused_columns(rows)
        compiled = jobs.insert().compile(dialect=dialect, column_keys=keys)
        assert compiled.positiontup in (None, list(keys))  # None: bound by name


def test_a_burst_s_insert_leaves_out_only_the_columns_every_row_leaves_null():
    plain = make_job(timeout=None)
    rows = [codec.insert_row(job, frozenset(), "t") for job in (plain, plain)]
    keys, cut = without_unused_columns(rows)
    assert set(keys) == set(codec.INSERT_KEYS) - set(SPARSE_KEYS)
    assert [dict(zip(keys, row, strict=True)) for row in cut] == [
        {key: value for key, value in zip(codec.INSERT_KEYS, row, strict=True) if key in keys}
        for row in rows
    ]
    with_owner = make_job(timeout=None, owner="ann")
    rows = [codec.insert_row(job, frozenset(), "t") for job in (plain, with_owner)]
    keys, cut = without_unused_columns(rows)
    assert set(codec.INSERT_KEYS) - set(keys) == set(SPARSE_KEYS) - {"owner"}
    assert [dict(zip(keys, row, strict=True))["owner"] for row in cut] == [None, "ann"]
    every = make_job(
        headers=[("cookie", "s=1")],
        callback_url="https://example.com/hook",
        owner="ann",
        idempotency_key="k",
    )
    rows = [codec.insert_row(every, frozenset({"cookie"}), "t")]
    assert without_unused_columns(rows) == (codec.INSERT_KEYS, rows)


def test_a_run_keeps_the_first_outcome_of_each_job_in_order():
    outcomes = [("a", 1, "x"), ("b", 1, "x"), ("a", 1, "y"), ("c", 2, "x"), ("b", 3, "z")]
    assert first_per_job(outcomes) == [("a", 1, "x"), ("b", 1, "x"), ("c", 2, "x")]


def test_a_run_of_outcomes_is_one_statement_on_postgresql_and_row_by_row_elsewhere(store):
    """A worker ends a batch of jobs at once: on PostgreSQL one statement
    for the run, rather than one for each job."""
    jobs_ = [make_job() for _ in range(3)]
    store.insert(jobs_)
    assert len(store.claim("w", 3, 30)) == 3
    ends = [Finish(job.id, 1, Status.SUCCEEDED, None) for job in jobs_]
    if store._file is not None:  # on the writing thread's own connection: SQLite's trace
        traced: list[str] = []
        store._writing_connection().dbapi_connection.set_trace_callback(traced.append)
        assert store.write(ends) == 3
        kinds = [statement.split()[0] for statement in traced]
        assert kinds == ["BEGIN", "SELECT", "UPDATE", "UPDATE", "UPDATE", "COMMIT"]
        return
    ran: list[tuple[str, bool]] = []

    def keep(_conn, _cursor, statement, _parameters, _context, many):
        if statement.lstrip().upper().startswith("UPDATE"):
            ran.append((statement, many))

    sa.event.listen(store.engine, "before_cursor_execute", keep)
    try:
        assert store.write(ends) == 3
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", keep)
    [(statement, many)] = ran
    if store.engine.dialect.name == "postgresql":
        assert "unnest(" in statement and not many
    else:
        assert many


def test_a_burst_keeps_each_job_s_own_values_beside_jobs_that_leave_them_null(store):
    sparse = {
        "plain": make_job(timeout=None),
        "timeout": make_job(timeout=7),
        "owner": make_job(timeout=None, owner="ann"),
        "callback": make_job(timeout=None, callback_url="https://example.com/hook"),
        "key": make_job(timeout=None, idempotency_key="k"),
        "cookie": make_job(timeout=None, headers=[("accept", "*/*"), ("cookie", "s=1")]),
    }
    store.insert(list(sparse.values()))
    store.insert([make_job(timeout=None), sparse_too := make_job(timeout=None, owner="bob")])
    read = {name: store.get(job.id, request=True) for name, job in sparse.items()}
    assert read["timeout"].options.timeout == 7
    assert [name for name, job in read.items() if job.options.timeout is not None] == ["timeout"]
    assert [name for name, job in read.items() if job.owner is not None] == ["owner"]
    assert read["callback"].callback_url == "https://example.com/hook"
    assert [name for name, job in read.items() if job.callback_url] == ["callback"]
    assert read["cookie"].request.headers == [("accept", "*/*"), ("cookie", "s=1")]
    assert store.get(sparse_too.id).owner == "bob"
    again = make_job(timeout=None, idempotency_key="k")
    assert store.insert_once(again).id == sparse["key"].id  # its key was stored


def test_a_new_job_s_row_holds_its_values_with_credentials_apart():
    job = make_job(callback_url="https://example.com/hook", owner="ann", idempotency_key="k")
    values = row_values(job, frozenset(), "t")
    assert values["id"] == job.id
    assert (values["created_at"], values["run_after"]) == ("t", "t")
    assert (values["owner"], values["callback_url"]) == ("ann", "https://example.com/hook")
    assert (values["idempotency_key"], values["request_digest"]) == (
        job.idempotency.key,
        job.idempotency.request,
    )
    assert values["request_credentials"] is None  # none sent: nothing to forget later
    with_cookie = make_job(headers=[("cookie", "s=1"), ("accept", "*/*")])
    values = row_values(with_cookie, frozenset({"cookie"}), "t")
    assert json.loads(values["request_credentials"]) == [[0, "cookie", "s=1"]]
    assert json.loads(values["request_headers"]) == [["accept", "*/*"]]


_ZONES = (
    st.none()
    | st.just(timezone.utc)
    | st.builds(
        timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
    )
)


@given(st.datetimes(min_value=datetime(1900, 1, 1), timezones=_ZONES))
def test_a_time_is_written_as_isoformat_writes_it_in_utc(when):
    in_utc = when if when.tzinfo is None else when.astimezone(timezone.utc)
    text = in_utc.replace(tzinfo=None).isoformat(" ", "microseconds")
    assert _dialects.SQLite().datetime_param(when) == text
    if when.tzinfo is timezone.utc or when.tzinfo is None:
        assert protocol._timestamp(when) == text.replace(" ", "T") + "Z"


@given(
    st.lists(
        st.tuples(
            st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 1, 1, 0, 2)),
            st.sampled_from([" ", "T"]),
        ),
        max_size=200,
    )
)
def test_times_of_one_second_share_a_head_and_stay_exact(times):
    """Within a second and across the bound on kept heads (two minutes of
    seconds is more than it keeps), each time's own text, whatever came before."""
    for when, separator in times:
        expected = when.isoformat(separator, "microseconds")
        assert utc_text(when, separator) == expected
        assert utc_text(when.replace(tzinfo=timezone.utc), separator, "Z") == expected + "Z"
    assert len(_timestamps._SECOND_HEADS) <= _timestamps.SECOND_HEADS_KEPT


_ADDRESSES = st.one_of(
    st.none(),
    st.tuples(st.text(), st.integers(min_value=0, max_value=65535)),
    st.tuples(st.text(), st.none() | st.booleans() | st.text(max_size=5)),
)


@given(
    scheme=st.text(),
    root_path=st.text(),
    http_version=st.text(max_size=5),
    server=_ADDRESSES,
    client=_ADDRESSES,
)
def test_a_stored_request_s_meta_is_the_json_text_json_dumps_writes(
    scheme, root_path, http_version, server, client
):
    request = StoredRequest("POST", "/", scheme=scheme, root_path=root_path, server=server)
    request.http_version, request.client = http_version, client
    meta = {
        "scheme": scheme,
        "root_path": root_path,
        "http_version": http_version,
        "server": server,
        "client": client,
    }
    assert codec.request_meta(request) == json.dumps(meta)


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 11, 28, 3, 0, 0, 5, tzinfo=timezone.utc),
        datetime(2026, 11, 28, 5, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
        datetime(2026, 11, 28, 3, 0, 0, 5),
    ],
    ids=["utc", "plus-two-hours", "naive"],
)
def test_a_timestamp_is_stored_as_naive_utc_whatever_its_zone(when):
    assert naive_utc(when) == datetime(2026, 11, 28, 3, 0, 0, 5)
    assert naive_utc(when).tzinfo is None
    assert _dialects.SQLite().datetime_param(when) == "2026-11-28 03:00:00.000005"


def insert_as_before_queues(store: SQLJobStore, job) -> None:
    """A row as a release from before queues wrote it: no queue column (nor
    any column added since)."""
    values = row_values(job, frozenset(), store.dialect.datetime_param(job.created_at))
    for added_since in ("queue", "callback_url", "owner", "idempotency_key", "request_digest"):
        del values[added_since]
    columns = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    insert = sa.text(f"INSERT INTO deferred_jobs ({columns}) VALUES ({placeholders})")
    with store.engine.begin() as connection:
        connection.execute(insert, values)


def test_a_release_from_before_queues_keeps_inserting_during_a_rolling_deploy(database_url):
    store = SQLJobStore(database_url)
    store.migrate()
    job = make_job()
    insert_as_before_queues(store, job)
    assert store.get(job.id).queue == "default"
    store.close()


def test_an_older_release_runs_against_a_newer_schema(database_url):
    """A rolling deploy: a newer release upgraded the table first."""
    store = SQLJobStore(database_url)
    store.migrate()
    with store.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE deferred_middleware_version SET version_num = '9999_from_the_future'"
        )
    store.close()
    older = SQLJobStore(database_url)
    older.migrate()
    job = make_job()
    older.insert([job])
    assert older.get(job.id) is not None
    older.close()


def test_an_sqlite_file_removed_while_serving_is_noticed_then_made_anew(sqlite_url, tmp_path):
    """Never a commit into a file nobody will open again."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    kept = make_job()
    store.insert([kept])
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreUnavailable):
        store.insert([make_job()])
    fresh = make_job()
    store.insert([fresh])  # the store opened and migrated a new file
    assert path.exists()
    assert store.get(fresh.id) is not None
    assert store.get(kept.id) is None
    store.close()


def test_an_sqlite_file_replaced_while_serving_is_noticed(sqlite_url, tmp_path):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    other = SQLJobStore(f"sqlite:///{tmp_path}/other.db")
    other.migrate()
    other.close()
    (tmp_path / "other.db").replace(path)
    with pytest.raises(StoreUnavailable):
        store.insert([make_job()])
    job = make_job()
    store.insert([job])
    assert SQLJobStore(sqlite_url).get(job.id) is not None
    store.close()


def test_a_connection_that_failed_is_not_used_again(sqlite_url):
    """SQLite keeps a file's read-only state per connection: a pooled one
    would keep failing after the file is writable again."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    with store.engine.connect() as connection:
        pooled = connection.connection.dbapi_connection
    pooled.execute("PRAGMA query_only=ON")  # fails every write on this connection
    with pytest.raises(StoreUnavailable):
        store.insert([make_job()])
    store.insert([make_job()])  # on a fresh connection
    store.close()


def test_the_writer_keeps_its_connection_between_batches(sqlite_url):
    """A checkout from the pool costs more than a batch of a few rows."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    checkouts = []
    sa.event.listen(store.engine, "checkout", lambda *_: checkouts.append(1))
    for _ in range(3):
        store.insert([make_job()])
    assert len(checkouts) == 1
    store.close()


def test_a_claim_on_an_sqlite_file_is_one_statement_on_the_thread_s_own_connection(sqlite_url):
    """No BEGIN and COMMIT around it, and no checkout from the pool: a
    worker claims a few rows at a time, as its slots free up."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    queued = [make_job() for _ in range(3)]
    store.insert(queued)
    statements: list[str] = []
    store._writing_connection().dbapi_connection.set_trace_callback(statements.append)
    checkouts = []
    sa.event.listen(store.engine, "checkout", lambda *_: checkouts.append(1))
    claimed = [store.claim("w", 1, 30) for _ in range(3)]
    assert [job.id for [job] in claimed] == [job.id for job in queued]
    assert [statement.split()[0] for statement in statements] == ["UPDATE"] * 3
    assert checkouts == []
    store.close()


def test_closing_the_store_closes_the_connections_threads_keep(sqlite_url):
    """Kept for reading and for writing, they close with the store, so the
    file is left whole, without its log."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = make_job()
    store.insert([job])
    store.get(job.id)
    store.claim("w", 1, 30)
    log = Path(sqlite_url.removeprefix("sqlite:///") + "-wal")
    assert log.exists()
    store.close()
    assert not log.exists()


def test_a_forked_child_keeps_connections_of_its_own(sqlite_url):
    """As a preforking server's workers do: the child gets an engine and a
    record of kept connections of its own, never the parent's lock over
    them, which another thread may hold at the fork (here: held throughout)."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    store.insert([make_job()])  # the parent's writing connection, kept
    with store._kept_lock:
        pid = os.fork()
        if pid == 0:  # the child: stopped after 20 s if it waits on the lock
            signal.alarm(20)
            code = 1
            try:
                store.insert([make_job()])
                store.close()
                code = 0
            finally:
                os._exit(code)
        status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0
    store.insert([make_job()])  # the parent's kept connection still works
    assert store.count(Status.QUEUED) == 3
    store.close()


def test_outcomes_that_fail_before_their_commit_land_nothing_and_the_connection_goes_on(
    sqlite_url, monkeypatch
):
    """Written on the writing thread's own connection: a failure rolls
    its transaction back, so the next write begins one of its own."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = make_job()
    store.insert([job])
    store.claim("w", 1, 30)
    ended = [Finish(job.id, 1, Status.SUCCEEDED, None)]
    check = store._file.check
    monkeypatch.setattr(store._file, "check", lambda: (_ for _ in ()).throw(StoreUnavailable()))
    with pytest.raises(StoreUnavailable):
        store.write(ended)
    assert store.get(job.id).status is Status.RUNNING
    monkeypatch.setattr(store._file, "check", check)
    assert store.write(ended) == 1
    assert store.get(job.id).status is Status.SUCCEEDED
    store.close()


def test_outcomes_on_a_connection_that_failed_are_unavailable_then_land(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = make_job()
    store.insert([job])
    store.claim("w", 1, 30)
    store._writing_connection().dbapi_connection.execute("PRAGMA query_only=ON")
    ended = [Finish(job.id, 1, Status.SUCCEEDED, None)]
    with pytest.raises(StoreUnavailable):
        store.write(ended)
    assert store.write(ended) == 1  # on a fresh connection
    assert store.get(job.id).status is Status.SUCCEEDED
    store.close()


def test_a_claim_on_a_connection_that_failed_is_unavailable_then_recovers(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = make_job()
    store.insert([job])
    store._writing_connection().dbapi_connection.execute("PRAGMA query_only=ON")
    with pytest.raises(StoreUnavailable):
        store.claim("w", 1, 30)
    assert [claimed.id for claimed in store.claim("w", 1, 30)] == [job.id]
    store.close()


def test_a_claim_in_a_replaced_sqlite_file_is_unavailable_then_claims_from_the_new_one(
    sqlite_url, tmp_path
):
    """With the old file's log gone first: SQLite would read a log left
    beside a replaced file as the new file's, whoever opens it."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    assert store.claim("w", 1, 30) == []
    store.close()  # its connections, kept ones too, close: the log goes
    other = SQLJobStore(f"sqlite:///{tmp_path}/other.db")
    other.migrate()
    job = make_job()
    other.insert([job])
    other.close()
    (tmp_path / "other.db").replace(sqlite_url.removeprefix("sqlite:///"))
    with pytest.raises(StoreUnavailable):
        store.claim("w", 1, 30)
    assert [claimed.id for claimed in store.claim("w", 1, 30)] == [job.id]
    store.close()


def files_of(sqlite_url: str) -> bytes:
    path = sqlite_url.removeprefix("sqlite:///")
    return b"".join(
        Path(path + suffix).read_bytes() for suffix in ("", "-wal") if Path(path + suffix).exists()
    )


@pytest.mark.parametrize("end", ["finish", "cancel", "reap"])
def test_erased_credentials_are_gone_from_the_sqlite_files(sqlite_url, end):
    from deferred_middleware._jobs import DEFAULT_CREDENTIAL_HEADERS, Finish, Status, StoredResponse

    from .support import FakeClock

    clock = FakeClock()
    store = SQLJobStore(sqlite_url, credential_headers=DEFAULT_CREDENTIAL_HEADERS, clock=clock)
    store.migrate()
    token = "Bearer secret-" + new_job_id()
    job = make_job(headers=[("authorization", token)], created_at=clock())
    store.insert([job])
    assert token.encode() in files_of(sqlite_url)  # it is there while the job needs it
    assert len(store.claim("w", 1, 30)) == 1
    if end == "finish":
        store.write([Finish(job.id, 1, Status.SUCCEEDED, StoredResponse(200, [], b""))])
    elif end == "cancel":
        store.cancel(job.id)
    else:
        clock.advance(31)
        store.reap_expired("lost")
    assert store.get(job.id).status.finished
    assert token.encode() not in files_of(sqlite_url)
    store.close()


def test_credentials_erased_late_in_a_long_batch_of_outcomes_are_gone_too(sqlite_url):
    """The check for stored credentials goes in chunks of ids; the one that
    holds them is in the last."""
    from deferred_middleware._jobs import DEFAULT_CREDENTIAL_HEADERS, Finish, Status, StoredResponse

    from .support import FakeClock

    clock = FakeClock()
    store = SQLJobStore(sqlite_url, credential_headers=DEFAULT_CREDENTIAL_HEADERS, clock=clock)
    store.migrate()
    token = "Bearer secret-" + new_job_id()
    plain = [make_job(created_at=clock()) for _ in range(ERASE_CHECK_CHUNK)]
    holder = make_job(headers=[("authorization", token)], created_at=clock())
    store.insert([*plain, holder])
    assert len(store.claim("w", len(plain) + 1, 30)) == len(plain) + 1
    response = StoredResponse(200, [], b"")
    store.write([Finish(job.id, 1, Status.SUCCEEDED, response) for job in (*plain, holder)])
    assert store.get(holder.id).status is Status.SUCCEEDED
    assert token.encode() not in files_of(sqlite_url)
    store.close()


@contextlib.contextmanager
def listening(store: SQLJobStore, channel: str) -> Iterator[list[str | None]]:
    """What the store hears on ``channel``, from the moment it is connected."""
    heard: list[str | None] = []
    stopped = threading.Event()
    listener = threading.Thread(target=store.listen, args=(channel, heard.append, stopped))
    listener.start()
    try:
        eventually(lambda: heard == [None])  # connected
        yield heard
    finally:
        stopped.set()
        listener.join(10)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_announces_every_change_to_other_processes(store):
    with listening(store, JOB_CHANGES) as heard:
        job = make_job()
        store.insert([job])
        [claimed] = store.claim("w", 1, 30)
        store.write([Progress(job.id, claimed.attempts, 0.5, None)])
        store.write([Finish(job.id, claimed.attempts, Status.SUCCEEDED, None)])
        eventually(lambda: heard.count(job.id) == 3)  # claimed, progressed, finished
        store.delete(job.id)
        eventually(lambda: heard.count(job.id) == 4)


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_postgres_claim_announces_what_it_claims_in_payloads_within_the_limit(store):
    """The claim statement sends its own notifications: one per 242 ids."""
    queued = [make_job() for _ in range(300)]
    store.insert(queued)
    with listening(store, JOB_CHANGES) as heard:
        assert store.claim("w", 5, 30, queues=["elsewhere"]) == []  # announces nothing
        assert len(store.claim("w", 300, 30)) == 300
        eventually(lambda: len(heard) == 3)
        payloads = heard[1:]
        assert sorted(len(p.split(",")) for p in payloads) == [58, 242]
        assert max(len(p.encode()) for p in payloads) <= 7999
        assert sorted(i for p in payloads for i in p.split(",")) == sorted(j.id for j in queued)
        store.delete(queued[0].id)  # the next change is heard after them: nothing else came
        eventually(lambda: len(heard) == 4)
        assert heard[3] == queued[0].id


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_postgres_batch_of_accepts_is_one_commit_with_one_wake_up(store):
    with listening(store, NEW_JOBS) as heard:
        batch = [make_job() for _ in range(3)]
        store.insert(batch)
        eventually(lambda: len(heard) == 2)  # one wake-up for the batch
        assert all(store.get(job.id) is not None for job in batch)
        clash = [make_job(), make_job()]
        clash[1].id = batch[0].id  # the second row fails: the first must not land
        refused = (sa.exc.IntegrityError, store.engine.dialect.loaded_dbapi.IntegrityError)
        with pytest.raises(refused):
            store.insert(clash)
        assert store.get(clash[0].id) is None
        store.insert([make_job()])  # the connection that failed a batch serves the next
        eventually(lambda: len(heard) == 3)


# -- pooled connections on a database server -----------------------------------

ON_A_SERVER = pytest.mark.parametrize(
    "database_url",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
    indirect=True,
)


def end_pooled_sessions(store: SQLJobStore, count: int) -> None:
    """Put ``count`` connections in the store's pool, then end their sessions
    on the server, as a server restart does."""
    postgres = store.engine.dialect.name == "postgresql"
    with contextlib.ExitStack() as held:
        connections = [held.enter_context(store.engine.connect()) for _ in range(count)]
        asked = "SELECT pg_backend_pid()" if postgres else "SELECT CONNECTION_ID()"
        sessions = [c.exec_driver_sql(asked).scalar_one() for c in connections]
    killer = sa.create_engine(store.url, poolclass=sa.pool.NullPool)
    with killer.connect() as connection:
        for session in sessions:
            end = f"SELECT pg_terminate_backend({session})" if postgres else f"KILL {session}"
            connection.exec_driver_sql(end)
    killer.dispose()


@ON_A_SERVER
def test_a_connection_idle_in_the_pool_is_checked_before_use(store, monkeypatch):
    monkeypatch.setattr(_dialects, "PING_AFTER_IDLE", 0.0)
    end_pooled_sessions(store, 1)
    assert store.count(Status.QUEUED) == 0  # the ping found it gone: a new one served


@ON_A_SERVER
def test_a_connection_used_a_moment_ago_is_not_checked_and_its_loss_renews_the_pool(
    store, monkeypatch
):
    """No round trip before each statement; the price is one failed
    statement after a restart, never a second."""
    monkeypatch.setattr(_dialects, "PING_AFTER_IDLE", 3600.0)
    end_pooled_sessions(store, 2)
    with pytest.raises(StoreUnavailable):
        store.count(Status.QUEUED)
    assert store.count(Status.QUEUED) == 0  # the other lost connection was not used


# -- reads remembered while nothing changed ------------------------------------


def finished_job(store: SQLJobStore, body: bytes = b"done"):
    from deferred_middleware._jobs import StoredResponse

    job = make_job()
    store.insert([job])
    store.claim("w", 1, 30)
    store.write([Finish(job.id, 1, Status.SUCCEEDED, StoredResponse(200, [], body))])
    return job


def statements_on_this_threads_reader(store: SQLJobStore) -> list[str]:
    statements: list[str] = []
    connection = store._readers.held.connection.dbapi_connection
    connection.set_trace_callback(statements.append)
    return statements


def in_another_process(sqlite_url: str, code: str) -> None:
    import subprocess
    import sys

    script = (
        f"from deferred_middleware.store import SQLJobStore\nstore = SQLJobStore({sqlite_url!r})\n"
    )
    subprocess.run([sys.executable, "-c", script + code], check=True, timeout=60)


def test_a_job_unchanged_since_it_was_read_costs_no_select(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = finished_job(store)
    assert store.get(job.id, response=True).response.body == b"done"
    statements = statements_on_this_threads_reader(store)
    assert store.get(job.id, response=True).response.body == b"done"
    assert store.get(job.id, response=True).status is Status.SUCCEEDED
    assert statements == ["PRAGMA data_version"] * 2  # SQLite said nothing changed
    store.get(job.id)  # a read of other columns is a read of its own
    assert statements[2:] == ["PRAGMA data_version", statements[3]]
    assert statements[3].startswith("SELECT")
    store.close()


def test_a_commit_watch_says_yes_once_for_each_commit_by_any_process(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    committed = store.commit_watch()
    assert committed is not None
    assert committed()  # its first answer
    assert not committed()
    job = make_job()
    store.insert([job])
    assert committed()
    assert not committed()
    store.get(job.id)  # reading commits nothing
    assert not committed()
    in_another_process(sqlite_url, f"assert store.delete({job.id!r})")
    assert committed()
    assert not committed()
    store.close()


def test_a_commit_watch_whose_connection_failed_says_no_then_starts_again(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    committed = store.commit_watch()
    assert committed()
    held = store._readers.held

    def failing() -> object:
        raise sqlite3.OperationalError("disk I/O error")

    held.data_version = failing
    assert not committed()  # the claim after the poll interval says why
    assert store._readers.held is None  # the failed connection is not used again
    assert committed()  # a new connection counts from its own start
    assert not committed()
    store.close()


@pytest.mark.parametrize(
    "trouble",
    [StoreUnavailable("unable to open database file"), sqlite3.DatabaseError("not a database")],
    ids=["no-connection", "not-a-database"],
)
def test_a_commit_watch_never_raises_into_the_idle_wait(sqlite_url, monkeypatch, trouble):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    committed = store.commit_watch()

    def failing(*_args: object) -> object:
        raise trouble

    monkeypatch.setattr(store, "_checkout", failing)
    monkeypatch.setattr(ReadingConnection, "data_version", failing)
    assert not committed()
    monkeypatch.undo()
    assert committed()
    store.close()


def sqlite_index_lock_holder(path: str) -> int | None:
    """The process holding SQLite's shared lock on the file's WAL index
    (byte 128 of ``-shm``: os_unix.c's UNIX_SHM_DMS), as another process
    sees it; POSIX locks are invisible to their own process."""
    import subprocess
    import sys

    probe = (
        "import fcntl, os, struct\n"
        f"fd = os.open({path + '-shm'!r}, os.O_RDONLY)\n"
        "query = struct.pack('hhqqi4x', fcntl.F_WRLCK, os.SEEK_SET, 128, 1, 0)\n"
        "kind, _, _, _, pid = struct.unpack('hhqqi4x', fcntl.fcntl(fd, fcntl.F_GETLK, query))\n"
        "print(0 if kind == fcntl.F_UNLCK else pid)\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True)
    return int(found.stdout) or None


def test_reading_and_watching_leave_sqlite_its_lock_on_the_log_index(sqlite_url):
    """Closing any descriptor of a file drops its process's POSIX locks on
    it, SQLite's included: a store that opened and closed the ``-shm`` file
    itself let the next process to connect rebuild the WAL index under its
    connections (its server processes died of SIGBUS). Status polls and an
    idle executor's watch, over more than a second, leave the lock held."""
    path = sqlite_url.removeprefix("sqlite:///")
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = finished_job(store)
    assert sqlite_index_lock_holder(path) == os.getpid()
    store.get(job.id)
    store.get(job.id)  # served from memory
    reader = threading.Thread(target=store.get, args=(job.id,))  # a thread that ends
    reader.start()
    reader.join()
    gc.collect()
    wait_for_work(threading.Event(), 1.5, store.commit_watch())  # an idle executor
    assert sqlite_index_lock_holder(path) == os.getpid()
    in_another_process(sqlite_url, f"assert store.get({job.id!r}) is not None")
    assert store.get(job.id).status is Status.SUCCEEDED
    store.close()


def test_only_an_sqlite_file_has_a_commit_watch(database_url):
    assert MemoryJobStore().commit_watch() is None
    store = SQLJobStore(database_url)
    assert (store.commit_watch() is not None) is (store.engine.dialect.name == "sqlite")
    store.close()


@pytest.mark.parametrize("change", ["delete", "retry", "prune"])
def test_a_job_changed_by_another_process_is_read_again(sqlite_url, change):
    """DELETE, retry and pruning are the only changes a finished job sees,
    and each may come from any process sharing the file."""
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = finished_job(store, body=b"first")
    assert store.get(job.id, response=True).status is Status.SUCCEEDED
    if change == "delete":
        in_another_process(sqlite_url, f"assert store.delete({job.id!r})")
        assert store.get(job.id) is None
        assert store.get(job.id, response=True) is None
    elif change == "retry":
        failed = make_job()
        store.insert([failed])
        store.claim("w", 1, 30)
        store.write([Finish(failed.id, 1, Status.FAILED, None, error="boom")])
        assert store.get(failed.id).status is Status.FAILED
        in_another_process(sqlite_url, f"assert store.retry({failed.id!r})")
        again = store.get(failed.id)
        assert again.status is Status.QUEUED and again.error is None
    else:
        code = "from datetime import datetime, timezone, timedelta\n"
        code += "assert store.prune(datetime.now(timezone.utc) + timedelta(days=1)) == 1"
        in_another_process(sqlite_url, code)
        assert store.get(job.id, response=True) is None
    store.close()


def test_a_reading_connection_that_failed_is_not_used_again(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = finished_job(store)
    store.get(make_job().id)  # this thread's reading connection
    failing = store._readers.held.connection.dbapi_connection
    failing.set_progress_handler(lambda: 1, 1)  # interrupts every statement on it
    with pytest.raises(StoreUnavailable):
        store.get(job.id)
    assert store.get(job.id).status is Status.SUCCEEDED  # on a new connection
    store.close()


def test_what_a_caller_sets_on_a_job_read_is_not_remembered(sqlite_url):
    store = SQLJobStore(sqlite_url)
    store.migrate()
    job = finished_job(store)
    store.get(job.id).status = Status.FAILED
    assert store.get(job.id).status is Status.SUCCEEDED
    store.close()


def test_large_results_and_stored_requests_are_read_each_time(sqlite_url):
    """Memory holds small documents only, and never a request's credentials."""
    from deferred_middleware.store._connections import REMEMBERED_BODY

    store = SQLJobStore(sqlite_url)
    store.migrate()
    large = finished_job(store, body=b"x" * (REMEMBERED_BODY + 1))
    at_limit = finished_job(store, body=b"x" * REMEMBERED_BODY)
    store.get(large.id, response=True)
    statements = statements_on_this_threads_reader(store)
    for _ in range(2):
        store.get(large.id, response=True)
        store.get(large.id, request=True)
    assert sum(s.startswith("SELECT") for s in statements) == 4
    store.get(at_limit.id, response=True)
    store.get(at_limit.id, response=True)
    assert sum(s.startswith("SELECT") for s in statements) == 5
    store.close()


def test_an_in_memory_database_is_read_each_time():
    """One connection serves every thread there: its data_version never
    moves for its own writes, so nothing read can be remembered."""
    store = SQLJobStore("sqlite://")
    store.migrate()
    job = finished_job(store)
    assert store.get(job.id).status is Status.SUCCEEDED
    store.delete(job.id)
    assert store.get(job.id) is None
    store.close()


def test_remembered_jobs_are_bounded(sqlite_url, monkeypatch):
    from deferred_middleware.store import _connections

    monkeypatch.setattr(_connections, "REMEMBERED_JOBS", 2)
    store = SQLJobStore(sqlite_url)
    store.migrate()
    first, second, third = (finished_job(store) for _ in range(3))
    for job in (first, second, third):
        store.get(job.id)
    statements = statements_on_this_threads_reader(store)
    store.get(third.id)
    store.get(second.id)
    store.get(first.id)  # the oldest made room
    assert sum(s.startswith("SELECT") for s in statements) == 1
    store.close()


def test_a_write_waiting_on_another_thread_s_past_the_lock_timeout_is_unavailable(sqlite_url):
    """The process's own writes queue on a thread lock (handed over the
    moment it is released); past the lock timeout the answer is a 503's."""
    store = SQLJobStore(sqlite_url, lock_timeout=0.2)
    store.migrate()
    with store._file.one_writer(1):
        with pytest.raises(StoreUnavailable):
            store.insert([make_job()])
        with pytest.raises(StoreUnavailable):
            store.claim("w", 1, 30)
    job = make_job()
    store.insert([job])
    assert store.get(job.id) is not None
    store.close()
