"""The job lifecycle as a state machine (hypothesis): several workers claim,
renew, finish, fail, get canceled, lose their leases, are reaped, retried
and pruned, in any interleaving, against a model of what the contract says.

Invariants: at most one live attempt per job; a stale attempt's write never
lands; a final state changes only by retry or DELETE; no final row keeps
credentials; an Idempotency-Key names one job for as long as it exists."""

from __future__ import annotations

import dataclasses
import tempfile
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from deferred_middleware._jobs import (
    DEFAULT_CREDENTIAL_HEADERS,
    Finish,
    Progress,
    Requeue,
    RetryLater,
    Status,
    StoredResponse,
)
from deferred_middleware.store import JobStore, MemoryJobStore, SQLJobStore

from .support import FakeClock, make_job

LEASE = 30.0
WORKERS = ("w1", "w2", "w3")
TOKEN = "Bearer lifecycle-secret"
KEYS = ("order-1", "order-2")


@dataclasses.dataclass
class Model:
    status: Status
    attempts: int
    max_attempts: int
    owner: str | None = None
    lease_until: float = 0.0
    due_at: float = 0.0


class Lifecycle(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.now = 0.0  # seconds since the start, the model's clock
        self.store = self.make_store()
        self.model: dict[str, Model] = {}
        self.held: dict[str, dict[str, int]] = {w: {} for w in WORKERS}
        self.seen: dict[str, tuple[int, tuple[object, ...]]] = {}
        self.keys: dict[str, str] = {}  # Idempotency-Key -> the job that claimed it
        self.bodies: dict[str, str] = {}  # job id -> its request digest

    def make_store(self) -> JobStore:
        return MemoryJobStore(credential_headers=DEFAULT_CREDENTIAL_HEADERS, clock=self.clock)

    def teardown(self) -> None:
        self.store.close()

    # -- helpers ---------------------------------------------------------------

    def _running(self, job_id: str, attempt: int) -> bool:
        model = self.model.get(job_id)
        return model is not None and model.status is Status.RUNNING and model.attempts == attempt

    def _end(self, job_id: str, status: Status) -> None:
        model = self.model[job_id]
        model.status, model.owner = status, None

    def _requeue(self, job_id: str, due_in: float) -> None:
        model = self.model[job_id]
        model.status, model.owner, model.due_at = Status.QUEUED, None, self.now + due_in

    # -- rules -----------------------------------------------------------------

    @rule(target=jobs, retries=st.integers(0, 2), secret=st.booleans())
    def submit(self, retries: int, secret: bool) -> str:
        headers = [("authorization", TOKEN)] if secret else []
        job = make_job(retries=retries, headers=headers, created_at=self.clock())
        self.store.insert([job])
        self.model[job.id] = Model(Status.QUEUED, 0, retries + 1, due_at=self.now)
        return job.id

    @rule(key=st.sampled_from(KEYS), body=st.sampled_from([b"{}", b"[]"]))
    def submit_with_a_key(self, key: str, body: bytes) -> None:
        """An Idempotency-Key holds while its job exists, in any state."""
        job = make_job(body=body, idempotency_key=key, created_at=self.clock())
        stored = self.store.insert_once(job)
        holder = self.keys.get(key)
        if holder in self.model:
            assert stored.id == holder
            assert stored.idempotency.request == self.bodies[holder]
            assert self.store.get(job.id) is None
            return
        assert stored is job
        self.keys[key], self.bodies[job.id] = job.id, job.idempotency.request
        self.model[job.id] = Model(Status.QUEUED, 0, 1, due_at=self.now)

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 3))
    def claim(self, worker: str, limit: int) -> None:
        claimed = self.store.claim(worker, limit, LEASE)
        due = [
            i for i, m in self.model.items() if m.status is Status.QUEUED and m.due_at <= self.now
        ]
        assert len(claimed) == min(limit, len(due))
        for job in claimed:
            model = self.model[job.id]
            assert model.status is Status.QUEUED and model.due_at <= self.now, "claimed twice"
            assert job.attempts == model.attempts + 1
            model.status, model.attempts, model.owner = Status.RUNNING, job.attempts, worker
            model.lease_until = self.now + LEASE
            self.held[worker][job.id] = job.attempts

    @rule(worker=st.sampled_from(WORKERS))
    def renew(self, worker: str) -> None:
        held = self.held[worker]
        owned = self.store.renew(worker, dict(held), LEASE)
        expected = {
            i for i, a in held.items() if self._running(i, a) and self.model[i].owner == worker
        }
        assert owned == expected
        for job_id in owned:
            self.model[job_id].lease_until = self.now + LEASE
        for job_id in set(held) - owned:
            del held[job_id]  # abandoned, as the dispatcher does

    @rule(
        data=st.data(),
        worker=st.sampled_from(WORKERS),
        kind=st.sampled_from(["succeed", "fail", "retry later", "requeue", "progress"]),
    )
    def write(self, data: st.DataObject, worker: str, kind: str) -> None:
        """What a worker writes for an attempt it believes it holds; a stale
        belief (taken back, canceled) must not land."""
        held = self.held[worker]
        if not held:
            return
        job_id = data.draw(st.sampled_from(sorted(held)))
        attempt = held[job_id]
        live = self._running(job_id, attempt)
        writes = {
            "succeed": Finish(job_id, attempt, Status.SUCCEEDED, StoredResponse(200, [], b"")),
            "fail": Finish(job_id, attempt, Status.FAILED, error="broke"),
            "retry later": RetryLater(job_id, attempt, 5, "broke"),
            "requeue": Requeue(job_id, attempt),
            "progress": Progress(job_id, attempt, 0.5, "half"),
        }
        landed = self.store.write([writes[kind]])
        assert landed == (1 if live else 0), "a stale attempt's write landed"
        if kind != "progress":
            del held[job_id]
        if not live:
            return
        if kind == "succeed":
            self._end(job_id, Status.SUCCEEDED)
        elif kind == "fail":
            self._end(job_id, Status.FAILED)
        elif kind == "retry later":
            self._requeue(job_id, 5)
        elif kind == "requeue":
            self._requeue(job_id, 0)
            self.model[job_id].attempts -= 1

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        answer = self.store.cancel(job_id)
        model = self.model.get(job_id)
        if model is None:
            assert answer is None
            return
        if model.status in (Status.QUEUED, Status.RUNNING):
            self._end(job_id, Status.CANCELED)
        assert answer.status is model.status

    @rule(seconds=st.sampled_from([1.0, 10.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.now += seconds

    @rule()
    def reap(self) -> None:
        retried, failed = self.store.reap_expired("lost")
        expired = {
            i
            for i, m in self.model.items()
            if m.status is Status.RUNNING and m.lease_until < self.now
        }
        assert set(retried) | set(failed) == expired
        for job_id in expired:
            model = self.model[job_id]
            if model.attempts < model.max_attempts:
                assert job_id in retried
                self._requeue(job_id, 0)
            else:
                assert job_id in failed
                self._end(job_id, Status.FAILED)

    @rule(job_id=jobs)
    def operator_retry(self, job_id: str) -> None:
        model = self.model.get(job_id)
        retried = self.store.retry(job_id)
        allowed = model is not None and model.status in (Status.FAILED, Status.CANCELED)
        assert retried == allowed
        if allowed:
            model.max_attempts = model.attempts + model.max_attempts
            self._requeue(job_id, 0)

    @rule(job_id=consumes(jobs))
    def delete(self, job_id: str) -> None:
        assert self.store.delete(job_id) == (job_id in self.model)
        self.model.pop(job_id, None)

    @precondition(lambda self: self.model)
    @rule(age=st.sampled_from([0.0, 5.0, 100.0]))
    def prune(self, age: float) -> None:
        """Prune jobs finished more than ``age`` seconds ago; the model keeps
        only what a prune at that age must leave."""
        self.store.prune(self.clock() - timedelta(seconds=age))
        for job_id in list(self.model):
            if self.model[job_id].status.finished and self.store.get(job_id) is None:
                del self.model[job_id]

    # -- invariants --------------------------------------------------------------

    @invariant()
    def the_store_agrees_with_the_model(self) -> None:
        for job_id, model in self.model.items():
            job = self.store.get(job_id, request=True)
            assert job is not None, "a job vanished without a DELETE or a prune"
            assert (job.status, job.attempts) == (model.status, model.attempts)
            if job.status.finished:
                assert ("authorization", TOKEN) not in job.request.headers

    @invariant()
    def the_revision_rises_with_every_change_a_client_could_see(self) -> None:
        """What numbers the events of /jobs/{id}/events: never back, and up
        whenever the status document changed."""
        for job_id in self.model:
            job = self.store.get(job_id)
            assert job is not None
            shown = (
                job.status,
                job.attempts,
                job.progress,
                job.message,
                job.error,
                job.started_at,
                job.finished_at,
            )
            if job_id in self.seen:
                revision, before = self.seen[job_id]
                assert job.revision >= revision
                if shown != before:
                    assert job.revision > revision, (before, shown)
            self.seen[job_id] = (job.revision, shown)

    @invariant()
    def at_most_one_live_attempt_per_job(self) -> None:
        live: dict[str, list[str]] = {}
        for worker, held in self.held.items():
            for job_id, attempt in held.items():
                if self._running(job_id, attempt):
                    live.setdefault(job_id, []).append(worker)
        assert all(len(workers) == 1 for workers in live.values()), live


class SQLiteLifecycle(Lifecycle):
    def make_store(self) -> JobStore:
        self.folder = tempfile.TemporaryDirectory()
        store = SQLJobStore(
            f"sqlite:///{self.folder.name}/jobs.db",
            credential_headers=DEFAULT_CREDENTIAL_HEADERS,
            clock=self.clock,
        )
        store.migrate()
        return store

    def teardown(self) -> None:
        super().teardown()
        self.folder.cleanup()


FAST = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycleInMemory = Lifecycle.TestCase
TestLifecycleInMemory.settings = FAST
TestLifecycleOnSQLite = SQLiteLifecycle.TestCase
TestLifecycleOnSQLite.settings = settings(FAST, max_examples=25)


@pytest.fixture(autouse=True)
def _quiet_hypothesis_database(tmp_path, monkeypatch):
    """Examples are not kept between runs: CI starts from a clean clone."""
    monkeypatch.chdir(tmp_path)
