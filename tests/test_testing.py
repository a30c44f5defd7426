"""``deferred_middleware.testing``: every way a user tests an app that uses the
middleware (Starlette's TestClient with and without its lifespan, httpx's
transports, Flask's test client, FastAPI) runs queued jobs to their end with
``run_jobs``, with no sleeps."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, current_job, deferred
from deferred_middleware.testing import arun_jobs, run_jobs
from deferred_middleware.worker import find_middleware

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def starlette_app(url: str, **options) -> Starlette:
    @deferred
    async def work(request: Request) -> Response:
        current_job().progress(0.5, "half")
        return PlainTextResponse(f"done {request.query_params.get('n', '')}", status_code=201)

    @deferred(retries=1)
    async def flaky(request: Request) -> Response:
        if current_job().attempt == 1:
            raise RuntimeError("first attempt fails")
        return PlainTextResponse("second time")

    routes = [Route("/work", work, methods=["POST"]), Route("/flaky", flaky, methods=["POST"])]
    options = {"database_url": url, "retry_backoff": 0.05, **options}
    return Starlette(routes=routes, middleware=[Middleware(DeferredMiddleware, **options)])


def statuses(client, ids: list[str]) -> list[str]:
    """The status of each job, through whichever test client (each has ``.text``)."""
    return [json.loads(client.get(f"/jobs/{job_id}").text)["status"] for job_id in ids]


@pytest.mark.parametrize("with_lifespan", [True, False], ids=["with", "without"])
def test_starlette_test_client_with_or_without_its_lifespan(sqlite_url, with_lifespan):
    from starlette.testclient import TestClient

    app = starlette_app(sqlite_url)
    client = TestClient(app)
    if with_lifespan:
        client.__enter__()
    try:
        ids = [client.post(f"/work?n={n}").json()["id"] for n in range(5)]
        ids.append(client.post("/flaky").json()["id"])
        run_jobs(app)
        assert statuses(client, ids) == ["succeeded"] * 6
        assert client.get(f"/jobs/{ids[0]}/result").text == "done 0"
        assert client.get(f"/jobs/{ids[-1]}").json()["attempts"] == 2  # its retry ran too
    finally:
        if with_lifespan:
            client.__exit__(None, None, None)


def test_an_enqueue_only_app_runs_jobs_when_the_test_says(sqlite_url):
    from starlette.testclient import TestClient

    app = starlette_app(sqlite_url, execute=False)
    with TestClient(app) as client:
        first = client.post("/work").json()["id"]
        assert statuses(client, [first]) == ["queued"]
        run_jobs(app)
        second = client.post("/work").json()["id"]
        assert statuses(client, [first, second]) == ["succeeded", "queued"]  # stopped again
        run_jobs(app)
        assert statuses(client, [second]) == ["succeeded"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_httpx_asgi_transport_in_an_async_test(sqlite_url):
    app = starlette_app(sqlite_url)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        ids = [(await c.post("/work")).json()["id"] for _ in range(3)]
        await arun_jobs(app)
        for job_id in ids:
            assert (await c.get(f"/jobs/{job_id}")).json()["status"] == "succeeded"
    await find_middleware(app).shutdown()


def flask_app(url: str, **options):
    from flask import Flask

    from deferred_middleware.flask import FlaskDeferred

    app = Flask(__name__)

    @app.post("/work")
    @deferred
    def work():
        current_job().progress(1.0)
        return "flask done", 201

    FlaskDeferred(app, database_url=url, **options)
    return app


@pytest.mark.parametrize("execute", [True, False], ids=["executing", "enqueue-only"])
def test_flask_s_test_client(sqlite_url, execute):
    app = flask_app(sqlite_url, execute=execute)
    with app.test_client() as client:
        ids = [client.post("/work").get_json()["id"] for _ in range(4)]
        run_jobs(app)
        assert statuses(client, ids) == ["succeeded"] * 4
        assert client.get(f"/jobs/{ids[0]}/result").data == b"flask done"
    app.extensions["deferred_middleware"].shutdown()


def test_httpx_wsgi_transport(sqlite_url):
    app = flask_app(sqlite_url)
    transport = httpx.WSGITransport(app)
    with httpx.Client(transport=transport, base_url="http://t") as client:
        job_id = client.post("/work").json()["id"]
        run_jobs(app)
        assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    app.extensions["deferred_middleware"].shutdown()


def test_a_job_that_never_ends_is_a_timeout_not_a_hang(sqlite_url):
    from starlette.testclient import TestClient

    release = threading.Event()

    @deferred
    def stuck(request: Request) -> Response:
        release.wait(30)
        return PlainTextResponse("late")

    app = Starlette(
        routes=[Route("/stuck", stuck, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url, grace_seconds=5)],
    )
    with TestClient(app) as client:
        client.post("/stuck")
        with pytest.raises(TimeoutError, match="1 jobs were still queued or running"):
            run_jobs(app, timeout=0.3)
        release.set()
        run_jobs(app)


def test_an_app_without_the_middleware_is_named(sqlite_url):
    with pytest.raises(LookupError, match="no DeferredMiddleware"):
        run_jobs(Starlette())
