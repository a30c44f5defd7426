"""The store contract for completion webhooks, on every implementation: a
delivery becomes due in the write that ends its job, is claimed under a
lease, and keeps every attempt."""

from __future__ import annotations

from datetime import timedelta

import pytest

from deferred_middleware._jobs import (
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    Finish,
    Status,
    StoredResponse,
    WebhookAttempt,
)
from deferred_middleware.store import JobStore

from .support import make_job

HOOK = "https://hooks.example.com/done"


@pytest.fixture
def finished(any_store: JobStore, clock):
    """A job with a callback, run to success."""
    job = make_job(created_at=clock(), callback_url=HOOK)
    any_store.insert([job])
    [claimed] = any_store.claim("w", 1, 30)
    response = StoredResponse(200, [], b"ok")
    any_store.write([Finish(job.id, claimed.attempts, Status.SUCCEEDED, response)])
    return job.id


def attempt(due, status_code=None, error=None, clock=None) -> WebhookAttempt:
    return WebhookAttempt(
        job_id=due.job.id,
        attempt=due.job.webhook_attempts,
        at=clock(),
        url=due.job.callback_url,
        status_code=status_code,
        error=error,
        duration_ms=3,
        worker=due.worker,
    )


def test_the_write_that_ends_a_job_makes_its_webhook_due(any_store, finished):
    job = any_store.get(finished)
    assert (job.callback_url, job.webhook_state, job.webhook_attempts) == (HOOK, WEBHOOK_PENDING, 0)
    [due] = any_store.claim_webhooks("d1", 10, 30)
    assert due.job.id == finished
    assert due.job.status is Status.SUCCEEDED
    assert due.job.webhook_attempts == 1
    assert due.root_path == "/api"


@pytest.mark.parametrize("end", ["cancel", "reap"])
def test_jobs_ended_outside_an_attempt_get_their_webhook_too(any_store, clock, end):
    job = make_job(created_at=clock(), callback_url=HOOK)
    any_store.insert([job])
    if end == "cancel":
        any_store.cancel(job.id)
    else:
        any_store.claim("w", 1, 1)
        clock.advance(2)
        any_store.reap_expired("lost")
    assert any_store.get(job.id).webhook_state == WEBHOOK_PENDING
    [due] = any_store.claim_webhooks("d1", 10, 30)
    assert due.job.webhook_attempts == 1


def test_a_job_without_a_callback_has_no_webhook(any_store, clock):
    job = make_job(created_at=clock())
    any_store.insert([job])
    any_store.cancel(job.id)
    assert any_store.get(job.id).webhook_state is None
    assert any_store.claim_webhooks("d1", 10, 30) == []


def test_a_claimed_delivery_is_leased_and_due_again_when_its_lease_ends(any_store, finished, clock):
    [first] = any_store.claim_webhooks("d1", 10, 30)
    assert any_store.claim_webhooks("d2", 10, 30) == []  # held
    clock.advance(31)  # d1 died mid-delivery
    [second] = any_store.claim_webhooks("d2", 10, 30)
    assert (second.job.webhook_attempts, second.worker) == (2, "d2")
    # d1's late report is kept, but no longer decides anything.
    assert not any_store.record_webhook(attempt(first, 200, clock=clock), WEBHOOK_DELIVERED, None)
    assert any_store.get(finished).webhook_state == WEBHOOK_PENDING
    assert any_store.record_webhook(attempt(second, 204, clock=clock), WEBHOOK_DELIVERED, None)
    assert any_store.get(finished).webhook_state == WEBHOOK_DELIVERED
    codes = [a.status_code for a in any_store.webhook_attempts_of(finished)]
    assert codes == [200, 204]


def test_a_failed_attempt_is_due_again_at_its_time(any_store, finished, clock):
    [due] = any_store.claim_webhooks("d1", 10, 30)
    later = clock() + timedelta(seconds=5)
    assert any_store.record_webhook(attempt(due, 500, clock=clock), WEBHOOK_PENDING, later)
    assert any_store.claim_webhooks("d1", 10, 30) == []
    clock.advance(5)
    [again] = any_store.claim_webhooks("d1", 10, 30)
    assert again.job.webhook_attempts == 2
    refused = attempt(again, error="refused", clock=clock)
    any_store.record_webhook(refused, WEBHOOK_FAILED, None)
    assert any_store.get(finished).webhook_state == WEBHOOK_FAILED
    [one, two] = any_store.webhook_attempts_of(finished)
    assert (one.attempt, one.status_code) == (1, 500)
    assert two == refused  # every field kept as it was


def test_redeliver_starts_a_finished_delivery_afresh(any_store, finished, clock):
    [due] = any_store.claim_webhooks("d1", 10, 30)
    any_store.record_webhook(attempt(due, error="down", clock=clock), WEBHOOK_FAILED, None)
    assert any_store.redeliver(finished)
    [again] = any_store.claim_webhooks("d1", 10, 30)
    assert again.job.webhook_attempts == 1
    assert not any_store.redeliver("f" * 32)


def test_a_retried_job_forgets_its_webhook_until_it_ends_again(any_store, clock):
    job = make_job(created_at=clock(), callback_url=HOOK)
    any_store.insert([job])
    any_store.cancel(job.id)
    assert any_store.retry(job.id)
    assert any_store.get(job.id).webhook_state is None
    assert any_store.claim_webhooks("d1", 10, 30) == []


def test_prune_keeps_jobs_whose_webhook_is_pending_and_delete_forgets_attempts(
    any_store, finished, clock
):
    clock.advance(100)
    assert any_store.prune(clock()) == 0
    [due] = any_store.claim_webhooks("d1", 10, 30)
    any_store.record_webhook(attempt(due, 200, clock=clock), WEBHOOK_DELIVERED, None)
    assert any_store.prune(clock()) == 1
    assert any_store.webhook_attempts_of(finished) == []
