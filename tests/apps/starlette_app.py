"""The Starlette app the integration tests serve with uvicorn."""

import gc

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from deferred_middleware import DeferredMiddleware, current_job, deferred

from ._common import (
    BINARY,
    STREAM_CHUNKS,
    middleware_options,
    record_effect,
    wait_gate,
    wait_gate_async,
)


async def _report(request: Request) -> Response:
    job = current_job()
    record_effect(job.id, job.attempt)
    body = await request.body()
    job.progress(0.5, "halfway")
    await wait_gate_async(request.query_params.get("gate"))
    response = JSONResponse(
        {
            "echo": body.decode(),
            "authorization": request.headers.get("authorization"),
            "job": job.id,
            "attempt": job.attempt,
        },
        status_code=201,
    )
    response.set_cookie("first", "1")
    response.set_cookie("second", "2")
    return response


report = deferred(_report)


@deferred(retries=1)
async def report_retry(request: Request) -> Response:
    return await _report(request)


@deferred
def sync_report(request: Request) -> Response:
    job = current_job()
    record_effect(job.id, job.attempt)
    job.progress(0.25, "sync")
    wait_gate(request.query_params.get("gate"))
    return JSONResponse({"sync": True, "job": job.id})


@deferred
async def tiny(request: Request) -> Response:
    job = current_job()
    record_effect(job.id, job.attempt)
    return Response(b"ok")


@deferred
async def stepped(request: Request) -> Response:
    """Progress that moves as the test opens ``{gate}-1`` and then ``{gate}-2``."""
    job = current_job()
    gate = request.query_params["gate"]
    job.progress(0.25, "first step")
    await wait_gate_async(f"{gate}-1")
    job.progress(0.75, "second step")
    await wait_gate_async(f"{gate}-2")
    return Response(b"stepped")


@deferred(queue="nightly")
async def nightly(request: Request) -> Response:
    job = current_job()
    record_effect(job.id, job.attempt)
    return Response(b"nightly")


@deferred
async def binary(request: Request) -> Response:
    return Response(BINARY, media_type="application/octet-stream", headers={"x-kind": "binary"})


@deferred
async def stream(request: Request) -> Response:
    async def chunks():
        for chunk in STREAM_CHUNKS:
            yield chunk

    return StreamingResponse(chunks(), media_type="text/plain")


@deferred
async def missing(request: Request) -> Response:
    return JSONResponse({"detail": "no such thing"}, status_code=404)


@deferred
async def boom(request: Request) -> Response:
    raise RuntimeError("secret-token-123 leaked from the database")


@deferred(timeout=0.5)
async def too_slow(request: Request) -> Response:
    await wait_gate_async("never-opened")
    return Response("late")


@deferred(mode="prefer")
async def maybe(request: Request) -> Response:
    try:
        job_id = current_job().id
    except LookupError:
        job_id = None
    return JSONResponse({"job": job_id})


@deferred
async def frozen(request: Request) -> Response:
    """How many objects the process has frozen out of garbage collection."""
    return JSONResponse({"frozen": gc.get_freeze_count()})


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def stream_plain(request: Request) -> Response:
    async def chunks():
        for chunk in STREAM_CHUNKS:
            yield chunk

    return StreamingResponse(chunks(), media_type="text/plain")


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(f"echo:{text}")
    await websocket.close()


app = Starlette(
    routes=[
        Route("/report", report, methods=["POST"]),
        Route("/report-retry", report_retry, methods=["POST"]),
        Route("/sync-report", sync_report, methods=["POST"]),
        Route("/tiny", tiny, methods=["POST"]),
        Route("/stepped", stepped, methods=["POST"]),
        Route("/nightly", nightly, methods=["POST"]),
        Route("/binary", binary, methods=["POST"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/missing", missing, methods=["POST"]),
        Route("/boom", boom, methods=["POST"]),
        Route("/too-slow", too_slow, methods=["POST"]),
        Route("/maybe", maybe, methods=["POST"]),
        Route("/frozen", frozen, methods=["POST"]),
        Route("/echo", echo, methods=["POST"]),
        Route("/stream-plain", stream_plain),
        Route("/health", health),
        WebSocketRoute("/ws", ws_echo),
    ],
    middleware=[Middleware(DeferredMiddleware, **middleware_options())],
)
