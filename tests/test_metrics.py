"""``metrics=True``: what each event counts and what a scrape reads from the
table, parsed with prometheus_client's own parser, over the in-memory store
one step at a time."""

from __future__ import annotations

import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deferred_middleware import _policy as policy
from deferred_middleware._jobs import DeferredOptions, StoredRequest
from deferred_middleware._metrics import Metrics
from deferred_middleware._refusals import HeadersTooLarge, KeyReused, NoOwner, QueueFull
from deferred_middleware.store import StoreUnavailable, Unstorable

from .policy_harness import Harness


def samples(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    reply = h.operator.metrics("GET")
    assert reply.status == 200
    assert reply.headers[0][1].startswith("text/plain; version=")
    found = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(h: Harness, name: str, **labels: str) -> float | None:
    return samples(h).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def h() -> Harness:
    return Harness(metrics=True)


@pytest.fixture
def anyio_backend():
    return "asyncio"  # the ASGI adapter runs its executor on asyncio


def test_accepted_jobs_are_counted_per_queue(h):
    h.submit()
    h.submit()
    h.submit(queue="mail")
    assert value(h, "deferred_jobs_accepted_total", queue="default") == 2
    assert value(h, "deferred_jobs_accepted_total", queue="mail") == 1


def test_finished_jobs_are_counted_by_status_with_their_run_time(h):
    ok, bad = h.submit(), h.submit()
    h.claim()
    h.advance(0.2)
    h.launcher.last(ok).respond(200)
    h.advance(3)
    h.launcher.last(bad).respond(500)
    assert value(h, "deferred_jobs_finished_total", queue="default", status="succeeded") == 1
    assert value(h, "deferred_jobs_finished_total", queue="default", status="failed") == 1
    assert value(h, "deferred_job_run_seconds_count", queue="default") == 2
    assert value(h, "deferred_job_run_seconds_sum", queue="default") == pytest.approx(3.4)
    assert value(h, "deferred_job_run_seconds_bucket", queue="default", le="0.25") == 1
    assert value(h, "deferred_job_run_seconds_bucket", queue="default", le="5.0") == 2


def test_a_retried_attempt_is_counted_apart_from_the_job_s_end(h):
    job_id = h.submit(retries=1)
    h.claim()
    h.launcher.last(job_id).end(policy.raised(ValueError("boom")))
    assert value(h, "deferred_job_attempts_retried_total", queue="default") == 1
    assert value(h, "deferred_jobs_finished_total", queue="default", status="failed") is None


def test_canceled_jobs_are_read_from_the_table_not_counted_per_request(h):
    job_id = h.submit()
    for _ in range(2):  # a second cancel changes nothing and must count nothing
        assert h.route(f"/jobs/{job_id}/cancel", "POST").status == 200
    assert value(h, "deferred_jobs", queue="default", status="canceled") == 1
    assert value(h, "deferred_jobs_finished_total", queue="default", status="canceled") is None


def test_reaped_jobs_are_counted_by_what_became_of_them(h):
    kept, lost = h.submit(retries=1), h.submit()
    h.claim()
    h.dispatcher.running.clear()  # the worker is gone: nobody renews the leases
    h.advance(h.config.lease_seconds + 1)
    h.claim()
    assert value(h, "deferred_jobs_reaped_total", outcome="requeued") == 1
    assert value(h, "deferred_jobs_reaped_total", outcome="failed") == 1
    assert h.job(kept).attempts == 2 and h.job(lost).error is not None


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (QueueFull(), "queue_full"),
        (HeadersTooLarge(), "headers_too_large"),
        (NoOwner(), "no_owner"),
        (KeyReused(), "key_reused"),
        (Unstorable(), "unstorable"),
        (StoreUnavailable("down"), "unavailable"),
    ],
)
def test_refusals_are_counted_by_reason(h, error, reason):
    h.core.refused(error)
    h.core.refused(error)
    assert value(h, "deferred_jobs_refused_total", reason=reason) == 2


def test_refusals_of_real_requests_are_counted(h):
    h.config.max_header_size = 10
    request = StoredRequest("POST", "/reports", headers=[("x-big", "y" * 100)])
    with pytest.raises(HeadersTooLarge) as refused:
        h.core.accept(request, DeferredOptions())
    assert h.core.refused(refused.value).status == 431
    assert h.core.too_large().status == 413
    assert value(h, "deferred_jobs_refused_total", reason="headers_too_large") == 1
    assert value(h, "deferred_jobs_refused_total", reason="body_too_large") == 1
    assert value(h, "deferred_jobs_accepted_total", queue="default") is None


def test_the_table_s_depth_and_oldest_queued_age_are_read_at_each_scrape(h):
    h.submit()
    h.advance(30)
    h.submit()
    h.submit(queue="mail")
    h.config.concurrency = 1
    h.claim()  # the oldest default job runs
    assert value(h, "deferred_jobs", queue="default", status="queued") == 1
    assert value(h, "deferred_jobs", queue="default", status="running") == 1
    assert value(h, "deferred_jobs", queue="mail", status="queued") == 1
    assert value(h, "deferred_jobs", queue="mail", status="running") == 0  # absent reads 0
    assert value(h, "deferred_oldest_queued_job_age_seconds", queue="mail") == 0
    h.advance(0.5)
    assert value(h, "deferred_oldest_queued_job_age_seconds", queue="mail") == 0.5
    h.advance(11.5)
    assert value(h, "deferred_oldest_queued_job_age_seconds", queue="default") == 12
    assert value(h, "deferred_oldest_queued_job_age_seconds", queue="mail") == 12
    assert value(h, "deferred_job_store_up") == 1


def test_a_scrape_before_the_table_could_be_made_says_the_store_is_down(monkeypatch):
    h = Harness(metrics=True)

    def down(*_args, **_kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "migrate", down)
    monkeypatch.setattr(h.store, "counts", down)
    assert value(h, "deferred_job_store_up") == 0


def test_a_scrape_while_the_store_is_down_says_so_and_still_counts(h, monkeypatch):
    h.submit()

    def down(*_args, **_kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "counts", down)
    assert value(h, "deferred_job_store_up") == 0
    assert value(h, "deferred_jobs_accepted_total", queue="default") == 1
    assert value(h, "deferred_jobs", queue="default", status="queued") is None


def test_the_metrics_route_answers_head_without_a_body_and_refuses_writes(h):
    get, head = h.operator.metrics("GET"), h.operator.metrics("HEAD")
    assert head.status == 200 and head.body == b""
    assert dict(head.headers)["content-type"] == dict(get.headers)["content-type"]
    assert ("cache-control", "no-store") in get.headers
    assert dict(get.headers)["content-length"] == str(len(get.body))
    refused = h.operator.metrics("POST")
    assert refused.status == 405 and ("allow", "GET, HEAD") in refused.headers


def test_without_the_option_there_is_no_metrics_route_and_nothing_is_counted():
    h = Harness()
    assert h.operator.route_of("/metrics") is None
    assert h.route("/jobs/metrics").status == 404
    h.submit()  # counting while off is a no-op
    assert not h.metrics.on
    with pytest.raises(RuntimeError):
        h.metrics.registry  # noqa: B018


def test_switching_on_twice_keeps_the_counts(h):
    h.submit()
    h.metrics.switch_on(h.store)
    assert value(h, "deferred_jobs_accepted_total", queue="default") == 1


def test_the_option_without_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"\[metrics\] extra"):
        Harness(metrics=True)
    with pytest.raises(ImportError, match=r"\[metrics\] extra"):
        Metrics().switch_on(Harness().store)


def test_webhook_deliveries_are_counted_by_outcome(h):
    metrics = h.metrics
    for outcome in ("delivered", "retry", "retry", "failed"):
        metrics.webhook(outcome)
    assert value(h, "deferred_webhook_deliveries_total", outcome="delivered") == 1
    assert value(h, "deferred_webhook_deliveries_total", outcome="retry") == 2
    assert value(h, "deferred_webhook_deliveries_total", outcome="failed") == 1


@pytest.mark.anyio
async def test_both_adapters_serve_the_route_under_their_prefix(tmp_path):
    from deferred_middleware import DeferredMiddleware, DeferredWSGIMiddleware

    def plain_wsgi(environ, start_response):
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"plain"]

    async def plain_asgi(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    url = f"sqlite:///{tmp_path}/jobs.db"
    wsgi = DeferredWSGIMiddleware(plain_wsgi, database_url=url, metrics=True, prefix="/ops")
    asgi = DeferredMiddleware(plain_asgi, database_url=url, metrics=True, execute=False)
    with httpx.Client(transport=httpx.WSGITransport(wsgi), base_url="http://t") as client:
        scraped = client.get("/ops/metrics")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(asgi), base_url="http://t") as ac:
        scraped_async = await ac.get("/jobs/metrics")
        assert (await ac.get("/metrics")).text == "plain"
    for reply in (scraped, scraped_async):
        assert reply.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(reply.text)}
        assert {"deferred_jobs_accepted", "deferred_jobs_refused"} <= families.keys()
        [up] = families["deferred_job_store_up"].samples
        assert up.value == 1  # the table was made before it was read
    wsgi.shutdown()
    await asgi.shutdown()
