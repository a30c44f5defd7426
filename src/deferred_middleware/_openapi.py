"""The wire protocol in OpenAPI 3.1 terms: what a deferred operation answers
and the job routes, added to an app's document. Plain data, no framework:
the FastAPI glue (:mod:`.fastapi`) calls it with the app's schema."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._jobs import DeferredOptions, Status

STATUS_REF = {"$ref": "#/components/schemas/DeferredJobStatus"}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
SUCCESS = ("200", "201", "204")


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"anyOf": [{"type": kind, **more}, {"type": "null"}]}


SCHEMAS: dict[str, Any] = {
    "DeferredJobStatus": {
        "title": "DeferredJobStatus",
        "description": "Where a deferred job stands. A 202 carries the first five fields.",
        "type": "object",
        "required": ["id", "status", "status_url", "result_url", "created_at"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "status": {"type": "string", "enum": [s.value for s in Status]},
            "status_url": {"type": "string"},
            "result_url": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _nullable("string", format="date-time"),
            "finished_at": _nullable("string", format="date-time"),
            "attempts": {"type": "integer", "minimum": 0},
            "progress": _nullable("number"),
            "message": _nullable("string"),
            "error": _nullable("string"),
        },
    },
    "Problem": {
        "title": "Problem",
        "description": "An RFC 9457 problem document.",
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
}


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


def _status(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": STATUS_REF}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _problem(description: str, also: dict[str, Any] | None = None) -> dict[str, Any]:
    """A problem answer; ``also``: other media types it may come as."""
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": PROBLEM_REF}, **(also or {})},
    }


ACCEPTED = _status(
    "Accepted: the request is stored as a job and runs later.",
    {
        "Location": _header("The job's result: 202 until it is ready, then the response."),
        "Operation-Location": _header("The job's status document."),
        "Retry-After": _header("Seconds to wait between polls.", "integer"),
    },
)
UNPARSEABLE = {  # the framework's own answer to a body it cannot parse
    "schema": {"type": "object", "properties": {"detail": {}}},
}
REFUSALS = {
    "400": _problem(
        "A malformed Idempotency-Key, a body that cannot be parsed, "
        "or a request that cannot be stored.",
        {"application/json": UNPARSEABLE},
    ),
    "403": _problem("The request names no owner for its job."),
    "413": _problem("The body is over the size limit; no job was made."),
    "422": _problem("An Idempotency-Key used before with a different request."),
    "431": _problem("The headers are over the size limit; no job was made."),
    "503": _problem("The job store is unavailable or the queue is full; no job was made."),
}
NOT_FOUND = _problem("No job with this id (or not yours).")
JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
WAIT = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Hold the request up to this many seconds until the job finishes.",
    "schema": {"type": "integer", "minimum": 0},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retry safely: the same key answers the first job's 202.",
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
}
TAG = "deferred jobs"
DEFERRED_NOTE = (
    "Deferred: answers 202 Accepted at once and runs as a job; "
    "poll Operation-Location, fetch the response from Location."
)


def document_jobs(
    schema: dict[str, Any], prefix: str, deferred: Iterable[tuple[str, str, DeferredOptions]]
) -> None:
    """Document each deferred operation (path, method, options) as what it
    answers now, and add the job routes under ``prefix``."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(SCHEMAS)
    paths = schema.setdefault("paths", {})
    for path, method, options in deferred:
        operation = paths.get(path, {}).get(method.lower())
        if operation is not None:
            _defer(operation, options)
    paths.update(job_routes(prefix))


def _defer(operation: dict[str, Any], options: DeferredOptions) -> None:
    responses = operation.setdefault("responses", {})
    if options.mode == "always":  # "prefer": answered inline unless asked otherwise
        for code in SUCCESS:
            responses.pop(code, None)
    responses["202"] = ACCEPTED
    for code, answer in REFUSALS.items():
        if code in responses:  # the app's own 422, say: both bodies are possible
            content = responses[code].setdefault("content", {})
            for media_type, body in answer["content"].items():
                content.setdefault(media_type, body)
        else:
            responses[code] = answer
    parameters = operation.setdefault("parameters", [])
    if not any(p.get("name") == IDEMPOTENCY_KEY["name"] for p in parameters):
        parameters.append(IDEMPOTENCY_KEY)
    described = operation.get("description", "")
    if DEFERRED_NOTE not in described:
        operation["description"] = f"{described}\n\n{DEFERRED_NOTE}".strip()


def job_routes(prefix: str) -> dict[str, Any]:
    job = f"{prefix}/{{job_id}}"
    pending = {"Retry-After": _header("Seconds to wait between polls.", "integer")}
    unavailable = _problem("The job store is unavailable.")
    return {
        job: {
            "parameters": [JOB_ID],
            "get": {
                "tags": [TAG],
                "summary": "A job's status",
                "operationId": "deferred_job_status",
                "parameters": [WAIT],
                "responses": {
                    "200": _status("The status document; ETag is its revision.", pending),
                    "304": {"description": "Not modified (If-None-Match)."},
                    "404": NOT_FOUND,
                    "503": unavailable,
                },
            },
            "delete": {
                "tags": [TAG],
                "summary": "Forget a job (canceling it first)",
                "operationId": "deferred_job_delete",
                "responses": {
                    "204": {"description": "Gone."},
                    "404": NOT_FOUND,
                    "503": unavailable,
                },
            },
        },
        f"{job}/result": {
            "parameters": [JOB_ID],
            "get": {
                "tags": [TAG],
                "summary": "A job's result",
                "operationId": "deferred_job_result",
                "parameters": [WAIT],
                "responses": {
                    "default": {"description": "The handler's own response, replayed exactly."},
                    "202": _status("Not finished yet.", pending),
                    "404": NOT_FOUND,
                    "409": _problem("The job was canceled."),
                    "500": _problem("The job failed without a response."),
                    "503": unavailable,
                },
            },
        },
        f"{job}/cancel": {
            "parameters": [JOB_ID],
            "post": {
                "tags": [TAG],
                "summary": "Cancel a queued or running job",
                "operationId": "deferred_job_cancel",
                "responses": {
                    "200": _status("Canceled."),
                    "404": NOT_FOUND,
                    "409": _problem("The job has already finished."),
                    "503": unavailable,
                },
            },
        },
        f"{job}/events": {
            "parameters": [JOB_ID],
            "get": {
                "tags": [TAG],
                "summary": "A job's changes as server-sent events",
                "operationId": "deferred_job_events",
                "responses": {
                    "200": {
                        "description": "One `status` event per change, to the end.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "204": {"description": "Finished, and the client has the last event."},
                    "404": NOT_FOUND,
                    "503": unavailable,
                },
            },
        },
    }
