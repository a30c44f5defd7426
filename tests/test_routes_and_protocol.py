"""The sans-IO parts: route selection and the wire protocol's documents."""

from datetime import datetime, timezone

import pytest

from deferred_middleware import _protocol as protocol
from deferred_middleware import deferred
from deferred_middleware._jobs import (
    DeferredOptions,
    Job,
    Status,
)
from deferred_middleware._routes import RoutePatterns, options_of
from deferred_middleware.store._credentials import merge_credentials, split_credentials


def test_the_marker_returns_the_same_function_with_its_options():
    def view():
        return "ok"

    assert deferred(view) is view
    assert options_of(view) == DeferredOptions()
    marked = deferred(retries=2, timeout=60)(view)
    assert marked is view
    assert options_of(view) == DeferredOptions(retries=2, timeout=60)
    assert options_of(lambda: None) is None


def test_invalid_options_are_refused():
    with pytest.raises(ValueError):
        deferred(retries=-1)
    with pytest.raises(ValueError):
        deferred(timeout=0)


@pytest.mark.parametrize(
    ("pattern", "method", "path", "matches"),
    [
        ("POST /reports", "POST", "/reports", True),
        ("POST /reports", "GET", "/reports", False),
        ("POST /reports", "POST", "/reports/1", False),
        ("/exports/*", "GET", "/exports/42", True),
        ("/exports/*", "PUT", "/exports/", True),
        ("/exports/*", "GET", "/exports/42/parts", False),
        ("/exports/**", "GET", "/exports/42/parts/7", True),
        ("/a/*/c", "POST", "/a/b/c", True),
        ("/a/*/c", "POST", "/a/b/x/c", False),
        ("POST,PUT /jobs-of/*", "PUT", "/jobs-of/x", True),
        ("/dots.json", "GET", "/dotsXjson", False),
    ],
)
def test_route_patterns(pattern, method, path, matches):
    assert (RoutePatterns([pattern]).match(method, path) is not None) is matches


def test_a_pattern_must_be_a_path():
    with pytest.raises(ValueError):
        RoutePatterns(["POST reports"])


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("/" + "a" * 32, ("a" * 32, "")),
        ("/" + "a" * 32 + "/result", ("a" * 32, "result")),
        ("/" + "a" * 32 + "/cancel", ("a" * 32, "cancel")),
        ("/" + "a" * 32 + "/other", None),
        ("/" + "a" * 31, None),
        ("/" + "A" * 32, None),
        ("/../" + "a" * 32, None),
        ("", None),
        ("/", None),
    ],
)
def test_job_routes_are_parsed_strictly(tail, expected):
    route = protocol.parse_job_route(tail, b"", 30)
    assert (route and (route.job_id, route.action)) == expected


@pytest.mark.parametrize(
    ("query", "wait"),
    [
        (b"wait=5", 5.0),
        (b"wait=99", 30.0),
        (b"wait=-3", 0.0),
        (b"wait=nan", 0.0),
        (b"wait=abc", 0.0),
        (b"", 0.0),
        (b"x=1&wait=2.5", 2.5),
    ],
)
def test_wait_is_capped_and_tolerant(query, wait):
    assert protocol.parse_job_route("/" + "a" * 32, query, 30).wait == wait


def _job(status: Status, **fields) -> Job:
    created = datetime(2026, 11, 24, 6, 0, tzinfo=timezone.utc)
    return Job(id="a" * 32, status=status, created_at=created, **fields)


def test_the_status_document_has_every_field():
    urls = protocol.JobURLs.for_request("/jobs", "/api", None)
    document = protocol.status_document(_job(Status.QUEUED), urls)
    assert document == {
        "id": "a" * 32,
        "status": "queued",
        "created_at": "2026-11-24T06:00:00.000000Z",
        "started_at": None,
        "finished_at": None,
        "attempts": 0,
        "progress": None,
        "message": None,
        "status_url": "/api/jobs/" + "a" * 32,
        "result_url": "/api/jobs/" + "a" * 32 + "/result",
    }
    failed = protocol.status_document(_job(Status.FAILED, error="It failed."), urls)
    assert failed["error"] == "It failed."


def test_status_prints_as_itself():
    assert str(Status.SUCCEEDED) == "succeeded"
    assert Status.CANCELED.finished and not Status.RUNNING.finished


def test_credentials_are_split_out_and_put_back_in_place():
    headers = [("accept", "*/*"), ("authorization", "Bearer x"), ("cookie", "a=1"), ("x", "y")]
    kept, credentials = split_credentials(headers, frozenset({"authorization", "cookie"}))
    assert kept == [("accept", "*/*"), ("x", "y")]
    assert merge_credentials(kept, credentials) == headers


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("GETT /x", "unknown method GETT"),
        ("POST /x?y=1", "a pattern matches the path alone, without a query or fragment"),
        ("POST /x#top", "a pattern matches the path alone, without a query or fragment"),
        ("HEAD /x", "HEAD requests are never deferred"),
        ("POST,OPTIONS /x", "OPTIONS requests are never deferred"),
        ("POST /jobs/*", "the job routes are served under /jobs; nothing there is deferred"),
        ("/jobs", "the job routes are served under /jobs; nothing there is deferred"),
        ("POST reports", "the path must start with '/'"),
    ],
)
def test_a_pattern_that_could_never_match_is_refused_when_built(pattern, problem):
    with pytest.raises(ValueError) as refused:
        RoutePatterns([pattern], prefix="/jobs")
    assert str(refused.value) == f"route pattern {pattern!r}: {problem}"


@pytest.mark.parametrize("pattern", ["POST /jobs-archive/*", "/**", "propfind /dav/*", "/job"])
def test_patterns_beside_the_job_routes_are_fine(pattern):
    assert RoutePatterns([pattern], prefix="/jobs")


def test_the_middlewares_check_their_patterns_when_built(sqlite_url):
    from deferred_middleware import DeferredMiddleware, DeferredWSGIMiddleware

    for middleware in (DeferredMiddleware, DeferredWSGIMiddleware):
        with pytest.raises(ValueError, match="unknown method GETT"):
            middleware(lambda *a: None, database_url=sqlite_url, routes=["GETT /x"])
