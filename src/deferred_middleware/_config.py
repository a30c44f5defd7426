"""Options shared by every adapter, validated once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from ._jobs import DEFAULT_CREDENTIAL_HEADERS

DEFAULT_DATABASE_FILE = "deferred_jobs.db"


def default_database_url() -> str:
    return "sqlite:///" + os.path.join(os.getcwd(), DEFAULT_DATABASE_FILE)


@dataclasses.dataclass
class Config:
    """Everything an operator can tune.

    ``execute=False`` makes a process enqueue only: a web tier that must not
    run jobs, with ``deferred-middleware worker`` doing the work elsewhere.
    """

    database_url: str = dataclasses.field(default_factory=default_database_url)
    prefix: str = "/jobs"
    public_url: str | None = None
    max_body_size: int = 10 * 1024 * 1024
    max_wait: float = 30.0
    max_queued: int | None = None
    retry_after: int = 1
    concurrency: int = 8
    execute: bool = True
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    retry_backoff: float = 1.0
    retention_seconds: float = 24 * 3600
    lock_timeout: float = 5.0
    credential_headers: frozenset[str] = DEFAULT_CREDENTIAL_HEADERS
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError("prefix must start with '/' and not end with one, e.g. '/jobs'")
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.lease_seconds <= 0 or self.poll_interval <= 0:
            raise ValueError("lease_seconds and poll_interval must be > 0")

    @classmethod
    def build(cls, credential_headers: Iterable[str] = (), **options: object) -> Config:
        """Options from a middleware's keyword arguments; extra credential
        headers add to the defaults rather than replace them."""
        names = DEFAULT_CREDENTIAL_HEADERS | {h.lower() for h in credential_headers}
        given = {k: v for k, v in options.items() if v is not None}
        return cls(credential_headers=names, **given)  # type: ignore[arg-type]
