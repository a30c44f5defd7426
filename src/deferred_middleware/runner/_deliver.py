"""Completion webhooks, delivered by any executor that runs beside the table.

A delivery becomes due in the write that ends its job; an executor claims it
under a lease, signs and POSTs the final status document, records the
attempt, and either marks it delivered or makes it due again with backoff,
until ``webhook_retry_for`` has passed since the job ended. A process that
dies mid-delivery leaves a lease that runs out, and another executor tries
again: at least once, as Standard Webhooks receivers expect (they
deduplicate on ``webhook-id``).

Each attempt checks the target anew and connects to the address it
checked; redirects are not followed and the receiver's body is not read.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from .. import _protocol as protocol
from .. import _webhooks as webhooks
from .._causes import store_away
from .._config import Config
from .._jobs import (
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    WebhookAttempt,
    WebhookDue,
    utcnow,
)
from .._metrics import Metrics
from ..store import Clock, JobStore, StoreUnavailable
from ._identity import worker_name

logger = logging.getLogger("deferred_middleware")

AT_ONCE = 4
CONNECT_TIMEOUT = 5.0


class WebhookDeliverer:
    """A side loop of the executor (see :class:`Dispatcher`)."""

    name = "webhooks"

    def __init__(
        self,
        config: Config,
        store: JobStore,
        *,
        clock: Clock = utcnow,
        resolve: webhooks.Resolve = webhooks.resolve_host,
        transport: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``resolve`` and ``transport`` (an httpx transport) are the tests'
        way in; by default names are looked up and sent over the network."""
        assert config.webhook_secret is not None
        self.config = config
        self.secret = config.webhook_secret
        self.store = store
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.resolve = resolve
        self.allowlist = webhooks.Allowlist(config.webhook_allowlist)
        self.worker = worker_name()
        # Long enough for the slowest attempt (connecting, sending, reading),
        # so no other executor takes a delivery that is still under way.
        timeout = config.webhook_timeout
        self.lease_seconds = max(
            config.lease_seconds, min(timeout, CONNECT_TIMEOUT) + 2 * timeout + 1
        )
        self._transport = transport
        self._client: Any = None
        self._migrated = False

    def run(self, stopping: threading.Event) -> None:
        with ThreadPoolExecutor(AT_ONCE, thread_name_prefix="deferred-webhook") as pool:
            while not stopping.is_set():
                delivered = self.step(pool)
                if delivered < AT_ONCE:
                    stopping.wait(self.config.poll_interval)
        if self._client is not None:
            self._client.close()
            self._client = None

    def step(self, pool: ThreadPoolExecutor | None = None) -> int:
        """Claim what is due and deliver it; answers how many were tried."""
        try:
            if not self._migrated:  # a fresh database: no table to claim from yet
                self.store.migrate()
                self._migrated = True
            due = self.store.claim_webhooks(self.worker, AT_ONCE, self.lease_seconds)
        except StoreUnavailable as exc:
            store_away.warn("the job store is unavailable; delivering webhooks again shortly", exc)
            return 0
        except Exception:
            logger.exception("claiming webhook deliveries failed")
            return 0
        if pool is None:
            for delivery in due:
                self.deliver(delivery)
        else:
            list(pool.map(self.deliver, due))
        return len(due)

    def deliver(self, due: WebhookDue) -> None:
        job = due.job
        assert job.callback_url is not None
        at = self.clock()
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        refused = False
        try:
            status_code = self._post(due, at)
        except webhooks.CallbackRefused as exc:
            error, refused = exc.detail, True
        except Exception as exc:  # connection refused, timeouts, TLS: try again
            error = _describe(exc)
        attempt = WebhookAttempt(
            job_id=job.id,
            attempt=job.webhook_attempts,
            at=at,
            url=job.callback_url,
            status_code=status_code,
            error=error,
            duration_ms=int((time.monotonic() - started) * 1000),
            worker=self.worker,
        )
        state, due_at = self.next_state(due, attempt, refused)
        _log(attempt, state)
        self.metrics.webhook(state if state != WEBHOOK_PENDING else "retry")
        try:
            held = self.store.record_webhook(attempt, state, due_at)
        except StoreUnavailable:
            logger.warning("job %s: webhook attempt not recorded; its lease will run out", job.id)
            return
        if not held:
            logger.warning(
                "job %s: webhook attempt %d outlived its lease; another executor took the "
                "delivery over",
                job.id,
                attempt.attempt,
            )

    def next_state(
        self, due: WebhookDue, attempt: WebhookAttempt, refused: bool
    ) -> tuple[str, datetime | None]:
        """Delivered on a 2xx; failed for a refused target or once the time
        for retries has run out; otherwise due again after the backoff."""
        code = attempt.status_code
        if code is not None and 200 <= code < 300:
            return WEBHOOK_DELIVERED, None
        if refused:
            return WEBHOOK_FAILED, None
        delay = timedelta(seconds=webhooks.next_delay(attempt.attempt, self.config.webhook_backoff))
        ended = due.job.finished_at or attempt.at
        give_up = ended + timedelta(seconds=self.config.webhook_retry_for)
        if attempt.at + delay > give_up:
            return WEBHOOK_FAILED, None
        return WEBHOOK_PENDING, attempt.at + delay

    def _post(self, due: WebhookDue, at: datetime) -> int:
        job = due.job
        url = job.callback_url
        assert url is not None
        # Checked again: the allowlist, or where the name points, may have changed.
        address = webhooks.check_callback(url, self.allowlist, self.secret, self.resolve)
        config = self.config
        urls = protocol.JobURLs.for_request(config.prefix, due.root_path, config.public_url)
        body = webhooks.payload(job, urls)
        headers = webhooks.signed_headers(self.secret, job, body, at)
        parts = urlsplit(url)
        headers["host"] = parts.netloc
        client = self._http()
        pinned = client.build_request(
            "POST",
            _with_host(url, address),
            headers=headers,
            content=body,
            extensions={"sni_hostname": parts.hostname},
        )
        response = client.send(pinned, stream=True)  # the answer's body is never read
        response.close()
        return response.status_code  # type: ignore[no-any-return]

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            timeout = self.config.webhook_timeout
            self._client = httpx.Client(
                timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
                follow_redirects=False,
                trust_env=False,  # a proxy from the environment would defeat the address check
                transport=self._transport,
            )
        return self._client


def _with_host(url: str, address: str) -> Any:
    import httpx

    return httpx.URL(url).copy_with(host=address)


def _describe(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:500]


def _log(attempt: WebhookAttempt, state: str) -> None:
    what = attempt.status_code if attempt.status_code is not None else attempt.error
    if state == WEBHOOK_DELIVERED:
        logger.info("job %s: webhook delivered (%s)", attempt.job_id, what)
    elif state == WEBHOOK_FAILED:
        logger.error(
            "job %s: webhook failed for good after attempt %d (%s)",
            attempt.job_id,
            attempt.attempt,
            what,
        )
    else:
        logger.warning(
            "job %s: webhook attempt %d failed (%s); will try again",
            attempt.job_id,
            attempt.attempt,
            what,
        )
