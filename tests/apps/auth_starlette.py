"""The README's bearer-token recipe: Starlette's AuthenticationMiddleware
behind the deferred middleware, and an async ``owner`` asking the same backend.

The authentication middleware sits inside, so a job's replay is authenticated
too (``request.user`` in the handler), from the credentials kept with it.
"""

from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    SimpleUser,
    requires,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, RequestInfo, deferred

from ._common import middleware_options

TOKENS = {"token-alice": "alice", "token-bob": "bob"}


class BearerTokens(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection):
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in TOKENS:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(TOKENS[token])


backend = BearerTokens()


async def owner(request: RequestInfo) -> str | None:
    found = await backend.authenticate(HTTPConnection(request.scope))
    return found[1].identity if found else None


@deferred
@requires("authenticated")
async def report(request: Request):
    return JSONResponse({"made for": request.user.display_name})


async def health(request: Request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/report", report, methods=["POST"]), Route("/health", health)],
    middleware=[
        Middleware(DeferredMiddleware, owner=owner, **middleware_options()),
        Middleware(AuthenticationMiddleware, backend=backend),
    ],
)
