"""Every policy rule of the contract, against the in-memory store, one step at
a time: what an outcome does to a job, retries and backoff, timeouts, leases,
cancel, pruning, credentials, fencing, and what the job routes answer."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from datetime import timedelta

import pytest

from deferred_middleware import _policy as policy
from deferred_middleware import current_job
from deferred_middleware._ids import EPOCH
from deferred_middleware._jobs import (
    LOST_WORKER,
    RAISED,
    DeferredOptions,
    Failure,
    Finish,
    Job,
    RetryLater,
    Status,
    StoredRequest,
    StoredResponse,
    utcnow,
)
from deferred_middleware._refusals import QueueFull
from deferred_middleware.store import StoreUnavailable, Unstorable
from deferred_middleware.store._writer import INSERT

from .policy_harness import Harness

CREDENTIALS = [("authorization", "Bearer secret"), ("x-kept", "1"), ("cookie", "c=1")]


@pytest.fixture
def h() -> Harness:
    return Harness()


def run(h: Harness, **options):
    """Submit a job and launch it; answers (job id, its replay)."""
    job_id = h.submit(**options)
    assert h.claim() == 1
    return job_id, h.launcher.last(job_id)


# -- what an outcome does ----------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 302, 404, 422, 499])
def test_a_response_below_500_succeeds_and_is_kept_exactly(h, status):
    job_id, replay = run(h, retries=2)
    replay.respond(status, b"body")
    job = h.job(job_id)
    assert job.status is Status.SUCCEEDED
    assert job.response == StoredResponse(status, [("content-type", "text/plain")], b"body")
    assert job.error is None
    assert job.attempts == 1
    assert h.launcher.count(job_id) == 1
    assert not h.dispatcher.running


@pytest.mark.parametrize("status", [500, 502, 503, 599])
def test_a_5xx_is_a_failure_that_keeps_the_response(h, status):
    job_id, replay = run(h)
    replay.respond(status, b"down")
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == f"The handler answered {status}."
    assert job.response.status == status
    assert job.response.body == b"down"


def test_a_5xx_is_retried_while_attempts_remain(h):
    job_id, replay = run(h, retries=1)
    replay.respond(503)
    assert h.job(job_id).status is Status.QUEUED
    h.advance(h.config.retry_backoff)
    assert h.claim() == 1
    h.launcher.last(job_id).respond(200)
    done = h.job(job_id)
    assert (done.status, done.attempts) == (Status.SUCCEEDED, 2)


def test_a_raise_fails_the_job_with_a_safe_sentence(h):
    job_id, replay = run(h)
    replay.end(RAISED)
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == "The handler raised an exception."
    assert job.response is None


def test_a_raise_is_retried_after_a_backoff(h):
    job_id, replay = run(h, retries=1)
    replay.end(RAISED)
    queued = h.job(job_id)
    assert queued.status is Status.QUEUED
    assert queued.error == "The handler raised an exception."
    h.advance(h.config.retry_backoff - 0.01)
    assert h.claim() == 0  # not due yet
    h.advance(0.01)
    assert h.claim() == 1
    assert h.launcher.count(job_id) == 2
    assert h.launcher.last(job_id).context.run(lambda: current_job().attempt) == 2


def test_an_app_that_rendered_its_own_error_page_for_a_raise_has_no_result(h):
    job_id, replay = run(h)
    replay.context.run(lambda: setattr(current_job(), "raised", True))
    replay.respond(500, b"<html>Internal Server Error</html>")
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == "The handler raised an exception."
    assert job.response is None


def test_a_launch_that_fails_fails_the_attempt(h):
    h.launcher.refuse = True
    job_id = h.submit()
    h.claim()
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == "The job could not be started."
    assert not h.dispatcher.running


def test_the_last_progress_is_kept_and_progress_after_the_end_is_not(h):
    job_id, replay = run(h)
    replay.progress(0.25, "a quarter")
    assert h.document(job_id)["progress"] == 0.25
    assert h.document(job_id)["message"] == "a quarter"
    replay.progress(2.0, "clamped")
    assert h.document(job_id)["progress"] == 1.0
    replay.respond(200)
    replay.progress(0.1, "late")
    assert (h.document(job_id)["progress"], h.document(job_id)["message"]) == (1.0, "clamped")
    with pytest.raises(ValueError):
        replay.progress(float("nan"))


# -- backoff -----------------------------------------------------------------


def test_backoff_doubles_from_the_first_delay_and_is_capped():
    assert [policy.backoff(n, 1.5) for n in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]
    assert policy.backoff(20, 1.0) == policy.MAX_BACKOFF == 300.0
    assert policy.backoff(9, 1.0) == 256.0


def test_settle_retries_until_the_last_attempt():
    job = Job("a" * 32, Status.RUNNING, utcnow(), options=DeferredOptions(retries=2))
    failure = Failure("broke")
    assert policy.settle(job, 1, failure, 2.0) == RetryLater(job.id, 1, 2.0, "broke")
    assert policy.settle(job, 2, failure, 2.0) == RetryLater(job.id, 2, 4.0, "broke")
    assert policy.settle(job, 3, failure, 2.0) == Finish(job.id, 3, Status.FAILED, error="broke")
    ok = StoredResponse(200, [], b"")
    assert policy.settle(job, 3, ok, 2.0) == Finish(job.id, 3, Status.SUCCEEDED, response=ok)


def test_the_second_retry_waits_twice_as_long(h):
    job_id, replay = run(h, retries=2)
    replay.end(RAISED)
    h.advance(h.config.retry_backoff)
    assert h.claim() == 1
    h.launcher.last(job_id).end(RAISED)
    h.advance(2 * h.config.retry_backoff - 0.01)
    assert h.claim() == 0
    h.advance(0.01)
    assert h.claim() == 1
    h.launcher.last(job_id).end(RAISED)
    failed = h.job(job_id)
    assert (failed.status, failed.attempts) == (Status.FAILED, 3)


# -- timeouts ----------------------------------------------------------------


def test_an_interruptible_attempt_is_cancelled_and_fails_when_it_times_out(h):
    job_id, replay = run(h, timeout=5)
    h.advance(5)
    h.tend()
    assert replay.cancel_calls == 0  # not overdue at its limit, only after it
    h.advance(0.01)
    h.tend()
    assert replay.cancel_calls == 1
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == "The job timed out after 5 seconds."
    assert not h.dispatcher.running


def test_a_timed_out_attempt_with_retries_runs_again(h):
    job_id, _ = run(h, timeout=5, retries=1)
    h.advance(6)
    h.tend()
    assert h.job(job_id).status is Status.QUEUED
    h.advance(h.config.retry_backoff)
    assert h.claim() == 1


def test_an_uninterruptible_last_attempt_fails_at_once_and_frees_its_slot():
    h = Harness(interruptible=False)
    job_id, replay = run(h, timeout=5)
    h.advance(6)
    h.tend()
    assert h.job(job_id).status is Status.FAILED
    assert not h.dispatcher.running
    replay.respond(200, b"too late")  # the abandoned thread returns at last
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.response is None


def test_an_uninterruptible_attempt_with_retries_keeps_its_slot_until_it_returns():
    """A job never runs twice at the same time."""
    h = Harness(interruptible=False)
    job_id, replay = run(h, timeout=5, retries=1)
    h.advance(6)
    h.tend()
    assert job_id in h.dispatcher.running
    assert h.job(job_id).status is Status.RUNNING
    for _ in range(10):  # its lease is renewed meanwhile
        h.advance(h.config.lease_seconds / 3)
        h.tend()
        assert h.claim() == 0
    replay.respond(200)  # its result is not taken: the attempt timed out
    queued = h.job(job_id)
    assert queued.status is Status.QUEUED
    assert queued.error == "The job timed out after 5 seconds."
    assert not h.dispatcher.running


# -- leases: lost workers and fencing ----------------------------------------


def test_a_lost_worker_s_job_is_failed_when_its_lease_expires(h):
    job_id = h.submit()
    other = Harness()
    other.store, other.dispatcher.store = h.store, h.store  # a second worker on the same table
    other.clock = h.clock
    other.dispatcher.clock = h.clock
    assert other.claim() == 1  # ... which then dies
    h.advance(h.config.lease_seconds + 0.01)
    h.claim()
    job = h.job(job_id)
    assert job.status is Status.FAILED
    assert job.error == LOST_WORKER


def test_a_lost_worker_s_job_with_retries_runs_again_here(h):
    job_id = h.submit(retries=1)
    h.store.claim("dead", 1, h.config.lease_seconds)
    h.advance(h.config.lease_seconds + 0.01)
    assert h.claim() == 1
    assert h.launcher.last(job_id).context.run(lambda: current_job().attempt) == 2


def test_leases_of_running_attempts_are_renewed(h):
    job_id, replay = run(h)
    for _ in range(6):
        h.advance(h.config.lease_seconds / 3)
        h.tend()
    h.store.reap_expired(LOST_WORKER)
    assert h.job(job_id).status is Status.RUNNING
    replay.respond(200)
    assert h.job(job_id).status is Status.SUCCEEDED


def test_an_attempt_that_lost_its_job_is_abandoned_and_its_outcome_dropped():
    h = Harness(interruptible=False)
    job_id, replay = run(h, retries=1)
    h.store.write([RetryLater(job_id, 1, 0, "taken back")])  # as a reaper elsewhere would
    h.store.claim("elsewhere", 1, 30)
    h.advance(h.config.lease_seconds / 3)
    h.tend()
    assert replay.cancel_calls == 1
    assert not h.dispatcher.running
    replay.respond(200, b"stale")  # too late; attempt 2 owns the job now
    job = h.job(job_id)
    assert (job.status, job.attempts, job.response) == (Status.RUNNING, 2, None)


def test_an_outcome_is_written_again_while_the_store_is_away(h, monkeypatch):
    job_id, replay = run(h)
    real_write = h.store.write
    failing = {"left": 2}

    def write(writes):
        if failing["left"]:
            failing["left"] -= 1
            raise StoreUnavailable("down")
        return real_write(writes)

    monkeypatch.setattr(h.store, "write", write)
    replay.respond(200)
    assert failing["left"] == 1
    assert h.job(job_id).status is Status.RUNNING
    assert job_id in h.dispatcher.running  # keeps its lease
    h.tend()
    assert failing["left"] == 1  # not before its delay
    h.advance(0.1)
    h.tend()
    assert failing["left"] == 0
    h.advance(0.15)
    h.tend()
    assert h.job(job_id).status is Status.RUNNING  # the delay doubled
    h.advance(0.1)
    h.tend()
    assert h.job(job_id).status is Status.SUCCEEDED
    assert not h.dispatcher.running


# -- cancel ------------------------------------------------------------------


def test_canceling_a_queued_job_means_it_never_runs(h):
    job_id = h.submit()
    reply = h.route(f"/jobs/{job_id}/cancel", "POST")
    assert reply.status == 200
    assert json.loads(reply.body)["status"] == "canceled"
    assert h.claim() == 0
    assert h.launcher.count(job_id) == 0


def test_canceling_a_running_job_interrupts_it_and_drops_its_outcome(h):
    job_id, replay = run(h)
    assert h.route(f"/jobs/{job_id}/cancel", "POST").status == 200
    assert replay.cancel_calls == 1
    assert not h.dispatcher.running
    job = h.job(job_id)
    assert job.status is Status.CANCELED
    assert job.finished_at is not None


def test_a_canceled_thread_runs_on_but_its_result_is_discarded():
    h = Harness(interruptible=False)
    job_id, replay = run(h)
    h.route(f"/jobs/{job_id}/cancel", "POST")
    assert not h.dispatcher.running  # its slot is free for other work
    replay.respond(200)
    assert h.job(job_id).status is Status.CANCELED


def test_canceling_a_finished_job_is_a_conflict(h):
    job_id, replay = run(h)
    replay.respond(200)
    reply = h.route(f"/jobs/{job_id}/cancel", "POST")
    assert reply.status == 409
    assert h.job(job_id).status is Status.SUCCEEDED


def test_delete_cancels_and_forgets(h):
    job_id, replay = run(h)
    assert h.route(f"/jobs/{job_id}", "DELETE").status == 204
    assert replay.cancel_calls == 1
    assert h.store.get(job_id) is None
    assert h.route(f"/jobs/{job_id}").status == 404
    assert h.route(f"/jobs/{job_id}", "DELETE").status == 404


# -- pruning -----------------------------------------------------------------


def test_finished_jobs_are_pruned_after_their_retention_and_no_sooner():
    h = Harness(retention_seconds=3600)
    old, replay = run(h)
    replay.respond(200)
    waiting = h.submit()
    h.advance(3600)
    h.dispatcher._next_prune = 0
    h.claim()
    assert h.store.get(old) is not None  # exactly at its retention: kept
    h.advance(1)
    h.dispatcher._next_prune = 0
    h.launcher.last(waiting).respond(200)
    h.claim()
    assert h.store.get(old) is None
    assert h.store.get(waiting) is not None


def test_pruning_runs_by_itself_every_minute(h):
    done, replay = run(h)
    replay.respond(200)
    h.advance(h.config.retention_seconds + 1)
    h.claim()
    assert h.store.get(done) is None


# -- credentials -------------------------------------------------------------


@pytest.mark.parametrize("end", ["respond", "raise", "cancel", "lost"])
def test_credentials_are_kept_only_while_the_job_needs_them(h, end):
    job_id = h.submit(headers=CREDENTIALS)
    assert h.store.credentials_of(job_id) != []
    assert h.claim() == 1
    replay = h.launcher.last(job_id)
    # The replay gets them, in order, and the length of the body as stored.
    assert replay.request.headers == [*CREDENTIALS, ("content-length", "2")]
    if end == "respond":
        replay.respond(200)
    elif end == "raise":
        replay.end(RAISED)
    elif end == "cancel":
        h.core.cancel(job_id)
    else:
        h.dispatcher.running.clear()
        h.advance(h.config.lease_seconds + 1)
        h.claim()
    assert h.job(job_id).status.finished
    assert h.store.credentials_of(job_id) == []
    assert h.job(job_id).request.headers == [("x-kept", "1"), ("content-length", "2")]


def test_extra_credential_headers_are_erased_too():
    h = Harness(credential_headers=["X-Api-Key"])
    job_id, replay = run(h, headers=[("x-api-key", "k"), ("x-other", "o")])
    replay.respond(200)
    assert h.job(job_id).request.headers == [("x-other", "o"), ("content-length", "2")]


# -- shutdown ----------------------------------------------------------------


def test_shutdown_returns_running_jobs_without_using_an_attempt(h):
    job_id, replay = run(h, retries=0)
    h.dispatcher.stop(grace=0)
    assert replay.cancel_calls == 1
    job = h.job(job_id)
    assert (job.status, job.attempts) == (Status.QUEUED, 0)


def test_shutdown_waits_for_a_job_that_finishes_within_the_grace(h):
    job_id, replay = run(h)
    timer = threading.Timer(0.05, replay.respond)
    timer.start()
    h.dispatcher.stop(grace=30)
    timer.join()
    assert h.job(job_id).status is Status.SUCCEEDED
    assert replay.cancel_calls == 0


# -- accepting and the job routes -------------------------------------------


def test_an_accepted_job_s_id_carries_the_millisecond_it_was_made(h):
    """Ids of later jobs sort later, so the table's primary key grows at one end."""
    first = h.submit()
    h.advance(0.001)
    second = h.submit()
    made = (h.job(first).created_at - EPOCH) // timedelta(milliseconds=1)
    assert (int(first[:12], 16), int(second[:12], 16)) == (made, made + 1)
    assert first < second


def test_claiming_stays_within_the_concurrency():
    h = Harness(concurrency=3)
    ids = [h.submit() for _ in range(5)]
    assert h.claim() == 3
    assert h.claim() == 0
    h.launcher.last(ids[0]).respond()
    assert h.claim() == 1  # an idle slot is filled even below the minimum batch


def test_an_outcome_waiting_for_its_write_frees_its_slot_but_keeps_its_lease(monkeypatch):
    """The next claim need not wait for a commit; at most ``concurrency``
    outcomes wait for theirs, so a store that takes no writes stops claims."""
    h = Harness(concurrency=1)
    first, second, third = h.submit(), h.submit(), h.submit()
    assert h.claim() == 1
    real_write = h.store.write

    def away(writes):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "write", away)
    h.launcher.last(first).respond()
    assert first in h.dispatcher.running  # its lease is still renewed
    assert h.claim() == 1
    h.launcher.last(second).respond()
    assert h.claim() == 0
    assert h.job(third).status is Status.QUEUED
    monkeypatch.setattr(h.store, "write", real_write)
    h.advance(1)
    h.tend()
    assert [h.job(i).status for i in (first, second)] == [Status.SUCCEEDED] * 2
    assert h.claim() == 1
    assert h.launcher.count(third) == 1


@pytest.mark.parametrize(("concurrency", "claimed", "wakes"), [(4, 4, True), (8, 2, False)])
def test_a_settle_wakes_the_claims_only_when_they_wait_for_slots(
    monkeypatch, concurrency, claimed, wakes
):
    """With slots to spare a claim now would only contend with the
    outcome's own write; with claims held back, the freed slot is used."""
    h = Harness(concurrency=concurrency)
    ids = [h.submit() for _ in range(claimed)]
    assert h.claim() == claimed

    def away(writes):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "write", away)  # the write stays pending
    h.dispatcher._wake.clear()
    h.launcher.last(ids[0]).respond()
    assert h.dispatcher._wake.is_set() is wakes


def test_max_queued_refuses_once_that_many_jobs_wait():
    h = Harness(max_queued=2)
    h.submit()
    h.submit()
    with pytest.raises(QueueFull):
        h.submit()
    assert h.store.count(Status.QUEUED) == 2
    reply = h.core.refused(QueueFull())
    assert reply.status == 503
    assert ("retry-after", "1") in reply.headers


def test_a_pending_job_tells_clients_when_to_poll_again(h):
    job_id = h.submit()
    status = h.route(f"/jobs/{job_id}")
    assert ("retry-after", "1") in status.headers
    result = h.route(f"/jobs/{job_id}/result")
    assert result.status == 202
    assert ("retry-after", "1") in result.headers
    assert json.loads(result.body)["status"] == "queued"


def test_a_finished_job_has_no_retry_after_and_its_result_is_the_response(h):
    job_id, replay = run(h)
    replay.respond(201, b"made")
    status = h.route(f"/jobs/{job_id}")
    assert [name for name, _ in status.headers if name == "retry-after"] == []
    result = h.route(f"/jobs/{job_id}/result")
    assert (result.status, result.body) == (201, b"made")
    assert result.headers == [("content-type", "text/plain")]


def test_a_job_that_failed_without_a_response_answers_a_500_problem(h):
    job_id, replay = run(h)
    replay.end(RAISED)
    result = h.route(f"/jobs/{job_id}/result")
    assert result.status == 500
    assert ("content-type", "application/problem+json") in result.headers
    assert json.loads(result.body)["detail"] == "The handler raised an exception."
    assert h.document(job_id)["error"] == "The handler raised an exception."


def test_a_canceled_job_s_result_is_a_conflict(h):
    job_id = h.submit()
    h.core.cancel(job_id)
    assert h.route(f"/jobs/{job_id}/result").status == 409


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/result"])
def test_head_answers_the_get_headers_without_a_body(h, path):
    job_id, replay = run(h)
    replay.respond(200, b"payload")
    url = path.format(id=job_id)
    get, head = h.route(url, "GET"), h.route(url, "HEAD")
    assert head.body == b""
    assert (head.status, head.headers) == (get.status, get.headers)
    assert get.body != b""


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/jobs/{id}", "POST", "GET, HEAD, DELETE"),
        ("/jobs/{id}/result", "DELETE", "GET, HEAD"),
        ("/jobs/{id}/cancel", "GET", "POST"),
    ],
)
def test_a_method_the_route_does_not_allow_is_405_with_allow(h, path, method, allow):
    job_id = h.submit()
    reply = h.route(path.format(id=job_id), method)
    assert reply.status == 405
    assert ("allow", allow) in reply.headers
    assert h.job(job_id).status is Status.QUEUED


@pytest.mark.parametrize("tail", ["", "/", "/abc", "/" + "g" * 32, "/" + "A" * 32, "/{id}/x"])
def test_unknown_and_malformed_ids_are_404(h, tail):
    job_id = h.submit()
    assert h.route("/jobs" + tail.format(id=job_id)).status == 404


def test_a_long_poll_is_woken_by_the_outcome(h):
    job_id, replay = run(h)
    threading.Timer(0.05, replay.respond).start()
    reply = h.route(f"/jobs/{job_id}", query=b"wait=30")
    assert json.loads(reply.body)["status"] == "succeeded"


def test_a_long_poll_ends_at_its_deadline(h):
    job_id = h.submit()
    reply = h.route(f"/jobs/{job_id}", query=b"wait=0.05")
    assert json.loads(reply.body)["status"] == "queued"


def test_the_store_being_down_answers_503_on_job_routes(h, monkeypatch):
    job_id = h.submit()

    def down(*_args, **_kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "get", down)
    reply = h.route(f"/jobs/{job_id}")
    assert reply.status == 503
    assert ("retry-after", "1") in reply.headers


def test_accept_refuses_while_the_store_is_down(h, monkeypatch):
    def down(*_args, **_kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "insert", down)
    with pytest.raises(StoreUnavailable):
        h.submit()
    assert h.store.count(Status.QUEUED) == 0


def test_one_unstorable_job_does_not_fail_the_others_in_its_batch(h, monkeypatch):
    real_insert = h.store.insert

    def insert(jobs):
        if any(job.request.path == "/bad" for job in jobs):
            raise ValueError("this row cannot be stored")
        return real_insert(jobs)

    monkeypatch.setattr(h.store, "insert", insert)
    good, bad = Future(), Future()
    items = []
    for path, future in (("/good", good), ("/bad", bad)):
        job = h.core.admission.new_job(StoredRequest("POST", path), DeferredOptions())
        items.append((INSERT, job, future))
    h.writer._write(items)
    assert good.result() is None
    assert isinstance(bad.exception(), Unstorable)
    assert h.core.refused(bad.exception()).status == 400
    assert h.store.count(Status.QUEUED) == 1


# -- what a raise leaves for operators --------------------------------------------


def raised_here() -> Failure:
    try:
        {}["missing"]
    except KeyError as exc:
        return policy.raised(exc)
    raise AssertionError("unreachable")


def test_a_raise_keeps_its_traceback_for_operators_and_never_shows_it(h):
    job_id, replay = run(h)
    replay.end(raised_here())
    job = h.job(job_id)
    assert (job.status, job.error) == (Status.FAILED, RAISED.error)
    detail = h.store.error_detail(job_id)
    assert detail.startswith("Traceback") and detail.endswith("KeyError: 'missing'")
    assert "raised_here" in detail
    seen = h.route(f"/jobs/{job_id}").body + h.route(f"/jobs/{job_id}/result").body
    assert b"KeyError" not in seen and b"Traceback" not in seen


def test_a_retried_raise_keeps_the_latest_traceback_and_a_retry_forgets_it(h):
    job_id, replay = run(h, retries=1)
    replay.end(raised_here())
    assert "KeyError" in h.store.error_detail(job_id)
    assert h.job(job_id).status is Status.QUEUED
    h.advance(60)
    h.claim()
    h.launcher.last(job_id).respond(500, b"")
    assert h.store.error_detail(job_id) is None  # a 5xx has a response, not a traceback
    assert h.store.retry(job_id)
    assert h.store.error_detail(job_id) is None


def test_raised_without_an_exception_is_the_plain_sentence():
    assert policy.raised(None) is RAISED
    assert raised_here() == RAISED  # the detail is not part of what the outcome is
