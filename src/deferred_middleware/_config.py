"""Options shared by every adapter, validated once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

from ._jobs import DEFAULT_CREDENTIAL_HEADERS, DEFAULT_QUEUE, RequestInfo, check_queue_name
from ._metrics import require_prometheus_client

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
    max_header_size: int = 64 * 1024
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
    queue: str = DEFAULT_QUEUE
    event_keep_alive: float = 15.0
    webhook_secret: str | None = None
    webhook_allowlist: tuple[str, ...] = ()
    webhook_backoff: float = 5.0
    webhook_retry_for: float = 24 * 3600
    webhook_timeout: float = 10.0
    owner: Callable[[RequestInfo], Any] | None = None
    metrics: bool = False
    dashboard: Callable[[RequestInfo], Any] | None = None

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError("prefix must start with '/' and not end with one, e.g. '/jobs'")
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.lease_seconds <= 0 or self.poll_interval <= 0 or self.event_keep_alive <= 0:
            raise ValueError("lease_seconds, poll_interval and event_keep_alive must be > 0")
        check_queue_name(self.queue)
        self.webhook_allowlist = tuple(self.webhook_allowlist)
        if self.webhook_secret is not None:
            _check_webhook_secret(self.webhook_secret)
        if self.metrics:
            require_prometheus_client()

    @classmethod
    def build(cls, credential_headers: Iterable[str] = (), **options: object) -> Config:
        """Options from a middleware's keyword arguments; extra credential
        headers add to the defaults rather than replace them."""
        names = DEFAULT_CREDENTIAL_HEADERS | {h.lower() for h in credential_headers}
        given = {k: v for k, v in options.items() if v is not None}
        return cls(credential_headers=names, **given)  # type: ignore[arg-type]


def _check_webhook_secret(secret: str) -> None:
    """Fail when the middleware is built, not at the first callback."""
    try:
        import httpx  # noqa: F401  (the deliveries are sent with it)
        from standardwebhooks import Webhook
    except ImportError:
        raise ImportError(
            "webhooks need the [webhooks] extra: pip install 'deferred-middleware[webhooks]'"
        ) from None
    try:
        Webhook(secret)
    except Exception as exc:
        raise ValueError("webhook_secret is not a Standard Webhooks secret (whsec_...)") from exc


class Options(TypedDict, total=False):
    """The keyword options every adapter takes (README, "Options")."""

    database_url: str
    """Any SQLAlchemy URL; default an SQLite file in the working directory."""
    routes: Iterable[str]
    """Patterns of deferred routes, for apps that cannot be edited."""
    retries: int
    """For routes chosen by pattern: how often a failed attempt runs again."""
    timeout: float | None
    """For routes chosen by pattern: seconds one attempt may take."""
    credential_headers: Iterable[str]
    """More headers to forget once a job finishes."""
    prefix: str
    """Where the job routes are mounted (``/jobs``)."""
    public_url: str | None
    """Absolute URLs in headers and bodies, e.g. ``https://api.example.com``."""
    max_body_size: int
    """Larger deferred requests get 413 and no job."""
    max_header_size: int
    """All header names and values together; larger deferred requests get 431."""
    max_wait: float
    """Cap of ``?wait=N``, seconds."""
    max_queued: int | None
    """With this many jobs waiting, deferred requests get 503."""
    retry_after: int
    """Seconds clients are told to wait between polls."""
    concurrency: int
    """Jobs this process runs at once."""
    execute: bool
    """False: enqueue only, for a web tier that must not run jobs."""
    lease_seconds: float
    """A running job's lease, renewed every third of it."""
    poll_interval: float
    """How often idle executors and cross-process long-polls look."""
    retry_backoff: float
    """First retry's delay, doubled each attempt (at most 300 s)."""
    retention_seconds: float
    """Finished jobs are pruned after this."""
    lock_timeout: float
    """How long to wait for a locked SQLite database before 503."""
    grace_seconds: float
    """On shutdown, how long running jobs may take to finish."""
    event_keep_alive: float
    """Seconds between keep-alive comments on a quiet event stream."""
    webhook_secret: str | None
    """A Standard Webhooks secret (``whsec_...``): enables completion webhooks."""
    webhook_allowlist: Iterable[str]
    """URL prefixes (``scheme://host[:port][/path]``) callbacks may target."""
    webhook_backoff: float
    """Seconds before a failed delivery's second attempt, doubled each time (at most 1 h)."""
    webhook_retry_for: float
    """How long after the job ended a delivery is still tried."""
    webhook_timeout: float
    """Seconds a receiver has to answer one delivery (connecting: at most 5)."""
    owner: Callable[[RequestInfo], str | None] | None
    """``fn(request)``: who is asking. A job keeps its submitter's owner and
    its routes answer 404 to anyone else; a submit that names nobody gets 403.
    On ASGI it may be a coroutine function; under Flask it runs in a request
    context (``session``, ``flask_login.current_user``)."""
    metrics: bool
    """Serve ``GET {prefix}/metrics`` in Prometheus text format (the
    ``[metrics]`` extra): this process's counters and the table's depth."""
    dashboard: Callable[[RequestInfo], bool] | None
    """``fn(request)``: who may see the dashboard at ``{prefix}/``, and cancel
    or retry jobs there; off without it. Called like ``owner``."""
    queue: str
    """The queue jobs go to (``@deferred(queue=...)`` picks another) and that
    this process's executor runs, with the queues its marked routes name."""
