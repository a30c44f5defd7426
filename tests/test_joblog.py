"""One INFO line per job event, with the job's id, queue and route as
``extra`` fields: accepted, started, finished, retried, reaped."""

from __future__ import annotations

import logging

import pytest

from deferred_middleware._jobs import RAISED, DeferredOptions, StoredRequest

from .policy_harness import Harness


@pytest.fixture
def h(caplog) -> Harness:
    caplog.set_level(logging.INFO, "deferred_middleware")
    return Harness(retry_backoff=2.0)


def events(caplog, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "job_id", None) == job_id]


def test_a_job_s_life_is_one_line_per_event(h, caplog):
    job_id = h.submit(retries=1)
    assert h.claim() == 1
    h.advance(0.25)
    h.launcher.last(job_id).respond(503, b"busy")
    h.advance(2.0)
    assert h.claim() == 1
    h.advance(0.5)
    h.launcher.last(job_id).respond(201, b"made")

    lines = events(caplog, job_id)
    assert [r.getMessage().split(":")[0] for r in lines] == [
        f"job {job_id} accepted",
        f"job {job_id} started",
        f"job {job_id} retried",
        f"job {job_id} started",
        f"job {job_id} succeeded",
    ]
    assert {r.levelno for r in lines} == {logging.INFO}
    assert {(r.queue, r.route) for r in lines} == {("default", "POST /reports")}
    retried, succeeded = lines[2], lines[4]
    assert (retried.attempt, retried.outcome, retried.duration_ms) == (1, "retry", 250.0)
    assert retried.error == "The handler answered 503."
    assert (succeeded.attempt, succeeded.outcome, succeeded.status_code) == (2, "succeeded", 201)
    assert succeeded.duration_ms == 500.0
    assert "answered 201 in 500.0 ms" in succeeded.getMessage()
    assert lines[1].worker == h.dispatcher.worker


def test_a_failed_job_says_why(h, caplog):
    job_id = h.submit()
    h.claim()
    h.launcher.last(job_id).end(RAISED)
    [failed] = [r for r in events(caplog, job_id) if getattr(r, "outcome", "") == "failed"]
    assert "The handler raised an exception." in failed.getMessage()
    assert failed.status_code is None


def test_a_reaped_job_is_a_warning(h, caplog):
    job_id = h.submit()
    other = Harness()
    other.store, other.dispatcher.store = h.store, h.store  # a second worker on the same table
    other.clock = other.dispatcher.clock = h.clock
    assert other.claim() == 1  # ... which then dies
    h.advance(h.config.lease_seconds + 0.01)
    h.claim()
    [reaped] = [r for r in events(caplog, job_id) if getattr(r, "outcome", "") == "failed"]
    assert reaped.levelno == logging.WARNING
    assert "worker was lost" in reaped.getMessage()


def test_nothing_is_built_when_info_is_off(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "deferred_middleware")
    h = Harness()
    from deferred_middleware import _joblog

    monkeypatch.setattr(_joblog, "_fields", lambda *a, **k: pytest.fail("built the fields"))
    job_id = h.core.accept(StoredRequest("POST", "/r"), DeferredOptions()).id
    h.claim()
    h.launcher.last(job_id).respond(200, b"")
    assert not events(caplog, job_id)
