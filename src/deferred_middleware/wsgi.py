"""``DeferredWSGIMiddleware``: deferred routes for any WSGI app."""

from __future__ import annotations

import atexit
import http
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _protocol as protocol
from ._assemble import assemble
from ._dashboard import ACTION_HEADER
from ._jobs import DeferredOptions, RequestInfo, StoredRequest
from ._operator import METRICS
from ._prefer import Preferences, parse_prefer
from ._process import current_pid
from ._refusals import Refusal
from ._routes import NEVER_DEFERRED
from .runner.wsgi import ThreadLauncher, WSGIApp
from .store import StoreUnavailable, Unstorable

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._config import Options

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
OptionsFinder = Callable[[Environ], "DeferredOptions | None"]
ReplyFinisher = Callable[[Environ, protocol.Reply], protocol.Reply]

READ_CHUNK = 64 * 1024
ACTION_ENVIRON_KEY = "HTTP_" + ACTION_HEADER.upper().replace("-", "_")


def from_wsgi_string(text: str) -> str:
    """WSGI carries paths as latin-1-decoded bytes; the job table keeps real text."""
    return text.encode("latin-1").decode("utf-8", "replace")


def raw_path(environ: Environ) -> str | None:
    """The path as the client sent it, where the server tells (gunicorn's
    ``RAW_URI``, werkzeug's and most others' ``REQUEST_URI``)."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not uri:
        return None
    return uri.partition("?")[0]


def stored_request(environ: Environ, body: bytes) -> StoredRequest:
    headers: list[tuple[str, str]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").lower(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("content-type", environ["CONTENT_TYPE"]))
    client = (
        (environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT") or 0))
        if environ.get("REMOTE_ADDR")
        else None
    )
    protocol_version = environ.get("SERVER_PROTOCOL", "HTTP/1.1").partition("/")[2] or "1.1"
    return StoredRequest(
        method=environ["REQUEST_METHOD"],
        path=from_wsgi_string(environ.get("PATH_INFO", "")),
        query_string=environ.get("QUERY_STRING", "").encode("latin-1"),
        headers=headers,
        body=body,
        scheme=environ.get("wsgi.url_scheme", "http"),
        root_path=from_wsgi_string(environ.get("SCRIPT_NAME", "")),
        http_version=protocol_version,
        server=(environ.get("SERVER_NAME", "localhost"), int(environ.get("SERVER_PORT") or 80)),
        client=client,
    )


def request_info(environ: Environ, request: StoredRequest | None = None) -> RequestInfo:
    """What ``owner=fn`` and ``dashboard=fn`` see: the stored request, or
    the request line and headers."""
    return RequestInfo.of(request or stored_request(environ, b""), environ=environ)


class BodyTooLarge(Exception):
    pass


class ClientDisconnected(Exception):
    pass


def read_body(environ: Environ, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes before reading them
    where the length is declared."""
    stream = environ["wsgi.input"]
    length_text = environ.get("CONTENT_LENGTH") or ""
    if length_text.strip():
        try:
            length = int(length_text)
        except ValueError:
            length = 0
        if length > limit:
            raise BodyTooLarge
        body = stream.read(length) if length > 0 else b""
        if len(body) < length:
            raise ClientDisconnected
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""
    chunks: list[bytes] = []
    size = 0
    while chunk := stream.read(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def respond(start_response: StartResponse, reply: protocol.Reply) -> Iterable[bytes]:
    try:
        reason = http.HTTPStatus(reply.status).phrase
    except ValueError:
        reason = ""
    start_response(f"{reply.status} {reason}".rstrip(), list(reply.headers))
    if reply.stream is not None:
        return reply.stream  # type: ignore[return-value]  # the server closes it
    return [reply.body]


def varying_on_prefer(start_response: StartResponse) -> StartResponse:
    """``start_response`` adding ``Vary: Prefer``: the answer of a
    ``mode="prefer"`` route depends on that header."""

    def start_varying(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return start_response(status, [*headers, ("Vary", "Prefer")], *exc_info)

    return start_varying


class DeferredWSGIMiddleware:
    """Answer requests to deferred routes of a WSGI app with ``202 Accepted``
    and run them later, in a bounded set of threads of this process (or in
    ``deferred-middleware worker``).

    Use it for a WSGI app that is not Flask, naming the deferred routes in
    ``routes``; Flask apps use :class:`deferred_middleware.flask.FlaskDeferred`,
    which also finds ``@deferred`` views. It trusts nothing from the client
    for its URLs: they are built from ``SCRIPT_NAME`` and ``public_url``.
    Options: see :class:`deferred_middleware._config.Options`.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        find_options: OptionsFinder | None = None,
        find_queues: Callable[[], Iterable[str]] | None = None,
        finish_reply: ReplyFinisher | None = None,
        **options: Unpack[Options],
    ) -> None:
        """``find_options`` and ``find_queues`` let a framework tell which
        views are marked, and ``finish_reply`` pass the middleware's own
        answers through its response hooks (see :mod:`deferred_middleware.flask`)."""
        self.app = app
        self.find_options = find_options
        self.find_queues = find_queues
        self.finish_reply = finish_reply
        self.run_queues: frozenset[str] = frozenset()
        """Set by ``deferred-middleware worker --queue``: exactly these queues."""
        parts = assemble(ThreadLauncher(app), **options)
        self.config = parts.config
        self.patterns = parts.patterns
        self.core = parts.core
        self.dispatcher = parts.dispatcher
        self.operator = parts.operator
        self.metrics = parts.metrics
        self._pid = 0
        self._lock = threading.Lock()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.config.execute and self._pid != current_pid():
            self.start_executor()
        path = from_wsgi_string(environ.get("PATH_INFO", ""))
        tail = protocol.job_route_tail(self.config.prefix, path, raw_path(environ))
        if tail is not None and (route := self.operator.route_of(tail)) is not None:
            return self._respond(environ, start_response, self._answer_operator(environ, route))
        if tail is not None:
            reply = self.core.answer(
                tail,
                environ["REQUEST_METHOD"],
                environ.get("QUERY_STRING", "").encode("latin-1"),
                from_wsgi_string(environ.get("SCRIPT_NAME", "")),
                protocol.Conditions(
                    environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_LAST_EVENT_ID")
                ),
                self.owner_of(environ),
            )
            return self._respond(environ, start_response, reply)
        options = self._deferred_options(environ, path)
        if options is None:
            return self.app(environ, start_response)
        wanted = parse_prefer([environ.get("HTTP_PREFER", "")])
        if options.mode == "prefer" and not wanted.respond_async:
            return self.app(environ, varying_on_prefer(start_response))
        return self._respond(environ, start_response, self._accept(environ, options, wanted))

    def _respond(
        self, environ: Environ, start_response: StartResponse, reply: protocol.Reply
    ) -> Iterable[bytes]:
        if self.finish_reply is not None:
            reply = self.finish_reply(environ, reply)
        return respond(start_response, reply)

    def _answer_operator(self, environ: Environ, route: str) -> protocol.Reply:
        method = environ["REQUEST_METHOD"]
        if route == METRICS:
            return self.operator.metrics(method)
        dashboard = self.config.dashboard
        assert dashboard is not None  # the route is there only with it
        allowed = bool(dashboard(request_info(environ)))
        query = environ.get("QUERY_STRING", "").encode("latin-1")
        from_page = ACTION_ENVIRON_KEY in environ
        return self.operator.dashboard(method, query, allowed, from_page)

    def owner_of(self, environ: Environ, request: StoredRequest | None = None) -> str | None:
        if self.config.owner is None:
            return None
        return self.core.owner_of(request_info(environ, request))

    def _deferred_options(self, environ: Environ, path: str) -> DeferredOptions | None:
        method = environ["REQUEST_METHOD"]
        if method in NEVER_DEFERRED:
            return None
        options = self.patterns.match(method, path) if self.patterns else None
        if options is None and self.find_options is not None:
            options = self.find_options(environ)
        return options

    def _accept(
        self, environ: Environ, options: DeferredOptions, wanted: Preferences
    ) -> protocol.Reply:
        limit = self.config.max_body_size
        try:
            body = read_body(environ, limit)
        except BodyTooLarge:
            return self.core.too_large()
        except ClientDisconnected:
            return protocol.problem(400, "Bad Request", "The request body was incomplete.")
        request = stored_request(environ, body)
        try:
            job = self.core.accept(request, options, self.owner_of(environ, request))
        except (Refusal, StoreUnavailable, Unstorable) as error:
            return self.core.refused(error)
        root_path = from_wsgi_string(environ.get("SCRIPT_NAME", ""))
        return self.core.accepted(job, root_path, wanted)

    # -- running jobs in this process -------------------------------------

    def start_executor(self) -> None:
        """Start this process's job threads: on the first request, so that a
        forking server starts them in each worker, never in the parent."""
        with self._lock:
            if self._pid == current_pid():
                return
            self._pid = current_pid()
            self.core.check_store_soon()
            self.dispatcher.start(self.run_queues or self._queues_to_run())
            atexit.register(self.shutdown)

    def _queues_to_run(self) -> set[str]:
        """Its own queue, and those its marked views name."""
        found = set(self.find_queues()) if self.find_queues is not None else set()
        return {self.config.queue, *found}

    def stop_executor(self) -> None:
        """Let running jobs finish within the grace period, return the rest
        to the queue, and stop claiming."""
        with self._lock:
            if self._pid != current_pid():
                return
            self._pid = 0
        self.dispatcher.stop(self.config.grace_seconds)

    def shutdown(self) -> None:
        """Stop the executor and write what is queued."""
        self.stop_executor()
        self.core.close()
