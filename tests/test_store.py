"""The job table against SQLite and the real PostgreSQL and MariaDB servers."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from deferred_middleware import migrations
from deferred_middleware._jobs import (
    DeferredOptions,
    Job,
    Status,
    StoredRequest,
    StoredResponse,
    new_job_id,
    utcnow,
)
from deferred_middleware.store import JobStore, StoreUnavailable
from deferred_middleware.store._schema import jobs

HEAD = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()


def make_job(retries: int = 0, body: bytes = b"{}", headers=None) -> Job:
    request = StoredRequest(
        method="POST",
        path="/reports/é",
        query_string=b"a=1&b=%20",
        headers=headers or [("content-type", "application/json")],
        body=body,
        server=("example", 443),
        client=("10.0.0.1", 5555),
        scheme="https",
        root_path="/api",
    )
    return Job(
        id=new_job_id(),
        status=Status.QUEUED,
        created_at=utcnow(),
        request=request,
        options=DeferredOptions(retries=retries, timeout=30),
    )


def insert(store: JobStore, *jobs_: Job) -> None:
    store.insert_rows([store.new_row(job) for job in jobs_])


def test_migrating_is_idempotent_and_safe_to_race(database_url):
    stores = [JobStore(database_url) for _ in range(4)]
    errors: list[BaseException] = []

    def migrate(store: JobStore) -> None:
        try:
            store.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stores[0].migrate()
    with stores[0].engine.connect() as connection:
        version = connection.exec_driver_sql(
            "SELECT version_num FROM deferred_middleware_version"
        ).scalar_one()
    assert version == HEAD
    for store in stores:
        store.close()


def test_a_job_round_trips_exactly(store):
    body = bytes(range(256)) * 1024  # 256 KiB: larger than MySQL's plain BLOB
    headers = [("x-twice", "1"), ("authorization", "Bearer t"), ("x-twice", "2"), ("cookie", "c=1")]
    job = make_job(body=body, headers=headers)
    insert(store, job)
    loaded = store.get(job.id, request=True)
    assert loaded is not None
    assert loaded.request == job.request
    assert loaded.status is Status.QUEUED
    assert loaded.created_at == job.created_at  # microseconds and UTC survive
    assert loaded.options == job.options

    [claimed] = store.claim("w1", 10, 30)
    response = StoredResponse(201, [("set-cookie", "a=1"), ("set-cookie", "b=2")], body)
    assert store.finish(job.id, claimed.attempts, Status.SUCCEEDED, response=response)
    done = store.get(job.id, request=True, response=True)
    assert done.response == response
    assert done.request.header("authorization") is None  # forgotten once finished
    assert done.request.headers == [("x-twice", "1"), ("x-twice", "2")]


def test_concurrent_claims_never_hand_out_a_job_twice(store):
    all_jobs = [make_job() for _ in range(200)]
    insert(store, *all_jobs)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claim_all(index: int) -> None:
        worker = JobStore(store.database_url)
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
    assert store.count(Status.RUNNING) == 200


def expire_leases(store: JobStore) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            jobs.update()
            .where(jobs.c.status == Status.RUNNING.value)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )


def test_a_stale_attempt_cannot_overwrite_the_attempt_that_replaced_it(store):
    job = make_job(retries=1)
    insert(store, job)
    [first] = store.claim("stale", 1, 30)
    expire_leases(store)
    assert store.reap_expired("lost") == ([job.id], [])
    [second] = store.claim("fresh", 1, 30)
    assert (first.attempts, second.attempts) == (1, 2)
    late = StoredResponse(200, [], b"stale")
    assert not store.finish(job.id, first.attempts, Status.SUCCEEDED, response=late)
    assert not store.set_progress(job.id, first.attempts, 0.9, "stale")
    assert store.renew("stale", {job.id: first.attempts}, 30) == set()
    assert store.renew("fresh", {job.id: second.attempts}, 30) == {job.id}
    fresh = StoredResponse(200, [], b"fresh")
    assert store.finish(job.id, second.attempts, Status.SUCCEEDED, response=fresh)
    assert store.get(job.id, response=True).response.body == b"fresh"


def test_an_expired_job_without_retries_fails_with_the_given_error(store):
    job = make_job(retries=0)
    insert(store, job)
    store.claim("gone", 1, 30)
    expire_leases(store)
    assert store.reap_expired("The worker was lost.") == ([], [job.id])
    failed = store.get(job.id)
    assert failed.status is Status.FAILED
    assert failed.error == "The worker was lost."
    assert failed.finished_at is not None


def test_retry_later_waits_before_the_job_is_due_again(store):
    job = make_job(retries=2)
    insert(store, job)
    [claimed] = store.claim("w", 1, 30)
    assert store.retry_later(job.id, claimed.attempts, 3600, "raised")
    assert store.claim("w", 1, 30) == []
    assert store.get(job.id).status is Status.QUEUED


def test_requeue_gives_back_an_interrupted_attempt(store):
    job = make_job()
    insert(store, job)
    [claimed] = store.claim("w", 1, 30)
    assert store.requeue(job.id, claimed.attempts)
    assert store.get(job.id).attempts == 0
    assert store.claim("w", 1, 30)[0].attempts == 1


def test_cancel_touches_only_active_jobs(store):
    queued, finished = make_job(), make_job()
    insert(store, queued, finished)
    store.claim("w", 10, 30)
    assert store.finish(finished.id, 1, Status.SUCCEEDED, response=StoredResponse(200, [], b""))
    assert store.cancel(queued.id).status is Status.CANCELED
    assert store.cancel(finished.id).status is Status.SUCCEEDED
    assert store.cancel(new_job_id()) is None


def test_prune_removes_only_expired_finished_jobs(store):
    old_done, new_done, old_queued = make_job(), make_job(), make_job()
    insert(store, old_done, new_done)
    store.claim("w", 10, 30)
    for job in (old_done, new_done):
        store.finish(job.id, 1, Status.SUCCEEDED, response=StoredResponse(200, [], b""))
    insert(store, old_queued)
    long_ago = utcnow() - timedelta(days=3)
    with store.engine.begin() as connection:
        connection.execute(
            jobs.update().where(jobs.c.id == old_done.id).values(finished_at=long_ago)
        )
        connection.execute(
            jobs.update().where(jobs.c.id == old_queued.id).values(created_at=long_ago)
        )
    assert store.prune(utcnow() - timedelta(days=1), batch=1) == 1
    assert store.get(old_done.id) is None
    assert store.get(new_done.id) is not None
    assert store.get(old_queued.id) is not None


def test_an_unreachable_database_is_reported_as_unavailable():
    store = JobStore("postgresql+psycopg://postgres@127.0.0.1:1/test", lock_timeout=1)
    with pytest.raises(StoreUnavailable):
        store.migrate()
    with pytest.raises(StoreUnavailable):
        store.get(new_job_id())


def test_a_locked_sqlite_database_is_reported_as_unavailable(sqlite_url):
    store = JobStore(sqlite_url, lock_timeout=0.2)
    store.migrate()
    lock = sa.create_engine(sqlite_url).raw_connection()
    lock.isolation_level = None
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable):
            insert(store, make_job())
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    insert(store, make_job())


def test_a_database_from_an_earlier_release_upgrades_in_place(database_url):
    old = JobStore(database_url)
    old.migrate("0001")
    job = make_job()
    insert(old, job)
    indexes = {ix["name"] for ix in sa.inspect(old.engine).get_indexes("deferred_jobs")}
    assert "ix_deferred_jobs_created" not in indexes
    old.close()

    new = JobStore(database_url)
    new.migrate()
    indexes = {ix["name"] for ix in sa.inspect(new.engine).get_indexes("deferred_jobs")}
    assert "ix_deferred_jobs_created" in indexes
    with new.engine.connect() as connection:
        version = connection.exec_driver_sql(
            "SELECT version_num FROM deferred_middleware_version"
        ).scalar_one()
    assert version == HEAD
    assert new.get(job.id, request=True).request == job.request
    new.close()


def test_an_older_release_runs_against_a_newer_schema(database_url):
    """A rolling deploy: a newer release upgraded the table first."""
    store = JobStore(database_url)
    store.migrate()
    with store.engine.begin() as connection:
        connection.exec_driver_sql(
            "UPDATE deferred_middleware_version SET version_num = '9999_from_the_future'"
        )
    store.close()
    older = JobStore(database_url)
    older.migrate()
    job = make_job()
    insert(older, job)
    assert older.get(job.id) is not None
    older.close()
