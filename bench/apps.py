"""The apps the benchmarks serve: a plain endpoint and the same endpoint
deferred, side by side in one app, so both are measured on one server.

DATABASE_URL picks the job table; EXECUTE=0 makes the process enqueue only,
so that accepting is measured alone (jobs then run in ``bench.e2e``).
"""

import os
import time

from flask import Flask, jsonify
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, deferred
from deferred_middleware.flask import FlaskDeferred

OPTIONS = {
    "database_url": os.environ.get("DATABASE_URL"),
    "execute": os.environ.get("EXECUTE", "1") == "1",
    "concurrency": int(os.environ.get("CONCURRENCY", "32")),
}
DOCUMENT = {"id": "0" * 32, "status": "succeeded", "progress": None, "message": None}


async def plain(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "size": len(await request.body())})


@deferred
async def trivial(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True, "size": len(await request.body())})


@deferred
async def stamp(request: Request) -> JSONResponse:
    """When the handler started, for the latency run."""
    return JSONResponse({"started": time.time()})


async def plain_get(request: Request) -> JSONResponse:
    return JSONResponse(DOCUMENT)


starlette_app = Starlette(
    routes=[
        Route("/plain", plain, methods=["POST"]),
        Route("/deferred", trivial, methods=["POST"]),
        Route("/stamp", stamp, methods=["POST"]),
        Route("/plain-get", plain_get),
    ],
    middleware=[Middleware(DeferredMiddleware, **OPTIONS)],
)

flask_app = Flask(__name__)


@flask_app.post("/plain")
def flask_plain():
    return jsonify(ok=True, size=len(flask_request.get_data()))


@flask_app.post("/deferred")
@deferred
def flask_trivial():
    return jsonify(ok=True, size=len(flask_request.get_data()))


@flask_app.get("/plain-get")
def flask_plain_get():
    return jsonify(DOCUMENT)


FlaskDeferred(flask_app, **OPTIONS)
