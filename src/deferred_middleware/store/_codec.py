"""The row codec: the only place that knows what each column of the job
table holds, both ways. Queries say which rows; this module says what goes
into them and what comes out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any, TypeGuard

import sqlalchemy as sa

from .. import _json
from .._jobs import (
    WEBHOOK_PENDING,
    DeferredOptions,
    Idempotency,
    Job,
    Progress,
    Requeue,
    RetryLater,
    Status,
    StoredRequest,
    StoredResponse,
    WebhookAttempt,
    WebhookDue,
    request_line,
)
from ._credentials import merge_credentials, split_credentials
from ._schema import jobs

STATUS_COLUMNS = (
    jobs.c.id,
    jobs.c.status,
    jobs.c.queue,
    jobs.c.created_at,
    jobs.c.started_at,
    jobs.c.finished_at,
    jobs.c.attempts,
    jobs.c.max_attempts,
    jobs.c.timeout,
    jobs.c.revision,
    jobs.c.progress,
    jobs.c.message,
    jobs.c.error,
    jobs.c.callback_url,
    jobs.c.webhook_state,
    jobs.c.webhook_attempts,
    jobs.c.owner,
)
REQUEST_COLUMNS = (
    jobs.c.request_method,
    jobs.c.request_path,
    jobs.c.request_query,
    jobs.c.request_headers,
    jobs.c.request_credentials,
    jobs.c.request_meta,
    jobs.c.request_body,
)
ROUTE_COLUMNS = (jobs.c.request_method, jobs.c.request_path)
RESPONSE_COLUMNS = (jobs.c.response_status, jobs.c.response_headers, jobs.c.response_body)
INSERT_KEYS = (
    "id",
    "status",
    "queue",
    "created_at",
    "run_after",
    "attempts",
    "max_attempts",
    "timeout",
    "request_method",
    "request_path",
    "request_query",
    "request_headers",
    "request_credentials",
    "request_meta",
    "request_body",
    "callback_url",
    "owner",
    "idempotency_key",
    "request_digest",
)
IDEMPOTENCY_COLUMNS = (jobs.c.idempotency_key, jobs.c.request_digest)
# Every write that changes what the status document shows raises the revision.
NEXT_REVISION = jobs.c.revision + 1
# The statement that ends a job makes its webhook due, in the same write.
WEBHOOK_DUE_IF_ANY = sa.case((jobs.c.callback_url.is_not(None), WEBHOOK_PENDING), else_=None)


def webhook_due_at(when: Any) -> Any:
    """Only a job with a callback gets a due time: the others leave the
    webhook index untouched when they end."""
    return sa.case((jobs.c.callback_url.is_not(None), when), else_=None)


NO_WEBHOOK_PENDING = sa.or_(jobs.c.webhook_state.is_(None), jobs.c.webhook_state != WEBHOOK_PENDING)
FINISHED_VALUES = tuple(s.value for s in (Status.SUCCEEDED, Status.FAILED, Status.CANCELED))
ACTIVE_VALUES = (Status.QUEUED.value, Status.RUNNING.value)


# -- into the table --------------------------------------------------------


def insert_row(job: Job, credential_names: frozenset[str], created: Any) -> tuple[Any, ...]:
    """A new job's row, its values in the order of ``INSERT_KEYS``: built as
    a tuple rather than a dict, and JSON encoded here once rather than by a
    bind processor per row, since the writer builds one per accepted
    request. ``created`` is the timestamp already in the driver's own type."""
    assert job.request is not None
    request = job.request
    headers, credentials = split_credentials(request.headers, credential_names)
    idempotency = job.idempotency
    return (
        job.id,
        job.status.value,
        job.queue,
        created,
        created,
        0,
        job.max_attempts,
        job.options.timeout,
        request.method,
        request.path,
        request.query_string.decode("latin-1"),
        _json.dumps(headers),
        _json.dumps(credentials) if credentials else None,
        request_meta(request),
        request.body,
        job.callback_url,
        job.owner,
        idempotency.key if idempotency else None,
        idempotency.request if idempotency else None,
    )


def request_meta(request: StoredRequest) -> str:
    """How the request reached the server, as the JSON text ``json.dumps``
    gives. Filled in rather than encoded where both addresses are a host
    name and a port, as servers give them: it is written for every accepted
    request, and encoding a dict of tuples cost three times as much."""
    server, client = request.server, request.client
    if _is_address(server) and _is_address(client):
        return (
            f'{{"scheme": {_quoted(request.scheme)}, "root_path": {_quoted(request.root_path)}, '
            f'"http_version": {_quoted(request.http_version)}, '
            f'"server": [{_quoted(server[0])}, {server[1]}], '
            f'"client": [{_quoted(client[0])}, {client[1]}]}}'
        )
    names = ("scheme", "root_path", "http_version", "server", "client")
    return _json.dumps({name: getattr(request, name) for name in names})


def _is_address(address: object) -> TypeGuard[tuple[str, int]]:
    host, port = address if type(address) is tuple and len(address) == 2 else (None, None)
    return type(host) is str and type(port) is int


def claim_values(worker: str, now: datetime, lease_seconds: float) -> dict[str, Any]:
    return {
        "revision": NEXT_REVISION,
        "status": Status.RUNNING.value,
        "attempts": jobs.c.attempts + 1,
        "worker": worker,
        "started_at": now,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
    }


def attempt_values(write: RetryLater | Requeue | Progress, now: datetime) -> dict[str, Any]:
    """The columns a fenced write other than a finish changes."""
    if isinstance(write, Progress):
        return {"progress": write.progress, "message": write.message, "revision": NEXT_REVISION}
    values: dict[str, Any] = {"status": Status.QUEUED.value, **_BACK_IN_THE_QUEUE}
    if isinstance(write, RetryLater):
        values.update(
            run_after=now + timedelta(seconds=write.delay),
            error=write.error,
            error_detail=write.detail,
        )
    else:
        # An interrupted attempt does not count against the job's retries.
        values.update(run_after=now, attempts=jobs.c.attempts - 1)
    return values


def requeue_lost_values(now: datetime, error: str) -> dict[str, Any]:
    return {
        "status": Status.QUEUED.value,
        "run_after": now,
        "error": error,
        "error_detail": None,
        **_BACK_IN_THE_QUEUE,
    }


# A job back in the queue shows nothing of the run that ended: it is waiting.
_BACK_IN_THE_QUEUE = {
    "revision": NEXT_REVISION,
    "lease_expires_at": None,
    "worker": None,
    "started_at": None,
    "progress": None,
    "message": None,
}


def final_values(status: Status, now: datetime, error: str | None = None) -> dict[str, Any]:
    """A job ended outside an attempt (lost worker, cancel): credentials go."""
    values: dict[str, Any] = {
        "revision": NEXT_REVISION,
        "status": status.value,
        "finished_at": now,
        "lease_expires_at": None,
        "request_credentials": None,
        "webhook_state": WEBHOOK_DUE_IF_ANY,
        "webhook_due_at": webhook_due_at(now),
        "webhook_attempts": 0,
        "webhook_lease_until": None,
    }
    if error is not None:
        values["error"], values["error_detail"] = error, None
    return values


def retry_values(now: datetime) -> dict[str, Any]:
    return {
        "revision": NEXT_REVISION,
        "status": Status.QUEUED.value,
        "run_after": now,
        "max_attempts": jobs.c.attempts + jobs.c.max_attempts,
        "finished_at": None,
        "error": None,
        "error_detail": None,
        "response_status": None,
        "response_headers": None,
        "response_body": None,
        "webhook_state": None,
    }


def webhook_claim_values(worker: str, now: datetime, lease_seconds: float) -> dict[str, Any]:
    return {
        "webhook_worker": worker,
        "webhook_lease_until": now + timedelta(seconds=lease_seconds),
        "webhook_attempts": jobs.c.webhook_attempts + 1,
    }


def webhook_due_from_row(row: Mapping[str, Any], worker: str) -> WebhookDue:
    meta = _from_json(row["request_meta"])
    return WebhookDue(job_from_row(row), meta.get("root_path", ""), worker)


def webhook_attempt_values(attempt: WebhookAttempt) -> dict[str, Any]:
    return dataclasses.asdict(attempt)


def webhook_attempt_from_row(row: Mapping[str, Any]) -> WebhookAttempt:
    return WebhookAttempt(
        job_id=row["job_id"],
        attempt=row["attempt"],
        at=utc(row["at"]),  # type: ignore[arg-type]
        url=row["url"],
        status_code=row["status_code"],
        error=row["error"],
        duration_ms=row["duration_ms"],
        worker=row["worker"],
    )


# -- out of the table ------------------------------------------------------


def utc(value: Any) -> datetime | None:
    """A timestamp as SQLAlchemy or the raw driver hands it over (SQLite's
    text, or a naive datetime), made timezone-aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _from_json(value: Any) -> Any:
    """JSON columns arrive decoded from SQLAlchemy and psycopg, as text from
    the raw SQLite and MySQL drivers; they never hold a bare JSON string."""
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _request_from_row(row: Mapping[str, Any]) -> StoredRequest:
    meta = _from_json(row["request_meta"])
    headers = [(name, value) for name, value in _from_json(row["request_headers"])]
    credentials = _from_json(row["request_credentials"])
    if credentials:
        headers = merge_credentials(headers, [tuple(c) for c in credentials])
    return StoredRequest(
        method=row["request_method"],
        path=row["request_path"],
        query_string=row["request_query"].encode("latin-1"),
        headers=headers,
        body=bytes(row["request_body"]),
        scheme=meta["scheme"],
        root_path=meta["root_path"],
        http_version=meta["http_version"],
        server=tuple(meta["server"]) if meta.get("server") else None,
        client=tuple(meta["client"]) if meta.get("client") else None,
    )


def job_from_row(row: Mapping[str, Any]) -> Job:
    """One decoder for every read, whether SQLAlchemy or the driver ran it."""
    job = Job(
        id=row["id"],
        status=Status(row["status"]),
        created_at=utc(row["created_at"]),  # type: ignore[arg-type]
        options=DeferredOptions(retries=row["max_attempts"] - 1, timeout=row["timeout"]),
        started_at=utc(row["started_at"]),
        finished_at=utc(row["finished_at"]),
        attempts=row["attempts"],
        revision=row["revision"],
        callback_url=row["callback_url"],
        webhook_state=row["webhook_state"],
        webhook_attempts=row["webhook_attempts"],
        progress=row["progress"],
        message=row["message"],
        error=row["error"],
        queue=row["queue"],
        owner=row.get("owner"),
    )
    if row.get("idempotency_key") is not None:
        job.idempotency = Idempotency(row["idempotency_key"], row["request_digest"])
    if "request_method" in row:
        job.route = request_line(row["request_method"], row["request_path"])
    if "request_body" in row:
        job.request = _request_from_row(row)
    if row.get("response_status") is not None:
        job.response = StoredResponse(
            status=row["response_status"],
            headers=[(name, value) for name, value in _from_json(row["response_headers"])],
            body=bytes(row["response_body"]),
        )
    return job


def jobs_from_result(result: sa.CursorResult[Any]) -> list[Job]:
    return jobs_from_rows(list(result.keys()), result.fetchall())


def jobs_from_rows(names: list[str], rows: Iterable[Sequence[Any]]) -> list[Job]:
    """Each row as a plain dict: a row's own mapping raises and catches a
    ``KeyError`` inside for every column a read did not select."""
    return [job_from_row(dict(zip(names, row, strict=True))) for row in rows]
