"""The wire protocol, sans I/O: what the middleware answers, as plain data.

Both adapters turn a :class:`Reply` into their own response; nothing here
knows whether it will travel over ASGI or WSGI.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, quote

from . import _json
from ._ids import is_job_id
from ._jobs import Headers, Job, Status
from ._timestamps import utc_text

JSON = "application/json"
PROBLEM = "application/problem+json"

ALLOWED = {
    "": ("GET", "HEAD", "DELETE"),
    "result": ("GET", "HEAD"),
    "cancel": ("POST",),
    "events": ("GET", "HEAD"),
}


@dataclasses.dataclass
class Reply:
    status: int
    headers: Headers
    body: bytes = b""
    stream: Iterator[bytes] | AsyncIterator[bytes] | None = None
    """A body sent piece by piece (an event stream) instead of ``body``."""


@dataclasses.dataclass(frozen=True)
class Conditions:
    """The request headers the job routes read."""

    if_none_match: str | None = None
    last_event_id: str | None = None


NO_CONDITIONS = Conditions()


@dataclasses.dataclass(frozen=True)
class JobURLs:
    """Where a job's routes are, as absolute paths (or absolute URLs when a
    ``public_url`` is configured): never built from a client's Host header."""

    base: str

    @classmethod
    def for_request(cls, prefix: str, root_path: str, public_url: str | None) -> JobURLs:
        return cls((public_url or "") + clean_root_path(root_path) + prefix)

    def status(self, job_id: str) -> str:
        return f"{self.base}/{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.base}/{job_id}/result"

    @functools.cached_property
    def quoted_base(self) -> str:
        """The base as the start of a JSON string (no closing quote), escaped
        once: a 202 is then filled in rather than encoded per request."""
        return _json.compact(self.base)[:-1]


class JobURLsByRootPath:
    """The job URLs for each root path, built once: every answer that
    names a job needs them. Forgotten all at once past a bound, since
    whoever sets ``root_path`` (a proxy's header, say) may vary it; a
    server has one or a few."""

    LIMIT = 64

    def __init__(self, prefix: str, public_url: str | None) -> None:
        self.prefix = prefix
        self.public_url = public_url
        self._built: dict[str, JobURLs] = {}

    def of(self, root_path: str) -> JobURLs:
        urls = self._built.get(root_path)
        if urls is None:
            if len(self._built) >= self.LIMIT:
                self._built.clear()
            urls = JobURLs.for_request(self.prefix, root_path, self.public_url)
            self._built[root_path] = urls
        return urls


def clean_root_path(root_path: str) -> str:
    """The root path as a same-origin path prefix, percent-encoded for a
    header. Anything but a clean absolute path (``//host``, backslashes,
    control characters, dot segments) is ignored: a client that can set
    ``SCRIPT_NAME`` must not send other clients to another host."""
    root_path = root_path.rstrip("/")
    if not root_path:
        return ""
    segments = root_path.split("/")
    if (
        segments[0] != ""
        or any(segment in ("", ".", "..") for segment in segments[1:])
        or any(ord(c) < 0x20 or c in "\\\x7f" for c in root_path)
    ):
        return ""
    return quote(root_path, safe="/:@!$&'()*+,;=-._~")


@dataclasses.dataclass(frozen=True)
class JobRoute:
    """A parsed request to one of the middleware's own routes."""

    job_id: str
    action: str  # "", "result", "cancel" or "events"
    wait: float = 0.0


def _timestamp(value: datetime | None) -> str | None:
    """A time in UTC as RFC 3339 text with microseconds and a "Z"."""
    if value is None:
        return None
    # A time in UTC, as the clock and the table give it, needs no conversion.
    if value.tzinfo is timezone.utc:
        return utc_text(value, "T", "Z")
    return value.replace(tzinfo=None).isoformat("T", "microseconds") + "Z"


def compact_json(data: Any) -> bytes:
    return _json.compact(data).encode()


def _json_reply(status: int, data: Any, extra: Headers | None = None) -> Reply:
    body = compact_json(data)
    headers = [("content-type", JSON), ("content-length", str(len(body))), *(extra or ())]
    return Reply(status, headers, body)


def problem(
    status: int, title: str, detail: str | None = None, headers: Headers | None = None
) -> Reply:
    """An RFC 9457 problem document."""
    data: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        data["detail"] = detail
    body = compact_json(data)
    return Reply(
        status,
        [("content-type", PROBLEM), ("content-length", str(len(body))), *(headers or ())],
        body,
    )


def not_found() -> Reply:
    return problem(404, "Not Found", "No job with this id.")


def for_method(reply: Reply, method: str) -> Reply:
    """``reply`` as sent to ``method``: a HEAD gets the headers alone."""
    if method == "HEAD":
        reply.body = b""
    return reply


def unknown(method: str) -> Reply:
    """The answer for a job that is not there (for this asker), as for any
    unknown id."""
    return for_method(not_found(), method)


QUEUE_FULL = "Too many jobs are waiting; try again later."


def unavailable(retry_after: int, detail: str = "The job store is unavailable.") -> Reply:
    return problem(503, "Service Unavailable", detail, [("retry-after", str(retry_after))])


def headers_too_large(limit: int) -> Reply:
    return problem(
        431, "Request Header Fields Too Large", f"The request headers exceed {limit} bytes."
    )


def bad_request(detail: str) -> Reply:
    return problem(400, "Bad Request", detail)


def too_large(limit: int) -> Reply:
    return problem(413, "Content Too Large", f"The request body exceeds {limit} bytes.")


def status_document(job: Job, urls: JobURLs) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": job.id,
        "status": job.status.value,
        "created_at": _timestamp(job.created_at),
        "started_at": _timestamp(job.started_at),
        "finished_at": _timestamp(job.finished_at),
        "attempts": job.attempts,
        "progress": job.progress,
        "message": job.message,
        "status_url": urls.status(job.id),
        "result_url": urls.result(job.id),
    }
    if job.status is Status.FAILED:
        document["error"] = job.error
    return document


def _pending_headers(job: Job, retry_after: int) -> Headers:
    return [] if job.status.finished else [("retry-after", str(retry_after))]


# A deferred route's answer depends on the client's Prefer header (a 202, or
# the result when it was ready within wait=N): caches must key on it.
VARY_PREFER = ("vary", "Prefer")


def accepted(job: Job, urls: JobURLs, retry_after: int, applied: str | None = None) -> Reply:
    """The 202 for a newly stored job; ``applied`` is the preference it honours.

    Its document is filled in rather than encoded: every accepted request
    answers one, and encoding it cost a fifth of the event loop's work for
    the request. Only the URLs' base can hold characters JSON must escape
    (an id is hex digits, a status and a timestamp are ASCII words), and
    :attr:`JobURLs.quoted_base` has them escaped."""
    job_id, base = job.id, urls.quoted_base
    body = (
        f'{{"id":"{job_id}","status":"{job.status.value}",'
        f'"status_url":{base}/{job_id}","result_url":{base}/{job_id}/result",'
        f'"created_at":"{_timestamp(job.created_at)}"}}'
    ).encode()
    headers = [
        ("content-type", JSON),
        ("content-length", str(len(body))),
        ("location", urls.result(job_id)),
        ("operation-location", urls.status(job_id)),
        ("retry-after", str(retry_after)),
        VARY_PREFER,
    ]
    if applied:
        headers.append(("preference-applied", applied))
    return Reply(202, headers, body)


def answered_within_wait(job: Job, urls: JobURLs, retry_after: int, wait: int) -> Reply:
    """A finished job's result, sent in place of the 202 to a client that
    asked ``Prefer: wait=N`` (RFC 7240 §4.3)."""
    reply = result_reply(job, urls, retry_after)
    reply.headers = [*reply.headers, VARY_PREFER, ("preference-applied", f"wait={wait}")]
    return reply


def entity_tag(job: Job) -> str:
    """The status document changes only with the job's revision (its URLs
    are the request's own), so the revision is a strong validator."""
    return f'"{job.revision}"'


def status_reply(job: Job, urls: JobURLs, retry_after: int) -> Reply:
    headers = [("etag", entity_tag(job)), *_pending_headers(job, retry_after)]
    return _json_reply(200, status_document(job, urls), headers)


class StatusReplies:
    """Status documents already rendered. A document is a function of the
    job's id and revision and of its URLs (the ETag says as much), and a
    client polling a job asks for the same one many times."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._rendered: dict[tuple[object, ...], tuple[Headers, bytes]] = {}
        self._lock = threading.Lock()

    def reply(self, job: Job, urls: JobURLs, retry_after: int) -> Reply:
        key = (job.id, job.revision, job.status, urls.base, retry_after)
        rendered = self._rendered.get(key)
        if rendered is None:
            fresh = status_reply(job, urls, retry_after)
            rendered = (fresh.headers, fresh.body)
            with self._lock:
                if len(self._rendered) >= self._size:
                    del self._rendered[next(iter(self._rendered))]
                self._rendered[key] = rendered
        return Reply(200, list(rendered[0]), rendered[1])


def unless_unchanged(reply: Reply, if_none_match: str | None) -> Reply:
    """``304 Not Modified`` when the client holds the current document
    (RFC 9110 §13.1.2: weak comparison, ``*`` matches any)."""
    if if_none_match is None or reply.status != 200:
        return reply
    etag = dict(reply.headers).get("etag")
    tags = [tag.strip() for tag in if_none_match.split(",")]
    if etag is None or not ("*" in tags or any(t.removeprefix("W/") == etag for t in tags)):
        return reply
    kept = [(k, v) for k, v in reply.headers if k not in ("content-type", "content-length")]
    return Reply(304, kept)


def result_reply(job: Job, urls: JobURLs, retry_after: int) -> Reply:
    """The handler's own response once there is one; until then the status
    document with 202, so that "poll Location until not 202" clients work."""
    if not job.status.finished:
        return _json_reply(202, status_document(job, urls), _pending_headers(job, retry_after))
    if job.status is Status.CANCELED:
        return problem(409, "Conflict", "The job was canceled; it has no result.")
    if job.response is not None:
        # A finished result never looks pending: a handler's own Retry-After
        # (say on a 503) would send generic clients polling a final answer.
        headers = [(k, v) for k, v in job.response.headers if k != "retry-after"]
        return Reply(job.response.status, headers, job.response.body)
    return problem(500, "Internal Server Error", job.error or "The job failed without a response.")


UNROUTABLE = "//"
"""The tail of a path under the prefix that is no route at all (404): not
``"/"``, which is the dashboard's."""


def job_route_tail(prefix: str, path: str, raw_path: str | bytes | None = None) -> str | None:
    """The path after the prefix when ``path`` is one of the job routes.

    Job routes are routed on the path as sent: a tail that only exists
    after percent-decoding (``/jobs/{id}%2Fresult``) is not a route, so it
    becomes :data:`UNROUTABLE` (404)."""
    if not (path == prefix or path.startswith(prefix + "/")):
        return None
    tail = path[len(prefix) :]
    if isinstance(raw_path, bytes):
        raw_path = raw_path.decode("latin-1")
    if raw_path is not None and not raw_path.endswith(tail):
        return UNROUTABLE
    return tail


def parse_job_route(tail: str, query_string: bytes, max_wait: float) -> JobRoute | None:
    """``tail`` is the path after the prefix: ``/{id}``, ``/{id}/result``,
    ``/{id}/cancel`` or ``/{id}/events``. None for anything else, malformed
    ids included."""
    parts = tail.split("/")
    if len(parts) not in (2, 3) or parts[0] != "" or not is_job_id(parts[1]):
        return None
    action = parts[2] if len(parts) == 3 else ""
    if action not in ALLOWED or (len(parts) == 3 and not action):
        return None
    return JobRoute(parts[1], action, _wait_seconds(query_string, max_wait))


def _wait_seconds(query_string: bytes, max_wait: float) -> float:
    if not query_string:  # most polls: no need to parse
        return 0.0
    for key, value in parse_qsl(query_string.decode("latin-1")):
        if key == "wait":
            try:
                seconds = float(value)
            except ValueError:
                return 0.0
            if seconds != seconds:  # NaN
                return 0.0
            return min(max(seconds, 0.0), max_wait)
    return 0.0


def options(action: str) -> Reply:
    """``OPTIONS``: the methods a job route allows (RFC 9110 §9.3.7). A CORS
    preflight carries no credentials, so it is answered for any job id."""
    return Reply(204, [("allow", ", ".join((*ALLOWED[action], "OPTIONS")))])


def method_not_allowed(action: str) -> Reply:
    allow = ", ".join(ALLOWED[action])
    return problem(405, "Method Not Allowed", None, [("allow", allow)])
