"""The mechanics around the rules: the core's two faces (blocking and async),
long-polls that see jobs finished elsewhere, the queue bound's sampling, the
executor's threads, and how ``@deferred`` markers are found."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import re
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import pytest

from deferred_middleware import _protocol as protocol
from deferred_middleware import deferred
from deferred_middleware._jobs import (
    DeferredOptions,
    Finish,
    Job,
    Status,
    StoredRequest,
    StoredResponse,
)
from deferred_middleware._notify import Notifier
from deferred_middleware._prefer import Preferences
from deferred_middleware._refusals import HeadersTooLarge, NotStorable, QueueFull
from deferred_middleware._routes import RoutePatterns, options_of, queues_of
from deferred_middleware.runner import _dispatch as dispatch
from deferred_middleware.runner._dispatch import worker_name
from deferred_middleware.runner._idle import wait_for_work
from deferred_middleware.store import MemoryJobStore, StoreUnavailable, Unstorable
from deferred_middleware.store._writer import BatchWriter

from .policy_harness import Harness
from .support import eventually


class Calls:
    """Counts calls to a wrapped function, passing them through."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.fn(*args, **kwargs)


def spy(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> Calls:
    """Count the calls to ``owner.name`` for the rest of the test."""
    calls = Calls(getattr(owner, name))
    monkeypatch.setattr(owner, name, calls)
    return calls


def finish_elsewhere(h: Harness, job_id: str) -> None:
    """As another process would: straight into the store, no notification here."""
    [claimed] = h.store.claim("elsewhere", 1, 30)
    h.store.write(
        [Finish(job_id, claimed.attempts, Status.SUCCEEDED, StoredResponse(200, [], b""))]
    )


# -- preparing ---------------------------------------------------------------


def test_the_table_is_prepared_once_and_again_after_a_failure(monkeypatch):
    h = Harness()
    migrate = spy(monkeypatch, h.store, "migrate")
    h.submit()
    h.submit()
    h.route("/jobs/" + "a" * 32)
    assert (migrate.count, h.core.ready) == (1, True)

    down = Harness()

    def unavailable(revision: str = "head") -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(down.store, "migrate", unavailable)
    with pytest.raises(StoreUnavailable):
        down.submit()
    assert not down.core.ready
    assert down.route("/jobs/" + "a" * 32).status == 503


def test_the_executor_migrates_once_before_its_first_claim(monkeypatch):
    h = Harness()
    migrate = spy(monkeypatch, h.store, "migrate")
    for _ in range(3):
        h.claim()
    assert migrate.count == 1


# -- the async face ----------------------------------------------------------


def test_the_async_face_accepts_and_answers_like_the_blocking_one():
    h = Harness(retry_after=5, public_url="https://api.example")
    woken = Calls(h.dispatcher.wake)
    h.dispatcher.wake = woken  # type: ignore[method-assign]

    async def scenario() -> tuple[Any, ...]:
        job = await h.core.accept_async(StoredRequest("POST", "/r"), DeferredOptions())
        accepted = h.core.accepted(job, "/root")
        status = await h.core.answer_async(f"/{job.id}", "GET", b"", "")
        head = await h.core.answer_async(f"/{job.id}", "HEAD", b"", "")
        cancel = await h.core.answer_async(f"/{job.id}/cancel", "POST", b"wait=30", "")
        gone = await h.core.answer_async("/nope", "GET", b"", "")
        return job, accepted, status, head, cancel, gone

    job, accepted, status, head, cancel, gone = asyncio.run(scenario())
    assert woken.count == 1
    assert ("retry-after", "5") in accepted.headers
    assert ("location", f"https://api.example/root/jobs/{job.id}/result") in accepted.headers
    assert json.loads(status.body)["status"] == "queued"
    assert ("retry-after", "5") in status.headers
    assert (head.status, head.headers, head.body) == (200, status.headers, b"")
    assert json.loads(cancel.body)["status"] == "canceled"
    assert ("retry-after", "5") not in cancel.headers
    assert gone.status == 404
    h.core.close()


@pytest.mark.parametrize("local", [True, False])
def test_the_async_face_reads_in_place_only_where_reads_are_local(monkeypatch, local):
    h = Harness()
    job_id = h.submit()
    h.store.reads_are_local = local
    offload = spy(monkeypatch, h.core, "offload")

    async def poll() -> None:
        await h.core.answer_async(f"/{job_id}", "GET", b"", "")
        await h.core.answer_async(f"/{job_id}", "HEAD", b"", "")

    asyncio.run(poll())
    assert offload.count == (0 if local else 2)
    asyncio.run(h.core.answer_async(f"/{job_id}/cancel", "POST", b"", ""))
    assert offload.count == (1 if local else 3)  # writes never run on the loop
    h.core.close()


def test_the_async_face_prepares_the_table_off_the_loop(monkeypatch):
    h = Harness()
    offload = spy(monkeypatch, h.core, "offload")
    asyncio.run(h.core.answer_async("/" + "a" * 32, "GET", b"", ""))
    assert (offload.count, h.core.ready) == (1, True)
    asyncio.run(h.core.answer_async("/" + "a" * 32, "GET", b"", ""))
    assert offload.count == 1
    h.core.close()


def test_the_async_face_answers_503_while_the_store_is_down(monkeypatch):
    h = Harness(retry_after=6)
    job_id = h.submit()

    def down(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "get", down)
    reply = asyncio.run(h.core.answer_async(f"/{job_id}", "GET", b"", ""))
    assert (reply.status, dict(reply.headers)["retry-after"]) == (503, "6")


def test_offloading_threads_come_back_after_close():
    h = Harness()
    assert asyncio.run(h.core.offload(threading.current_thread)) is not threading.current_thread()
    h.core.close()
    name = asyncio.run(h.core.offload(lambda: threading.current_thread().name))
    assert name.startswith("deferred-io")
    h.core.close()


# -- long-polls --------------------------------------------------------------


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_long_poll_sees_a_job_finished_by_another_process(face):
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    timer = threading.Timer(0.05, finish_elsewhere, (h, job_id))
    timer.start()
    if face == "blocking":
        reply = h.route(f"/jobs/{job_id}", query=b"wait=0.8")
    else:
        reply = asyncio.run(h.core.answer_async(f"/{job_id}", "GET", b"wait=0.8", ""))
    timer.join()
    assert json.loads(reply.body)["status"] == "succeeded"
    assert h.notifier._waiters == {}  # the poll unsubscribed


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_an_async_long_poll_is_woken_by_this_process(face):
    h = Harness(poll_interval=60)  # only a wake-up can end it in time
    job_id, replay = h.submit(), None
    h.claim()
    replay = h.launcher.last(job_id)
    threading.Timer(0.05, replay.respond).start()
    if face == "blocking":
        reply = h.route(f"/jobs/{job_id}/result", query=b"wait=30")
    else:
        reply = asyncio.run(h.core.answer_async(f"/{job_id}/result", "GET", b"wait=30", ""))
    assert reply.status == 200
    assert h.notifier._waiters == {}


def test_an_async_long_poll_ends_at_its_deadline():
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    reply = asyncio.run(h.core.answer_async(f"/{job_id}", "GET", b"wait=0.05", ""))
    assert json.loads(reply.body)["status"] == "queued"
    assert h.notifier._waiters == {}


# -- Prefer: wait -------------------------------------------------------------


def answer_preferring(h: Harness, face: str, preferences: Preferences):
    job = h.job(h.submit())
    if face == "blocking":
        return job, h.core.accepted(job, "", preferences)
    return job, asyncio.run(h.core.accepted_async(job, "", preferences))


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_job_done_within_prefer_wait_is_answered_with_its_result(face, monkeypatch):
    h = Harness(poll_interval=60, max_wait=8)  # only a wake-up can end it in time

    def run_then_wait(job_id: str, timeout: float) -> None:
        assert timeout == 8  # wait=30, capped
        h.claim()
        h.launcher.last(job_id).respond(201, b"made")

    async def run_then_wait_async(job_id: str, timeout: float) -> None:
        run_then_wait(job_id, timeout)

    monkeypatch.setattr(h.core, "wait", run_then_wait)
    monkeypatch.setattr(h.core, "wait_async", run_then_wait_async)
    _, reply = answer_preferring(h, face, Preferences(wait=30))
    assert (reply.status, reply.body) == (201, b"made")
    assert reply.headers[-2:] == [("vary", "Prefer"), ("preference-applied", "wait=8")]


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_job_not_done_within_prefer_wait_gets_the_202(face):
    h = Harness(poll_interval=0.01, max_wait=1)
    job, reply = answer_preferring(h, face, Preferences(respond_async=True, wait=1))
    assert reply.status == 202
    assert json.loads(reply.body)["id"] == job.id
    assert reply.headers[-2:] == [("vary", "Prefer"), ("preference-applied", "respond-async")]
    assert h.notifier._waiters == {}


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_store_that_fails_during_prefer_wait_still_gets_the_202(face, monkeypatch):
    """The row was committed before the wait began: the promise stands."""
    h = Harness(poll_interval=0.01)
    job = h.job(h.submit())

    def down(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "get", down)
    if face == "blocking":
        reply = h.core.accepted(job, "", Preferences(wait=5))
    else:
        reply = asyncio.run(h.core.accepted_async(job, "", Preferences(wait=5)))
    assert reply.status == 202
    assert "preference-applied" not in dict(reply.headers)  # nor respond-async: not asked


def test_without_prefer_wait_the_202_comes_at_once(monkeypatch):
    h = Harness()
    monkeypatch.setattr(h.core, "wait", lambda *_: pytest.fail("waited"))
    _, reply = answer_preferring(h, "blocking", Preferences(respond_async=True))
    assert reply.status == 202


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_reads_wait_and_writes_do_not(h_wait_spy, method):
    h, waited = h_wait_spy
    job_id = h.submit()
    h.route(f"/jobs/{job_id}", method, b"wait=0.01")
    h.route(f"/jobs/{job_id}/cancel", "POST", b"wait=5")
    assert waited == [(job_id, 0.01)]


@pytest.fixture
def h_wait_spy(monkeypatch):
    h = Harness()
    waited: list[tuple[str, float]] = []
    monkeypatch.setattr(h.core, "wait", lambda job_id, timeout: waited.append((job_id, timeout)))
    return h, waited


def test_nothing_is_left_to_wait_for_once_a_job_ends_or_is_gone():
    h = Harness()
    job_id = h.submit()
    assert not h.core.is_finished(job_id)
    h.core.cancel(job_id)
    assert h.core.is_finished(job_id)
    assert h.core.is_finished("b" * 32)


def test_cancel_wakes_long_polls_and_stops_a_local_attempt():
    h = Harness()
    job_id = h.submit()
    h.claim()
    woken: list[str] = []
    h.notifier.subscribe(job_id, lambda: woken.append(job_id))
    h.core.cancel(job_id)
    assert woken == [job_id]
    assert h.launcher.last(job_id).cancel_calls == 1


def test_progress_and_outcomes_wake_long_polls():
    h = Harness()
    job_id = h.submit()
    h.claim()
    woken: list[str] = []
    h.notifier.subscribe(job_id, lambda: woken.append(job_id))
    h.launcher.last(job_id).progress(0.5)
    assert woken == [job_id]
    h.launcher.last(job_id).respond()
    assert woken == [job_id, job_id]


def test_a_reaped_job_wakes_its_long_polls():
    h = Harness()
    job_id = h.submit()
    h.store.claim("dead", 1, h.config.lease_seconds)
    woken: list[str] = []
    h.notifier.subscribe(job_id, lambda: woken.append(job_id))
    h.advance(h.config.lease_seconds + 1)
    h.claim()
    assert woken == [job_id]


# -- the queue bound ---------------------------------------------------------


def test_the_queue_is_counted_at_most_twice_a_second(monkeypatch):
    h = Harness(max_queued=100)
    count = spy(monkeypatch, h.store, "count")
    h.submit()
    h.submit()
    assert count.count == 1
    h.advance(0.49)
    h.submit()
    assert count.count == 1
    h.advance(0.01)
    h.submit()
    assert count.count == 2


def test_without_a_bound_the_queue_is_never_counted(monkeypatch):
    h = Harness()
    count = spy(monkeypatch, h.store, "count")
    for _ in range(3):
        h.submit()
        h.advance(1)
    assert count.count == 0


def test_accepts_between_counts_are_counted_too():
    h = Harness(max_queued=3)
    for _ in range(3):
        h.submit()
    with pytest.raises(QueueFull):
        h.submit()
    h.advance(1)
    h.core.cancel(h.store.list()[0].id)  # one place frees up, seen at the next count
    h.submit()
    with pytest.raises(QueueFull):
        h.submit()


def test_queue_full_is_a_503_with_retry_after_from_the_config():
    h = Harness(retry_after=9)
    assert dict(h.core.refused(QueueFull()).headers)["retry-after"] == "9"
    assert dict(h.core.refused(StoreUnavailable("x")).headers)["retry-after"] == "9"


# -- the executor ------------------------------------------------------------


def test_claiming_waits_for_a_useful_batch_while_busy():
    h = Harness(concurrency=8)  # a batch is at least 2
    ids = [h.submit() for _ in range(10)]
    assert h.claim() == 8
    h.launcher.last(ids[0]).respond()
    assert h.claim() == 0  # one free slot while busy: wait for more
    h.launcher.last(ids[1]).respond()
    assert h.claim() == 2


def test_the_claim_loop_is_woken_only_when_its_next_step_would_claim():
    h = Harness(concurrency=8, poll_interval=1.0)  # a batch is at least 2
    ids = [h.submit() for _ in range(12)]
    assert h.claim() == 8
    wake = h.dispatcher._wake
    wake.clear()
    h.launcher.last(ids[0]).respond()
    assert not wake.is_set()  # one free slot, and a claim was just made
    h.launcher.last(ids[1]).respond()
    assert wake.is_set()  # a batch fits
    assert h.claim() == 2
    wake.clear()
    h.advance(1.0)
    h.launcher.last(ids[2]).respond()
    assert wake.is_set()  # one slot, but a poll interval has passed
    wake.clear()
    h.launcher.last(ids[3]).end(None)  # cancelled: its slot is free at once
    assert wake.is_set()


def test_with_every_slot_taken_no_claim_is_made_however_long_since_the_last(monkeypatch):
    h = Harness(concurrency=2, poll_interval=1.0)
    for _ in range(3):
        h.submit()
    assert h.claim() == 2
    claims = spy(monkeypatch, h.store, "claim")
    h.advance(5.0)
    assert h.claim() == 0
    assert claims.count == 0  # not even a claim of nothing


def test_a_free_slot_is_filled_within_a_poll_interval_while_long_jobs_run():
    """Seven long jobs and one free slot: the queued job must not wait for
    a batch of two to fit."""
    h = Harness(concurrency=8, poll_interval=1.0)
    first = [h.submit() for _ in range(7)]
    assert h.claim() == 7
    waiting = h.submit()
    h.advance(0.5)
    assert h.claim() == 0  # soon after a claim: wait for a batch
    h.advance(0.5)
    assert h.claim() == 1  # a poll interval on: take what fits
    assert h.launcher.count(waiting) == 1
    assert len(first) + 1 == len(h.dispatcher.running)


def test_an_idle_wait_ends_at_a_commit_a_wake_up_or_the_poll_interval():
    answers = iter([False, False, True])
    looks: list[bool] = []

    def committed() -> bool:
        looks.append(next(answers))
        return looks[-1]

    wake = threading.Event()
    wait_for_work(wake, 600, committed)  # only the commit can end it in time
    assert looks == [False, False, True]
    wake.set()
    wait_for_work(wake, 600, lambda: pytest.fail("woken: nothing to look at"))
    wake.clear()
    wait_for_work(wake, 0.02, lambda: False)  # nothing committed: the poll interval ends it
    wait_for_work(wake, 0.02, None)  # no watch: the poll interval alone


@pytest.mark.parametrize("running, watched", [(1, True), (2, False)])
def test_the_claim_loop_watches_for_commits_only_with_a_slot_free(monkeypatch, running, watched):
    """With every slot taken a new job could not be claimed anyway: only a
    slot coming free (a wake-up) or the poll interval ends the wait."""
    h = Harness(concurrency=2, poll_interval=1.0)
    for _ in range(running):
        h.submit()

    def watch() -> bool:
        return False

    monkeypatch.setattr(h.store, "commit_watch", lambda: watch)
    waits: list[object] = []

    def wait(wake: threading.Event, timeout: float, committed: object) -> None:
        waits.append(committed)
        h.dispatcher._stopping.set()

    monkeypatch.setattr(dispatch, "wait_for_work", wait)
    h.dispatcher._claim_loop()
    assert len(h.dispatcher.running) == running
    assert waits == [watch if watched else None]


def test_housekeeping_runs_on_its_own_schedule(monkeypatch):
    h = Harness(lease_seconds=30)
    reap, prune = Calls(h.store.reap_expired), Calls(h.store.prune)
    monkeypatch.setattr(h.store, "reap_expired", reap)
    monkeypatch.setattr(h.store, "prune", prune)
    h.claim()
    assert (reap.count, prune.count) == (1, 1)
    h.advance(14.9)
    h.claim()
    assert (reap.count, prune.count) == (1, 1)
    h.advance(0.1)  # half a lease
    h.claim()
    assert (reap.count, prune.count) == (2, 1)
    h.advance(45)  # a minute since the first prune
    h.claim()
    assert (reap.count, prune.count) == (3, 2)


def test_leases_are_renewed_every_third_of_their_time(monkeypatch):
    h = Harness(lease_seconds=30)
    h.submit()
    h.claim()
    renew = spy(monkeypatch, h.store, "renew")
    h.advance(9.9)
    h.tend()
    assert renew.count == 0
    h.advance(0.1)
    h.tend()
    assert renew.count == 1
    h.advance(9.9)
    h.tend()
    assert renew.count == 1
    h.advance(0.1)
    h.tend()
    assert renew.count == 2


def test_a_store_that_is_down_does_not_stop_the_executor(monkeypatch):
    h = Harness()
    job_id = h.submit()
    h.claim()

    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("down")

    for name in ("claim", "renew", "reap_expired"):
        monkeypatch.setattr(h.store, name, down)
    h.advance(h.config.lease_seconds)
    assert h.claim() == 0
    h.tend()  # renewing fails, and the attempt is kept
    assert job_id in h.dispatcher.running


def test_a_failing_claim_is_logged_and_survived(monkeypatch, caplog):
    h = Harness()

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.store, "claim", broken)
    assert h.claim() == 0
    assert "claiming jobs failed" in caplog.text


def test_a_replay_cancelled_from_outside_frees_its_slot():
    h = Harness()
    job_id = h.submit()
    h.claim()
    h.launcher.last(job_id).end(None)  # e.g. its event loop shut down
    assert not h.dispatcher.running
    assert h.job(job_id).status is Status.RUNNING  # its lease will expire


def test_outcomes_waiting_for_their_write_free_their_slots_up_to_the_concurrency(monkeypatch):
    """A handler that returned frees its slot at once, even while the store
    cannot take its outcome; but no more than ``concurrency`` such outcomes
    are held, and once written they free nothing twice."""
    h = Harness(concurrency=4)
    ids = [h.submit() for _ in range(16)]
    write = h.store.write

    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "write", down)
    assert h.claim() == 4
    for job_id in ids[:4]:
        h.launcher.last(job_id).respond()
    assert h.claim() == 4  # four outcomes held, four handlers free to start
    for job_id in ids[4:8]:
        h.launcher.last(job_id).respond()
    h.advance(1)
    assert h.claim() == 0  # eight held: the concurrency is spent
    monkeypatch.setattr(h.store, "write", write)
    h.tend()  # written again
    assert not h.dispatcher.running
    assert all(h.job(job_id).status is Status.SUCCEEDED for job_id in ids[:8])
    assert h.claim() == 4  # the slots freed by the held outcomes are not freed again
    monkeypatch.setattr(h.store, "write", down)
    for job_id in ids[8:10]:
        h.launcher.last(job_id).respond()
    h.dispatcher.stop(grace=0)  # nothing runs here any more, held or not
    assert not h.dispatcher.running
    assert h.dispatcher._busy() == 0


def test_an_ended_attempt_is_freed_by_reference_counting_alone():
    """No reference cycle through an attempt: a worker would otherwise
    leave every job's attempt, task and context to the cyclic collector."""
    h = Harness()
    job_id = h.submit()
    gc.disable()
    try:
        assert h.claim() == 1
        attempt = weakref.ref(h.dispatcher.running[job_id])
        run = h.launcher.last(job_id)
        run.progress(0.5, "half")
        run.respond()
        assert h.job(job_id).status is Status.SUCCEEDED
        h.launcher.launched.clear()  # the launcher's own record of the replay
        del run
        assert attempt() is None
    finally:
        gc.enable()


def test_shutdown_waits_no_longer_than_its_grace():
    h = Harness()
    job_id = h.submit()
    h.claim()
    h.dispatcher.stop(grace=0.05)  # the replay never ends by itself
    assert h.job(job_id).status is Status.QUEUED


def test_shutdown_survives_a_store_that_is_down(monkeypatch, caplog):
    h = Harness()
    job_id = h.submit()
    h.claim()

    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "write", down)
    h.dispatcher.stop(grace=0)
    assert h.job(job_id).status is Status.RUNNING  # its lease will expire
    assert "not returned to the queue" in caplog.text


def test_the_executor_threads_run_jobs_and_stop():
    h = Harness(poll_interval=0.01)
    h.dispatcher.monotonic = time.monotonic  # real time for real threads
    h.dispatcher._next_renew = 0
    h.dispatcher.start()
    threads = list(h.dispatcher._threads)
    assert {t.name for t in threads} == {"deferred-claim", "deferred-lease"}
    assert all(t.daemon for t in threads)
    job_id = h.submit()
    eventually(lambda: h.launcher.count(job_id) == 1, timeout=10)
    h.launcher.last(job_id).respond()
    h.dispatcher.stop(grace=5)
    assert h.job(job_id).status is Status.SUCCEEDED
    assert not any(t.is_alive() for t in threads)


def test_a_store_that_pushes_wake_ups_gets_a_listener(monkeypatch):
    h = Harness(poll_interval=60)
    listened = threading.Event()

    def listen(channel: str, heard: Any, stopped: threading.Event) -> None:
        assert channel == "deferred_jobs"
        listened.set()
        stopped.wait()

    monkeypatch.setattr(h.store, "pushes_wakeups", True)
    monkeypatch.setattr(h.store, "listen", listen)
    h.dispatcher.start()
    assert "deferred-listen" in {t.name for t in h.dispatcher._threads}
    assert listened.wait(10)
    h.dispatcher.stop(grace=0)
    assert h.dispatcher._threads == []


def test_workers_have_distinct_names_with_their_host():
    first, second = worker_name(), worker_name()
    assert first != second
    assert re.fullmatch(r"[^:]+:[0-9a-f]{12}", first)


# -- the job URLs ------------------------------------------------------------


def test_each_root_path_gets_its_own_job_urls_past_the_bound_of_those_kept():
    h = Harness()
    request = StoredRequest("POST", "/reports", b"", [], b"{}")
    job = h.core.accept(request, DeferredOptions())
    root_paths = [f"/app{n}" for n in range(protocol.JobURLsByRootPath.LIMIT + 2)]
    for root_path in [*root_paths, *root_paths]:
        location = dict(h.core.accepted(job, root_path).headers)["operation-location"]
        assert location == f"{root_path}/jobs/{job.id}"
    assert 0 < len(h.core._urls._built) <= protocol.JobURLsByRootPath.LIMIT


def test_job_urls_are_built_once_per_root_path_and_never_kept_past_the_bound():
    urls = protocol.JobURLsByRootPath("/jobs", None)
    first = urls.of("/a")
    assert urls.of("/a") is first and first.base == "/a/jobs"
    assert urls.of("/b") is not first and urls.of("/b").base == "/b/jobs"
    for n in range(urls.LIMIT + 1):
        urls.of(f"/app{n}")
        assert len(urls._built) <= urls.LIMIT


# -- finding @deferred markers ------------------------------------------------


def test_markers_are_found_through_bound_methods_and_wrappers():
    class Views:
        @deferred(retries=3)
        def report(self) -> None: ...

    def logged(view: Any) -> Any:
        @functools.wraps(view)
        def wrapper(*args: Any) -> Any:
            return view(*args)

        return wrapper

    assert options_of(Views().report) == DeferredOptions(retries=3)
    wrapped = logged(deferred(timeout=5)(lambda: None))
    assert options_of(wrapped) == DeferredOptions(timeout=5)
    assert options_of(logged(logged(deferred(lambda: None)))) == DeferredOptions()
    outer = deferred(retries=1)(logged(deferred(retries=2)(lambda: None)))
    assert options_of(outer) == DeferredOptions(retries=1)  # the outermost marker wins

    def selfish() -> None: ...

    selfish.__wrapped__ = selfish  # type: ignore[attr-defined]
    assert options_of(selfish) is None
    assert options_of(None) is None
    assert options_of(Views().report.__func__) == DeferredOptions(retries=3)


def test_a_bad_pattern_names_itself():
    with pytest.raises(ValueError, match="'POST reports'"):
        RoutePatterns(["POST reports"])


# -- requests that get no job ------------------------------------------------


def accept(h: Harness, **request: Any) -> Any:
    return h.core.accept(StoredRequest(**{"method": "POST", "path": "/r", **request}), OPTIONS)


OPTIONS = DeferredOptions()


def test_headers_over_the_limit_get_431_and_no_job():
    h = Harness(max_header_size=100)
    accept(h, headers=[("x", "v" * 99)])  # 100 bytes: at the limit
    with pytest.raises(HeadersTooLarge) as refused:
        accept(h, headers=[("x", "v" * 50), ("y", "v" * 49)])
    assert h.core.refused(refused.value).status == 431
    assert h.store.count(Status.QUEUED) == 1


@pytest.mark.parametrize(
    ("request_fields", "detail"),
    [
        ({"method": "X" * 17}, "The request method cannot be stored."),
        ({"method": "GET POST"}, "The request method cannot be stored."),
        ({"method": ""}, "The request method cannot be stored."),
        ({"path": "/r\x00"}, "The request contains a NUL character."),
        ({"root_path": "/a\x00"}, "The request contains a NUL character."),
        ({"headers": [("x", "a\x00b")]}, "The request contains a NUL character."),
    ],
)
def test_a_request_the_table_cannot_keep_gets_400_and_no_job(request_fields, detail):
    h = Harness()
    with pytest.raises(NotStorable) as refused:
        accept(h, **request_fields)
    reply = h.core.refused(refused.value)
    assert (reply.status, json.loads(reply.body)["detail"]) == (400, detail)
    assert h.store.count(Status.QUEUED) == 0
    accept(h, method="X" * 16)  # the longest method that fits
    assert h.store.count(Status.QUEUED) == 1


def test_a_chunked_request_is_replayed_with_its_length():
    h = Harness()
    job = accept(
        h,
        headers=[("transfer-encoding", "chunked"), ("content-length", "99"), ("x", "1")],
        body=b"hello",
    )
    stored = h.store.get(job.id, request=True).request
    assert stored.headers == [("x", "1"), ("content-length", "5")]
    assert stored.body == b"hello"


@pytest.mark.parametrize(
    ("path", "raw", "tail"),
    [
        (f"/jobs/{'a' * 32}/result", f"/jobs/{'a' * 32}/result", f"/{'a' * 32}/result"),
        (f"/jobs/{'a' * 32}/result", f"/jobs/{'a' * 32}%2Fresult", protocol.UNROUTABLE),
        (f"/jobs/{'a' * 32}", f"/root/jobs/{'a' * 32}", f"/{'a' * 32}"),
        (f"/jobs/{'a' * 32}", None, f"/{'a' * 32}"),
        ("/jobsx", "/jobsx", None),
        ("/other", "/other", None),
    ],
)
def test_job_routes_are_routed_on_the_path_as_sent(path, raw, tail):
    h = Harness()
    assert protocol.job_route_tail("/jobs", path, raw) == tail
    if tail == protocol.UNROUTABLE:
        assert h.core.answer(tail, "GET", b"", "").status == 404


# -- outages -----------------------------------------------------------------


class Outage:
    """Makes some store methods fail as a database that is down would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Any, *names: str) -> None:
        self.down = False
        for name in names:
            real = getattr(store, name)
            monkeypatch.setattr(store, name, self._guard(real))

    def _guard(self, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("down")
            return real(*args, **kwargs)

        return call


def test_an_outage_longer_than_a_lease_does_not_make_a_worker_reap_its_own_jobs(monkeypatch):
    h = Harness(lease_seconds=30)
    job_id = h.submit(retries=1)
    h.claim()
    outage = Outage(monkeypatch, h.store, "claim", "renew", "reap_expired", "write", "prune")
    outage.down = True
    for _ in range(10):  # 100 s without the database
        h.advance(10)
        h.tend()
        h.claim()
    outage.down = False
    h.claim()  # the first thing it does with the database back
    assert h.job(job_id).status is Status.RUNNING
    assert h.job(job_id).attempts == 1
    h.launcher.last(job_id).respond(200)
    assert h.job(job_id).status is Status.SUCCEEDED
    assert h.launcher.count(job_id) == 1


def test_while_the_store_is_away_leases_are_retried_every_second(monkeypatch):
    h = Harness(lease_seconds=30)
    h.submit()
    h.claim()
    outage = Outage(monkeypatch, h.store, "renew")
    renew = spy(monkeypatch, h.store, "renew")
    outage.down = True
    h.advance(10)
    h.tend()
    assert renew.count == 1
    h.advance(0.5)
    h.tend()
    assert renew.count == 1
    h.advance(0.5)
    h.tend()
    assert renew.count == 2


# -- the writer ---------------------------------------------------------------


class ThreadOnlyStore(MemoryJobStore):
    """Never inserts at once, as a file another process is writing: every
    round goes to the writer's thread."""

    def insert_at_once(self, jobs: Any) -> bool:
        return False


def queued_job(path: str = "/r") -> Job:
    """A new job as admission makes it, for the writer to store."""
    return Harness().core.admission.new_job(StoredRequest("POST", path), OPTIONS)


def insert_in_one_round(writer: BatchWriter, paths: list[str]) -> list[asyncio.Future[Any]]:
    """On the running loop, with no await between: one job per path,
    accepted in one round of its callbacks. Answers their waiters."""
    loop = asyncio.get_running_loop()
    waiters = [loop.create_future() for _ in paths]
    for path, waiter in zip(paths, waiters, strict=True):
        writer.insert(queued_job(path), waiter)
    return waiters


async def outcomes_of(waiters: list[asyncio.Future[Any]]) -> list[Any]:
    """Each waiter's result or exception, within ten seconds."""
    return await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 10)


def test_the_writer_outlives_a_waiter_that_gave_up(caplog):
    store = MemoryJobStore()
    writer = BatchWriter(store)
    abandoned: Future[None] = Future()
    abandoned.cancel()
    writer.insert(queued_job("/a"), abandoned)
    later: Future[None] = Future()
    writer.insert(queued_job("/b"), later)
    assert later.result(timeout=10) is None
    assert store.count(Status.QUEUED) == 2
    thread = writer._thread
    assert thread is not None
    writer.stop()
    assert not thread.is_alive()  # stopped: what was queued is written, the thread ended
    assert caplog.text == ""  # no one to tell of new jobs is no error
    third: Future[None] = Future()
    writer.insert(queued_job("/c"), third)
    assert third.result(timeout=10) is None  # a stopped writer starts again
    writer.stop()


def test_committed_jobs_are_told_in_the_writer_thread_before_their_waiters():
    """An executor in this process must hear of a new job at the commit,
    not once the event loop has answered the 202."""
    writer = BatchWriter(MemoryJobStore())
    jobs = [queued_job(f"/{n}") for n in range(3)]
    waiters: list[Future[None]] = [Future() for _ in jobs]
    waiter_of = {job.id: waiter for job, waiter in zip(jobs, waiters, strict=True)}
    told: list[tuple[list[str], str, list[bool]]] = []

    def tell(batch: list[Any]) -> None:
        thread = threading.current_thread().name
        told.append(([job.id for job in batch], thread, [waiter_of[j.id].done() for j in batch]))

    writer.tell_committed(tell)
    for job, waiter in zip(jobs, waiters, strict=True):
        writer.insert(job, waiter)
    for waiter in waiters:
        waiter.result(timeout=10)
    writer.stop()
    assert sorted(job_id for ids, _, _ in told for job_id in ids) == sorted(j.id for j in jobs)
    assert {name for _, name, _ in told} == {"deferred-writer"}
    assert not any(done for _, _, dones in told for done in dones)


def test_a_hook_that_fails_costs_no_waiter_its_answer(caplog):
    """The rows are committed whatever the hook does: their requests get a 202."""
    store = MemoryJobStore()
    writer = BatchWriter(store)

    def broken(batch: list[Any]) -> None:
        raise RuntimeError("a log handler that fails")

    writer.tell_committed(broken)
    waiter: Future[None] = Future()
    writer.insert(queued_job(), waiter)
    assert waiter.result(timeout=10) is None
    writer.stop()
    assert store.count(Status.QUEUED) == 1
    assert "telling of committed jobs failed" in caplog.text


def test_jobs_accepted_in_one_round_of_the_loop_reach_the_writer_together():
    """Held until the loop has run the callbacks that were ready, then
    handed over as one: the writer wakes once per round, not at the first."""
    store = ThreadOnlyStore()
    batches: list[int] = []
    insert = store.insert
    store.insert = lambda jobs: (batches.append(len(jobs)), insert(jobs))[1]  # type: ignore[method-assign]
    writer = BatchWriter(store)

    async def one_round() -> None:
        waiters = insert_in_one_round(writer, ["/0", "/1", "/2"])
        assert writer._queue.empty()  # nothing handed over before the round ends
        await asyncio.wait_for(asyncio.gather(*waiters), 10)

    asyncio.run(one_round())
    writer.stop()
    assert batches == [3]
    assert store.count(Status.QUEUED) == 3


def test_a_round_the_store_takes_at_once_is_stored_on_the_loop_without_the_thread():
    """One insert for the round, in the loop's own thread, told before any
    request hears of it; no thread is started for it."""
    store = MemoryJobStore()
    inserts: list[tuple[int, str]] = []
    insert_at_once = store.insert_at_once

    def spied(jobs: list[Any]) -> bool:
        inserts.append((len(jobs), threading.current_thread().name))
        return insert_at_once(jobs)

    store.insert_at_once = spied  # type: ignore[method-assign]
    writer = BatchWriter(store)
    told: list[tuple[int, str, bool]] = []

    async def one_round() -> None:
        waiters = insert_in_one_round(writer, ["/0", "/1", "/2"])
        writer.tell_committed(
            lambda jobs: told.append(
                (len(jobs), threading.current_thread().name, any(w.done() for w in waiters))
            )
        )
        assert await outcomes_of(waiters) == [None, None, None]

    asyncio.run(one_round())
    loop_thread = threading.current_thread().name
    assert inserts == [(3, loop_thread)]
    assert told == [(3, loop_thread, False)]
    assert writer._thread is None
    assert store.count(Status.QUEUED) == 3


def test_a_round_that_fails_to_go_in_at_once_is_stored_by_the_thread(caplog):
    """Whatever the insert at once raised, nothing of it was stored: the
    thread stores the round, and no request hears of the failure."""
    caplog.set_level("DEBUG", logger="deferred_middleware")
    store = MemoryJobStore()

    def unavailable(jobs: list[Any]) -> bool:
        raise StoreUnavailable("a connection that failed")

    store.insert_at_once = unavailable  # type: ignore[method-assign]
    writer = BatchWriter(store)

    async def one_round() -> list[Any]:
        return await outcomes_of(insert_in_one_round(writer, ["/0", "/1"]))

    assert asyncio.run(one_round()) == [None, None]
    writer.stop()
    assert store.count(Status.QUEUED) == 2
    assert "inserting at once failed" in caplog.text


class CheckpointingStore(MemoryJobStore):
    """Says a checkpoint is due after each of its first ``due`` rounds
    inserted at once; records the thread of each checkpoint, failing the
    first ``failing`` of them."""

    def __init__(self, due: int, failing: int = 0) -> None:
        super().__init__()
        self.due, self.failing = due, failing
        self.checkpoints: list[str] = []
        self.checkpointed = threading.Event()

    def checkpoint_due(self) -> bool:
        self.due -= 1
        return self.due >= 0

    def checkpoint(self) -> None:
        self.checkpoints.append(threading.current_thread().name)
        self.checkpointed.set()
        if len(self.checkpoints) <= self.failing:
            raise OSError("disk I/O error")


def test_inserts_at_once_leave_the_checkpoint_to_the_writer_thread():
    store = CheckpointingStore(due=1)
    writer = BatchWriter(store)

    async def two_rounds() -> None:
        for round_ in ("a", "b"):
            await outcomes_of(insert_in_one_round(writer, [f"/{round_}"]))

    asyncio.run(two_rounds())
    assert store.checkpointed.wait(10)
    writer.stop()
    assert store.checkpoints == ["deferred-writer"]  # once: only the first round said so
    assert store.count(Status.QUEUED) == 2


def test_a_checkpoint_that_fails_is_logged_and_the_writer_goes_on(caplog):
    store = CheckpointingStore(due=2, failing=1)
    writer = BatchWriter(store)

    async def one_round(path: str) -> list[Any]:
        return await outcomes_of(insert_in_one_round(writer, [path]))

    assert asyncio.run(one_round("/a")) == [None]
    assert store.checkpointed.wait(10)
    store.checkpointed.clear()
    assert asyncio.run(one_round("/b")) == [None]
    assert store.checkpointed.wait(10)
    writer.stop()
    assert store.checkpoints == ["deferred-writer", "deferred-writer"]
    assert "checkpointing the job table's log failed" in caplog.text
    assert "OSError: disk I/O error" in caplog.text


def test_a_checkpoint_that_fails_outright_costs_the_writer_thread_nothing(caplog):
    """Past what a checkpoint can raise (a BaseException): logged, and the
    thread goes on to store what it is given next."""

    class Crash(BaseException):
        pass

    store = CheckpointingStore(due=1)
    checkpoint = store.checkpoint

    def crash() -> None:
        checkpoint()
        raise Crash

    store.checkpoint = crash  # type: ignore[method-assign]
    writer = BatchWriter(store)

    async def one_round() -> list[Any]:
        return await outcomes_of(insert_in_one_round(writer, ["/a"]))

    assert asyncio.run(one_round()) == [None]
    assert store.checkpointed.wait(10)
    thread = writer._thread
    later: Future[None] = Future()  # a WSGI thread's accept: always the thread's
    writer.insert(queued_job("/later"), later)
    assert later.result(timeout=10) is None
    assert writer._thread is thread  # the same thread, not one started again
    writer.stop()
    assert "the job writer failed a batch" in caplog.text
    assert store.count(Status.QUEUED) == 2


@pytest.mark.parametrize("store_kind", [MemoryJobStore, ThreadOnlyStore])
def test_loops_in_several_threads_each_hand_over_their_own_jobs(store_kind):
    store = store_kind()
    writer = BatchWriter(store)
    all_gathered = threading.Barrier(4)

    async def accept(thread: int) -> None:
        waiters = insert_in_one_round(writer, [f"/{thread}/{n}" for n in range(5)])
        all_gathered.wait(10)  # every loop holds jobs of its round at once
        await asyncio.wait_for(asyncio.gather(*waiters), 10)

    threads = [threading.Thread(target=asyncio.run, args=(accept(t),)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    writer.stop()
    assert store.count(Status.QUEUED) == 20


def test_a_writer_that_cannot_start_answers_its_waiters_and_tries_again(monkeypatch, caplog):
    """A thread that could not start must not leave accepts queued for it."""
    store = ThreadOnlyStore()
    writer = BatchWriter(store)
    start = threading.Thread.start

    def cannot_start(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def accept(path: str) -> str:
        waiter = asyncio.get_running_loop().create_future()
        job = queued_job(path)
        writer.insert(job, waiter)
        await asyncio.wait_for(waiter, 10)
        return job.id

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(StoreUnavailable):
        asyncio.run(accept("/refused"))
    assert "could not take accepted jobs" in caplog.text
    monkeypatch.setattr(threading.Thread, "start", start)
    later = asyncio.run(accept("/later"))
    writer.stop()
    assert [job.id for job in store.list()] == [later]


def test_a_batch_that_fails_outright_answers_each_waiter_and_the_writer_goes_on(caplog):
    """Past the store's own errors (a BaseException): every gathered job's
    request hears StoreUnavailable, and the next round is written."""

    class Crash(BaseException):
        pass

    store = ThreadOnlyStore()
    insert, crashes = store.insert, [Crash()]

    def insert_or_crash(jobs: list[Any]) -> None:
        if crashes:
            raise crashes.pop()
        insert(jobs)

    store.insert = insert_or_crash  # type: ignore[method-assign]
    writer = BatchWriter(store)

    async def one_round(size: int) -> list[Any]:
        return await outcomes_of(insert_in_one_round(writer, ["/r"] * size))

    failed = asyncio.run(one_round(2))
    assert [type(outcome) for outcome in failed] == [StoreUnavailable, StoreUnavailable]
    assert "the job writer failed a batch" in caplog.text
    assert asyncio.run(one_round(1)) == [None]
    writer.stop()
    assert store.count(Status.QUEUED) == 1


@pytest.mark.parametrize("store_kind", [MemoryJobStore, ThreadOnlyStore])
def test_a_request_that_left_costs_the_rest_of_its_round_nothing(store_kind):
    """Its future is cancelled; those resolved after it in the same batch
    still hear of their commit."""
    writer = BatchWriter(store_kind())

    async def one_round() -> list[Any]:
        waiters = insert_in_one_round(writer, ["/r"] * 3)
        waiters[0].cancel()  # the client went away
        return await asyncio.wait_for(asyncio.gather(*waiters[1:]), 10)

    assert asyncio.run(one_round()) == [None, None]
    writer.stop()


def test_a_loop_that_closed_before_its_commit_costs_the_writer_nothing():
    """Nobody is left to answer; the thread goes on to the next batch."""
    store = ThreadOnlyStore()
    entered, release = threading.Event(), threading.Event()
    insert = store.insert

    def slow_insert(jobs: list[Any]) -> None:
        entered.set()
        release.wait(10)
        insert(jobs)

    store.insert = slow_insert  # type: ignore[method-assign]
    writer = BatchWriter(store)

    async def accept_then_leave() -> None:
        insert_in_one_round(writer, ["/gone"])
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)  # being written

    asyncio.run(accept_then_leave())  # the loop closes mid-commit
    release.set()
    later: Future[None] = Future()
    writer.insert(queued_job("/later"), later)
    assert later.result(timeout=10) is None
    writer.stop()
    assert store.count(Status.QUEUED) == 2


def test_jobs_stored_one_by_one_after_a_failed_batch_are_told_too():
    """A bad row fails only itself; the rest are stored alone, and the
    log, the metrics and the executor hear of each. The round that failed
    to go in at once goes to the thread, which finds the bad one."""
    store = MemoryJobStore()
    insert = store._insert

    def refuse_the_bad(jobs: list[Any]) -> None:
        if any(job.request.path == "/bad" for job in jobs):
            raise ValueError("unstorable")
        insert(jobs)

    store._insert = refuse_the_bad  # type: ignore[method-assign]
    writer = BatchWriter(store)
    told: list[str] = []
    writer.tell_committed(lambda batch: told.extend(job.request.path for job in batch))

    async def one_round() -> list[Any]:
        return await outcomes_of(insert_in_one_round(writer, ["/a", "/bad", "/b"]))

    outcomes = asyncio.run(one_round())
    assert [type(outcome) for outcome in outcomes] == [type(None), Unstorable, type(None)]
    assert sorted(told) == ["/a", "/b"]
    alone: Future[None] = Future()
    writer.insert(queued_job("/c"), alone)
    assert alone.result(timeout=10) is None
    writer.stop()


def test_a_repeated_idempotency_key_is_not_told_as_a_new_job():
    h = Harness()
    told: list[str] = []
    h.writer.tell_committed(lambda batch: told.extend(job.id for job in batch))
    request = StoredRequest("POST", "/r", headers=[("idempotency-key", "k1")])
    first = h.core.accept(request, DeferredOptions())
    again = h.core.accept(request, DeferredOptions())
    assert again.id == first.id
    assert told == [first.id]


def test_a_job_whose_client_left_before_the_commit_was_heard_is_logged_and_woken(caplog):
    """The row is committed: it is accepted, counted and run, though nobody
    is left to hear the 202."""
    caplog.set_level("INFO", logger="deferred_middleware")
    h = Harness(metrics=True)
    woken = Calls(h.dispatcher.wake)
    h.dispatcher.wake = woken  # type: ignore[method-assign]

    async def scenario() -> asyncio.Task[Any]:
        accepting = asyncio.create_task(
            h.core.accept_async(StoredRequest("POST", "/r"), DeferredOptions())
        )
        while not h.store.count(Status.QUEUED):  # committed; the waiter not yet resolved
            await asyncio.sleep(0)
        accepting.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await accepting
        return accepting

    asyncio.run(scenario())
    assert woken.count == 1
    assert re.search(r"job \w+ accepted", caplog.text)
    counted = h.metrics.registry.get_sample_value
    assert counted("deferred_jobs_accepted_total", {"queue": "default"}) == 1


def test_a_renewal_abandons_every_job_taken_back_whatever_settles_beside_it(monkeypatch):
    h = Harness(concurrency=16)
    ids = [h.submit() for _ in range(9)]
    h.claim()
    pending: list[Any] = []

    def written_but_not_yet_heard_of(write: Any) -> Any:
        h.store.write([write])
        pending.append(Future())
        return pending[-1]

    monkeypatch.setattr(h.writer, "write", written_but_not_yet_heard_of)
    for job_id in ids[:8]:
        h.launcher.last(job_id).respond()  # settling: finished in the table
    taken = ids[8]
    h.store.cancel(taken)  # from another process: the CLI, say
    h.advance(h.config.lease_seconds / 3)
    h.tend()
    assert h.launcher.last(taken).cancel_calls == 1
    assert taken not in h.dispatcher.running
    assert all(h.launcher.last(job_id).cancel_calls == 0 for job_id in ids[:8])


def test_a_renewal_that_races_a_written_outcome_abandons_nothing(monkeypatch, caplog):
    h = Harness()
    job_id = h.submit()
    h.claim()
    attempt = h.dispatcher.running[job_id]
    real_write = h.writer.write
    held_back: list[Any] = []

    def write_without_callbacks_yet(write: Any) -> Any:
        h.store.write([write])  # committed, but the dispatcher has not heard yet
        future: Future[None] = Future()
        held_back.append(future)
        return future

    monkeypatch.setattr(h.writer, "write", write_without_callbacks_yet)
    h.launcher.last(job_id).respond()
    h.advance(h.config.lease_seconds / 3)
    h.tend()  # the store no longer calls the job ours: it finished
    assert "abandoning" not in caplog.text
    assert h.launcher.last(job_id).cancel_calls == 0
    held_back[0].set_result(None)
    assert not h.dispatcher.running
    assert attempt.state.value == "done"
    monkeypatch.setattr(h.writer, "write", real_write)


# -- what the mutation run showed unchecked ----------------------------------


def test_a_view_marked_after_it_was_wrapped_is_found_through_the_wrapper():
    def view() -> None: ...

    @functools.wraps(view)
    def wrapper() -> None: ...

    deferred(queue="late")(view)  # marked after wraps() copied its attributes
    assert options_of(wrapper) == DeferredOptions(queue="late")
    assert options_of(functools.wraps(wrapper)(lambda: None)) == DeferredOptions(queue="late")


def test_queues_named_by_marked_views_are_found():
    views = [
        deferred(queue="nightly")(lambda: None),
        deferred(lambda: None),
        lambda: None,
        deferred(queue="mail")(lambda: None),
    ]
    assert queues_of(views) == {"nightly", "mail"}
    assert queues_of([]) == set()


def test_a_job_goes_to_its_route_s_queue_or_else_the_middleware_s():
    h = Harness(queue="billing")
    plain = h.submit()
    routed = h.core.accept(StoredRequest("POST", "/r"), DeferredOptions(queue="nightly")).id
    assert (h.store.get(plain).queue, h.store.get(routed).queue) == ("billing", "nightly")
    assert h.claim() == 1  # the executor runs its own queue
    assert h.launcher.count(plain) == 1
    h.dispatcher.queues = frozenset({"nightly"})
    assert h.claim() == 1
    assert h.launcher.count(routed) == 1


def test_refusals_say_exactly_why():
    h = Harness(max_header_size=100)
    too_large = h.core.refused(HeadersTooLarge())
    assert json.loads(too_large.body)["detail"] == "The request headers exceed 100 bytes."
    refused = h.core.refused(Unstorable())
    assert (refused.status, json.loads(refused.body)["detail"]) == (
        400,
        "The request could not be stored.",
    )


def test_cancel_and_delete_answer_exactly():
    h = Harness()
    job_id = h.submit()
    h.claim()
    h.launcher.last(job_id).respond()
    conflict = h.route(f"/jobs/{job_id}/cancel", "POST")
    assert conflict.status == 409
    assert json.loads(conflict.body) == {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": "The job has already finished.",
    }
    deleted = h.route(f"/jobs/{job_id}", "DELETE")
    assert (deleted.status, deleted.headers, deleted.body) == (204, [], b"")


def test_the_raw_path_may_come_as_bytes():
    path = f"/jobs/{'a' * 32}/result"
    assert protocol.job_route_tail("/jobs", path, f"/jobs/{'a' * 32}%2Fresult".encode()) == (
        protocol.UNROUTABLE
    )
    assert protocol.job_route_tail("/jobs", path, path.encode()) == f"/{'a' * 32}/result"


def test_shutdown_waits_within_a_short_grace():
    h = Harness()
    job_id = h.submit()
    h.claim()
    timer = threading.Timer(0.05, h.launcher.last(job_id).respond)
    timer.start()
    h.dispatcher.stop(grace=0.5)
    timer.join()
    assert h.job(job_id).status is Status.SUCCEEDED


def test_the_executor_threads_enforce_timeouts_and_see_jobs_from_elsewhere():
    """The loops themselves: the lease loop times out a thread that runs on,
    the claim loop finds a job it was not told about at its poll."""
    h = Harness(interruptible=False, poll_interval=0.01)
    h.dispatcher.monotonic = time.monotonic
    h.dispatcher._next_renew = 0
    ticks = spy(pytest.MonkeyPatch(), h.dispatcher, "tend_step")
    h.dispatcher.start()
    eventually(lambda: ticks.count >= 2, timeout=10)  # idle ticks: the loop keeps going
    job = h.core.admission.new_job(StoredRequest("POST", "/r"), DeferredOptions(timeout=0.2))
    h.store.insert([job])  # straight into the table: nobody wakes the executor
    failed = eventually(lambda: (j := h.job(job.id)).status.finished and j, timeout=10)
    assert failed.error == "The job timed out after 0.2 seconds."
    h.dispatcher.stop(grace=0)


def test_a_store_that_pushes_wakes_the_executor_at_once(monkeypatch):
    h = Harness(poll_interval=60)  # only a push can start the job in time
    pushed = threading.Event()

    def listen(channel: str, heard: Any, stopped: threading.Event) -> None:
        while not stopped.is_set():
            if pushed.wait(0.01):
                pushed.clear()
                heard(None)

    monkeypatch.setattr(h.store, "pushes_wakeups", True)
    monkeypatch.setattr(h.store, "listen", listen)
    h.dispatcher.start()
    eventually(lambda: h.dispatcher._wake.is_set() is False, timeout=10)  # idle, waiting
    job = h.core.admission.new_job(StoredRequest("POST", "/r"), DeferredOptions())
    h.store.insert([job])
    pushed.set()
    eventually(lambda: h.launcher.count(job.id) == 1, timeout=10)
    h.launcher.last(job.id).respond()
    h.dispatcher.stop(grace=5)


# -- the change feed ----------------------------------------------------------


def test_the_change_feed_listens_once_a_waiter_arrives_and_wakes_by_id():
    heard_by: list[Any] = []
    listening = threading.Event()

    def listen(heard: Any, stopped: threading.Event) -> None:
        heard_by.append(heard)
        listening.set()
        stopped.wait()

    notifier = Notifier(listen)
    assert heard_by == []  # nobody waits: no connection
    woken: list[str] = []
    notifier.subscribe("a", lambda: woken.append("a"))
    notifier.subscribe("b", lambda: woken.append("b"))
    assert listening.wait(10)
    [heard] = heard_by  # one listener for every waiter
    heard("b,c")
    assert woken == ["b"]
    heard(None)  # reconnected: anything may have changed
    assert sorted(woken) == ["a", "b", "b"]
    notifier.close()
    assert notifier._stopped.is_set()


def test_side_loops_run_beside_the_executor_until_it_stops():
    class Loop:
        name = "side"

        def __init__(self) -> None:
            self.stopping: threading.Event | None = None
            self.ran = threading.Event()

        def run(self, stopping: threading.Event) -> None:
            self.stopping = stopping
            self.ran.set()
            stopping.wait()

    loop = Loop()
    h = Harness()
    h.dispatcher.side_loops = [loop]
    h.dispatcher.start()
    assert loop.ran.wait(10)
    assert "deferred-side" in {t.name for t in h.dispatcher._threads}
    assert not loop.stopping.is_set()
    h.dispatcher.stop(grace=0)
    assert loop.stopping.is_set()
    assert h.dispatcher._threads == []


def test_a_status_poll_with_the_current_tag_gets_304_on_both_faces():
    h = Harness()
    job_id = h.submit()
    first = h.route(f"/jobs/{job_id}")
    tag = dict(first.headers)["etag"]
    held = protocol.Conditions(if_none_match=tag)
    assert h.core.answer(f"/{job_id}", "GET", b"", "", held).status == 304
    assert h.core.answer(f"/{job_id}", "HEAD", b"", "", held).status == 304
    assert asyncio.run(h.core.answer_async(f"/{job_id}", "GET", b"", "", held)).status == 304
    result = h.core.answer(f"/{job_id}/result", "GET", b"", "", held)
    assert result.status == 202  # only the status document is conditional
    h.claim()
    moved = h.core.answer(f"/{job_id}", "GET", b"", "", held)
    assert moved.status == 200
    assert dict(moved.headers)["etag"] != tag
