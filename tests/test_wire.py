"""Every reply of the wire protocol, exactly: status, headers in order, body
bytes. Clients parse these, so a changed title, a lost header or a wrong
Content-Length is a break, not a detail."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deferred_middleware import _protocol as protocol
from deferred_middleware._jobs import Job, Status, StoredResponse

JOB_ID = "a" * 32
CREATED = datetime(2026, 11, 24, 6, 0, 0, 123456, tzinfo=timezone.utc)
STARTED = datetime(2026, 11, 24, 6, 0, 1, tzinfo=timezone.utc)
FINISHED = datetime(2026, 11, 24, 6, 0, 2, 500000, tzinfo=timezone.utc)
URLS = protocol.JobURLs.for_request("/jobs", "/api/", None)


def job(status: Status, **fields) -> Job:
    return Job(id=JOB_ID, status=status, created_at=CREATED, **fields)


def compact(data) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def problem_reply(status: int, title: str, detail: str | None, *extra) -> protocol.Reply:
    document = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        document["detail"] = detail
    body = compact(document)
    headers = [
        ("content-type", "application/problem+json"),
        ("content-length", str(len(body))),
        *extra,
    ]
    return protocol.Reply(status, headers, body)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (lambda: protocol.not_found(), problem_reply(404, "Not Found", "No job with this id.")),
        (
            lambda: protocol.too_large(1024),
            problem_reply(413, "Content Too Large", "The request body exceeds 1024 bytes."),
        ),
        (
            lambda: protocol.unavailable(7),
            problem_reply(
                503, "Service Unavailable", "The job store is unavailable.", ("retry-after", "7")
            ),
        ),
        (
            lambda: protocol.unavailable(2, protocol.QUEUE_FULL),
            problem_reply(
                503,
                "Service Unavailable",
                "Too many jobs are waiting; try again later.",
                ("retry-after", "2"),
            ),
        ),
        (
            lambda: protocol.method_not_allowed(""),
            problem_reply(405, "Method Not Allowed", None, ("allow", "GET, HEAD, DELETE")),
        ),
        (
            lambda: protocol.method_not_allowed("result"),
            problem_reply(405, "Method Not Allowed", None, ("allow", "GET, HEAD")),
        ),
        (
            lambda: protocol.method_not_allowed("cancel"),
            problem_reply(405, "Method Not Allowed", None, ("allow", "POST")),
        ),
        (
            lambda: protocol.problem(409, "Conflict", "The job has already finished."),
            problem_reply(409, "Conflict", "The job has already finished."),
        ),
    ],
)
def test_problems_are_rfc_9457_documents(reply, expected):
    reply = reply()  # built here, inside the test, so mutation testing sees who checks it
    assert reply == expected
    assert int(dict(reply.headers)["content-length"]) == len(reply.body)


def test_the_202_carries_both_urls_and_the_poll_interval():
    reply = protocol.accepted(job(Status.QUEUED), URLS, 3)
    body = compact(
        {
            "id": JOB_ID,
            "status": "queued",
            "status_url": f"/api/jobs/{JOB_ID}",
            "result_url": f"/api/jobs/{JOB_ID}/result",
            "created_at": "2026-11-24T06:00:00.123456Z",
        }
    )
    assert reply == protocol.Reply(
        202,
        [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("location", f"/api/jobs/{JOB_ID}/result"),
            ("operation-location", f"/api/jobs/{JOB_ID}"),
            ("retry-after", "3"),
            ("vary", "Prefer"),
        ],
        body,
    )


@given(
    base=st.text(),
    status=st.sampled_from(Status),
    created=st.datetimes(timezones=st.just(timezone.utc)),
)
def test_a_202_s_document_is_the_job_s_encoded_whatever_its_urls_hold(base, status, created):
    """The 202 is filled in, not encoded: it must still be exactly the
    encoded document, for any base a public URL or root path can give."""
    urls = protocol.JobURLs(base)
    reply = protocol.accepted(Job(id=JOB_ID, status=status, created_at=created), urls, 3)
    document = {
        "id": JOB_ID,
        "status": status.value,
        "status_url": f"{base}/{JOB_ID}",
        "result_url": f"{base}/{JOB_ID}/result",
        "created_at": created.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z",
    }
    assert reply.body == compact(document)
    assert reply.headers[1] == ("content-length", str(len(reply.body)))


@pytest.mark.parametrize(
    "when", [CREATED, CREATED.replace(tzinfo=None)], ids=["in UTC", "naive, taken as UTC"]
)
def test_times_are_written_in_utc_with_microseconds_and_a_z(when):
    assert protocol._timestamp(when) == "2026-11-24T06:00:00.123456Z"
    assert protocol._timestamp(when.replace(microsecond=0)) == "2026-11-24T06:00:00.000000Z"
    assert protocol._timestamp(None) is None


def test_a_202_names_the_preference_it_applied():
    reply = protocol.accepted(job(Status.QUEUED), URLS, 3, "respond-async")
    assert reply.headers[-2:] == [("vary", "Prefer"), ("preference-applied", "respond-async")]


def test_a_result_within_the_wait_is_the_result_with_the_preference_applied():
    done = job(Status.SUCCEEDED)
    done.response = StoredResponse(
        201, [("content-type", "text/plain"), ("retry-after", "9")], b"ok"
    )
    reply = protocol.answered_within_wait(done, URLS, 3, 5)
    assert reply == protocol.Reply(
        201,
        [("content-type", "text/plain"), ("vary", "Prefer"), ("preference-applied", "wait=5")],
        b"ok",
    )


def status_body(status: str, **fields) -> bytes:
    document = {
        "id": JOB_ID,
        "status": status,
        "created_at": "2026-11-24T06:00:00.123456Z",
        "started_at": None,
        "finished_at": None,
        "attempts": 0,
        "progress": None,
        "message": None,
        "status_url": f"/api/jobs/{JOB_ID}",
        "result_url": f"/api/jobs/{JOB_ID}/result",
    }
    document.update(fields)
    return compact(document)


def json_reply(status: int, body: bytes, *extra) -> protocol.Reply:
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *extra]
    return protocol.Reply(status, headers, body)


def test_a_running_job_s_status_tells_when_to_poll_again():
    running = job(Status.RUNNING, started_at=STARTED, attempts=1, progress=0.5, message="half")
    body = status_body(
        "running",
        started_at="2026-11-24T06:00:01.000000Z",
        attempts=1,
        progress=0.5,
        message="half",
    )
    running.revision = 7
    expected = json_reply(200, body, ("etag", '"7"'), ("retry-after", "4"))
    assert protocol.status_reply(running, URLS, 4) == expected
    assert protocol.result_reply(running, URLS, 4) == json_reply(202, body, ("retry-after", "4"))


def test_a_finished_job_s_status_has_its_times_and_no_retry_after():
    done = job(Status.SUCCEEDED, started_at=STARTED, finished_at=FINISHED, attempts=2)
    body = status_body(
        "succeeded",
        started_at="2026-11-24T06:00:01.000000Z",
        finished_at="2026-11-24T06:00:02.500000Z",
        attempts=2,
    )
    assert protocol.status_reply(done, URLS, 4) == json_reply(200, body, ("etag", '"0"'))


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        (None, 200),
        ('"7"', 304),
        ('W/"7"', 304),  # If-None-Match compares weakly
        ('"3", "7"', 304),
        ("*", 304),
        ('"8"', 200),
        ("7", 200),  # not a quoted tag
        ("", 200),
    ],
)
def test_a_client_holding_the_current_status_gets_304(if_none_match, status):
    running = job(Status.RUNNING, started_at=STARTED, attempts=1)
    running.revision = 7
    reply = protocol.unless_unchanged(protocol.status_reply(running, URLS, 4), if_none_match)
    assert reply.status == status
    if status == 304:
        assert reply == protocol.Reply(304, [("etag", '"7"'), ("retry-after", "4")])


def test_only_a_200_with_a_tag_is_ever_turned_into_a_304():
    gone = protocol.not_found()
    assert protocol.unless_unchanged(gone, "*") is gone
    untagged = json_reply(200, b"{}")
    assert protocol.unless_unchanged(untagged, "*") is untagged


def test_a_status_rendered_before_is_the_same_reply_until_the_job_changes():
    replies = protocol.StatusReplies()
    running = job(Status.RUNNING, started_at=STARTED, attempts=1, progress=0.5)
    running.revision = 7
    first = replies.reply(running, URLS, 4)
    assert first == protocol.status_reply(running, URLS, 4)
    first.headers.append(("x-added", "by a caller"))  # not kept for the next one
    assert replies.reply(running, URLS, 4) == protocol.status_reply(running, URLS, 4)
    running.progress, running.revision = 0.75, 8
    assert json.loads(replies.reply(running, URLS, 4).body)["progress"] == 0.75
    other_urls = protocol.JobURLs.for_request("/jobs", "/other", None)
    assert replies.reply(running, other_urls, 4) == protocol.status_reply(running, other_urls, 4)
    assert replies.reply(running, URLS, 9) == protocol.status_reply(running, URLS, 9)
    done = job(Status.SUCCEEDED, started_at=STARTED, finished_at=FINISHED, attempts=1)
    done.revision = 8  # a revision names one state: this says so only for the test's sake
    assert replies.reply(done, URLS, 4) == protocol.status_reply(done, URLS, 4)


def test_a_status_is_rendered_once_per_revision(monkeypatch):
    rendered = []
    render = protocol.status_reply
    monkeypatch.setattr(protocol, "status_reply", lambda *a: rendered.append(a) or render(*a))
    replies = protocol.StatusReplies()
    queued = job(Status.QUEUED)
    for _ in range(3):
        replies.reply(queued, URLS, 4)
    assert len(rendered) == 1
    queued.revision = 1
    replies.reply(queued, URLS, 4)
    assert len(rendered) == 2


def test_rendered_statuses_are_bounded():
    replies = protocol.StatusReplies(size=2)
    jobs = [job(Status.QUEUED) for _ in range(3)]
    for number, queued in enumerate(jobs):
        queued.revision = number
        replies.reply(queued, URLS, 4)
    assert len(replies._rendered) == 2
    assert {key[1] for key in replies._rendered} == {1, 2}


def test_only_a_failed_job_s_status_has_an_error():
    failed = job(Status.FAILED, finished_at=FINISHED, attempts=1, error="It broke.")
    document = json.loads(protocol.status_reply(failed, URLS, 1).body)
    assert document["error"] == "It broke."
    for status in (Status.QUEUED, Status.RUNNING, Status.SUCCEEDED, Status.CANCELED):
        assert "error" not in json.loads(
            protocol.status_reply(job(status, error="x"), URLS, 1).body
        )


def test_a_finished_result_replays_the_handler_s_response_exactly():
    headers = [("set-cookie", "a=1"), ("set-cookie", "b=2"), ("content-type", "x/y")]
    done = job(Status.SUCCEEDED, response=StoredResponse(201, headers, b"\x00body"))
    reply = protocol.result_reply(done, URLS, 1)
    assert reply == protocol.Reply(201, headers, b"\x00body")
    reply.headers.append(("x", "y"))
    assert done.response.headers == headers  # the reply is a copy


def test_a_failed_job_with_a_response_replays_it():
    failed = job(Status.FAILED, response=StoredResponse(502, [], b"bad"), error="x")
    assert protocol.result_reply(failed, URLS, 1) == protocol.Reply(502, [], b"bad")


def test_a_failed_job_without_a_response_is_a_500_problem():
    failed = job(Status.FAILED, error="The handler raised an exception.")
    expected = problem_reply(500, "Internal Server Error", "The handler raised an exception.")
    assert protocol.result_reply(failed, URLS, 1) == expected
    unexplained = protocol.result_reply(job(Status.FAILED), URLS, 1)
    assert json.loads(unexplained.body)["detail"] == "The job failed without a response."


def test_a_canceled_job_s_result_is_a_409_problem():
    expected = problem_reply(409, "Conflict", "The job was canceled; it has no result.")
    assert protocol.result_reply(job(Status.CANCELED), URLS, 1) == expected


@pytest.mark.parametrize(
    ("prefix", "root_path", "public_url", "status_url"),
    [
        ("/jobs", "", None, f"/jobs/{JOB_ID}"),
        ("/jobs", "/api", None, f"/api/jobs/{JOB_ID}"),
        ("/jobs", "/api//", None, f"/api/jobs/{JOB_ID}"),
        ("/tasks", "/", "https://x.example", f"https://x.example/tasks/{JOB_ID}"),
    ],
)
def test_job_urls_are_absolute_paths_under_the_root_path(prefix, root_path, public_url, status_url):
    urls = protocol.JobURLs.for_request(prefix, root_path, public_url)
    assert urls.status(JOB_ID) == status_url
    assert urls.result(JOB_ID) == status_url + "/result"


@pytest.mark.parametrize(
    ("root_path", "base"),
    [
        ("//evil.example", "/jobs"),
        ("//evil.example/x", "/jobs"),
        ("/\\evil.example", "/jobs"),
        ("evil.example", "/jobs"),
        ("/a/../b", "/jobs"),
        ("/a/./b", "/jobs"),
        ("/a\r\nSet-Cookie: x=1", "/jobs"),
        ("/a\x7f", "/jobs"),
        ("/api/v1/", "/api/v1/jobs"),
        ("/café au lait", "/caf%C3%A9%20au%20lait/jobs"),
        ("/a;b=1/@me", "/a;b=1/@me/jobs"),
        ("/MAX/", "/MAX/jobs"),
    ],
)
def test_a_root_path_that_is_not_a_clean_absolute_path_is_ignored(root_path, base):
    """Job URLs never point at another host, and always fit in a header."""
    urls = protocol.JobURLs.for_request("/jobs", root_path, None)
    assert urls.base == base
    urls.status(JOB_ID).encode("ascii")


def test_a_trailing_slash_is_no_job_route():
    assert protocol.parse_job_route(f"/{JOB_ID}/", b"", 30) is None
    assert protocol.parse_job_route(f"/{JOB_ID}/result/", b"", 30) is None
    assert protocol.parse_job_route(f"/{JOB_ID}//", b"", 30) is None


def test_a_final_result_never_looks_pending():
    headers = [("retry-after", "30"), ("content-type", "text/plain")]
    failed = job(Status.FAILED, response=StoredResponse(503, headers, b"busy"), error="x")
    reply = protocol.result_reply(failed, URLS, 1)
    assert reply == protocol.Reply(503, [("content-type", "text/plain")], b"busy")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            lambda: protocol.headers_too_large(65536),
            problem_reply(
                431, "Request Header Fields Too Large", "The request headers exceed 65536 bytes."
            ),
        ),
        (
            lambda: protocol.bad_request("The request method cannot be stored."),
            problem_reply(400, "Bad Request", "The request method cannot be stored."),
        ),
    ],
)
def test_refusals_of_one_request_are_4xx_problems(reply, expected):
    assert reply() == expected
