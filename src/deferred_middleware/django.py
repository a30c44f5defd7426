"""Django: ``@deferred`` views, found through Django's own URL resolver.

Wrap the project's application where Django builds it, in ``wsgi.py``::

    application = deferred_wsgi(get_wsgi_application())

or in ``asgi.py``::

    application = deferred_asgi(get_asgi_application())

and mark views with ``@deferred`` (a class-based view: the class). Django's
resolver does not know methods, so every method a marked view is sent but
HEAD and OPTIONS is deferred; a view that also answers GET inline belongs
in ``routes=["POST /path"]`` instead. Jobs replay into the same application,
through Django's middleware, as the request would have gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.urls import URLResolver, get_resolver, resolve
from django.urls.exceptions import Resolver404

from ._asgi_io import route_path
from ._jobs import DeferredOptions
from ._routes import options_of, queues_of
from .asgi import DeferredMiddleware
from .wsgi import DeferredWSGIMiddleware, Environ, from_wsgi_string

if TYPE_CHECKING:
    from asgiref.typing import ASGI3Application, HTTPScope
    from typing_extensions import Unpack

    from ._config import Options
    from .runner.wsgi import WSGIApp

__all__ = ["deferred_asgi", "deferred_wsgi", "view_options"]


def deferred_wsgi(application: WSGIApp, **options: Unpack[Options]) -> DeferredWSGIMiddleware:
    """Django's WSGI application with its ``@deferred`` views deferred."""
    return DeferredWSGIMiddleware(
        application,
        find_options=_wsgi_view_options,
        find_queues=marked_queues,
        **options,
    )


def deferred_asgi(application: ASGI3Application, **options: Unpack[Options]) -> DeferredMiddleware:
    """Django's ASGI application with its ``@deferred`` views deferred."""
    return DeferredMiddleware(
        WithLifespan(application),
        find_options=_asgi_view_options,
        find_queues=marked_queues,
        **options,
    )


def view_options(path: str) -> DeferredOptions | None:
    """The ``@deferred`` options of the view Django resolves ``path`` to."""
    try:
        match = resolve(path)
    except Resolver404:
        return None
    found = options_of(match.func)
    if found is None:  # a class-based view marks its class
        found = options_of(getattr(match.func, "view_class", None))
    return found


def marked_queues() -> set[str]:
    """The queues the project's marked views name, for the executor to run."""
    views = list(_views(get_resolver().url_patterns))
    return queues_of([*views, *(getattr(view, "view_class", None) for view in views)])


def _wsgi_view_options(environ: Environ) -> DeferredOptions | None:
    return view_options(from_wsgi_string(environ.get("PATH_INFO", "")) or "/")


def _asgi_view_options(scope: HTTPScope) -> DeferredOptions | None:
    return view_options(route_path(scope) or "/")


def _views(patterns: list[Any]) -> Iterator[Any]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _views(pattern.url_patterns)
        else:
            yield pattern.callback


class WithLifespan:
    """Django's ASGI handler serves HTTP alone and refuses a lifespan; the
    middleware starts and drains its executor with the server's lifespan,
    so that part is answered here."""

    def __init__(self, app: ASGI3Application) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
