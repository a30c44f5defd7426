"""The job table: a small store protocol, its SQL implementation (one per
dialect family where they differ), an in-memory twin, and the writer thread
that commits accepts and outcomes in groups."""

from __future__ import annotations

from ._base import (
    JOB_CHANGES,
    NEW_JOBS,
    Clock,
    JobStore,
    QueueCount,
    StoreUnavailable,
    Unstorable,
    WorkerLoad,
)
from ._memory import MemoryJobStore
from ._schema import metadata
from ._sql import SQLJobStore
from ._urls import safe_url

__all__ = [
    "JOB_CHANGES",
    "NEW_JOBS",
    "Clock",
    "JobStore",
    "MemoryJobStore",
    "QueueCount",
    "SQLJobStore",
    "StoreUnavailable",
    "Unstorable",
    "WorkerLoad",
    "metadata",
    "open_store",
    "safe_url",
]

MEMORY_URL = "memory://"


def open_store(
    database_url: str,
    *,
    lock_timeout: float = 5.0,
    credential_headers: frozenset[str] = frozenset(),
) -> JobStore:
    """The store for a URL: ``memory://`` for the in-memory twin, any
    SQLAlchemy URL for the table."""
    if database_url == MEMORY_URL:
        return MemoryJobStore(credential_headers=credential_headers)
    return SQLJobStore(
        database_url, lock_timeout=lock_timeout, credential_headers=credential_headers
    )
