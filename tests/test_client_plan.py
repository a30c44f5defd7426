"""The client's plan of polls, against scripted answers (httpx's MockTransport):
pacing by Retry-After, the middleware's own 503, long-poll timeouts."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from deferred_middleware import client as client_module
from deferred_middleware.client import JobTimeout, afollow, follow

JOB = "/jobs/" + "a" * 32
ACCEPTED_HEADERS = {"location": JOB + "/result", "operation-location": JOB, "retry-after": "2"}


class Script:
    """Answers requests in order; remembers what was asked."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.asked: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request)
        return self.answers.pop(0)


@pytest.fixture
def sleeps(monkeypatch):
    """Pauses the plan asks for, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    return slept


def accepted(client: httpx.Client) -> httpx.Response:
    request = client.build_request("POST", "/reports")
    return httpx.Response(202, headers=ACCEPTED_HEADERS, request=request)


def pending(retry_after: str = "2") -> httpx.Response:
    return httpx.Response(202, headers={"retry-after": retry_after}, json={"status": "running"})


def test_polls_are_long_polls_on_the_result_with_room_to_read(sleeps):
    script = Script(httpx.Response(200, text="done"))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        final = follow(client, accepted(client))
    assert final.text == "done"
    (poll,) = script.asked
    assert str(poll.url) == f"http://api{JOB}/result?wait=30.0"
    assert poll.extensions["timeout"]["read"] == 40.0
    assert sleeps == []


def test_a_poll_that_comes_back_at_once_is_paced_by_retry_after(sleeps):
    script = Script(pending("3"), pending("3"), httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        follow(client, accepted(client))
    assert len(script.asked) == 3
    assert len(sleeps) == 2 and all(2.5 < pause <= 3 for pause in sleeps)


def test_a_retry_after_that_is_a_date_falls_back_to_the_last_pace(sleeps):
    script = Script(pending("Fri, 27 Nov 2026 10:00:00 GMT"), httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        follow(client, accepted(client))
    assert len(sleeps) == 1 and 1.5 < sleeps[0] <= 2


def test_the_middleware_s_503_is_waited_out_and_a_handler_s_503_returned(sleeps):
    store_away = httpx.Response(503, headers={"retry-after": "1"})
    handler_503 = httpx.Response(503, text="busy")  # finished results carry no Retry-After
    script = Script(store_away, handler_503)
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        final = follow(client, accepted(client))
    assert (final.status_code, final.text) == (503, "busy")
    assert len(script.asked) == 2


def test_a_409_that_the_status_monitor_does_not_explain_is_the_handler_s(sleeps):
    conflict = httpx.Response(409, text="taken")
    running = httpx.Response(200, json={"status": "succeeded"})
    script = Script(conflict, running)
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        final = follow(client, accepted(client))
    assert final.text == "taken"
    assert [r.url.path for r in script.asked] == [JOB + "/result", JOB]


def test_the_last_poll_asks_no_more_than_the_time_left(sleeps):
    script = Script(httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        follow(client, accepted(client), timeout=4)
    assert 3 < float(script.asked[0].url.params["wait"]) <= 4


def test_a_timeout_of_zero_asks_nothing():
    script = Script()
    client = httpx.Client(transport=httpx.MockTransport(script), base_url="http://api")
    with client, pytest.raises(JobTimeout):
        follow(client, accepted(client), timeout=0)
    assert script.asked == []


@pytest.mark.parametrize(
    "headers",
    [
        {"location": JOB + "/result"},  # a 202 of someone else's
        {"operation-location": JOB},
    ],
)
def test_a_202_without_both_urls_is_not_followed(headers):
    with httpx.Client(transport=httpx.MockTransport(Script()), base_url="http://api") as client:
        other = httpx.Response(202, headers=headers, request=client.build_request("GET", "/"))
        assert follow(client, other) is other


def test_the_async_follower_runs_the_same_plan():
    script = Script(pending("0"), httpx.Response(201, text="made"))

    async def go() -> httpx.Response:
        transport = httpx.MockTransport(script)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            request = client.build_request("POST", "/reports")
            first = httpx.Response(202, headers=ACCEPTED_HEADERS, request=request)
            return await afollow(client, first)

    final = asyncio.run(go())
    assert (final.status_code, final.text) == (201, "made")
    assert len(script.asked) == 2
