"""Follow a ``202 Accepted`` to the job's final response, with httpx.

    response = follow(client, client.post("/reports", json=...), timeout=60)
    response = await afollow(async_client, await async_client.post(...))

Any other response comes back unchanged, so ``follow`` can wrap every call.
The plan of requests is written once, without I/O (:func:`_plan`); the two
functions only carry it out, as httpx's own clients share their models.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import anyio
import httpx

__all__ = ["JobCanceled", "JobGone", "JobTimeout", "afollow", "follow"]

LONG_POLL = 30.0
"""Seconds one poll asks the server to hold it (the server caps it at its
``max_wait``)."""
READ_SLACK = 10.0
"""Extra read time on a long-poll, beyond what the server was asked to hold."""


class JobCanceled(Exception):
    """The job was canceled: it has no result."""

    def __init__(self, status_url: str) -> None:
        super().__init__(f"the job at {status_url} was canceled")
        self.status_url = status_url


class JobGone(LookupError):
    """The job was deleted (or pruned) before its result was fetched."""

    def __init__(self, status_url: str) -> None:
        super().__init__(f"the job at {status_url} no longer exists")
        self.status_url = status_url


class JobTimeout(TimeoutError):
    """``timeout`` seconds passed before the job finished. It still runs;
    ``status_url`` tells how it ends."""

    def __init__(self, status_url: str, timeout: float) -> None:
        super().__init__(f"the job at {status_url} did not finish within {timeout} s")
        self.status_url = status_url


@dataclass(frozen=True)
class _Get:
    url: httpx.URL
    wait: float


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Step = Generator["_Get | _Sleep", "httpx.Response | None", httpx.Response]


def is_accepted_job(response: httpx.Response) -> bool:
    """A 202 from the middleware names both the result and the status monitor."""
    headers = response.headers
    return response.status_code == 202 and "location" in headers and "operation-location" in headers


def _retry_after(response: httpx.Response, default: float = 1.0) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default  # an HTTP-date: the middleware never sends one


def _plan(response: httpx.Response, timeout: float | None) -> _Step:
    """Poll the result URL with ``?wait`` until it stops answering 202.

    ``Retry-After`` paces the polls: the next one is sent no sooner than
    that after the previous one was, so a server that holds polls is asked
    again at once and one that does not is not asked in a tight loop."""
    base = response.request.url
    result_url = base.join(response.headers["location"])
    status_url = str(base.join(response.headers["operation-location"]))
    deadline = None if timeout is None else time.monotonic() + timeout
    pace = _retry_after(response)
    while True:
        remaining = LONG_POLL if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout(status_url, timeout)  # type: ignore[arg-type]  # set: a deadline
        sent = time.monotonic()
        answer = yield _Get(result_url, round(min(remaining, LONG_POLL), 1))
        assert answer is not None
        if answer.status_code in (404, 409):
            yield from _explain(status_url)
        if not _pending(answer):
            return answer
        pace = _retry_after(answer, pace)
        pause = pace - (time.monotonic() - sent)
        if deadline is not None:
            pause = min(pause, deadline - time.monotonic())
        if pause > 0:
            yield _Sleep(pause)


def _pending(answer: httpx.Response) -> bool:
    """Still running, or the job store briefly away (a 503 that names a
    ``Retry-After``: a finished job's own response never carries one)."""
    return answer.status_code == 202 or (
        answer.status_code == 503 and "retry-after" in answer.headers
    )


def _explain(status_url: str) -> Generator[_Get, httpx.Response | None, None]:
    """A 409 or 404 is the handler's own answer unless the status monitor
    says the job was canceled or is gone."""
    status = yield _Get(httpx.URL(status_url), 0)
    assert status is not None
    if status.status_code == 404:
        raise JobGone(status_url)
    if status.status_code == 200 and status.json().get("status") == "canceled":
        raise JobCanceled(status_url)


def _poll_timeout(client_timeout: httpx.Timeout, wait: float) -> httpx.Timeout:
    read = client_timeout.read
    return httpx.Timeout(
        connect=client_timeout.connect,
        read=None if read is None else max(read, wait + READ_SLACK),
        write=client_timeout.write,
        pool=client_timeout.pool,
    )


def _request(client: httpx.Client | httpx.AsyncClient, step: _Get) -> httpx.Request:
    params = {"wait": step.wait} if step.wait else None
    return client.build_request(
        "GET", step.url, params=params, timeout=_poll_timeout(client.timeout, step.wait)
    )


def follow(
    client: httpx.Client, response: httpx.Response, timeout: float | None = None
) -> httpx.Response:
    """The job's final response for a 202 from the middleware; any other
    response unchanged. The final response is the handler's own, whatever
    its status (a failed job without one is the middleware's 500 problem).

    Raises :class:`JobCanceled`, :class:`JobGone`, or :class:`JobTimeout`
    once ``timeout`` seconds have passed."""
    if not is_accepted_job(response):
        return response
    plan = _plan(response, timeout)
    answer: httpx.Response | None = None
    try:
        while True:
            step = plan.send(answer)
            if isinstance(step, _Sleep):
                time.sleep(step.seconds)
                answer = None
            else:
                answer = client.send(_request(client, step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def afollow(
    client: httpx.AsyncClient, response: httpx.Response, timeout: float | None = None
) -> httpx.Response:
    """As :func:`follow`, for ``httpx.AsyncClient`` (asyncio or trio)."""
    if not is_accepted_job(response):
        return response
    plan = _plan(response, timeout)
    answer: httpx.Response | None = None
    try:
        while True:
            step = plan.send(answer)
            if isinstance(step, _Sleep):
                await anyio.sleep(step.seconds)
                answer = None
            else:
                answer = await client.send(_request(client, step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
