"""The client's plan of polls, against scripted answers (httpx's MockTransport):
pacing by Retry-After, the middleware's own 503, long-poll timeouts."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from deferred_middleware import client as client_module
from deferred_middleware.client import JobCanceled, JobGone, JobTimeout, afollow, follow

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


class FakeTime:
    """The plan's clock: it moves only when the plan pauses."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(client_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(client_module.time, "sleep", fake.sleep)
    monkeypatch.setattr(client_module.anyio, "sleep", fake.asleep)
    return fake


@pytest.fixture
def sleeps(fake_time):
    """Pauses the plan asks for, recorded instead of slept."""
    return fake_time.slept


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


def test_a_timeout_of_zero_asks_nothing(fake_time):
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


def test_a_404_from_a_job_that_is_gone_raises_job_gone():
    script = Script(httpx.Response(404), httpx.Response(404))
    client = httpx.Client(transport=httpx.MockTransport(script), base_url="http://api")
    with client, pytest.raises(JobGone) as gone:
        follow(client, accepted(client))
    assert gone.value.status_url == f"http://api{JOB}"
    assert str(gone.value) == f"the job at http://api{JOB} no longer exists"
    status_check = script.asked[1]
    assert (status_check.url.path, status_check.url.query) == (JOB, b"")  # no long-poll


def test_a_409_from_a_canceled_job_raises_job_canceled():
    canceled = httpx.Response(200, json={"status": "canceled"})
    script = Script(httpx.Response(409), canceled)
    client = httpx.Client(transport=httpx.MockTransport(script), base_url="http://api")
    with client, pytest.raises(JobCanceled) as raised:
        follow(client, accepted(client))
    assert raised.value.status_url == f"http://api{JOB}"
    assert str(raised.value) == f"the job at http://api{JOB} was canceled"


def test_a_handler_s_own_404_comes_back_when_the_job_is_there():
    script = Script(httpx.Response(404, text="no such report"), httpx.Response(200, json={}))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        assert follow(client, accepted(client)).text == "no such report"


def test_job_timeout_names_the_job_and_the_time(sleeps):
    script = Script(pending("3"))
    client = httpx.Client(transport=httpx.MockTransport(script), base_url="http://api")
    with client, pytest.raises(JobTimeout) as raised:
        follow(client, accepted(client), timeout=0.5)
    assert raised.value.status_url == f"http://api{JOB}"
    assert str(raised.value) == f"the job at http://api{JOB} did not finish within 0.5 s"
    assert len(script.asked) == 1  # a short timeout still asks once
    assert sleeps == [0.5]  # the pause never outlasts the time left


def test_a_short_pace_is_kept_and_a_zero_pace_polls_at_once(sleeps):
    script = Script(pending("0.5"), pending("0"), httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        follow(client, accepted(client))
    assert len(sleeps) == 1 and 0.3 < sleeps[0] <= 0.5


def test_a_poll_without_retry_after_keeps_the_last_pace(sleeps):
    script = Script(httpx.Response(202, json={}), httpx.Response(200))
    with httpx.Client(transport=httpx.MockTransport(script), base_url="http://api") as client:
        follow(client, accepted(client))  # the 202 said Retry-After: 2
    assert len(sleeps) == 1 and 1.5 < sleeps[0] <= 2


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (httpx.Timeout(3.0), {"connect": 3.0, "read": 40.0, "write": 3.0, "pool": 3.0}),
        (httpx.Timeout(60.0), {"connect": 60.0, "read": 60.0, "write": 60.0, "pool": 60.0}),
        (httpx.Timeout(None), {"connect": None, "read": None, "write": None, "pool": None}),
    ],
)
def test_a_long_poll_keeps_the_client_s_timeouts_but_reads_long_enough(timeout, expected):
    script = Script(httpx.Response(200))
    client = httpx.Client(
        transport=httpx.MockTransport(script), base_url="http://api", timeout=timeout
    )
    with client:
        follow(client, accepted(client))
    assert script.asked[0].extensions["timeout"] == expected


def test_the_async_follower_paces_and_times_out(sleeps):
    script = Script(pending("1"), pending("1"))

    async def go() -> None:
        transport = httpx.MockTransport(script)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            request = client.build_request("POST", "/reports")
            first = httpx.Response(202, headers=ACCEPTED_HEADERS, request=request)
            await afollow(client, first, timeout=1.5)

    with pytest.raises(JobTimeout):
        asyncio.run(go())
    assert sleeps == [1.0, 0.5]  # paced, then no longer than the time left
