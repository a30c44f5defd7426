"""deferred-middleware: make a slow endpoint asynchronous without rewriting it.

Mark a view with ``@deferred`` (or name its route), wrap the app, and requests
to it answer ``202 Accepted`` at once; the stored request is replayed into the
app later and its response is kept in a SQL job table, served from status and
result routes the middleware mounts itself.
"""

from ._context import RunningJob, current_job
from ._jobs import RequestInfo, Status
from ._routes import deferred
from .asgi import DeferredMiddleware
from .wsgi import DeferredWSGIMiddleware

__all__ = [
    "DeferredMiddleware",
    "DeferredWSGIMiddleware",
    "RequestInfo",
    "RunningJob",
    "Status",
    "current_job",
    "deferred",
]
