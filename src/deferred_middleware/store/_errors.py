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
        raise StoreUnavailable(cause_of(exc)) from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable(cause_of(exc)) from exc
        raise


def cause_of(error: BaseException) -> str:
    """The driver's own first line (host, port, file and reason), under the
    driver's exception name: what an operator needs to fix it."""
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    name = type(original).__name__
    return f"{name}: {lines[0].strip()}" if lines else name
