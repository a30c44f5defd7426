"""Schema versions: Alembic, with a version table of our own so the user's
own migrations never see ours."""

from __future__ import annotations

import logging
import threading
from typing import Any

import sqlalchemy as sa

from ._dialects import Dialect

VERSION_TABLE = "deferred_middleware_version"
logger = logging.getLogger("deferred_middleware")

# Alembic installs its migration context in module globals for the length of
# a command, so two job tables migrated at once from one process (a server's
# first request and its dispatcher, or two apps) would trample each other.
# The database's own lock only orders processes, not threads of one.
_alembic_in_use = threading.Lock()


def migrate(engine: sa.Engine, dialect: Dialect, revision: str = "head") -> None:
    """Create or upgrade the job table in place, once, even with several
    processes starting at the same moment."""
    from alembic import command

    config = alembic_config()
    with _alembic_in_use, engine.connect().execution_options(sqlite_immediate=True) as connection:
        with connection.begin():
            dialect.lock_migrations(connection)
            config.attributes["connection"] = connection
            if _schema_is_newer(config, connection):
                logger.warning(
                    "the job table's schema is newer than this release; "
                    "using it as it is (schema changes are additive)"
                )
            else:
                command.upgrade(config, revision)
        dialect.unlock_migrations(connection)


def alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", "deferred_middleware:migrations")
    config.attributes["version_table"] = VERSION_TABLE
    return config


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
