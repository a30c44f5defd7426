"""Database URLs as users write them, made into what the extras install.

``postgres://`` (as many hosting platforms hand it out) and a driverless
``postgresql://`` mean psycopg 3 (the ``[postgres]`` extra); a driverless
``mysql://`` or ``mariadb://`` means PyMySQL (the ``[mysql]`` extra).
SQLAlchemy's own defaults there are drivers this project does not install.
A driver that is missing is named, with the extra that provides it, when
the middleware is built rather than at the first request.
"""

from __future__ import annotations

import sqlalchemy as sa

DRIVERS = {
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def safe_url(text: str) -> str:
    """A database URL fit for a log line: its password hidden."""
    try:
        return sa.make_url(text).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(not a database URL)"


def database_url(text: str) -> sa.URL:
    """The URL to connect with; raises ValueError for one that is not a
    database URL and ImportError, naming the extra, for a missing driver."""
    scheme, separator, rest = text.partition("://")
    if separator and scheme in DRIVERS:
        text = f"{DRIVERS[scheme]}://{rest}"
    try:
        url = sa.make_url(text)
        dialect = url.get_dialect()
    except sa.exc.NoSuchModuleError:  # (an ArgumentError too)
        raise ValueError(f"database_url {text!r}: no such database or driver") from None
    except sa.exc.ArgumentError:
        raise ValueError(
            f"database_url {text!r} is not a database URL "
            "(e.g. sqlite:///jobs.db, postgresql://host/db, mysql://host/db)"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as missing:
        backend = url.get_backend_name()
        hint = (
            f"; pip install 'deferred-middleware[{EXTRAS[backend]}]' and use {backend}://"
            if backend in EXTRAS
            else ""
        )
        raise ImportError(
            f"database_url {url.render_as_string()!r} needs the driver "
            f"{missing.name or url.get_driver_name()!r}, which is not installed{hint}"
        ) from None
    return url
