"""Finding ``@deferred`` endpoints through a Starlette app's own router.

Beside :mod:`.flask`: each framework's way of telling which view a request
goes to. :class:`DeferredMiddleware` uses it for any app it wraps that has
Starlette routes (Starlette, FastAPI); plain ASGI apps name their routes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from starlette.routing import Host, Match, WebSocketRoute

from ._jobs import DeferredOptions
from ._routes import options_of

Scope = Any  # an HTTP scope, as the router reads it
logger = logging.getLogger("deferred_middleware")


def matched(routes: Iterable[Any], scope: Scope) -> tuple[Any, Scope] | None:
    """The route that will serve this request and the scope it will see
    (path parameters included), found the way Starlette's router finds it
    (first full match)."""
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:
            continue
        sub_routes = getattr(route, "routes", None)  # Mount and Host
        if sub_routes is not None:
            return matched(sub_routes, {**scope, **child_scope})
        return route, {**scope, **child_scope}
    return None


def marked_options(routes: Iterable[Any], scope: Scope) -> DeferredOptions | None:
    """The ``@deferred`` options of the route that will serve this request."""
    found = matched(routes, scope)
    return None if found is None else options_of(found[1].get("endpoint"))


def has_host_routes(routes: Iterable[Any]) -> bool:
    for route in routes:
        if isinstance(route, Host):
            return True
        sub_routes = getattr(route, "routes", None)
        if sub_routes and has_host_routes(sub_routes):
            return True
    return False


class MarkedRoutes:
    """Remembers which (method, path) pairs are deferred, so the routes are not
    searched again on every request. Routing that looks at more than the
    method and path (``Host`` routes) is never cached; the cache is forgotten
    when the routes change or when it grows past its bound."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._answers: dict[tuple[str, str], DeferredOptions | None] = {}
        self._routes_seen: tuple[int, int] = (0, 0)
        self._cacheable = True

    def lookup(self, routes: Any, scope: Scope, method: str, path: str) -> DeferredOptions | None:
        fingerprint = (id(routes), len(routes))
        if fingerprint != self._routes_seen:
            for mistake in never_deferred(routes):  # said once, when the routes are new
                logger.warning(mistake)
            self._answers.clear()
            self._routes_seen = fingerprint
            self._cacheable = not has_host_routes(routes)
        if not self._cacheable:
            return marked_options(routes, scope)
        key = (method, path)
        try:
            return self._answers[key]
        except KeyError:
            pass
        if len(self._answers) >= self.LIMIT:
            self._answers.clear()
        answer = self._answers[key] = marked_options(routes, scope)
        return answer


def never_deferred(routes: Iterable[Any]) -> list[str]:
    """Marked endpoints that no request can reach as a deferred one: a
    websocket route is served as it is, whatever its marker says."""
    return [
        f"@deferred on the websocket route {route.path}: a websocket is never deferred"
        for route, endpoint in endpoints_with_routes(routes)
        if isinstance(route, WebSocketRoute) and options_of(endpoint) is not None
    ]


def endpoints(routes: Iterable[Any]) -> Iterable[Any]:
    """Every endpoint below ``routes``, mounts included."""
    for _, endpoint in endpoints_with_routes(routes):
        yield endpoint


def endpoints_with_routes(routes: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    """Every (route, endpoint) below ``routes``, mounts included."""
    for route in routes:
        sub_routes = getattr(route, "routes", None)
        if sub_routes:
            yield from endpoints_with_routes(sub_routes)
        elif getattr(route, "endpoint", None) is not None:
            yield route, route.endpoint
