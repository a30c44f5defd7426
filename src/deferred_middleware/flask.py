"""``FlaskDeferred``: the Flask extension.

Wraps ``app.wsgi_app`` in :class:`DeferredWSGIMiddleware` and teaches it to
find ``@deferred`` views through Flask's own URL map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, got_request_exception
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from . import _protocol as protocol
from ._context import current_job
from ._jobs import DeferredOptions, RequestInfo
from ._routes import options_of, queues_of
from .wsgi import DeferredWSGIMiddleware, Environ

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._config import Options

EXTENSION_KEY = "deferred_middleware"
logger = logging.getLogger("deferred_middleware")
T = TypeVar("T")


class FlaskDeferred:
    """Defer ``@deferred`` views (and routes named in ``routes``) of a Flask app.

    ``FlaskDeferred(app, database_url=...)``, or ``ext = FlaskDeferred(...)``
    then ``ext.init_app(app)`` in an application factory. The middleware of
    each app is kept in ``app.extensions["deferred_middleware"]``.
    """

    def __init__(self, app: Flask | None = None, **options: Unpack[Options]) -> None:
        self.options = options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, **options: Unpack[Options]) -> DeferredWSGIMiddleware:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("FlaskDeferred is already set up on this app")
        merged: dict[str, Any] = {**self.options, **options}
        for asker in ("owner", "dashboard"):
            if merged.get(asker) is not None:
                merged[asker] = _in_request_context(app, merged[asker])
        middleware = DeferredWSGIMiddleware(
            app.wsgi_app,  # type: ignore[arg-type]
            find_options=_ViewOptions(app),
            find_queues=lambda: queues_of(app.view_functions.values()),
            finish_reply=_ThroughAfterRequest(app),
            **merged,
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_KEY] = middleware
        got_request_exception.connect(_mark_raised, app, weak=False)
        return middleware

    @staticmethod
    def middleware(app: Flask) -> DeferredWSGIMiddleware:
        return app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


class _ViewOptions:
    """Finds the view Flask would dispatch a request to, and its marker."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def __call__(self, environ: Environ) -> DeferredOptions | None:
        app = self.app
        adapter = app.url_map.bind_to_environ(
            environ,
            server_name=app.config["SERVER_NAME"],
            subdomain=app.url_map.default_subdomain or None,
        )
        try:
            endpoint, _ = adapter.match()
        except (HTTPException, RequestRedirect):
            return None
        return options_of(app.view_functions.get(endpoint))


class _ThroughAfterRequest:
    """The middleware's own answers (202s, job routes, problems) go through
    the app's ``after_request`` hooks as a view's response would: flask-cors
    adds its headers to them, a security-headers extension its own. Only the
    headers are taken; the status and body stay the middleware's."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def __call__(self, environ: Environ, reply: protocol.Reply) -> protocol.Reply:
        app = self.app
        if not app.after_request_funcs.get(None):
            return reply
        framing = [(k, v) for k, v in reply.headers if k.lower() in FRAMING]
        with app.request_context(environ):
            response = app.response_class(status=reply.status, headers=reply.headers)
            response = app.process_response(response)
            added = [(k, v) for k, v in response.headers.items() if k.lower() not in FRAMING]
        return dataclasses.replace(reply, headers=[*added, *framing])


FRAMING = ("content-type", "content-length")


def _in_request_context(app: Flask, ask: Callable[[RequestInfo], T]) -> Callable[[RequestInfo], T]:
    """``owner`` or ``dashboard`` run as a view would be, so that it can ask
    Flask who is asking (``session``, ``flask_login.current_user``)."""

    def asked_in_context(request: RequestInfo) -> T:
        with app.request_context(request.environ):  # type: ignore[arg-type]
            return ask(request)

    return asked_in_context


def _mark_raised(sender: Flask, exception: BaseException, **_: Any) -> None:
    """Flask renders an unhandled exception as its own HTML 500; in a job that
    page is not a result, so the attempt is recorded as raised."""
    with contextlib.suppress(LookupError):
        job = current_job()
        job.raised = True
        job.exception = exception
        # Flask has logged the traceback; this line ties it to the job.
        logger.error("job %s: attempt %d raised %s", job.id, job.attempt, type(exception).__name__)
