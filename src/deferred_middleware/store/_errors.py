"""Database trouble, told apart from programming errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa

from ._base import StoreUnavailable


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
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
