"""Ending attempts: the statement that stores a job's outcome.

Every job ends with one, so a worker writes them in runs, as its writer
finds them queued. Row by row, each is a statement of its own on the
server; PostgreSQL takes a whole run as one ``UPDATE ... FROM unnest(...)``,
which it parses, plans and starts once rather than once a job. The two
statements change the same columns in the same way: both are built here
from one description.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .. import _json
from .._jobs import Finish, Status
from ._codec import NEXT_REVISION, WEBHOOK_DUE_IF_ANY, webhook_due_at
from ._driver_sql import DriverStatement
from ._schema import jobs

FIELDS: dict[str, sa.types.TypeEngine[Any]] = {
    "id": sa.String(),
    "attempt": sa.Integer(),
    "status": sa.String(),
    "finished_at": postgresql.TIMESTAMP(),
    "error": sa.Text(),
    "error_detail": sa.Text(),
    "response_status": sa.Integer(),
    "response_headers": postgresql.JSON(),
    "response_body": postgresql.BYTEA(),
}
"""What one outcome binds, in the order of :func:`outcome`'s values, with
the types a PostgreSQL array of each takes."""
_BOUND = tuple(f"b_{name}" for name in FIELDS)


def _finishing(given: Mapping[str, Any]) -> sa.Update:
    """The update that ends the running attempt ``given["attempt"]`` of
    job ``given["id"]`` (a later attempt, or a job no longer running, is
    left alone), from bind parameters or from a run's columns."""
    return (
        jobs.update()
        .where(
            jobs.c.id == given["id"],
            jobs.c.attempts == given["attempt"],
            jobs.c.status == Status.RUNNING.value,
        )
        .values(
            revision=NEXT_REVISION,
            status=given["status"],
            finished_at=given["finished_at"],
            lease_expires_at=None,
            error=given["error"],
            error_detail=given["error_detail"],
            request_credentials=None,
            response_status=given["response_status"],
            response_headers=given["response_headers"],
            response_body=given["response_body"],
            webhook_state=WEBHOOK_DUE_IF_ANY,
            webhook_due_at=webhook_due_at(given["finished_at"]),
            webhook_attempts=0,
            webhook_lease_until=None,
        )
    )


def one_by_one() -> sa.Update:
    bound = zip(FIELDS, _BOUND, strict=True)
    return _finishing({name: sa.bindparam(parameter) for name, parameter in bound})


def as_one_run() -> sa.Update:
    """PostgreSQL's: each field bound as an array, the run's rows unnested."""
    arrays = [
        sa.bindparam(f"a_{name}", type_=postgresql.ARRAY(kind)) for name, kind in FIELDS.items()
    ]
    columns = [sa.column(name, kind) for name, kind in FIELDS.items()]
    run = sa.func.unnest(*arrays).table_valued(*columns).render_derived("outcomes")
    return _finishing(run.c)


def outcome(write: Finish, finished_at: Any) -> tuple[Any, ...]:
    """One outcome's values, in the order of :data:`FIELDS` and in the
    driver's own types (``finished_at`` already is): the statements run
    without SQLAlchemy's processing."""
    response = write.response
    return (
        write.job_id,
        write.attempt,
        write.status.value,
        finished_at,
        write.error,
        write.detail,
        response.status if response else None,
        _json.dumps(response.headers) if response else None,
        response.body if response else None,
    )


def first_per_job(outcomes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A run's outcomes without a later one for a job already ending in it.
    Row by row, the first would land and end the attempt, and the next find
    it no longer running; one statement updates a row once, with whichever
    it pairs first, so the later ones must not be in it."""
    kept: dict[str, tuple[Any, ...]] = {}
    for values in outcomes:
        kept.setdefault(values[0], values)
    return list(kept.values())


def land(
    connection: sa.Connection,
    compiled: Callable[[Hashable, Callable[[], Any]], DriverStatement],
    outcomes: list[tuple[Any, ...]],
    in_one_run: bool,
) -> int:
    """Store a run of outcomes; how many ended their attempt."""
    if in_one_run and len(outcomes) > 1:
        statement = compiled("finish run", as_one_run)
        columns = zip(*first_per_job(outcomes), strict=True)
        arrays = {f"a_{name}": list(values) for name, values in zip(FIELDS, columns, strict=True)}
        return connection.exec_driver_sql(statement.sql, statement.parameters(arrays)).rowcount
    statement = compiled("finish", one_by_one)
    rows = [statement.parameters(bound(values)) for values in outcomes]
    return connection.exec_driver_sql(statement.sql, rows).rowcount


def bound(values: tuple[Any, ...]) -> dict[str, Any]:
    """One outcome's values by the bind names of :func:`one_by_one`."""
    return dict(zip(_BOUND, values, strict=True))
