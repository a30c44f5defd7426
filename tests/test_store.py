"""The store contract, held by every implementation: in memory, SQLite, and
the real PostgreSQL and MariaDB servers. Time moves only by the test's clock."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from deferred_middleware._ids import new_job_id
from deferred_middleware._jobs import (
    Finish,
    Progress,
    Requeue,
    RetryLater,
    Status,
    StoredResponse,
)
from deferred_middleware.store import JobStore, MemoryJobStore, SQLJobStore

from .support import FakeClock, make_job

OK = StoredResponse(200, [], b"")


@pytest.fixture
def new(clock):
    """Jobs created on the test's clock, as the middleware would create them."""

    def make(**options):
        return make_job(created_at=clock(), **options)

    return make


def claim_one(store: JobStore, worker: str = "w", lease: float = 30) -> int:
    [claimed] = store.claim(worker, 1, lease)
    return claimed.attempts


def test_a_job_round_trips_exactly(any_store, new):
    body = bytes(range(256)) * 1024  # 256 KiB: larger than MySQL's plain BLOB
    headers = [("x-twice", "1"), ("authorization", "Bearer t"), ("x-twice", "2"), ("cookie", "c=1")]
    job = new(body=body, headers=headers)
    any_store.insert([job])
    loaded = any_store.get(job.id, request=True)
    assert loaded is not None
    assert loaded.request == job.request
    assert loaded.status is Status.QUEUED
    assert loaded.created_at == job.created_at  # microseconds and UTC survive
    assert loaded.options == job.options
    assert loaded.attempts == 0
    assert any_store.get(job.id).request is None  # only what was asked for

    [claimed] = any_store.claim("w1", 10, 30)
    assert claimed.request == job.request  # a claim carries the request, credentials included
    response = StoredResponse(201, [("set-cookie", "a=1"), ("set-cookie", "b=2")], body)
    assert any_store.write([Finish(job.id, claimed.attempts, Status.SUCCEEDED, response)]) == 1
    done = any_store.get(job.id, request=True, response=True)
    assert done.response == response
    assert any_store.get(job.id).response is None
    assert done.request.header("authorization") is None  # forgotten once finished
    assert done.request.headers == [("x-twice", "1"), ("x-twice", "2")]


def test_a_request_without_server_or_client_round_trips(any_store, new):
    job = new()
    job.request.server = job.request.client = None
    any_store.insert([job])
    assert any_store.get(job.id, request=True).request == job.request


def test_claims_take_due_jobs_oldest_first_up_to_the_limit(any_store, new, clock):
    jobs = []
    for _ in range(3):
        jobs.append(new())
        any_store.insert([jobs[-1]])
        clock.advance(1)
    first = any_store.claim("w", 2, 30)
    assert {j.id for j in first} == {jobs[0].id, jobs[1].id}
    assert all(j.status is Status.RUNNING and j.attempts == 1 for j in first)
    assert all(j.started_at == clock() for j in first)
    assert [j.id for j in any_store.claim("w", 5, 30)] == [jobs[2].id]
    assert any_store.claim("w", 5, 30) == []
    assert any_store.count(Status.RUNNING) == 3
    assert any_store.count(Status.QUEUED) == 0


def test_concurrent_claims_never_hand_out_a_job_twice(any_store, new):
    any_store.insert([new() for _ in range(200)])
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claim_all(index: int) -> None:
        if isinstance(any_store, SQLJobStore):  # a store of its own, as another process has
            worker: JobStore = SQLJobStore(any_store.database_url)
        else:
            worker = any_store
        while batch := worker.claim(f"w{index}", 7, 30):
            claimed[index].extend(job.id for job in batch)
        worker.close()

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [job_id for ids in claimed for job_id in ids]
    assert len(every) == len(set(every)) == 200
    assert any_store.count(Status.RUNNING) == 200


def test_a_stale_attempt_cannot_overwrite_the_attempt_that_replaced_it(any_store, new, clock):
    job = new(retries=1)
    any_store.insert([job])
    first = claim_one(any_store, "stale")
    clock.advance(31)
    assert any_store.reap_expired("lost") == ([job.id], [])
    second = claim_one(any_store, "fresh")
    assert (first, second) == (1, 2)
    late = StoredResponse(200, [], b"stale")
    assert any_store.write([Finish(job.id, first, Status.SUCCEEDED, late)]) == 0
    assert any_store.write([Progress(job.id, first, 0.9, "stale")]) == 0
    assert any_store.write([RetryLater(job.id, first, 1, "x"), Requeue(job.id, first)]) == 0
    assert any_store.renew("stale", {job.id: first}, 30) == set()
    assert any_store.renew("fresh", {job.id: second}, 30) == {job.id}
    assert any_store.renew("fresh", {job.id: first}, 30) == set()  # the attempt must match too
    fresh = StoredResponse(200, [], b"fresh")
    assert any_store.write([Finish(job.id, second, Status.SUCCEEDED, fresh)]) == 1
    assert any_store.get(job.id, response=True).response.body == b"fresh"
    assert any_store.get(job.id).progress is None


def test_renewing_keeps_a_lease_from_expiring(any_store, new, clock):
    job = new()
    any_store.insert([job])
    attempt = claim_one(any_store, "w", lease=10)
    clock.advance(8)
    assert any_store.renew("w", {job.id: attempt}, 10) == {job.id}
    clock.advance(8)
    assert any_store.reap_expired("lost") == ([], [])
    clock.advance(3)
    assert any_store.reap_expired("lost") == ([], [job.id])


def test_an_expired_job_without_retries_fails_with_the_given_error(any_store, new, clock):
    job = new(retries=0, headers=[("authorization", "Bearer t")])
    any_store.insert([job])
    claim_one(any_store, "gone")
    clock.advance(30)
    assert any_store.reap_expired("lost") == ([], [])  # the lease ends after, not at, its time
    clock.advance(1)
    assert any_store.reap_expired("The worker was lost.") == ([], [job.id])
    failed = any_store.get(job.id, request=True)
    assert failed.status is Status.FAILED
    assert failed.error == "The worker was lost."
    assert failed.finished_at == clock()
    assert failed.request.headers == []  # credentials erased


def test_a_reaped_job_with_retries_is_due_at_once_and_keeps_its_error(any_store, new, clock):
    job = new(retries=1)
    any_store.insert([job])
    claim_one(any_store)
    clock.advance(31)
    any_store.reap_expired("lost")
    requeued = any_store.get(job.id)
    assert requeued.status is Status.QUEUED
    assert requeued.error == "lost"
    assert requeued.finished_at is None
    assert claim_one(any_store) == 2


def test_retry_later_waits_before_the_job_is_due_again(any_store, new, clock):
    job = new(retries=2)
    any_store.insert([job])
    attempt = claim_one(any_store)
    assert any_store.write([RetryLater(job.id, attempt, 60, "raised")]) == 1
    queued = any_store.get(job.id)
    assert (queued.status, queued.error, queued.attempts) == (Status.QUEUED, "raised", 1)
    assert any_store.claim("w", 1, 30) == []
    clock.advance(59)
    assert any_store.claim("w", 1, 30) == []
    clock.advance(1)
    assert claim_one(any_store) == 2
    assert any_store.renew("w", {job.id: 2}, 30) == {job.id}


def test_requeue_gives_back_an_interrupted_attempt(any_store, new):
    job = new()
    any_store.insert([job])
    attempt = claim_one(any_store)
    assert any_store.write([Requeue(job.id, attempt)]) == 1
    back = any_store.get(job.id)
    assert (back.status, back.attempts) == (Status.QUEUED, 0)
    assert claim_one(any_store) == 1


def test_progress_is_kept_and_writes_apply_in_order(any_store, new):
    job = new()
    any_store.insert([job])
    attempt = claim_one(any_store)
    writes = [
        Progress(job.id, attempt, 0.5, "half"),
        Progress(job.id, attempt, 1.0, "all"),
        Finish(job.id, attempt, Status.SUCCEEDED, OK),
        Progress(job.id, attempt, 0.1, "too late"),  # the attempt has ended
    ]
    assert any_store.write(writes) == 3
    done = any_store.get(job.id)
    assert (done.progress, done.message, done.status) == (1.0, "all", Status.SUCCEEDED)


def test_a_run_of_outcomes_lands_each_as_its_own(any_store, new, clock):
    """Outcomes queued together are stored together (one statement on
    PostgreSQL): each job keeps its own, a stale one lands nowhere, and of
    two for one attempt the first ends it, as it would one by one."""
    plain, failing, hooked, doubled, stale = (
        new(),
        new(),
        new(callback_url="https://hooks.example/done"),
        new(),
        new(),
    )
    any_store.insert([plain, failing, hooked, doubled, stale])
    assert len(any_store.claim("w", 5, 30)) == 5
    answered = StoredResponse(201, [("x-one", "1"), ("x-one", "2")], b"\x00made")
    writes = [
        Finish(plain.id, 1, Status.SUCCEEDED, answered),
        Finish(failing.id, 1, Status.FAILED, None, "It broke.", "Traceback"),
        Finish(hooked.id, 1, Status.SUCCEEDED, OK),
        Finish(doubled.id, 1, Status.SUCCEEDED, StoredResponse(200, [], b"first")),
        Finish(stale.id, 2, Status.SUCCEEDED, OK),  # an attempt that is not running
        Finish(doubled.id, 1, Status.FAILED, None, "second"),
    ]
    assert any_store.write(writes) == 4
    done = any_store.get(plain.id, response=True)
    assert (done.status, done.response, done.error) == (Status.SUCCEEDED, answered, None)
    assert done.finished_at == clock()
    failed = any_store.get(failing.id, response=True)
    assert (failed.status, failed.response, failed.error) == (Status.FAILED, None, "It broke.")
    assert any_store.error_detail(failing.id) == "Traceback"
    first = any_store.get(doubled.id, response=True)
    assert (first.status, first.response.body, first.error) == (Status.SUCCEEDED, b"first", None)
    assert any_store.get(stale.id).status is Status.RUNNING
    [due] = any_store.claim_webhooks("d", 10, 30)  # only the job with a callback
    assert due.job.id == hooked.id


def test_a_failed_finish_keeps_its_error_and_response(any_store, new, clock):
    job = new()
    any_store.insert([job])
    attempt = claim_one(any_store)
    answered = StoredResponse(502, [("x", "y")], b"bad gateway")
    any_store.write([Finish(job.id, attempt, Status.FAILED, answered, "The handler answered 502.")])
    failed = any_store.get(job.id, response=True)
    assert failed.status is Status.FAILED
    assert failed.error == "The handler answered 502."
    assert failed.response == answered
    assert failed.finished_at == clock()


def test_a_failure_without_a_response_keeps_only_its_error(any_store, new):
    job = new()
    any_store.insert([job])
    attempt = claim_one(any_store)
    any_store.write([Finish(job.id, attempt, Status.FAILED, error="The handler raised.")])
    failed = any_store.get(job.id, response=True)
    assert (failed.status, failed.error, failed.response) == (
        Status.FAILED,
        "The handler raised.",
        None,
    )


def test_cancel_touches_only_active_jobs(any_store, new):
    queued, running, finished = new(), new(), new()
    any_store.insert([finished])
    attempt = claim_one(any_store)
    any_store.write([Finish(finished.id, attempt, Status.SUCCEEDED, OK)])
    any_store.insert([running])
    attempt = claim_one(any_store)
    any_store.insert([queued])
    assert any_store.cancel(queued.id).status is Status.CANCELED
    canceled = any_store.cancel(running.id)
    assert canceled.status is Status.CANCELED
    assert canceled.finished_at is not None
    assert any_store.cancel(finished.id).status is Status.SUCCEEDED
    assert any_store.cancel(new_job_id()) is None
    # The canceled attempt's late outcome is refused, and its lease is gone.
    assert any_store.write([Finish(running.id, attempt, Status.SUCCEEDED, OK)]) == 0
    assert any_store.renew("w", {running.id: attempt}, 30) == set()


def test_retry_queues_a_finished_failure_with_fresh_attempts(any_store, new):
    failed, succeeded = new(retries=1), new()
    any_store.insert([failed, succeeded])
    any_store.claim("w", 2, 30)
    any_store.write(
        [
            Finish(failed.id, 1, Status.FAILED, StoredResponse(500, [], b"x"), "broke"),
            Finish(succeeded.id, 1, Status.SUCCEEDED, OK),
        ]
    )
    assert not any_store.retry(succeeded.id)
    assert not any_store.retry(new_job_id())
    assert any_store.retry(failed.id)
    again = any_store.get(failed.id, response=True)
    assert (again.status, again.error, again.response, again.finished_at) == (
        Status.QUEUED,
        None,
        None,
        None,
    )
    assert again.max_attempts == 3  # one used, two fresh
    assert claim_one(any_store) == 2


def test_delete_forgets_the_job(any_store, new):
    job = new()
    any_store.insert([job])
    assert any_store.delete(job.id)
    assert any_store.get(job.id) is None
    assert not any_store.delete(job.id)


def test_prune_removes_only_expired_finished_jobs(any_store, new, clock):
    old_done, new_done, old_queued = new(), new(), new()
    any_store.insert([old_done])
    any_store.write([Finish(old_done.id, claim_one(any_store), Status.SUCCEEDED, OK)])
    any_store.insert([old_queued])
    clock.advance(3 * 86400)
    any_store.insert([new_done])
    any_store.write([Finish(new_done.id, claim_one(any_store), Status.SUCCEEDED, OK)])
    assert any_store.prune(clock() - timedelta(days=1), batch=1) == 1
    assert any_store.get(old_done.id) is None
    assert any_store.get(new_done.id) is not None
    assert any_store.get(old_queued.id) is not None


def test_list_is_newest_first_and_filters(any_store, new, clock):
    jobs = []
    for _ in range(3):
        jobs.append(new())
        any_store.insert([jobs[-1]])
        clock.advance(1)
    any_store.cancel(jobs[0].id)
    assert [j.id for j in any_store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in any_store.list(limit=1)] == [jobs[2].id]
    assert [j.id for j in any_store.list([Status.CANCELED])] == [jobs[0].id]
    assert [j.id for j in any_store.list(created_before=jobs[1].created_at)] == [jobs[0].id]
    assert all(j.request is None for j in any_store.list())


def test_list_filters_by_queue_and_status_together(any_store, new, clock):
    mailing, default = new(), new()
    mailing.queue = "mail"
    any_store.insert([mailing, default])
    any_store.cancel(default.id)
    assert [j.id for j in any_store.list(queues=["mail"])] == [mailing.id]
    both = {j.id for j in any_store.list(queues=["default", "mail"])}
    assert both == {mailing.id, default.id}
    assert any_store.list([Status.CANCELED], queues=["mail"]) == []
    assert [j.id for j in any_store.list([Status.QUEUED], queues=["mail"])] == [mailing.id]
    assert any_store.list(queues=["other"]) == []


def test_the_memory_store_refuses_a_duplicate_id():
    store = MemoryJobStore()
    job = make_job()
    store.insert([job])
    with pytest.raises(ValueError):
        store.insert([make_job(), job])
    assert store.count(Status.QUEUED) == 1


def test_the_memory_store_erases_credentials_when_a_job_ends():
    store = MemoryJobStore(credential_headers=frozenset({"authorization"}), clock=FakeClock())
    job = make_job(headers=[("authorization", "Bearer t")])
    store.insert([job])
    assert store.credentials_of(job.id) == [(0, "authorization", "Bearer t")]
    store.cancel(job.id)
    assert store.credentials_of(job.id) == []


@pytest.mark.parametrize("back", ["retry later", "requeue", "reaped"])
def test_a_job_back_in_the_queue_shows_nothing_of_the_run_that_ended(any_store, new, clock, back):
    job = new(retries=1)
    any_store.insert([job])
    attempt = claim_one(any_store)
    any_store.write([Progress(job.id, attempt, 0.5, "half")])
    if back == "retry later":
        any_store.write([RetryLater(job.id, attempt, 0, "raised")])
    elif back == "requeue":
        any_store.write([Requeue(job.id, attempt)])
    else:
        clock.advance(31)
        any_store.reap_expired("lost")
    queued = any_store.get(job.id)
    assert queued.status is Status.QUEUED
    assert (queued.started_at, queued.progress, queued.message) == (None, None, None)


def test_claims_take_only_the_queues_asked_for(any_store, new):
    mine, theirs = new(), new()
    theirs.queue = "reports"
    any_store.insert([mine, theirs])
    assert any_store.get(theirs.id).queue == "reports"
    assert [j.id for j in any_store.claim("w", 10, 30, ["nightly"])] == []
    assert [j.id for j in any_store.claim("w", 10, 30)] == [mine.id]  # "default" unless told
    assert [j.id for j in any_store.claim("w", 10, 30, ["reports", "x"])] == [theirs.id]


def test_a_claim_over_more_queues_than_the_last_takes_from_each(any_store, new):
    jobs = {}
    for queue in ("a", "b", "c"):
        jobs[queue] = new()
        jobs[queue].queue = queue
    any_store.insert(list(jobs.values()))
    assert [j.id for j in any_store.claim("w", 10, 30, ["c"])] == [jobs["c"].id]
    claimed = {j.id for j in any_store.claim("w", 10, 30, ["b", "a", "b"])}
    assert claimed == {jobs["a"].id, jobs["b"].id}


def test_every_change_a_client_could_see_raises_the_revision(any_store, new, clock):
    job = new(retries=2)
    any_store.insert([job])

    def revision() -> int:
        return any_store.get(job.id).revision

    seen = [revision()]

    def changed() -> None:
        seen.append(revision())
        assert seen[-1] > seen[-2], seen

    attempt = claim_one(any_store, lease=1)
    changed()
    any_store.write([Progress(job.id, attempt, 0.5, "half")])
    changed()
    any_store.renew("w", {job.id: attempt}, 30)  # not a change anyone sees
    assert revision() == seen[-1]
    any_store.write([RetryLater(job.id, attempt, 0.0, "once more")])
    changed()
    attempt = claim_one(any_store, lease=1)
    changed()
    any_store.write([Requeue(job.id, attempt)])
    changed()
    attempt = claim_one(any_store, lease=1)
    clock.advance(2)
    any_store.reap_expired("lost")
    changed()
    attempt = claim_one(any_store)
    any_store.write([Finish(job.id, attempt, Status.FAILED, None, "it broke")])
    changed()
    assert any_store.retry(job.id)
    changed()
    any_store.cancel(job.id)
    changed()
    any_store.cancel(job.id)  # already final: nothing changes
    assert revision() == seen[-1]


# -- owners and Idempotency-Keys ---------------------------------------------------


def test_a_job_keeps_its_owner(any_store, new):
    job = new(owner="alice@example.com")
    any_store.insert([job])
    assert any_store.get(job.id).owner == "alice@example.com"
    assert [j.owner for j in any_store.list()] == ["alice@example.com"]
    [claimed] = any_store.claim("w", 1, 30)
    assert claimed.owner == "alice@example.com"


def test_insert_once_stores_the_first_job_of_a_key_and_answers_it_after(any_store, new):
    first = new(owner="alice", idempotency_key="k1")
    assert any_store.insert_once(first) is first
    again = new(owner="alice", idempotency_key="k1", body=b"other")
    held = any_store.insert_once(again)
    assert held.id == first.id
    assert held.owner == "alice"
    assert held.idempotency == first.idempotency  # its request digest, to compare
    assert held.idempotency.request != again.idempotency.request
    assert any_store.get(again.id) is None
    assert any_store.count(Status.QUEUED) == 1


def test_a_key_is_free_again_once_its_job_is_deleted(any_store, new):
    first = new(idempotency_key="k1")
    any_store.insert_once(first)
    assert any_store.delete(first.id)
    second = new(idempotency_key="k1")
    assert any_store.insert_once(second) is second


def test_two_jobs_of_one_key_never_share_a_batch(any_store, new):
    """The unique index holds for plain inserts too: the writer then stores
    each job of the failed batch alone."""
    a, b = new(idempotency_key="k"), new(idempotency_key="k")
    with pytest.raises(Exception):  # noqa: B017  (each database its own IntegrityError)
        any_store.insert([a, b])
    assert any_store.get(a.id) is None and any_store.get(b.id) is None


def test_concurrent_duplicates_make_exactly_one_job(any_store, new):
    """Not check-then-insert: 50 threads race one key, one row wins."""
    jobs = [new(owner="alice", idempotency_key="race") for _ in range(50)]
    start = threading.Barrier(len(jobs))
    answers: list[str] = []

    def submit(job):
        start.wait()
        answers.append(any_store.insert_once(job).id)

    threads = [threading.Thread(target=submit, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 50
    assert len(set(answers)) == 1
    assert any_store.count(Status.QUEUED) == 1
    assert any_store.get(answers[0]) is not None


# -- operators' reads -----------------------------------------------------------


def test_counts_per_queue_and_status_with_the_oldest(any_store, new, clock):
    first = new()
    clock.advance(5)
    nightly = new()
    nightly.queue = "nightly"
    later = new()
    any_store.insert([first, nightly, later])
    assert [j.id for j in any_store.claim("w", 1, 30, ["nightly"])] == [nightly.id]
    counts = {(c.queue, c.status): (c.count, c.oldest_created_at) for c in any_store.counts()}
    assert counts == {
        ("default", Status.QUEUED): (2, first.created_at),
        ("nightly", Status.RUNNING): (1, nightly.created_at),
    }


def test_workers_are_the_executors_holding_running_jobs_with_their_soonest_lease(
    any_store, new, clock
):
    jobs = [new() for _ in range(4)]
    any_store.insert(jobs)
    any_store.claim("alpha", 2, 30)
    clock.advance(10)
    any_store.claim("beta", 1, 30)
    done = any_store.claim("alpha", 1, 5)
    any_store.write([Finish(done[0].id, 1, Status.SUCCEEDED, StoredResponse(200, [], b""))])
    start = clock() - timedelta(seconds=10)
    assert [(w.worker, w.running, w.lease_expires_at) for w in any_store.workers()] == [
        ("alpha", 2, start + timedelta(seconds=30)),
        ("beta", 1, clock() + timedelta(seconds=30)),
    ]
    assert any_store.workers()[0].lease_expires_at.tzinfo is not None


@pytest.mark.parametrize("end", ["start", "end"])
def test_ids_with_a_part_at_either_end(any_store, new, end):
    def placed(part: str, rest: str) -> str:
        return part + rest if end == "start" else rest + part

    ids_with = any_store.ids_starting if end == "start" else any_store.ids_ending
    jobs = [new() for _ in range(3)]
    for job, (part, digit) in zip(jobs, (("ab", "1"), ("ab", "2"), ("cd", "3")), strict=True):
        job.id = placed(part, digit * 30)
    any_store.insert(jobs)
    assert ids_with("ab") == [jobs[0].id, jobs[1].id]
    assert ids_with("ab", limit=1) == [jobs[0].id]
    assert ids_with(placed("cd", "3")) == [jobs[2].id]
    assert ids_with(jobs[1].id) == [jobs[1].id]
    assert ids_with("e") == []
    assert ids_with("%") == []


def test_a_list_names_each_job_s_route(any_store, new):
    job = new(path="/reports/7")
    any_store.insert([job])
    [listed] = any_store.list()
    assert listed.route == "POST /reports/7"
    assert listed.request is None
    assert any_store.get(job.id).route is None  # the hot read stays narrow
    assert any_store.get(job.id, request=True).route == "POST /reports/7"


def test_what_an_attempt_raised_is_kept_apart_for_operators(any_store, new):
    job = new(retries=1)
    any_store.insert([job])
    assert any_store.error_detail(job.id) is None
    attempt = claim_one(any_store)
    retry = RetryLater(job.id, attempt, 0, "The handler raised an exception.", "Traceback A")
    assert any_store.write([retry]) == 1
    assert any_store.error_detail(job.id) == "Traceback A"
    attempt = claim_one(any_store)
    ended = Finish(job.id, attempt, Status.FAILED, error="It broke.", detail="Traceback B" * 9000)
    assert any_store.write([ended]) == 1
    assert any_store.error_detail(job.id) == "Traceback B" * 9000  # long: LONGTEXT on MySQL
    assert any_store.get(job.id).error == "It broke."
    assert any_store.retry(job.id)
    assert any_store.error_detail(job.id) is None
    assert any_store.error_detail("0" * 32) is None
