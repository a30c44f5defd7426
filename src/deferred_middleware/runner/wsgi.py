"""Replay a stored request into a WSGI app, in a thread of its own.

The environ is built fresh from stored data, never copied from the live
request: by the time a job runs, that request and its objects are gone.
"""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from .._context import current_job
from .._jobs import FRAMING_HEADERS, Outcome, StoredRequest, StoredResponse
from .._policy import raised
from ._dispatch import Ended

logger = logging.getLogger("deferred_middleware")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


def build_environ(request: StoredRequest) -> dict[str, Any]:
    server_name, server_port = request.server or ("localhost", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": request.root_path.encode().decode("latin-1"),
        "PATH_INFO": request.path.encode().decode("latin-1"),
        "QUERY_STRING": request.query_string.decode("latin-1"),
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port),
        "SERVER_PROTOCOL": f"HTTP/{request.http_version}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": request.scheme,
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(request.body)),
    }
    if request.client:
        environ["REMOTE_ADDR"], port = request.client
        environ["REMOTE_PORT"] = str(port)
    for name, value in request.headers:
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name in FRAMING_HEADERS:
            continue  # the body is whole: CONTENT_LENGTH says how long
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def replay_wsgi(app: WSGIApp, request: StoredRequest) -> StoredResponse:
    """Call the app and consume (and close) its iterable, the whole body kept."""
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return chunks.append

    chunks: list[bytes] = []
    result = app(build_environ(request), start_response)
    try:
        chunks.extend(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    if not started:
        raise RuntimeError("the WSGI app returned without calling start_response")
    status, headers = started
    return StoredResponse(
        status=int(status.split(" ", 1)[0]),
        headers=[(name.lower(), value) for name, value in headers],
        body=b"".join(chunks),
    )


class ThreadLauncher:
    """Replays each request in a daemon thread of its own."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def launch(
        self, request: StoredRequest, context: contextvars.Context, ended: Ended
    ) -> _Abandon:
        thread = threading.Thread(
            target=context.run, args=(self._run, request, ended), name="deferred-job", daemon=True
        )
        thread.start()
        return _Abandon()

    def _run(self, request: StoredRequest, ended: Ended) -> None:
        try:
            outcome: Outcome = replay_wsgi(self.app, request)
        except Exception as exception:
            logger.exception("job %s: the handler raised", current_job().id)
            outcome = raised(exception)
        ended(outcome)


class _Abandon:
    def cancel(self) -> bool:
        """A thread cannot be interrupted; the dispatcher stops waiting for it
        and its late outcome is refused by the table (fenced by attempt)."""
        return False
