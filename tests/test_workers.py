"""``deferred-middleware worker`` processes sharing one job table, on SQLite and
on the real PostgreSQL and MariaDB servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from deferred_middleware._jobs import Status

from .support import (
    LOST,
    POSTGRES_URL,
    ThrowawayPostgres,
    enqueue,
    eventually,
    make_job,
    require,
)

pytestmark = pytest.mark.servers


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_four_workers_share_2000_jobs_and_each_runs_exactly_once(
    app, start_worker, store, effects, database_url
):
    ids = enqueue(store, "/tiny", 2000)
    started = time.monotonic()
    workers = [start_worker(app, "--concurrency", "8") for _ in range(4)]
    eventually(lambda: store.count(Status.SUCCEEDED) == 2000, timeout=240, interval=0.2)
    elapsed = time.monotonic() - started
    for worker in workers:
        assert worker.stop() == 0
    runs = Counter(line[0] for line in effects())
    assert set(runs) == set(ids)
    assert max(runs.values()) == 1  # each job ran exactly once
    pids = Counter(line[2] for line in effects())
    assert len(pids) > 1, "the work was shared between workers"
    print(
        f"\n{app} on {database_url.split(':')[0]}: 2000 jobs by 4 workers in "
        f"{elapsed:.1f} s ({2000 / elapsed:.0f} jobs/s, worker start-up included); "
        f"per worker: {sorted(pids.values())}"
    )


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_a_killed_worker_leaves_no_job_running_forever(app, start_worker, store, effects, gates):
    with_retry = enqueue(store, "/report-retry", retries=1, query=b"gate=k1")[0]
    without_retry = enqueue(store, "/report", query=b"gate=k2")[0]
    first = start_worker(app, LEASE_SECONDS="1")
    eventually(lambda: len(effects()) == 2, timeout=30)  # both are mid-run
    first.stop(signal.SIGKILL)
    gates("k1")
    gates("k2")

    second = start_worker(app, LEASE_SECONDS="1")
    done = eventually(lambda: (j := store.get(with_retry, response=True)).status.finished and j)
    assert done.status is Status.SUCCEEDED
    assert done.attempts == 2
    assert done.response.status == 201
    lost = eventually(lambda: (j := store.get(without_retry)).status.finished and j)
    assert lost.status is Status.FAILED
    assert lost.error == LOST
    assert second.stop() == 0
    assert store.count(Status.RUNNING) == 0
    runs = Counter(line[0] for line in effects())
    assert runs == {with_retry: 2, without_retry: 1}


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_sigterm_lets_a_running_job_finish_within_the_grace_period(
    app, start_worker, store, effects, gates
):
    job_id = enqueue(store, "/report", query=b"gate=t1")[0]
    worker = start_worker(app, "--grace", "60")
    eventually(lambda: len(effects()) == 1, timeout=30)
    worker.send(signal.SIGTERM)
    gates("t1")  # opened only after the signal: the worker must wait for it
    assert worker.wait(timeout=60) == 0
    assert store.get(job_id).status is Status.SUCCEEDED


SIGNAL_TO_ANOTHER_THREAD = """
import signal, sys, threading, time
from deferred_middleware import worker

def idle(frame):  # blocked in the worker's own wait, not in starting a thread
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names[:1] in (["wait"], ["select"]) and "start_executor" not in names

class Executor:
    def start_executor(self):
        threading.Thread(target=self.signal_from_here).start()

    def signal_from_here(self):
        # Once the main thread waits, SIGTERM goes to this thread, not to it.
        deadline = time.monotonic() + 10
        while not idle(sys._current_frames().get(threading.main_thread().ident)):
            assert time.monotonic() < deadline, "the main thread never waited"
            time.sleep(0.01)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    def shutdown(self):
        print("drained", flush=True)

worker._run_wsgi(Executor())
"""


def test_a_wsgi_worker_stops_on_a_signal_that_another_thread_took():
    """The kernel may hand a process's SIGTERM to any of its threads; the
    worker must drain and stop whichever it was."""
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_TO_ANOTHER_THREAD],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, "drained\n"), done.stderr


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_sigterm_returns_what_cannot_finish_in_time_to_the_queue(app, start_worker, store, effects):
    job_id = enqueue(store, "/report", query=b"gate=never")[0]
    worker = start_worker(app, "--grace", "0.5")
    eventually(lambda: len(effects()) == 1, timeout=30)
    assert worker.stop() == 0
    job = store.get(job_id)
    assert job.status is Status.QUEUED
    assert job.attempts == 0


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_a_timeout_fails_the_attempt_in_a_worker(app, start_worker, store):
    job_id = enqueue(store, "/too-slow", timeout=0.5)[0]
    worker = start_worker(app)
    failed = eventually(lambda: (j := store.get(job_id)).status.finished and j, timeout=30)
    assert failed.status is Status.FAILED
    assert failed.error == "The job timed out after 0.5 seconds."
    worker.stop()


@pytest.mark.parametrize(("kind", "app"), [("uvicorn", "starlette"), ("gunicorn-gthread", "flask")])
def test_an_enqueue_only_web_tier_and_a_worker_complete_a_request(
    serve, kind, app, start_worker, database_url, effects
):
    server = serve(kind, DATABASE_URL=database_url, EXECUTE="0", POLL_INTERVAL="0.2")
    accepted = httpx.post(server.base + "/tiny")
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    assert httpx.get(f"{server.base}/jobs/{job_id}").json()["status"] == "queued"
    worker = start_worker(app)
    result = httpx.get(f"{server.base}/jobs/{job_id}/result", params={"wait": 30}, timeout=40)
    assert result.status_code == 200
    assert result.content == b"ok"
    assert [(line[0], int(line[2])) for line in effects()] == [(job_id, worker.process.pid)]
    worker.stop()


@pytest.fixture
def throwaway_postgres():
    """A PostgreSQL server this test may stop and start."""
    require(POSTGRES_URL, "postgres")  # the server package is what we need from the machine
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_database_restart_under_web_and_worker_loses_no_accepted_job(
    serve, start_worker, throwaway_postgres, effects
):
    url = throwaway_postgres.url
    server = serve("uvicorn", DATABASE_URL=url, EXECUTE="0", POLL_INTERVAL="0.2")
    worker = start_worker("starlette", DATABASE_URL=url)
    eventually(lambda: "listening for new jobs" in worker.log(), timeout=30)
    accepted = [httpx.post(server.base + "/tiny").json()["id"] for _ in range(10)]
    throwaway_postgres.stop()
    try:
        during = [httpx.post(server.base + "/tiny", timeout=30) for _ in range(5)]
    finally:
        throwaway_postgres.start()
    for response in during:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"

    def accept_again() -> str | None:
        response = httpx.post(server.base + "/tiny", timeout=30)
        return response.json()["id"] if response.status_code == 202 else None

    accepted.append(eventually(accept_again, timeout=60, interval=0.5))
    for job_id in accepted:
        reply = httpx.get(f"{server.base}/jobs/{job_id}/result", params={"wait": 30}, timeout=40)
        assert reply.status_code == 200, (job_id, reply.text)
    runs = Counter(line[0] for line in effects())
    assert set(runs) == set(accepted)
    assert max(runs.values()) == 1
    assert worker.stop() == 0


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_an_idle_postgres_worker_wakes_on_notify_not_on_its_poll(start_worker, store):
    worker = start_worker("starlette", POLL_INTERVAL="120")
    eventually(lambda: "listening for new jobs" in worker.log(), timeout=30)
    first = enqueue(store, "/tiny")[0]
    eventually(lambda: store.get(first).status is Status.SUCCEEDED, timeout=20)
    # Idle now, with its next poll two minutes away: only NOTIFY can wake it in time.
    second = enqueue(store, "/tiny")[0]
    eventually(lambda: store.get(second).status is Status.SUCCEEDED, timeout=20)
    assert worker.stop() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_idle_sqlite_worker_starts_a_job_another_process_stored_not_on_its_poll(
    start_worker, store
):
    """No notification crosses processes on SQLite: the worker sees the
    file's commit mark move."""
    worker = start_worker("starlette", POLL_INTERVAL="120")
    first = enqueue(store, "/tiny")[0]
    eventually(lambda: store.get(first).status is Status.SUCCEEDED, timeout=20)
    # Idle now, with its next poll two minutes away: only the commit can wake it in time.
    second = enqueue(store, "/tiny")[0]
    eventually(lambda: store.get(second).status is Status.SUCCEEDED, timeout=20)
    assert worker.stop() == 0


def test_a_worker_started_while_its_database_is_down_waits_for_it(
    start_worker, sqlite_url, tmp_path
):
    """The table does not exist and cannot be reached yet; the worker stays up."""
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    worker = start_worker("starlette", DATABASE_URL=unreachable, POLL_INTERVAL="0.2")
    eventually(lambda: "store is unavailable" in worker.log(), timeout=30)
    assert worker.alive()
    assert worker.stop() == 0


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_two_apps_on_one_database_never_run_each_other_s_jobs(
    app, serve, start_worker, database_url, effects
):
    kind = "uvicorn" if app == "starlette" else "gunicorn-gthread"
    web = serve(kind, DATABASE_URL=database_url, EXECUTE="0", QUEUE="billing")
    theirs = start_worker(app, "--queue", "mail")  # another app's worker, on its own queue
    reply = httpx.post(web.base + "/tiny")
    job_id = reply.json()["id"]
    nightly_id = httpx.post(web.base + "/nightly").json()["id"]
    mine = start_worker(app, QUEUE="billing")  # runs billing and, by its routes, nightly
    for one in (job_id, nightly_id):
        result = httpx.get(f"{web.base}/jobs/{one}/result", params={"wait": 30}, timeout=40)
        assert result.status_code == 200
    pids = {line[0]: int(line[2]) for line in effects()}
    assert pids == {job_id: mine.pid, nightly_id: mine.pid}
    assert theirs.stop() == 0 and mine.stop() == 0


def test_a_worker_runs_exactly_the_queues_it_is_given(start_worker, store, effects):
    [default_job] = enqueue(store, "/tiny")
    worker = start_worker("starlette", "--queue", "nightly")
    job = make_job("/nightly", body=b"", headers=[])
    job.queue = "nightly"
    store.insert([job])
    eventually(lambda: store.get(job.id).status is Status.SUCCEEDED, timeout=30)
    assert store.get(default_job).status is Status.QUEUED
    assert worker.stop() == 0


@pytest.mark.parametrize("app", ["starlette", "flask"])
def test_a_worker_freezes_what_its_app_loaded_out_of_garbage_collection(app, start_worker, store):
    """The app and its modules live as long as the worker: full collections
    need not walk them again for what each job leaves behind."""
    [job_id] = enqueue(store, "/frozen")
    worker = start_worker(app)
    done = eventually(lambda: (j := store.get(job_id, response=True)).status.finished and j)
    assert done.status is Status.SUCCEEDED
    assert json.loads(done.response.body)["frozen"] > 10_000
    assert worker.stop() == 0
