"""Push instead of poll, through real servers: ``Prefer: wait`` and
``respond-async``, and event streams."""

from __future__ import annotations

import json

import httpx
import pytest

from .support import count_rows

pytestmark = pytest.mark.servers
WEB = ["uvicorn", "gunicorn-gthread"]


@pytest.mark.parametrize("kind", WEB)
def test_prefer_wait_answers_with_the_result_when_it_is_ready_in_time(serve, kind, sqlite_url):
    server = serve(kind)
    answer = httpx.post(server.base + "/tiny", headers={"Prefer": "wait=20"}, timeout=30)
    assert answer.status_code == 200
    assert answer.content == b"ok"
    assert answer.headers["preference-applied"] == "wait=20"
    assert answer.headers["vary"] == "Prefer"
    assert count_rows(sqlite_url) == 1  # it still went through the job table


@pytest.mark.parametrize("kind", WEB)
def test_prefer_wait_gives_the_202_when_the_job_is_not_done_in_time(serve, kind, gates):
    server = serve(kind, MAX_WAIT="1")
    answer = httpx.post(
        server.base + "/report?gate=g", headers={"Prefer": "respond-async, wait=60"}, timeout=30
    )
    assert answer.status_code == 202
    assert answer.headers["vary"] == "Prefer"
    assert answer.headers["preference-applied"] == "respond-async"
    gates("g")
    result = httpx.get(server.base + answer.headers["location"], params={"wait": 20}, timeout=30)
    assert result.status_code == 201


@pytest.mark.parametrize("kind", WEB)
def test_a_prefer_mode_route_runs_inline_unless_the_client_asks_for_async(serve, kind, sqlite_url):
    server = serve(kind)
    inline = httpx.post(server.base + "/maybe")
    assert (inline.status_code, inline.json()) == (200, {"job": None})
    assert inline.headers["vary"] == "Prefer"
    assert "preference-applied" not in inline.headers
    assert count_rows(sqlite_url) == 0

    accepted = httpx.post(server.base + "/maybe", headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202
    assert accepted.headers["preference-applied"] == "respond-async"
    job_id = accepted.json()["id"]
    result = httpx.get(server.base + accepted.headers["location"], params={"wait": 20}, timeout=30)
    assert result.json() == {"job": job_id}


@pytest.mark.parametrize(("kind", "app"), [("uvicorn", "starlette"), ("gunicorn-gthread", "flask")])
def test_prefer_wait_sees_a_job_that_a_worker_finishes(
    serve, kind, app, start_worker, database_url
):
    server = serve(kind, DATABASE_URL=database_url, EXECUTE="0", POLL_INTERVAL="0.2")
    start_worker(app)
    answer = httpx.post(server.base + "/tiny", headers={"Prefer": "wait=20"}, timeout=30)
    assert (answer.status_code, answer.content) == (200, b"ok")
    assert answer.headers["preference-applied"] == "wait=20"


# -- /jobs/{id}/events ---------------------------------------------------------


def read_events(lines, until=None) -> list[tuple[int, dict]]:
    """The status events of a stream's lines, read until it closes (or
    ``until`` says)."""
    seen: list[tuple[int, dict]] = []
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if fields.get("event") == "status":
            seen.append((int(fields["id"]), json.loads(fields["data"])))
            if until is not None and until(seen):
                return seen
        fields = {}
    return seen


STREAMING = ["uvicorn", "hypercorn", "gunicorn-gthread"]


@pytest.mark.parametrize("kind", STREAMING)
def test_an_event_stream_follows_a_job_to_its_end(serve, kind, gates):
    server = serve(kind)
    accepted = httpx.post(server.base + "/report?gate=g")
    events_url = server.base + accepted.headers["operation-location"] + "/events"
    with httpx.stream("GET", events_url, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = read_events(lines, until=lambda seen: seen[-1][1]["progress"] == 0.5)
        gates("g")
        rest = read_events(lines)
    seen = first + rest
    statuses = [document["status"] for _, document in seen]
    assert statuses[-1] == "succeeded"
    assert "running" in statuses
    ids = [number for number, _ in seen]
    assert ids == sorted(set(ids))

    last = ids[-1]
    again = httpx.get(events_url, headers={"Last-Event-ID": str(last)}, timeout=30)
    assert again.status_code == 204  # nothing more will come: EventSource stops
    earlier = httpx.get(events_url, headers={"Last-Event-ID": str(last - 1)}, timeout=30)
    assert [d["status"] for _, d in read_events(earlier.iter_lines())] == ["succeeded"]


@pytest.mark.parametrize("kind", STREAMING)
def test_a_quiet_event_stream_sends_keep_alives(serve, kind):
    server = serve(kind, EVENT_KEEP_ALIVE="0.3")
    accepted = httpx.post(server.base + "/report?gate=never")
    events_url = server.base + accepted.headers["operation-location"] + "/events"
    with httpx.stream("GET", events_url, timeout=30) as response:
        comments = 0
        for line in response.iter_lines():
            comments += line.startswith(":")
            if comments == 2:
                break
    assert comments == 2


@pytest.mark.parametrize(("kind", "app"), [("uvicorn", "starlette"), ("gunicorn-gthread", "flask")])
def test_an_event_stream_follows_a_job_that_a_worker_runs(
    serve, kind, app, start_worker, database_url
):
    server = serve(kind, DATABASE_URL=database_url, EXECUTE="0", POLL_INTERVAL="0.2")
    accepted = httpx.post(server.base + "/tiny")
    events_url = server.base + accepted.headers["operation-location"] + "/events"
    with httpx.stream("GET", events_url, timeout=30) as response:
        lines = response.iter_lines()
        first = read_events(lines, until=lambda seen: True)
        start_worker(app)
        rest = read_events(lines)
    statuses = [document["status"] for _, document in first + rest]
    assert statuses[0] == "queued"
    assert statuses[-1] == "succeeded"
