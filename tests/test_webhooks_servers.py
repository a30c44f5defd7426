"""Completion webhooks through real servers and workers, to a real receiver
on loopback (allowlisted by its IP) that verifies every signature."""

from __future__ import annotations

import signal

import httpx
import pytest

from deferred_middleware._jobs import WEBHOOK_DELIVERED, WEBHOOK_FAILED
from deferred_middleware.store import SQLJobStore

from .support import count_rows, eventually, free_port
from .webhook_receiver import SECRET, Receiver

pytestmark = pytest.mark.servers


@pytest.fixture
def receiver():
    """A receiver on a port of its own, not yet listening (``.start()``)."""
    made = Receiver(free_port())
    yield made
    made.stop()


def webhook_env(receiver: Receiver, **more: str) -> dict[str, str]:
    return {
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_ALLOWLIST": receiver.url,
        "WEBHOOK_BACKOFF": "0.2",
        "POLL_INTERVAL": "0.2",
        **more,
    }


def submit(server, receiver: Receiver, path: str = "/tiny") -> str:
    accepted = httpx.post(
        server.base + path, headers={"Callback-URL": f"{receiver.url}/hooks/done"}
    )
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


def webhook_of(database_url: str, job_id: str):
    store = SQLJobStore(database_url)
    try:
        return store.get(job_id), store.webhook_attempts_of(job_id)
    finally:
        store.close()


def settled(database_url: str, job_id: str, state: str = WEBHOOK_DELIVERED):
    """Wait for the job's webhook to reach ``state``; its recorded attempts."""

    def reached():
        job, attempts = webhook_of(database_url, job_id)
        return attempts if job.webhook_state == state else None

    return eventually(reached)


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_finished_job_is_delivered_signed(serve, kind, receiver, sqlite_url):
    receiver.start()
    server = serve(kind, **webhook_env(receiver))
    job_id = submit(server, receiver)
    [payload] = eventually(receiver.verified)
    assert payload["type"] == "job.finished"
    assert payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "succeeded"
    assert payload["data"]["result_url"] == f"/jobs/{job_id}/result"
    [delivery] = receiver.deliveries
    assert delivery.path == "/hooks/done"
    assert delivery.headers["webhook-id"].startswith(f"msg_{job_id}_")
    assert [a.status_code for a in settled(sqlite_url, job_id)] == [200]


@pytest.mark.parametrize(("kind", "app"), [("uvicorn", "starlette"), ("gunicorn-gthread", "flask")])
def test_a_worker_delivers_the_webhook_of_a_job_it_ran(
    serve, kind, app, start_worker, database_url, receiver
):
    receiver.start()
    env = webhook_env(receiver)
    server = serve(kind, DATABASE_URL=database_url, EXECUTE="0", **env)
    job_id = submit(server, receiver)
    worker = start_worker(app, **env)
    [payload] = eventually(receiver.verified)
    assert (payload["data"]["id"], payload["data"]["status"]) == (job_id, "succeeded")
    worker.stop()


def test_a_receiver_that_is_down_gets_it_once_it_is_up(serve, receiver, sqlite_url):
    server = serve("uvicorn", **webhook_env(receiver))
    job_id = submit(server, receiver)
    first = eventually(lambda: webhook_of(sqlite_url, job_id)[1])[0]
    assert first.status_code is None
    assert "Connect" in first.error
    receiver.start()
    eventually(receiver.verified)
    settled(sqlite_url, job_id)


def test_a_slow_receiver_is_tried_again(serve, receiver, sqlite_url):
    receiver.answers = [("sleep", 3, 200), 200]
    receiver.start()
    server = serve("uvicorn", **webhook_env(receiver, WEBHOOK_TIMEOUT="0.5"))
    job_id = submit(server, receiver)
    first, second = settled(sqlite_url, job_id)
    assert "Timeout" in first.error
    assert second.status_code == 200
    ids = {d.headers["webhook-id"] for d in receiver.deliveries}
    assert len(ids) == 1  # the same message, for the receiver to deduplicate


def test_a_redirect_is_not_followed_and_the_delivery_gives_up_in_time(serve, receiver, sqlite_url):
    receiver.answers = [("redirect", "/elsewhere")] * 50
    receiver.start()
    server = serve("uvicorn", **webhook_env(receiver, WEBHOOK_RETRY_FOR="1"))
    job_id = submit(server, receiver)
    attempts = settled(sqlite_url, job_id, WEBHOOK_FAILED)
    assert {a.status_code for a in attempts} == {307}
    assert {d.path for d in receiver.deliveries} == {"/hooks/done"}


def test_a_500_is_tried_again_until_the_receiver_takes_it(serve, receiver, sqlite_url):
    receiver.answers = [500, 500, 204]
    receiver.start()
    server = serve("gunicorn-gthread", **webhook_env(receiver))
    job_id = submit(server, receiver)
    assert [a.status_code for a in settled(sqlite_url, job_id)] == [500, 500, 204]


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_refused_callbacks_get_400_and_no_job(serve, kind, receiver, sqlite_url):
    by_name = f"http://localhost:{receiver.port}"
    server = serve(kind, **webhook_env(receiver, WEBHOOK_ALLOWLIST=f"{receiver.url};{by_name}"))
    for url, reason in [
        (f"{by_name}/hooks", "loopback, private or link-local"),  # a private address by name
        ("http://10.1.2.3/hooks", "outside the webhook allowlist"),
        ("not a url", "not a valid absolute URL"),
    ]:
        answer = httpx.post(server.base + "/tiny", headers={"Callback-URL": url})
        assert answer.status_code == 400, url
        assert answer.headers["content-type"] == "application/problem+json"
        assert reason in answer.json()["detail"]
    assert count_rows(sqlite_url) == 0


def test_without_a_secret_a_callback_is_refused(serve, receiver, sqlite_url):
    server = serve("uvicorn")
    answer = httpx.post(server.base + "/tiny", headers={"Callback-URL": receiver.url})
    assert answer.status_code == 400
    assert count_rows(sqlite_url) == 0


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_a_worker_killed_mid_delivery_loses_no_webhook(serve, start_worker, database_url, receiver):
    """The first worker finishes the job and is killed while the receiver
    holds its delivery; the next one delivers it again once the lease runs out."""
    receiver.answers = [("hold", 200), 200]
    receiver.start()
    env = webhook_env(receiver, LEASE_SECONDS="1", WEBHOOK_TIMEOUT="1")  # a 4 s claim
    server = serve("uvicorn", DATABASE_URL=database_url, EXECUTE="0", **env)
    job_id = submit(server, receiver)
    first = start_worker("starlette", **env)
    eventually(lambda: len(receiver.deliveries) == 1)
    first.stop(signal.SIGKILL)
    start_worker("starlette", **env)
    settled(database_url, job_id)
    assert len(receiver.verified()) == 2  # at least once: the held one, then again
    assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 1
