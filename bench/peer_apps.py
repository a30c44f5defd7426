"""Each peer behind the same kind of web tier as ours: a Starlette endpoint
that enqueues one job per POST, the way that peer's documentation shows.
``PEER`` picks the app; huey needs ``HUEY_DB``, PGQueuer ``PGQUEUER_DSN``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def huey_app() -> Starlette:
    from bench import peer_huey

    def submit(request: Request) -> JSONResponse:
        # huey's enqueue blocks on its SQLite file: a sync endpoint, which
        # Starlette runs in its thread pool.
        result = peer_huey.trivial(0)
        return JSONResponse({"id": result.id}, status_code=202)

    return Starlette(
        routes=[Route("/submit", submit, methods=["POST"]), Route("/plain-get", health)]
    )


def pgqueuer_app() -> Starlette:
    import psycopg
    from pgqueuer import PsycopgDriver, Queries

    state: dict[str, Queries] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connection = await psycopg.AsyncConnection.connect(
            os.environ["PGQUEUER_DSN"], autocommit=True
        )
        state["queries"] = Queries(PsycopgDriver(connection))
        yield
        await connection.close()

    async def submit(request: Request) -> JSONResponse:
        await request.body()
        [job_id] = await state["queries"].enqueue("trivial", None)
        return JSONResponse({"id": job_id}, status_code=202)

    routes = [Route("/submit", submit, methods=["POST"]), Route("/plain-get", health)]
    return Starlette(routes=routes, lifespan=lifespan)


async def pgqueuer_worker(batch_size: int) -> None:
    """PGQueuer's consumer, run as its documentation shows (``QueueManager.run``);
    its ``pgqueuer run`` command fails to set up logging in this release."""
    import psycopg
    from pgqueuer import PsycopgDriver, Queries, QueueManager

    connection = await psycopg.AsyncConnection.connect(os.environ["PGQUEUER_DSN"], autocommit=True)
    manager = QueueManager(Queries(PsycopgDriver(connection)))

    @manager.entrypoint("trivial")
    async def trivial(job: object) -> None:
        return None

    await manager.run(batch_size=batch_size)


PEERS = {"huey": huey_app, "pgqueuer": pgqueuer_app}
app = PEERS[os.environ["PEER"]]() if "PEER" in os.environ else None

if __name__ == "__main__":  # python -m bench.peer_apps BATCH_SIZE: the PGQueuer worker
    import asyncio
    import sys

    asyncio.run(pgqueuer_worker(int(sys.argv[1])))
