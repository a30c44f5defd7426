"""What one process counts, in Prometheus form (``metrics=True``, or
``deferred-middleware worker --metrics-port``).

Counters are this process's own, as Prometheus expects of every process it
scrapes: a web process counts what it accepted and refused, an executor what
it ran. How many jobs wait or run is read from the job table at each scrape,
so every process reports the same depth, whoever runs the jobs.

Until :meth:`Metrics.switch_on` nothing is counted and ``prometheus_client``
(the ``[metrics]`` extra) is never imported: each event costs one test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from ._jobs import Finish, Job, RetryLater, Status, utcnow
from .store import Clock, JobStore, StoreUnavailable

RUN_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


def require_prometheus_client() -> None:
    """Fail when the middleware is built, not at the first scrape."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError(
            "metrics need the [metrics] extra: pip install 'deferred-middleware[metrics]'"
        ) from None


@dataclasses.dataclass
class _Instruments:
    registry: Any
    accepted: Any
    refused: Any
    finished: Any
    retried: Any
    reaped: Any
    run_seconds: Any
    webhooks: Any


class Metrics:
    """The counters of one process, shared by its core, executor and webhook deliverer."""

    def __init__(self) -> None:
        self._on: _Instruments | None = None

    @property
    def on(self) -> bool:
        return self._on is not None

    def switch_on(self, store: JobStore, clock: Clock = utcnow) -> None:
        if self._on is not None:
            return
        require_prometheus_client()
        from prometheus_client import CollectorRegistry, Counter, Histogram

        registry = CollectorRegistry()

        def counter(name: str, text: str, labels: tuple[str, ...]) -> Any:
            return Counter(name, text, labels, registry=registry)

        self._on = _Instruments(
            registry=registry,
            accepted=counter("deferred_jobs_accepted", "Jobs accepted (answered 202).", ("queue",)),
            refused=counter(
                "deferred_jobs_refused", "Deferred requests that got no job.", ("reason",)
            ),
            finished=counter(
                "deferred_jobs_finished",
                "Jobs this process ran to their end, by status (canceled ones: deferred_jobs).",
                ("queue", "status"),
            ),
            retried=counter(
                "deferred_job_attempts_retried", "Failed attempts that run again.", ("queue",)
            ),
            reaped=counter("deferred_jobs_reaped", "Jobs whose worker was lost.", ("outcome",)),
            run_seconds=Histogram(
                "deferred_job_run_seconds",
                "How long attempts ran, from start to outcome.",
                ("queue",),
                buckets=RUN_SECONDS_BUCKETS,
                registry=registry,
            ),
            webhooks=counter(
                "deferred_webhook_deliveries", "Webhook delivery attempts.", ("outcome",)
            ),
        )
        registry.register(_TableCollector(store, clock))

    # -- events ------------------------------------------------------------

    def accepted(self, job: Job) -> None:
        if self._on is not None:
            self._on.accepted.labels(job.queue).inc()

    def refused(self, reason: str) -> None:
        if self._on is not None:
            self._on.refused.labels(reason).inc()

    def settled(self, job: Job, write: Finish | RetryLater, seconds: float) -> None:
        """An attempt's outcome was written."""
        if self._on is None:
            return
        self._on.run_seconds.labels(job.queue).observe(seconds)
        if isinstance(write, RetryLater):
            self._on.retried.labels(job.queue).inc()
        else:
            self._on.finished.labels(job.queue, write.status.value).inc()

    def reaped(self, requeued: bool) -> None:
        if self._on is not None:
            self._on.reaped.labels("requeued" if requeued else "failed").inc()

    def webhook(self, outcome: str) -> None:
        """One delivery attempt: ``delivered``, ``retry`` or ``failed``."""
        if self._on is not None:
            self._on.webhooks.labels(outcome).inc()

    # -- exposition ----------------------------------------------------------

    @property
    def registry(self) -> Any:
        if self._on is None:
            raise RuntimeError("metrics are off")
        return self._on.registry

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its media type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _TableCollector:
    """Queue depth and the oldest queued job's age, read from the table at
    each scrape; ``deferred_job_store_up`` says whether that read worked."""

    def __init__(self, store: JobStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def describe(self) -> list[Any]:
        return []  # read at scrape time: nothing to check when registered

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "deferred_job_store_up", "1 when the job table could be read at this scrape."
        )
        try:
            counts = self.store.counts()
        except StoreUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "deferred_jobs", "Jobs in the table, by queue and status.", labels=["queue", "status"]
        )
        oldest = GaugeMetricFamily(
            "deferred_oldest_queued_job_age_seconds",
            "Age of the oldest queued job, by queue.",
            labels=["queue"],
        )
        now = self.clock()
        seen = {(count.queue, count.status) for count in counts}
        for count in counts:
            jobs.add_metric([count.queue, count.status.value], count.count)
            if count.status is Status.QUEUED:
                oldest.add_metric([count.queue], count.waited(now))
        for queue in sorted({queue for queue, _ in seen}):
            for status in (Status.QUEUED, Status.RUNNING):  # an empty queue reads 0, not absent
                if (queue, status) not in seen:
                    jobs.add_metric([queue, status.value], 0)
        yield jobs
        yield oldest
