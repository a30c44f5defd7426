"""The operator's routes under the job prefix: ``{prefix}/metrics`` (with
``metrics=True``) and the dashboard at ``{prefix}/`` (with ``dashboard=fn``).

Both are blocking: they read the table and are nothing like a hot path, so
the ASGI adapter runs them in a thread.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from . import _dashboard as dashboard
from . import _protocol as protocol
from ._ids import is_job_id
from ._jobs import Status
from .store import StoreUnavailable

if TYPE_CHECKING:
    from ._core import JobCore

METRICS, DASHBOARD = "metrics", "dashboard"
LIST_LIMIT = 100

PAGE_HEADERS = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
]


class OperatorRoutes:
    def __init__(self, core: JobCore) -> None:
        self.core = core
        self.config = core.config

    def route_of(self, tail: str) -> str | None:
        """Which operator route ``tail`` is, if that route is switched on."""
        if tail == "/metrics" and self.config.metrics:
            return METRICS
        if tail == "/" and self.config.dashboard is not None:
            return DASHBOARD
        return None

    def metrics(self, method: str) -> protocol.Reply:
        if method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        with contextlib.suppress(StoreUnavailable):  # then the scrape says the store is down
            self.core.prepare()
        body, media_type = self.core.metrics.exposition()
        headers = [("content-type", media_type), ("cache-control", "no-store")]
        headers.append(("content-length", str(len(body))))
        return protocol.for_method(protocol.Reply(200, headers, body), method)

    def dashboard(
        self, method: str, query: bytes, allowed: bool, from_page: bool
    ) -> protocol.Reply:
        """The dashboard for whoever ``dashboard=fn`` let in (404 to anyone
        else, as if it were not there). ``from_page``: the request carries
        the header only the page's own buttons send."""
        if not allowed:
            return protocol.unknown(method)
        params = {k: v[0] for k, v in parse_qs(query.decode("latin-1")).items()}
        try:
            self.core.prepare()
            if method in ("GET", "HEAD"):
                reply = self._show(params)
            elif method == "POST":
                reply = self._act(params, from_page)
            else:
                return _not_allowed("GET, HEAD, POST")
        except StoreUnavailable:
            return protocol.unavailable(self.config.retry_after)
        return protocol.for_method(reply, method)

    def _show(self, params: dict[str, str]) -> protocol.Reply:
        now = self.core.clock()
        store = self.core.store
        if "job" in params:
            job_id = params["job"]
            job = store.get(job_id, request=True) if is_job_id(job_id) else None
            if job is None:
                return protocol.not_found()
            detail = store.error_detail(job_id)
            if params.get("part") == "job":
                return _fragment(dashboard.job_detail(job, detail, now))
            return _page(dashboard.job_page(job, detail, now))
        try:
            status = Status(params["status"]) if params.get("status") else None
        except ValueError:
            return protocol.bad_request("Unknown status.")
        filters = dashboard.Filters(status, params.get("queue") or None)
        jobs = store.list(
            [status] if status else (),
            queues=[filters.queue] if filters.queue else (),
            limit=LIST_LIMIT,
        )
        if params.get("part") == "rows":
            return _fragment(dashboard.job_rows(jobs, now))
        queues = {count.queue for count in store.counts()}
        return _page(dashboard.list_page(jobs, queues, filters, now))

    def _act(self, params: dict[str, str], from_page: bool) -> protocol.Reply:
        if not from_page:
            detail = f"Send the {dashboard.ACTION_HEADER} header, as the dashboard does."
            return protocol.problem(403, "Forbidden", detail)
        action, job_id = params.get("action"), params.get("job", "")
        if action not in ("cancel", "retry") or not is_job_id(job_id):
            return protocol.bad_request("Expected action=cancel or retry and a job id.")
        if action == "cancel":
            job = self.core.cancel(job_id)
            if job is None:
                return protocol.not_found()
            if job.status is not Status.CANCELED:
                return protocol.problem(409, "Conflict", "The job has already finished.")
        elif not self.core.retry(job_id):
            if self.core.store.get(job_id) is None:
                return protocol.not_found()
            return protocol.problem(409, "Conflict", "Only failed or canceled jobs run again.")
        return protocol.Reply(204, [])


def _page(page: dashboard.Page) -> protocol.Reply:
    headers = [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", str(len(page.body))),
        ("content-security-policy", page.policy),
        *PAGE_HEADERS,
    ]
    return protocol.Reply(200, headers, page.body)


def _fragment(html: str) -> protocol.Reply:
    body = html.encode()
    headers = [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", str(len(body))),
        *PAGE_HEADERS,
    ]
    return protocol.Reply(200, headers, body)


def _not_allowed(allow: str) -> protocol.Reply:
    reply = protocol.problem(405, "Method Not Allowed")
    reply.headers.append(("allow", allow))
    return reply
