"""The job table's indexes: built by the migrations exactly as declared
(partial ones included, which Alembic's comparison does not look at), and
used by the queries they are there for."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from deferred_middleware.store import SQLJobStore
from deferred_middleware.store._schema import jobs

from .support import make_job

SET_ONLY = {
    "ix_deferred_jobs_lease": "lease_expires_at",
    "ix_deferred_jobs_finished": "finished_at",
    "ux_deferred_jobs_idempotency": "idempotency_key",
}


def _where(text: object) -> str | None:
    """A partial index's condition, as any database spells it back."""
    if text is None:
        return None
    return re.sub(r"[()\s]+", " ", str(text)).strip().lower()


def _declared(engine: sa.Engine) -> dict[str, tuple[tuple[str, ...], bool, str | None]]:
    where_key = f"{engine.dialect.name}_where"
    return {
        index.name: (
            tuple(column.name for column in index.columns),
            bool(index.unique),
            _where(index.dialect_kwargs.get(where_key)),
        )
        for index in jobs.indexes
        if index.name is not None
    }


def _built(engine: sa.Engine) -> dict[str, tuple[tuple[str, ...], bool, str | None]]:
    where_key = f"{engine.dialect.name}_where"
    return {
        index["name"]: (
            tuple(index["column_names"]),
            bool(index["unique"]),
            _where(index.get("dialect_options", {}).get(where_key)),
        )
        for index in sa.inspect(engine).get_indexes("deferred_jobs")
        if index["name"] is not None
    }


def test_the_migrations_build_each_index_as_declared(database_url):
    store = SQLJobStore(database_url)
    store.migrate()
    try:
        built, declared = _built(store.engine), _declared(store.engine)
    finally:
        store.close()
    assert built == declared
    assert "ix_deferred_jobs_claim" not in built  # the queue-aware index serves claims
    partial = store.engine.dialect.name in ("sqlite", "postgresql")
    for name, column in SET_ONLY.items():
        assert built[name][2] == (f"{column} is not null" if partial else None)


@pytest.fixture
def plans(sqlite_or_postgres_url: str) -> Iterator[tuple[SQLJobStore, Callable[[str], list[str]]]]:
    """The store, and the plans of the statements it ran that compare a
    column. PostgreSQL is told to avoid full scans, which it would choose
    for a table this small whatever its indexes."""
    store = SQLJobStore(sqlite_or_postgres_url)
    store.migrate()
    seen: list[tuple[str, object]] = []

    def keep(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", keep)

    def plans_reading(column: str) -> list[str]:
        found = [(s, p) for s, p in seen if re.search(rf"\b{column}\s*(<|=)", s)]
        assert found, f"no statement read {column}"
        with store.engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SET enable_seqscan = off")
                explain = "EXPLAIN "
            else:
                explain = "EXPLAIN QUERY PLAN "
            return [
                " ".join(str(row[-1]) for row in connection.exec_driver_sql(explain + s, p))
                for s, p in found
            ]

    yield store, plans_reading
    sa.event.remove(store.engine, "before_cursor_execute", keep)
    store.close()


def test_the_lease_reaper_reads_the_partial_lease_index(plans):
    store, plans_reading = plans
    store.insert([make_job()])
    store.claim("w", 10, 30, ["default"])
    store.reap_expired("lost")
    for plan in plans_reading("lease_expires_at"):
        assert "ix_deferred_jobs_lease" in plan, plan


def test_pruning_reads_the_partial_finished_index(plans):
    store, plans_reading = plans
    store.prune(datetime.now(timezone.utc) - timedelta(days=1))
    for plan in plans_reading("finished_at"):
        assert "ix_deferred_jobs_finished" in plan, plan


def test_a_held_idempotency_key_is_found_through_the_partial_unique_index(plans):
    store, plans_reading = plans
    first = make_job(idempotency_key="k1")
    assert store.insert_once(first) is first
    assert store.insert_once(make_job(idempotency_key="k1")).id == first.id
    for plan in plans_reading("idempotency_key"):
        assert "ux_deferred_jobs_idempotency" in plan, plan
