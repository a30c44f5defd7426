"""The FastAPI app the integration tests serve with uvicorn: a deferred path
operation whose request has every kind of parameter, and dependencies that
record each time they run (they must run once, in the job)."""

from typing import Annotated

from fastapi import Cookie, Depends, FastAPI, Header, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from deferred_middleware import DeferredMiddleware, current_job, deferred

from ._common import middleware_options, record_effect

app = FastAPI(title="deferred FastAPI test app")


class Item(BaseModel):
    name: str = Field(min_length=1)
    price: float = Field(gt=0)


def session(limit: Annotated[int, Query(ge=1, le=100)] = 10):
    """A dependency with a side effect and a parameter of its own."""
    record_effect("session-open", current_job().attempt)
    yield {"limit": limit}
    record_effect("session-closed", current_job().attempt)


@app.post("/items/{item_id}", status_code=201)
@deferred
async def make_item(
    item_id: int,
    item: Item,
    q: Annotated[int, Query()],
    x_token: Annotated[str, Header(min_length=3)],
    db: Annotated[dict, Depends(session)],
    flavour: Annotated[str | None, Cookie(pattern="^[a-z]+$")] = None,
) -> dict:
    job = current_job()
    record_effect(job.id, job.attempt)
    return {"item_id": item_id, "name": item.name, "q": q, "limit": db["limit"], "flavour": flavour}


@app.get("/health", response_class=PlainTextResponse)
async def health() -> str:
    return "ok"


strict = FastAPI(title="a custom validation answer")


@strict.exception_handler(RequestValidationError)
async def teapot(request, exc: RequestValidationError):
    return JSONResponse({"errors": len(exc.errors())}, status_code=418)


@strict.post("/items")
@deferred
async def strict_item(item: Item) -> Item:
    return item


@strict.get("/health", response_class=PlainTextResponse)
async def strict_health() -> str:
    return "ok"


app.add_middleware(DeferredMiddleware, **middleware_options())
strict.add_middleware(DeferredMiddleware, **middleware_options())
