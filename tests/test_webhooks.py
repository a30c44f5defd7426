"""Completion webhooks without a network: which targets are allowed, what is
signed, and how a delivery moves on after each attempt (httpx's MockTransport
as the receiver, the in-memory store as the table)."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta

import httpx
import pytest
from standardwebhooks import Webhook

from deferred_middleware import _protocol as protocol
from deferred_middleware import _webhooks as webhooks
from deferred_middleware._config import Config
from deferred_middleware._jobs import (
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    DeferredOptions,
    Finish,
    Status,
    StoredRequest,
    StoredResponse,
)
from deferred_middleware._metrics import Metrics
from deferred_middleware.runner._deliver import WebhookDeliverer
from deferred_middleware.store import MemoryJobStore

from .policy_harness import Harness
from .support import eventually, make_job

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC = "93.184.216.34"


def resolving_to(*addresses: str):
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def unresolvable(host: str, port: int) -> list[str]:
    raise OSError("Name or service not known")


def check(url: str, allowlist=("https://hooks.example.com",), resolve=None):
    resolve = resolve or resolving_to(PUBLIC)
    return webhooks.check_callback(url, webhooks.Allowlist(allowlist), SECRET, resolve)


# -- which targets -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/done",
        "https://HOOKS.example.com:443/done?job=1",
        "https://hooks.example.com",
    ],
)
def test_a_url_inside_the_allowlist_resolving_publicly_is_allowed(url):
    assert check(url) == PUBLIC


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hooks.example.com/done", "outside the webhook allowlist"),  # another scheme
        ("https://hooks.example.com:8443/done", "outside the webhook allowlist"),
        ("https://evil.example.com/done", "outside the webhook allowlist"),
        ("https://hooks.example.com.evil.net/", "outside the webhook allowlist"),
        ("ftp://hooks.example.com/", "absolute http or https"),
        ("/relative/path", "absolute http or https"),
        ("https://user:pw@hooks.example.com/", "must not carry credentials"),
        ("https://hooks.example.com/a b", "not a valid absolute URL"),
        ("https://hooks.example.com:99999/", "not a valid absolute URL"),
        ("https://hooks.example.com/" + "a" * 3000, "not a valid absolute URL"),
    ],
)
def test_other_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(webhooks.CallbackRefused, match=reason):
        check(url)


def test_an_allowlist_path_is_a_prefix_of_whole_segments():
    allowlist = ("https://hooks.example.com/tenant-1",)
    assert check("https://hooks.example.com/tenant-1/done", allowlist)
    assert check("https://hooks.example.com/tenant-1", allowlist)
    with pytest.raises(webhooks.CallbackRefused):
        check("https://hooks.example.com/tenant-10/done", allowlist)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_names_resolving_inward_are_refused(address):
    with pytest.raises(webhooks.CallbackRefused, match="loopback, private or link-local"):
        check("https://hooks.example.com/", resolve=resolving_to(address))


def test_one_inward_address_among_public_ones_is_enough_to_refuse():
    with pytest.raises(webhooks.CallbackRefused):
        check("https://hooks.example.com/", resolve=resolving_to(PUBLIC, "10.0.0.1"))


def test_an_inward_address_named_literally_in_the_allowlist_is_allowed():
    allowlist = ("http://127.0.0.1:9000",)
    assert check("http://127.0.0.1:9000/hook", allowlist) == "127.0.0.1"
    with pytest.raises(webhooks.CallbackRefused):  # by name, it is still refused
        check("http://localhost:9000/hook", ("http://localhost:9000",), resolving_to("127.0.0.1"))


@pytest.mark.parametrize("resolve", [unresolvable, resolving_to()], ids=["error", "nothing"])
def test_a_name_that_does_not_resolve_is_refused(resolve):
    with pytest.raises(webhooks.CallbackRefused) as refused:
        check("https://hooks.example.com/", resolve=resolve)
    assert refused.value.detail == "The callback URL's host cannot be resolved."


def test_no_secret_no_callbacks():
    with pytest.raises(webhooks.CallbackRefused, match="no webhook secret"):
        webhooks.check_callback(
            "https://hooks.example.com/",
            webhooks.Allowlist(["https://hooks.example.com"]),
            None,
            resolving_to(PUBLIC),
        )


def test_a_bad_allowlist_entry_fails_when_the_middleware_is_built():
    with pytest.raises(ValueError, match=r"webhook_allowlist entry 'hooks\.example\.com'"):
        Harness(webhook_secret=SECRET, webhook_allowlist=["hooks.example.com"])


def test_a_bad_secret_fails_when_the_middleware_is_built():
    with pytest.raises(ValueError, match="whsec_"):
        Config(webhook_secret="not base64 !!")


# -- which callback a request gets ---------------------------------------------------


def test_the_route_s_callback_decides_else_the_header():
    callbacks = webhooks.Callbacks(SECRET, ["https://hooks.example.com"], resolving_to(PUBLIC))
    asking = StoredRequest("POST", "/r", headers=[("callback-url", "https://hooks.example.com/h")])
    plain = StoredRequest("POST", "/r", headers=[("x-tenant", "7")])
    assert callbacks.url_for(asking, DeferredOptions()) == "https://hooks.example.com/h"
    assert callbacks.url_for(plain, DeferredOptions()) is None

    def per_tenant(request):
        tenant = request.headers.get("X-Tenant")
        return f"https://hooks.example.com/{tenant}" if tenant else None

    routed = DeferredOptions(callback=per_tenant)
    assert callbacks.url_for(plain, routed) == "https://hooks.example.com/7"
    assert callbacks.url_for(asking, routed) is None  # the route decides, not the client


def test_a_refused_callback_gets_400_and_no_job():
    h = Harness(webhook_secret=SECRET, webhook_allowlist=["https://hooks.example.com"])
    request = StoredRequest("POST", "/r", headers=[("callback-url", "https://elsewhere.net/")])
    with pytest.raises(webhooks.CallbackRefused) as refused:
        h.core.accept(request, DeferredOptions())
    reply = h.core.refused(refused.value)
    assert reply.status == 400
    assert json.loads(reply.body)["detail"] == "The callback URL is outside the webhook allowlist."
    assert h.store.list() == []


def test_an_accepted_callback_is_kept_with_the_job(monkeypatch):
    h = Harness(webhook_secret=SECRET, webhook_allowlist=["https://hooks.example.com"])
    monkeypatch.setattr(h.core.callbacks, "resolve", resolving_to(PUBLIC))
    request = StoredRequest("POST", "/r", headers=[("callback-url", "https://hooks.example.com/")])
    job = h.core.accept(request, DeferredOptions())
    assert h.store.get(job.id).callback_url == "https://hooks.example.com/"


# -- what is sent ------------------------------------------------------------------


def test_the_payload_is_the_final_status_document_signed_per_standard_webhooks(clock):
    job = make_job(created_at=clock())
    job.status, job.finished_at, job.revision = Status.SUCCEEDED, clock(), 3
    urls = protocol.JobURLs("/api/jobs")
    body = webhooks.payload(job, urls)
    headers = webhooks.signed_headers(SECRET, job, body, clock())
    assert headers["webhook-id"] == f"msg_{job.id}_3"
    verified = Webhook(SECRET).verify(body, headers)
    assert verified["type"] == "job.finished"
    assert verified["data"] == protocol.status_document(job, urls)
    assert verified["timestamp"].endswith("Z")


@pytest.mark.parametrize(("attempt", "delay"), [(1, 5), (2, 10), (3, 20), (20, 3600)])
def test_retries_back_off_doubling_to_an_hour(attempt, delay):
    assert webhooks.next_delay(attempt, 5.0) == delay


# -- one delivery at a time ------------------------------------------------------------


class Receiver:
    """Answers deliveries from a script; keeps what it was sent."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer


@pytest.fixture
def deliveries(clock):
    """A finished job with a callback, and a deliverer over a scripted receiver."""

    def make(*answers, resolve=None, retry_for=3600.0):
        store = MemoryJobStore(clock=clock)
        config = Config(
            database_url="memory://",
            webhook_secret=SECRET,
            webhook_allowlist=("https://hooks.example.com",),
            webhook_backoff=5.0,
            webhook_retry_for=retry_for,
        )
        receiver = Receiver(*answers)
        metrics = Metrics()
        metrics.switch_on(store, clock)
        deliverer = WebhookDeliverer(
            config,
            store,
            clock=clock,
            resolve=resolve or resolving_to(PUBLIC),
            transport=httpx.MockTransport(receiver),
            metrics=metrics,
        )
        job = make_job(created_at=clock(), callback_url="https://hooks.example.com/done")
        store.insert([job])
        [claimed] = store.claim("w", 1, 30)
        store.write(
            [Finish(job.id, claimed.attempts, Status.SUCCEEDED, StoredResponse(200, [], b""))]
        )
        return store, deliverer, receiver, job.id

    return make


def test_a_2xx_delivers_to_the_checked_address_with_the_name_kept(deliveries):
    store, deliverer, receiver, job_id = deliveries(httpx.Response(204))
    assert deliverer.step() == 1
    assert store.get(job_id).webhook_state == WEBHOOK_DELIVERED
    [sent] = receiver.requests
    assert sent.url.host == PUBLIC  # connected to what was checked, not looked up again
    assert sent.headers["host"] == "hooks.example.com"
    assert sent.extensions["sni_hostname"] == "hooks.example.com"
    Webhook(SECRET).verify(sent.content, dict(sent.headers))
    [attempt] = store.webhook_attempts_of(job_id)
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 204, None)


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500),
        httpx.Response(302, headers={"location": "http://169.254.169.254/"}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
    ids=["500", "redirect", "down", "slow"],
)
def test_anything_else_is_tried_again_after_the_backoff(deliveries, clock, answer):
    store, deliverer, receiver, job_id = deliveries(answer, httpx.Response(200))
    deliverer.step()
    assert store.get(job_id).webhook_state == WEBHOOK_PENDING
    assert len(receiver.requests) == 1  # a redirect is not followed
    assert deliverer.step() == 0  # not due yet
    clock.advance(5)
    deliverer.step()
    assert store.get(job_id).webhook_state == WEBHOOK_DELIVERED
    first, second = store.webhook_attempts_of(job_id)
    assert (first.attempt, second.attempt, second.status_code) == (1, 2, 200)
    registry = deliverer.metrics.registry
    for outcome, count in (("retry", 1), ("delivered", 1), ("failed", None)):
        counted = registry.get_sample_value(
            "deferred_webhook_deliveries_total", {"outcome": outcome}
        )
        assert counted == count
    assert (first.status_code is None) == (first.error is not None)


def test_a_delivery_is_given_up_when_its_time_runs_out(deliveries, clock):
    store, deliverer, _, job_id = deliveries(httpx.Response(503), httpx.Response(503), retry_for=12)
    deliverer.step()  # next at +5
    clock.advance(5)
    deliverer.step()  # next would be at +15: past the 12 s allowed
    assert store.get(job_id).webhook_state == WEBHOOK_FAILED


def test_a_target_that_now_resolves_inward_fails_without_being_contacted(deliveries):
    store, deliverer, receiver, job_id = deliveries(resolve=resolving_to("10.0.0.7"))
    deliverer.step()
    assert receiver.requests == []
    assert store.get(job_id).webhook_state == WEBHOOK_FAILED
    [attempt] = store.webhook_attempts_of(job_id)
    assert "private" in attempt.error
    failed = {"outcome": "failed"}
    registry = deliverer.metrics.registry
    assert registry.get_sample_value("deferred_webhook_deliveries_total", failed) == 1


def run_until_delivered(deliverer: WebhookDeliverer, store, job_id: str) -> None:
    """Run the deliverer as an executor does, until the job's webhook is
    delivered; then stop it and check that it stopped."""
    stopping = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stopping,))
    thread.start()
    try:
        eventually(lambda: store.get(job_id).webhook_state == WEBHOOK_DELIVERED)
    finally:
        stopping.set()
        thread.join(10)
    assert not thread.is_alive()


def test_the_deliverer_runs_as_a_side_loop_until_stopped(deliveries):
    store, deliverer, _, job_id = deliveries(httpx.Response(200))
    run_until_delivered(deliverer, store, job_id)
    assert deliverer.name == "webhooks"


# -- the edges the rules are drawn on ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("ftp://hooks.example.com/", "The callback URL must be an absolute http or https URL."),
        ("https://user@hooks.example.com/", "The callback URL must not carry credentials."),
        ("https://hooks.example.com/\x7f", "The callback URL is not a valid absolute URL."),
        ("https://hooks.example.com:x/", "The callback URL is not a valid absolute URL."),
        ("http://hooks.example.com:443/", "The callback URL is outside the webhook allowlist."),
    ],
)
def test_each_refusal_says_exactly_why(url, detail):
    with pytest.raises(webhooks.CallbackRefused) as refused:
        check(url)
    assert refused.value.detail == detail


def test_the_longest_url_and_visible_punctuation_are_allowed():
    base = "https://hooks.example.com/!$'()*"
    assert check(base)
    longest = base + "a" * (webhooks.MAX_URL_LENGTH - len(base))
    assert check(longest)
    with pytest.raises(webhooks.CallbackRefused):
        check(longest + "a")


def test_the_name_is_looked_up_on_the_url_s_port():
    asked = []

    def resolve(host, port):
        asked.append((host, port))
        return [PUBLIC]

    check("https://hooks.example.com/x", resolve=resolve)
    check("https://hooks.example.com:443/", ("https://hooks.example.com",), resolve)
    assert asked == [("hooks.example.com", 443)] * 2


def test_scoped_and_mapped_addresses_are_judged_by_what_they_reach():
    with pytest.raises(webhooks.CallbackRefused, match="loopback"):
        check("https://hooks.example.com/", resolve=resolving_to("fe80::1%eth0"))
    assert check("https://hooks.example.com/", resolve=resolving_to(f"::ffff:{PUBLIC}"))


def test_an_allowlist_entry_with_a_trailing_slash_admits_its_subpaths():
    assert check(
        "https://hooks.example.com/tenant-1/done", ("https://hooks.example.com/tenant-1/",)
    )


def test_the_real_lookup_finds_localhost():
    assert "127.0.0.1" in webhooks.resolve_host("localhost", 80)


def test_a_payload_without_an_end_time_says_so(clock):
    job = make_job(created_at=clock())
    assert json.loads(webhooks.payload(job, protocol.JobURLs("/jobs")))["timestamp"] is None


def test_the_async_face_checks_a_callback_off_the_loop_only_when_there_is_one(monkeypatch):
    import asyncio

    h = Harness(webhook_secret=SECRET, webhook_allowlist=["https://hooks.example.com"])
    monkeypatch.setattr(h.core.callbacks, "resolve", resolving_to(PUBLIC))
    offloaded = []
    real_offload = h.core.offload

    async def offload(fn, *args):
        offloaded.append(fn)
        return await real_offload(fn, *args)

    monkeypatch.setattr(h.core, "offload", offload)
    h.core.prepare()
    plain = StoredRequest("POST", "/r")
    asking = StoredRequest("POST", "/r", headers=[("callback-url", "https://hooks.example.com/")])
    refused = StoredRequest("POST", "/r", headers=[("callback-url", "https://elsewhere.net/")])
    job = asyncio.run(h.core.accept_async(plain, DeferredOptions()))
    assert (h.store.get(job.id).callback_url, offloaded) == (None, [])
    job = asyncio.run(h.core.accept_async(asking, DeferredOptions()))
    assert h.store.get(job.id).callback_url == "https://hooks.example.com/"
    assert offloaded == [h.core.callbacks.url_for]
    with pytest.raises(webhooks.CallbackRefused):
        asyncio.run(h.core.accept_async(refused, DeferredOptions()))
    assert len(h.store.list()) == 2
    h.core.close()


def test_the_deliverer_s_client_follows_nothing_trusts_no_proxy_and_times_out(deliveries):
    _, deliverer, _, _ = deliveries()
    deliverer.config.webhook_timeout = 2.0
    client = deliverer._http()
    assert (client.follow_redirects, client.trust_env) == (False, False)
    assert client.timeout == httpx.Timeout(2.0, connect=2.0)
    deliverer._client = None
    deliverer.config.webhook_timeout = 30.0
    assert deliverer._http().timeout == httpx.Timeout(30.0, connect=5.0)


def test_an_attempt_records_what_happened(deliveries, clock):
    store, deliverer, _, job_id = deliveries(httpx.ConnectError("refused"), httpx.ConnectError(""))
    deliverer.step()
    clock.advance(5)
    deliverer.step()
    first, second = store.webhook_attempts_of(job_id)
    assert first.url == "https://hooks.example.com/done"
    assert first.worker == deliverer.worker is not None
    assert first.at == clock() - timedelta(seconds=5)
    assert first.error == "ConnectError: refused"
    assert second.error == "ConnectError: ConnectError"  # an empty message names the error
    assert 0 <= first.duration_ms < 5000


def test_a_3xx_is_not_delivered(deliveries):
    store, deliverer, _, job_id = deliveries(httpx.Response(300))
    deliverer.step()
    assert store.get(job_id).webhook_state == WEBHOOK_PENDING


def test_a_delivery_due_exactly_at_its_last_moment_is_still_tried(deliveries, clock):
    store, deliverer, _, job_id = deliveries(httpx.Response(503), retry_for=5)
    deliverer.step()  # next at +5, which is the last moment allowed
    assert store.get(job_id).webhook_state == WEBHOOK_PENDING


def test_the_payload_s_urls_are_those_the_client_was_given(deliveries):
    _store, deliverer, receiver, job_id = deliveries(httpx.Response(200))
    deliverer.config.public_url = "https://api.example.com"
    deliverer.step()
    data = json.loads(receiver.requests[0].content)["data"]
    assert data["status_url"] == f"https://api.example.com/api/jobs/{job_id}"
    assert receiver.requests[0].headers["content-type"] == "application/json"


def test_a_step_takes_at_most_a_few_and_a_pool_delivers_them(deliveries, clock):
    from concurrent.futures import ThreadPoolExecutor

    store, deliverer, receiver, _first = deliveries(*[httpx.Response(200)] * 6)
    for _ in range(5):
        job = make_job(created_at=clock(), callback_url="https://hooks.example.com/done")
        store.insert([job])
        store.cancel(job.id)
    with ThreadPoolExecutor(2) as pool:
        assert deliverer.step(pool) == 4
        assert deliverer.step(pool) == 2
    assert len(receiver.requests) == 6


def test_a_store_that_is_away_delivers_nothing_and_says_so(deliveries, monkeypatch, caplog):
    from deferred_middleware.store import StoreUnavailable

    _, deliverer, receiver, _ = deliveries()

    def down(*_args):
        raise StoreUnavailable("down")

    monkeypatch.setattr(deliverer.store, "claim_webhooks", down)
    assert deliverer.step() == 0
    assert receiver.requests == []
    assert "delivering webhooks again shortly" in caplog.text


def test_a_deliverer_on_a_fresh_database_makes_the_table_rather_than_warn(tmp_path, caplog):
    """It may start before anything else in its process has made the table:
    a first start is not an outage."""
    from deferred_middleware.store import SQLJobStore

    store = SQLJobStore(f"sqlite:///{tmp_path}/jobs.db")
    config = Config(database_url=store.database_url, webhook_secret=SECRET)
    assert WebhookDeliverer(config, store).step() == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert store.count(Status.QUEUED) == 0  # the table is there
    store.close()


def test_each_outcome_is_logged_at_its_level(deliveries, clock, caplog):
    caplog.set_level(logging.INFO, "deferred_middleware")
    _, deliverer, _, job_id = deliveries(httpx.Response(500), httpx.Response(201), retry_for=60)
    deliverer.step()
    clock.advance(5)
    deliverer.step()
    levels = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert levels == [
        ("WARNING", f"job {job_id}: webhook attempt 1 failed (500); will try again"),
        ("INFO", f"job {job_id}: webhook delivered (201)"),
    ]
    caplog.clear()
    _refused, refusing, _, other = deliveries(resolve=resolving_to("10.0.0.1"))
    refusing.step()
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert record.getMessage().startswith(f"job {other}: webhook failed for good after attempt 1")


def test_an_attempt_that_outlived_its_lease_says_so(deliveries, clock, caplog):
    """Its outcome is kept among the attempts, but the delivery is the
    executor's that took it over once the lease ran out."""
    store, deliverer, receiver, job_id = deliveries()
    other = WebhookDeliverer(
        deliverer.config,
        store,
        clock=clock,
        resolve=deliverer.resolve,
        transport=httpx.MockTransport(receiver),
    )

    def slow(_request: httpx.Request) -> httpx.Response:
        clock.advance(deliverer.lease_seconds + 1)
        assert other.step() == 1
        return httpx.Response(204)

    receiver.answers = [slow, httpx.Response(200)]
    deliverer.step()
    assert store.get(job_id).webhook_state == WEBHOOK_DELIVERED
    assert [(a.attempt, a.status_code) for a in store.webhook_attempts_of(job_id)] == [
        (2, 200),
        (1, 204),
    ]
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == (
        f"job {job_id}: webhook attempt 1 outlived its lease; another executor took the "
        "delivery over"
    )


def test_a_side_loop_keeps_delivering_what_becomes_due_later(deliveries, clock):
    store, deliverer, _, job_id = deliveries(httpx.Response(500), httpx.Response(200))
    deliverer.config.poll_interval = 0.01
    deliverer.config.webhook_backoff = 0.0  # due again at once
    run_until_delivered(deliverer, store, job_id)
    assert deliverer._client is None  # closed when the loop ended


@pytest.mark.parametrize(("lease", "timeout", "held"), [(30, 10, 30), (1, 1, 4), (5, 60, 126)])
def test_a_delivery_is_held_for_as_long_as_its_slowest_attempt(clock, lease, timeout, held):
    """So that no other executor takes a delivery that is still under way."""
    config = Config(
        database_url="memory://",
        webhook_secret=SECRET,
        lease_seconds=lease,
        webhook_timeout=timeout,
    )
    store = MemoryJobStore(clock=clock)
    asked = []
    store.claim_webhooks = lambda worker, limit, lease_seconds: asked.append(lease_seconds) or []
    WebhookDeliverer(config, store).step()
    assert asked == [held]
