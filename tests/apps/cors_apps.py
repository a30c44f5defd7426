"""The README's CORS set-ups, for a browser page on another origin: Starlette
with CORSMiddleware outside the deferred middleware, and Flask with flask-cors."""

from flask import Flask, jsonify
from flask import request as flask_request
from flask_cors import CORS
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, deferred
from deferred_middleware.flask import FlaskDeferred

from ._common import middleware_options

# What a browser may read of a deferred answer: the three headers of a 202,
# and the ETag a poll sends back in If-None-Match.
EXPOSED = ["Location", "Operation-Location", "Retry-After", "ETag"]


@deferred
async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"echo": await request.json()}, status_code=201)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


starlette_app = Starlette(
    routes=[Route("/echo", echo, methods=["POST"]), Route("/health", health)],
    middleware=[
        # Outermost, so that it answers preflights and marks every answer,
        # the middleware's own 202s and job routes included.
        Middleware(
            CORSMiddleware,
            allow_origins=["*"],
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED,
        ),
        Middleware(DeferredMiddleware, **middleware_options()),
    ],
)


flask_app = Flask(__name__)
CORS(flask_app, expose_headers=EXPOSED)


@flask_app.post("/echo")
@deferred
def flask_echo():
    return jsonify(echo=flask_request.get_json()), 201


@flask_app.get("/health")
def flask_health():
    return "ok"


FlaskDeferred(flask_app, **middleware_options())
