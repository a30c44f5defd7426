"""Statements compiled once per engine into the driver's own SQL.

Run with ``exec_driver_sql``, such a statement skips SQLAlchemy's per-row
bind processing, which cost more than the database's own work for the
writes made for every job (its outcome). The caller hands values already
in the driver's types.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


class DriverStatement:
    def __init__(self, statement: sa.Executable, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        # The statement's own constants (a status it matches, the 1 added to
        # a revision): bound once here, as SQLAlchemy would for every row.
        self.constants = {
            compiled.bind_names[bind]: bind.effective_value
            for bind in compiled.binds.values()
            if not bind.required
        }
        positions = compiled.positiontup
        self.positions = tuple(positions) if positions is not None else None

    def parameters(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """One row's parameters in the driver's style, from ``values`` by bind name."""
        merged = {**self.constants, **values}
        if self.positions is None:
            return merged
        return tuple(merged[name] for name in self.positions)
