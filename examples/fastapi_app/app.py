"""A FastAPI app with one slow path operation made asynchronous by one decorator.

Run it:  uvicorn examples.fastapi_app.app:app --port 8000

An invalid request still gets FastAPI's own 422 at once (no job is made);
a valid one gets 202 and runs as a job. /docs shows the 202 and the job routes.
"""

import asyncio
import os
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel, Field

from deferred_middleware import DeferredMiddleware, current_job, deferred

REPORT_SECONDS = float(os.environ.get("REPORT_SECONDS", "2"))

app = FastAPI(title="Reports")


class ReportRequest(BaseModel):
    name: str = Field(min_length=1)
    regions: int = Field(default=4, ge=1, le=20)


class Report(BaseModel):
    report: str
    rows: list[dict]


def database_session():
    """A dependency with a side effect: it runs in the job, once, never at accept time."""
    session = {"open": True}
    yield session
    session["open"] = False


@app.post("/reports/{team}", status_code=201)
@deferred(timeout=300)
async def build_report(
    team: str,
    spec: ReportRequest,
    session: Annotated[dict, Depends(database_session)],
    x_request_source: Annotated[str, Header()] = "web",
) -> Report:
    """Slow: it would hold a connection for seconds. Deferred, it answers 202 at once."""
    job = current_job()
    rows = []
    for step in range(1, spec.regions + 1):
        await asyncio.sleep(REPORT_SECONDS / spec.regions)
        rows.append({"team": team, "region": f"region-{step}", "total": step * 1000})
        job.progress(step / spec.regions, f"summed {step} of {spec.regions} regions")
    return Report(report=spec.name, rows=rows)


@app.get("/health")
async def health() -> dict:
    """Fast: left alone, it passes through the middleware untouched."""
    return {"ok": True}


app.add_middleware(DeferredMiddleware, database_url=os.environ.get("DATABASE_URL"))
