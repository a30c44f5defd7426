"""DeferredMiddleware driven through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from deferred_middleware import DeferredMiddleware, _freeze, current_job, deferred
from deferred_middleware._jobs import DeferredOptions, StoredRequest

from .support import count_rows

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@contextlib.asynccontextmanager
async def client_for(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@contextlib.asynccontextmanager
async def running_lifespan(app):
    """Drive the ASGI lifespan protocol as a server does."""
    to_app: asyncio.Queue = asyncio.Queue()
    from_app: asyncio.Queue = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    yield
    await to_app.put({"type": "lifespan.shutdown"})
    assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
    await task


async def finished(client: httpx.AsyncClient, accepted: httpx.Response) -> httpx.Response:
    return await client.get(accepted.headers["location"], params={"wait": 20})


async def test_routes_option_defers_a_plain_asgi_app(sqlite_url):
    async def plain_app(scope, receive, send):
        assert scope["type"] == "http"
        body = f"{scope['method']} {scope['path']}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    middleware = DeferredMiddleware(
        plain_app, database_url=sqlite_url, routes=["POST /reports", "/exports/*"]
    )
    async with client_for(middleware) as client:
        accepted = await client.post("/reports")
        assert accepted.status_code == 202
        assert (await finished(client, accepted)).content == b"POST /reports"
        exported = await client.put("/exports/7")
        assert exported.status_code == 202
        assert (await finished(client, exported)).content == b"PUT /exports/7"
        assert (await client.get("/exports/7/deeper")).content == b"GET /exports/7/deeper"
        assert (await client.get("/reports")).content == b"GET /reports"
        assert (await client.head("/exports/7")).status_code == 200
    await middleware.shutdown()


async def test_marked_endpoints_are_found_inside_mounts_and_in_route_order(sqlite_url):
    @deferred
    async def deep(request: Request) -> Response:
        return PlainTextResponse(f"deep {request.path_params['n']}")

    async def special(request: Request) -> Response:
        return PlainTextResponse("special, not deferred")

    inner = Starlette(routes=[Route("/special", special), Route("/{n}", deep)])
    app = Starlette(
        routes=[Mount("/v1", app=inner)],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)],
    )
    async with client_for(app) as client:
        accepted = await client.get("/v1/9")
        assert accepted.status_code == 202
        assert (await finished(client, accepted)).text == "deep 9"
        plain = await client.get("/v1/special")
        assert plain.status_code == 200
        assert plain.text == "special, not deferred"


async def test_a_method_the_route_does_not_allow_is_answered_by_the_app(sqlite_url):
    @deferred
    async def only_post(request: Request) -> Response:
        return PlainTextResponse("posted")

    app = Starlette(
        routes=[Route("/only", only_post, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)],
    )
    async with client_for(app) as client:
        response = await client.put("/only")
        assert response.status_code == 405
        assert "POST" in response.headers["allow"]


async def test_lifespan_state_reaches_the_replayed_request(sqlite_url):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield {"greeting": "hello from lifespan"}

    @deferred
    async def greet(request: Request) -> Response:
        return JSONResponse({"greeting": request.state.greeting, "job": current_job().id})

    app = Starlette(
        routes=[Route("/greet", greet, methods=["POST"])],
        lifespan=lifespan,
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)],
    )
    async with running_lifespan(app), client_for(app) as client:
        accepted = await client.post("/greet")
        result = await finished(client, accepted)
        assert result.json() == {"greeting": "hello from lifespan", "job": accepted.json()["id"]}


async def test_a_client_that_disconnects_mid_body_makes_no_job(sqlite_url):

    middleware = DeferredMiddleware(
        lambda *a: None, database_url=sqlite_url, routes=["POST /upload"]
    )
    sent: list[dict] = []
    messages = iter(
        [{"type": "http.request", "body": b"part", "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "scheme": "http",
    }
    await middleware(scope, receive, send)
    assert sent == []
    assert count_rows(sqlite_url) == 0


async def test_a_client_that_leaves_an_event_stream_frees_it_at_once(sqlite_url):
    middleware = DeferredMiddleware(
        lambda *a: None,
        database_url=sqlite_url,
        routes=["POST /upload"],
        execute=False,
        poll_interval=60,  # only the disconnect can end the stream in time
    )
    job = await middleware.core.accept_async(StoredRequest("POST", "/upload"), DeferredOptions())
    sent: list[dict] = []
    left = asyncio.Event()

    async def receive():
        if sent:  # the client reads the first event, then goes
            await left.wait()
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)
        if message.get("body"):
            left.set()

    scope = {
        "type": "http",
        "method": "GET",
        "path": f"/jobs/{job.id}/events",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"accept", b"text/event-stream")],
        "scheme": "http",
    }
    await asyncio.wait_for(middleware(scope, receive, send), 10)
    assert sent[0]["status"] == 200
    assert sent[1]["body"].startswith(b"event: status\nid: 0\n")
    assert middleware.core.notifier._waiters == {}
    await middleware.shutdown()


async def test_current_job_outside_a_job_raises_lookup_error():
    with pytest.raises(LookupError):
        current_job()


async def test_progress_is_clamped_and_visible(sqlite_url):
    seen = asyncio.Event()

    @deferred
    async def work(request: Request) -> Response:
        current_job().progress(7, "beyond")
        await asyncio.wait_for(seen.wait(), 20)
        return PlainTextResponse("done")

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)],
    )
    # With a lifespan, jobs run on the test's loop, so the handler can wait on its event.
    async with running_lifespan(app), client_for(app) as client:
        accepted = await client.post("/work")
        status_url = accepted.headers["operation-location"]
        for _ in range(400):
            document = (await client.get(status_url)).json()
            if document["progress"] is not None:
                break
            await asyncio.sleep(0.025)
        assert document["progress"] == 1.0
        assert document["message"] == "beyond"
        seen.set()
        assert (await finished(client, accepted)).text == "done"


async def test_a_full_queue_answers_503_and_makes_no_job(sqlite_url):

    middleware = DeferredMiddleware(
        lambda *a: None,
        database_url=sqlite_url,
        routes=["POST /work"],
        execute=False,
        max_queued=2,
    )
    async with client_for(middleware) as client:
        assert [(await client.post("/work")).status_code for _ in range(2)] == [202, 202]
        refused = await client.post("/work")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "Too many jobs are waiting; try again later."
    assert count_rows(sqlite_url) == 2
    await middleware.shutdown()


async def test_the_last_progress_before_returning_is_kept(sqlite_url):
    """Progress reported just before the handler returns is written before
    the outcome, so the finished job shows it."""

    @deferred
    async def work(request: Request) -> Response:
        for step in range(1, 5):
            current_job().progress(step / 4, f"step {step} of 4")
        return PlainTextResponse("done")

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)],
    )
    async with client_for(app) as client:
        for _ in range(5):
            accepted = await client.post("/work")
            assert (await finished(client, accepted)).text == "done"
            document = (await client.get(accepted.headers["operation-location"])).json()
            assert (document["progress"], document["message"]) == (1.0, "step 4 of 4")


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_one_app_serves_jobs_across_two_test_client_sessions(sqlite_url):
    """Each session runs the lifespan on a loop of its own: the executor and
    the writer follow the app from one to the next."""
    from starlette.testclient import TestClient

    @deferred
    async def work(request):
        return PlainTextResponse(f"done {current_job().attempt}")

    app = Starlette(
        routes=[Route("/work", work, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url, poll_interval=0.05)],
    )
    for _ in range(2):
        with TestClient(app) as client:
            job_id = client.post("/work").json()["id"]
            result = client.get(f"/jobs/{job_id}/result", params={"wait": 10})
            assert (result.status_code, result.text) == (200, "done 1")


async def test_a_marker_on_a_websocket_route_is_called_out_once(caplog):
    from starlette.routing import WebSocketRoute

    @deferred
    async def socket(websocket):
        await websocket.close()

    async def plain(request: Request) -> Response:
        return PlainTextResponse("plain")

    app = Starlette(
        routes=[Route("/plain", plain, methods=["POST"]), WebSocketRoute("/live", socket)],
        middleware=[Middleware(DeferredMiddleware, database_url="memory://", execute=False)],
    )
    async with client_for(app) as client:
        for _ in range(3):
            assert (await client.post("/plain")).text == "plain"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["@deferred on the websocket route /live: a websocket is never deferred"]


async def test_the_first_start_in_a_process_freezes_what_was_loaded_and_later_ones_do_not(
    sqlite_url, monkeypatch
):
    """Started again in one process (a test suite's TestClient per test), an
    app must not pay a full collection each time nor freeze what earlier
    starts left alive."""

    async def start_and_count() -> int:
        app = Starlette(middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url)])
        async with running_lifespan(app):
            return gc.get_freeze_count()

    monkeypatch.setattr(_freeze, "_frozen", False)
    gc.unfreeze()
    try:
        first = await start_and_count()
        left_alive = [[] for _ in range(5000)]  # what the first start's life left behind
        again = await start_and_count()
    finally:
        gc.unfreeze()
    assert first > 10_000
    assert again < first + len(left_alive), "the second start froze again"
