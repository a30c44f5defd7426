"""A worker's outcomes on an SQLite file, written as its claims are: on the
writing thread's own driver connection, without SQLAlchemy's ``Connection``.

Every job ends with one such write, and a worker's writer finds only a few
outcomes queued at a time: SQLAlchemy's begin event, its ``executemany``
and its commit cost more than SQLite's work for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from .._jobs import Finish
from . import _finish as finish
from ._dialects import Dialect
from ._driver_sql import DriverStatement
from ._schema import jobs
from ._sqlite_file import DatabaseFile, checkpoint_on

HOLDING_CREDENTIALS = f"SELECT 1 FROM {jobs.name} WHERE request_credentials IS NOT NULL"
ERASE_CHECK_CHUNK = 500  # bound parameters per statement, well under SQLite's limit


def erases(driver: Any, job_ids: Sequence[str]) -> bool:
    """Whether ending these jobs erases any stored credentials, whose old
    copies must then leave SQLite's write-ahead log. SQLite's own SQL, on
    the driver's connection: built through SQLAlchemy, this check cost more
    than the outcomes' statement it comes with."""
    for start in range(0, len(job_ids), ERASE_CHECK_CHUNK):
        chunk = tuple(job_ids[start : start + ERASE_CHECK_CHUNK])
        marks = ", ".join("?" * len(chunk))
        sql = f"{HOLDING_CREDENTIALS} AND id IN ({marks}) LIMIT 1"
        if driver.execute(sql, chunk).fetchone() is not None:
            return True
    return False


class InPlaceWrites:
    """Mixed into :class:`SQLJobStore`, which supplies the connections."""

    clock: Any
    dialect: Dialect
    _file: DatabaseFile | None

    if TYPE_CHECKING:

        def _driver_statement(self, key: Hashable, build: Callable[[], Any]) -> DriverStatement: ...

        def _in_place(self) -> contextlib.AbstractContextManager[Any]: ...

    def _finish_in_place(self, writes: Sequence[Finish]) -> int:
        """Outcomes alone (a batch that holds other writes takes the general
        path), in one immediate transaction, with the same promises as the
        store's own: one writer of this process at a time, nothing committed
        into a file that was removed or replaced, and erased credentials
        scrubbed from the log once committed. Returns how many landed."""
        assert self._file is not None
        finished_at = self.dialect.datetime_param(self.clock())
        outcomes = [finish.outcome(write, finished_at) for write in writes]
        statement = self._driver_statement("finish", finish.one_by_one)
        rows = [statement.parameters(finish.bound(values)) for values in outcomes]
        with self._in_place() as driver:
            driver.execute("BEGIN IMMEDIATE")
            try:
                erasing = erases(driver, [write.job_id for write in writes])
                landed: int = driver.executemany(statement.sql, rows).rowcount
                self._file.check()
                driver.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):  # a failed COMMIT has ended it
                    driver.execute("ROLLBACK")
                raise
            if erasing:
                checkpoint_on(driver)
        return landed
