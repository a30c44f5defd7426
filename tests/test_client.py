"""``deferred_middleware.client``: following a 202 to the job's final response,
against real servers, with httpx's blocking and async clients."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from deferred_middleware.client import JobCanceled, JobGone, JobTimeout, afollow, follow

pytestmark = pytest.mark.servers


@pytest.fixture(
    params=[
        ("uvicorn", "sync"),
        ("uvicorn", "async"),
        ("gunicorn-gthread", "sync"),
        ("gunicorn-gthread", "async"),
    ],
    ids="-".join,
)
def run(request, serve):
    """``run(method, path, timeout=None)``: send a request and follow it with
    the blocking or the async client."""
    kind, face = request.param
    server = serve(kind)

    def call(method: str, path: str, timeout: float | None = None, before=None):
        if face == "sync":
            with httpx.Client(base_url=server.base) as client:
                response = client.request(method, path)
                if before:
                    before(client, response)
                return response, follow(client, response, timeout=timeout)

        async def go():
            async with httpx.AsyncClient(base_url=server.base) as client:
                response = await client.request(method, path)
                if before:
                    before(httpx.Client(base_url=server.base), response)
                return response, await afollow(client, response, timeout=timeout)

        return asyncio.run(go())

    return call


def test_a_job_is_followed_to_the_handler_s_response(run):
    accepted, final = run("POST", "/report")
    assert accepted.status_code == 202
    assert final.status_code == 201
    assert final.json()["job"] == accepted.json()["id"]
    cookies = final.headers.get_list("set-cookie")
    assert [cookie.partition(";")[0] for cookie in cookies] == ["first=1", "second=2"]


def test_a_failed_job_gives_its_500_problem_not_an_exception(run):
    _, final = run("POST", "/boom")
    assert final.status_code == 500
    assert final.headers["content-type"] == "application/problem+json"


def test_a_handler_s_own_404_is_returned(run):
    _, final = run("POST", "/missing")
    assert (final.status_code, final.json()) == (404, {"detail": "no such thing"})


def test_a_canceled_job_raises_job_canceled(run):
    def cancel(client, accepted):
        assert client.post(accepted.headers["operation-location"] + "/cancel").status_code == 200

    with pytest.raises(JobCanceled) as raised:
        run("POST", "/report?gate=never", before=cancel)
    assert raised.value.status_url.endswith("/jobs/" + raised.value.status_url[-32:])


def test_a_deleted_job_raises_job_gone(run):
    def delete(client, accepted):
        assert client.delete(accepted.headers["operation-location"]).status_code == 204

    with pytest.raises(JobGone):
        run("POST", "/report?gate=never", before=delete)


def test_a_job_that_outlasts_the_timeout_raises_job_timeout(run):
    with pytest.raises(JobTimeout) as raised:
        run("POST", "/report?gate=never", timeout=1.5)
    assert isinstance(raised.value, TimeoutError)


def test_a_response_that_is_not_a_job_comes_back_unchanged(run):
    sent, final = run("POST", "/echo")
    assert final is sent
    assert sent.status_code == 200


@pytest.mark.parametrize(("kind", "app"), [("uvicorn", "starlette"), ("gunicorn-gthread", "flask")])
def test_a_job_run_by_a_worker_is_followed(serve, kind, app, start_worker, database_url):
    server = serve(kind, DATABASE_URL=database_url, EXECUTE="0", POLL_INTERVAL="0.2")
    start_worker(app)
    with httpx.Client(base_url=server.base) as client:
        final = follow(client, client.post("/tiny"), timeout=30)
    assert (final.status_code, final.content) == (200, b"ok")
