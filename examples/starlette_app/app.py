"""A Starlette app with one slow endpoint made asynchronous by one decorator.

Run it:  uvicorn examples.starlette_app.app:app --port 8000
"""

import asyncio
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, current_job, deferred

REPORT_SECONDS = float(os.environ.get("REPORT_SECONDS", "2"))


@deferred(timeout=300)
async def build_report(request: Request) -> JSONResponse:
    """Slow: it would hold a connection for seconds. Deferred, it answers 202 at once."""
    params = await request.json()
    job = current_job()
    rows = []
    for step in range(1, 5):
        await asyncio.sleep(REPORT_SECONDS / 4)
        rows.append({"region": f"region-{step}", "total": step * 1000})
        job.progress(step / 4, f"summed {step} of 4 regions")
    return JSONResponse({"report": params.get("name", "sales"), "rows": rows}, status_code=201)


async def health(request: Request) -> JSONResponse:
    """Fast: left alone, it passes through the middleware untouched."""
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/reports", build_report, methods=["POST"]),
        Route("/health", health),
    ],
    middleware=[
        Middleware(DeferredMiddleware, database_url=os.environ.get("DATABASE_URL")),
    ],
)
