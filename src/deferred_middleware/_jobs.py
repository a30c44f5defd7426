"""Plain data for jobs: what is stored, what is replayed, what is reported.

Nothing here performs I/O or knows about ASGI, WSGI or SQL, so every other
module (the store, the runners, the adapters) speaks in these terms.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone

from ._refusals import BadRequest

Headers = list[tuple[str, str]]
"""Header pairs in order, names lower-cased, values as latin-1 text.

A list of pairs, never a dict: repeated headers such as ``Set-Cookie`` must
survive the trip through the job table.
"""

DEFAULT_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
MAX_METHOD_LENGTH = 16  # the width of the method column
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
COMMON_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
HEADERS_TOO_LARGE = "The request headers are too large."


class Status(str, enum.Enum):
    """The lifecycle of a job, spelled as long-running-operation clients expect."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in FINISHED

    def __str__(self) -> str:
        return self.value


FINISHED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def request_line(method: str, path: str) -> str:
    """A job's route as operators read it: ``POST /reports``."""
    return f"{method} {path}"


MODES = ("always", "prefer")


@dataclasses.dataclass(frozen=True)
class DeferredOptions:
    """How one deferred route's jobs are run; set with ``@deferred(...)``."""

    retries: int = 0
    timeout: float | None = None
    queue: str | None = None  # None: the middleware's own queue
    mode: str = "always"  # "prefer": inline unless the client sends Prefer: respond-async
    callback: Callable[[RequestInfo], str | None] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode is one of {', '.join(MODES)}: {self.mode!r}")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if self.queue is not None:
            check_queue_name(self.queue)


DEFAULT_QUEUE = "default"
MAX_QUEUE_LENGTH = 64  # the width of the queue column


def check_queue_name(name: str) -> str:
    if not name or len(name) > MAX_QUEUE_LENGTH:
        raise ValueError(f"a queue name has 1 to {MAX_QUEUE_LENGTH} characters: {name!r}")
    return name


@dataclasses.dataclass
class StoredRequest:
    """An HTTP request as it arrived, neutral between ASGI and WSGI.

    ``path`` is the decoded path below ``root_path`` (ASGI's view; the WSGI
    adapter converts to and from ``PATH_INFO``).
    """

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = dataclasses.field(default_factory=list)
    body: bytes = b""
    scheme: str = "http"
    root_path: str = ""
    http_version: str = "1.1"
    server: tuple[str, int] | None = None
    client: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def admit(self, max_header_size: int) -> str | None:
        """Make the request ready to store, or say why it cannot be: in one
        pass over the headers (this runs for every accepted request).

        Its body is stored whole, so framing headers of the original transfer
        (chunked encoding) would only mislead a replay: they are replaced by
        the body's length. A request the table cannot keep faithfully (a
        method that is not a short token, a NUL character) is refused here,
        so it never shares a failing batch with others."""
        size = 0
        kept: Headers = []
        nul = "\x00" in self.path or "\x00" in self.root_path
        for name, value in self.headers:
            size += len(name) + len(value)
            nul = nul or "\x00" in value or "\x00" in name
            if name not in FRAMING_HEADERS:
                kept.append((name, value))
        if size > max_header_size:
            return HEADERS_TOO_LARGE
        if self.method not in COMMON_METHODS and (
            len(self.method) > MAX_METHOD_LENGTH or not TOKEN.fullmatch(self.method)
        ):
            return "The request method cannot be stored."
        if nul:
            return "The request contains a NUL character."
        kept.append(("content-length", str(len(self.body))))
        self.headers = kept
        return None


@dataclasses.dataclass
class StoredResponse:
    """The handler's response, stored whole so it can be replayed exactly."""

    status: int
    headers: Headers
    body: bytes


class RequestInfo:
    """What ``owner=fn`` and ``callback=fn`` see of a request: the same small
    object on ASGI and WSGI. ``scope`` (ASGI) or ``environ`` (WSGI) is the
    server's own view of it, for what a framework put there before us (an
    authenticated ``scope["user"]``, say); the other one is None."""

    __slots__ = ("environ", "headers", "method", "path", "query_string", "scope")

    def __init__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Headers,
        *,
        scope: Mapping[str, object] | None = None,
        environ: Mapping[str, object] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = CaseInsensitiveHeaders(headers)
        self.scope = scope
        self.environ = environ

    @classmethod
    def of(cls, request: StoredRequest, **native: Mapping[str, object] | None) -> RequestInfo:
        return cls(request.method, request.path, request.query_string, request.headers, **native)


class CaseInsensitiveHeaders(Mapping[str, str]):
    """Header values by name, any case; repeated headers joined by ", "."""

    def __init__(self, pairs: Headers) -> None:
        self._values: dict[str, str] = {}
        for name, value in pairs:
            key = name.lower()
            self._values[key] = f"{self._values[key]}, {value}" if key in self._values else value

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


@dataclasses.dataclass
class Job:
    """One row of the job table."""

    id: str
    status: Status
    created_at: datetime
    request: StoredRequest | None = None
    options: DeferredOptions = dataclasses.field(default_factory=DeferredOptions)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    progress: float | None = None
    message: str | None = None
    error: str | None = None
    response: StoredResponse | None = None
    queue: str = DEFAULT_QUEUE
    revision: int = 0
    """Raised by every write that changes what the status document shows."""
    callback_url: str | None = None
    webhook_state: str | None = None  # pending, delivered or failed, once it ended
    webhook_attempts: int = 0
    owner: str | None = None
    """Who submitted it, as ``owner=fn`` named them: only they see it."""
    route: str | None = None
    """The request line (``POST /reports``), for operators: read by lists."""
    idempotency: Idempotency | None = None

    @property
    def max_attempts(self) -> int:
        return self.options.retries + 1


@dataclasses.dataclass(frozen=True)
class Failure:
    """An attempt that produced no response. ``error`` is shown to clients,
    so it is always one of our own sentences, never an exception's text."""

    error: str
    detail: str | None = dataclasses.field(default=None, compare=False)
    """For operators only (the exception's type and traceback): kept with the
    job and shown by ``jobs show``, never sent to a client."""


Outcome = StoredResponse | Failure
"""What one attempt came to: the handler's response, or why there is none."""

RAISED = Failure("The handler raised an exception.")
NO_RESPONSE = Failure("The handler returned no response.")
NOT_STARTED = Failure("The job could not be started.")
LOST_WORKER = "The worker running this job was lost before it finished."


def timed_out(job: Job) -> Failure:
    return Failure(f"The job timed out after {job.options.timeout:g} seconds.")


# -- writes of a running attempt ------------------------------------------
# Each is fenced by the attempt number: it lands only while that attempt
# still owns the job, so a worker that lost its lease cannot overwrite the
# attempt that replaced it.


@dataclasses.dataclass(frozen=True)
class Finish:
    """The attempt ended the job: its final status, response and error."""

    job_id: str
    attempt: int
    status: Status
    response: StoredResponse | None = None
    error: str | None = None
    detail: str | None = None  # for operators: see Failure.detail


@dataclasses.dataclass(frozen=True)
class RetryLater:
    """The attempt failed with attempts left: queue the job again after ``delay`` seconds."""

    job_id: str
    attempt: int
    delay: float
    error: str
    detail: str | None = None


@dataclasses.dataclass(frozen=True)
class Requeue:
    """The attempt was interrupted by a shutdown: give the job back at once,
    without counting the attempt against its retries."""

    job_id: str
    attempt: int


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the status route shows while the attempt runs."""

    job_id: str
    attempt: int
    progress: float | None
    message: str | None


AttemptWrite = Finish | RetryLater | Requeue | Progress


# -- completion webhooks ------------------------------------------------------

WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "pending", "delivered", "failed"


@dataclasses.dataclass
class WebhookDue:
    """A job whose webhook an executor has claimed, for one attempt."""

    job: Job  # its status, callback_url and this attempt's number
    root_path: str  # of the request, for the URLs in the payload
    worker: str


@dataclasses.dataclass(frozen=True)
class WebhookAttempt:
    """One delivery attempt, as recorded for operators."""

    job_id: str
    attempt: int
    at: datetime
    url: str
    status_code: int | None
    error: str | None
    duration_ms: int
    worker: str | None = None


MAX_OWNER_LENGTH = 255  # the width of the owner column


def owner_key(owner: str | None) -> str | None:
    """An owner as the job table keeps it: longer names by their digest."""
    if owner is None or len(owner) <= MAX_OWNER_LENGTH:
        return owner
    return "sha256:" + hashlib.sha256(owner.encode()).hexdigest()


# -- idempotent submits -------------------------------------------------------

IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


@dataclasses.dataclass(frozen=True)
class Idempotency:
    """A job's claim on an ``Idempotency-Key``, as two fixed-width digests.

    ``key`` digests the key with who sent it to which route, so one unique
    column makes concurrent duplicates collide in every database; ``request``
    digests what was asked, to tell a retry from a different request."""

    key: str
    request: str

    @classmethod
    def of(cls, request: StoredRequest, owner: str | None) -> Idempotency | None:
        """The request's claim, None without the header; BadRequest for a
        malformed key (or more than one)."""
        keys = [value for name, value in request.headers if name == IDEMPOTENCY_HEADER]
        if not keys:
            return None
        key = keys[0]
        if len(keys) > 1 or len(key) > MAX_IDEMPOTENCY_KEY or not VISIBLE_ASCII.fullmatch(key):
            raise BadRequest(
                "The Idempotency-Key header must be sent once, as 1 to "
                f"{MAX_IDEMPOTENCY_KEY} visible ASCII characters."
            )
        scope = "\0".join((owner or "", request.method, request.path, key))
        what = hashlib.sha256(request.query_string + b"\0" + request.body)
        return cls(hashlib.sha256(scope.encode()).hexdigest(), what.hexdigest())
