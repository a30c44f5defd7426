"""Which requests are deferred: the ``@deferred`` marker and route patterns.

A marker is an attribute on the view function itself, so it survives any
framework decorator that registers the function object unchanged, whichever
order the two decorators are written in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from ._jobs import DeferredOptions, RequestInfo

F = TypeVar("F", bound=Callable[..., Any])

MARKER = "__deferred_options__"
NEVER_DEFERRED = frozenset({"HEAD", "OPTIONS"})


@overload
def deferred(func: F, /) -> F: ...


@overload
def deferred(
    *,
    retries: int = 0,
    timeout: float | None = None,
    queue: str | None = None,
    mode: str = "always",
    callback: Callable[[RequestInfo], str | None] | None = None,
) -> Callable[[F], F]: ...


def deferred(
    func: Callable[..., Any] | None = None,
    /,
    *,
    retries: int = 0,
    timeout: float | None = None,
    queue: str | None = None,
    mode: str = "always",
    callback: Callable[[RequestInfo], str | None] | None = None,
) -> Any:
    """Mark a view so that requests to it answer ``202`` and run in the background.

    ``retries``: how often a failed attempt (raised, timed out, worker lost) is
    run again. Default 0, because most deferred routes are POSTs that are not
    safe to repeat. ``timeout``: seconds one attempt may take. ``queue``: the
    queue its jobs go to, instead of the middleware's own; only executors
    that run that queue run them. ``mode="prefer"``: the view runs inline as
    usual, and is deferred only for a client that sends ``Prefer:
    respond-async``. ``callback=fn``: ``fn(request)`` gives the URL the
    job's completion webhook goes to, or None for none (see the middleware's
    ``webhook_*`` options).

    Returns the same function, so it composes with route decorators.
    """
    options = DeferredOptions(
        retries=retries, timeout=timeout, queue=queue, mode=mode, callback=callback
    )

    def mark(view: F) -> F:
        setattr(view, MARKER, options)
        return view

    return mark if func is None else mark(func)


def options_of(endpoint: Any) -> DeferredOptions | None:
    """The options a view was marked with, or None for an ordinary view."""
    options = getattr(endpoint, MARKER, None)  # bound methods read it from their function
    if options is None:
        # A wrapper made before the view was marked: look through it.
        wrapped = getattr(endpoint, "__wrapped__", None)
        if wrapped is not None and wrapped is not endpoint:
            return options_of(wrapped)
    return options


def queues_of(views: Iterable[Any]) -> set[str]:
    """The queues named by ``@deferred(queue=...)`` on any of ``views``."""
    found = set()
    for view in views:
        options = options_of(view)
        if options is not None and options.queue is not None:
            found.add(options.queue)
    return found


# Methods a pattern may name: those a request body can carry work in, and
# WebDAV's. HEAD and OPTIONS are never deferred.
KNOWN_METHODS = frozenset(
    {
        "GET",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "QUERY",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "REPORT",
        "SEARCH",
    }
)


def _compile_pattern(
    pattern: str, prefix: str | None = None
) -> tuple[frozenset[str] | None, re.Pattern[str]]:
    """A pattern that could never match is refused here, when the middleware
    is built, rather than silently deferring nothing."""
    method, _, path = pattern.strip().rpartition(" ")
    methods = frozenset(m.upper() for m in method.split(",") if m) or None
    problem = _problem_with(methods or frozenset(), path, prefix)
    if problem:
        raise ValueError(f"route pattern {pattern!r}: {problem}")
    regex = ""
    for part in re.split(r"(\*\*|\*)", path):
        if part == "**":
            regex += ".*"
        elif part == "*":
            regex += "[^/]*"
        else:
            regex += re.escape(part)
    return methods, re.compile(regex + r"\Z")


def _problem_with(methods: frozenset[str], path: str, prefix: str | None) -> str | None:
    if not path.startswith("/"):
        return "the path must start with '/'"
    if "?" in path or "#" in path:
        return "a pattern matches the path alone, without a query or fragment"
    never = methods & NEVER_DEFERRED
    if never:
        return f"{', '.join(sorted(never))} requests are never deferred"
    unknown = methods - KNOWN_METHODS
    if unknown:
        return f"unknown method {', '.join(sorted(unknown))}"
    literal = re.split(r"\*", path, maxsplit=1)[0]
    if prefix is not None and (literal == prefix or literal.startswith(prefix + "/")):
        return f"the job routes are served under {prefix}; nothing there is deferred"
    return None


class RoutePatterns:
    """Deferred routes named by pattern, for apps whose code cannot be edited.

    ``"POST /reports"`` matches one method and path; ``"/exports/*"`` matches
    every method with one path segment after ``/exports/``; ``**`` matches the
    rest of the path, slashes included.
    """

    def __init__(
        self,
        patterns: Iterable[str],
        options: DeferredOptions | None = None,
        prefix: str | None = None,
    ) -> None:
        """``prefix``: where the job routes are, which no pattern may name."""
        self.options = options or DeferredOptions()
        self._compiled = [_compile_pattern(p, prefix) for p in patterns]

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def match(self, method: str, path: str) -> DeferredOptions | None:
        for methods, regex in self._compiled:
            if (methods is None or method in methods) and regex.match(path):
                return self.options
        return None
