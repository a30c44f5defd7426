"""``/jobs/{id}/events``: what a subscriber is sent (sans I/O), and both
drivers over the in-memory store."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from deferred_middleware import _events as events
from deferred_middleware import _protocol as protocol
from deferred_middleware._jobs import Status
from deferred_middleware._protocol import Conditions
from deferred_middleware.store import StoreUnavailable

from .policy_harness import Harness
from .support import make_job

URLS = protocol.JobURLs("/jobs")


def parse(chunk: bytes) -> tuple[str, int, dict]:
    fields = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
    return fields["event"], int(fields["id"]), json.loads(fields["data"])


# -- what is sent --------------------------------------------------------------


def test_an_event_carries_the_status_document_with_the_revision_as_its_id():
    job = make_job()
    job.revision = 7
    chunk = events.status_event(job, URLS)
    assert chunk.endswith(b"\n\n") and chunk.count(b"\n") == 4  # data is one line
    kind, number, document = parse(chunk)
    assert (kind, number) == ("status", 7)
    assert document == json.loads(protocol.compact_json(protocol.status_document(job, URLS)))


def stream_at(last_seen=None, keep_alive=15.0, poll=1.0):
    return events.EventStream(URLS, last_seen, keep_alive, poll, now=100.0)


def test_the_current_state_comes_first_then_only_changes():
    stream, job = stream_at(), make_job()
    assert parse(stream.read(job, 100.0))[1] == 0
    assert stream.read(job, 101.0) == b""  # nothing new
    job.revision, job.status = 1, Status.RUNNING
    assert parse(stream.read(job, 102.0))[2]["status"] == "running"
    assert not stream.ended


def test_a_client_that_has_the_current_state_is_not_sent_it_again():
    stream, job = stream_at(last_seen=3), make_job()
    job.revision = 3
    assert stream.read(job, 100.0) == b""
    job.revision = 4
    assert parse(stream.read(job, 100.0))[1] == 4


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED, Status.CANCELED])
def test_the_stream_ends_right_after_a_final_status(status):
    stream, job = stream_at(), make_job()
    job.status, job.revision = status, 2
    assert parse(stream.read(job, 100.0))[2]["status"] == status.value
    assert stream.ended


def test_the_stream_ends_when_the_job_is_gone():
    stream = stream_at()
    assert stream.read(None, 100.0) == b""
    assert stream.ended


def test_a_keep_alive_comes_after_a_quiet_keep_alive_interval():
    stream, job = stream_at(keep_alive=15.0, poll=1.0), make_job()
    stream.read(job, 100.0)  # an event at 100: quiet until 115
    assert stream.idle(105.0) == (b"", 1.0)  # look again after a poll interval
    assert stream.idle(114.5) == (b"", 0.5)
    assert stream.idle(115.0) == (events.KEEP_ALIVE, 1.0)
    assert stream.idle(116.0) == (b"", 1.0)  # the keep-alive restarted the interval
    job.revision = 1
    stream.read(job, 129.0)  # so does an event
    assert stream.idle(131.0)[0] == b""


@pytest.mark.parametrize(
    ("value", "seen"),
    [
        (None, None),
        ("4", 4),
        (" 12 ", 12),
        ("", None),
        ("-1", None),
        ("x", None),
        ("٣", None),
        ("9" * 30, None),
    ],
)
def test_last_event_id_is_a_revision_or_nothing(value, seen):
    assert events.last_event_id(value) == seen


# -- both drivers over the in-memory store ---------------------------------------


def open_stream(h: Harness, job_id: str, last: str | None = None, method: str = "GET"):
    return h.core.answer(f"/{job_id}/events", method, b"", "", Conditions(last_event_id=last))


def test_a_blocking_stream_follows_a_job_to_its_end():
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    reply = open_stream(h, job_id)
    assert (reply.status, reply.headers) == (200, events.HEADERS)
    chunks = iter(reply.stream)
    seen = [parse(next(chunks))]
    h.claim()
    seen.append(parse(next(chunks)))
    replay = h.launcher.last(job_id)
    replay.progress(0.5, "half")
    seen.append(parse(next(chunks)))
    replay.respond()
    seen.append(parse(next(chunks)))
    assert list(chunks) == []  # closed after the final event
    assert [document["status"] for _, _, document in seen] == [
        "queued",
        "running",
        "running",
        "succeeded",
    ]
    assert seen[2][2]["progress"] == 0.5
    numbers = [number for _, number, _ in seen]
    assert numbers == sorted(set(numbers))
    assert h.notifier._waiters == {}


def test_an_async_stream_follows_a_job_to_its_end_woken_by_this_process():
    h = Harness(poll_interval=60)  # only wake-ups can move it in time

    async def follow() -> list[str]:
        reply = await h.core.answer_async(f"/{job_id}/events", "GET", b"", "")
        statuses = []
        async for chunk in reply.stream:
            statuses.append(parse(chunk)[2]["status"])
            if statuses == ["queued"]:
                threading.Thread(target=cancel).start()
        return statuses

    def cancel() -> None:
        h.route(f"/jobs/{job_id}/cancel", "POST")

    job_id = h.submit()
    assert asyncio.run(follow()) == ["queued", "canceled"]
    assert h.notifier._waiters == {}


def test_a_stream_closed_by_the_server_drops_its_subscription():
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    stream = open_stream(h, job_id).stream
    next(stream)
    assert job_id in h.notifier._waiters
    stream.close()  # what a WSGI server does when the client has gone
    assert h.notifier._waiters == {}


def test_a_reconnect_that_has_the_current_state_waits_for_the_next_change():
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    current = str(h.job(job_id).revision)
    threading.Timer(0.05, lambda: h.route(f"/jobs/{job_id}/cancel", "POST")).start()
    chunks = list(open_stream(h, job_id, current).stream)
    assert [parse(c)[2]["status"] for c in chunks] == ["canceled"]


def test_a_reconnect_after_the_final_event_gets_204():
    h = Harness()
    job_id = h.submit()
    h.route(f"/jobs/{job_id}/cancel", "POST")
    final = h.job(job_id).revision
    done = open_stream(h, job_id, str(final))
    assert (done.status, done.headers, done.stream) == (204, [], None)
    earlier = open_stream(h, job_id, str(final - 1))
    assert [parse(c)[2]["status"] for c in earlier.stream] == ["canceled"]


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("POST", 405), ("DELETE", 405)])
def test_head_gets_the_headers_and_other_methods_405(method, status):
    h = Harness()
    reply = open_stream(h, h.submit(), method=method)
    assert (reply.status, reply.stream) == (status, None)
    if status == 405:
        assert dict(reply.headers)["allow"] == "GET, HEAD"


def test_an_unknown_job_has_no_stream():
    h = Harness()
    reply = open_stream(h, "a" * 32)
    assert (reply.status, reply.stream) == (404, None)


def test_a_client_that_has_the_state_gets_no_keep_alive_at_once():
    stream, job = stream_at(last_seen=0), make_job()
    assert stream.read(job, 100.0) == b""
    assert stream.idle(101.0) == (b"", 1.0)
    assert stream.idle(115.0)[0] == events.KEEP_ALIVE


@pytest.mark.parametrize(("value", "seen"), [("9" * 18, int("9" * 18)), ("9" * 19, None)])
def test_a_last_event_id_longer_than_a_revision_is_nothing(value, seen):
    assert events.last_event_id(value) == seen


def statuses_streamed(h: Harness, job_id: str, face: str) -> list[str]:
    """The statuses a whole event stream carries, read through one face."""
    if face == "blocking":
        return [parse(c)[2]["status"] for c in open_stream(h, job_id).stream]

    async def follow() -> list[str]:
        reply = await h.core.answer_async(f"/{job_id}/events", "GET", b"", "")
        return [parse(c)[2]["status"] async for c in reply.stream]

    return asyncio.run(asyncio.wait_for(follow(), 10))


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_change_made_elsewhere_is_seen_by_polling(face):
    """Another process changed the row: no wake-up comes, the poll finds it."""
    h = Harness(poll_interval=0.02)
    job_id = h.submit()
    elsewhere = threading.Timer(0.05, lambda: h.store.cancel(job_id))  # not through the core
    elsewhere.start()
    assert statuses_streamed(h, job_id, face) == ["queued", "canceled"]


@pytest.mark.parametrize("face", ["blocking", "async"])
def test_a_stream_outlives_a_store_outage(face, monkeypatch):
    h = Harness(poll_interval=0.01)
    job_id = h.submit()
    reads = {"n": 0}
    real_get = h.store.get

    def flaky(*args, **kwargs):
        reads["n"] += 1
        if reads["n"] in (2, 3):  # the first read opens the stream; then it is away
            raise StoreUnavailable("down")
        if reads["n"] == 5:
            h.store.cancel(job_id)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(h.store, "get", flaky)
    assert statuses_streamed(h, job_id, face) == ["queued", "canceled"]


def test_the_async_face_reads_last_event_id_too():
    h = Harness()
    job_id = h.submit()
    h.route(f"/jobs/{job_id}/cancel", "POST")
    final = str(h.job(job_id).revision)
    reply = asyncio.run(
        h.core.answer_async(f"/{job_id}/events", "GET", b"", "", Conditions(last_event_id=final))
    )
    assert (reply.status, reply.headers, reply.stream) == (204, [], None)
    unknown = asyncio.run(h.core.answer_async(f"/{'a' * 32}/events", "GET", b"", ""))
    assert (unknown.status, unknown.stream) == (404, None)
