"""The core loop under real servers: uvicorn for Starlette; gunicorn (sync and
gthread) and Flask's dev server for Flask. Driven over real HTTP with httpx."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import httpx
import pytest
import sqlalchemy as sa

from .apps._common import BINARY, STREAM_CHUNKS
from .support import LOST, count_rows, eventually

pytestmark = pytest.mark.servers
KINDS = ["uvicorn", "gunicorn-sync", "gunicorn-gthread", "flask-dev"]


@pytest.fixture(params=KINDS)
def server(request, serve):
    return serve(request.param)


def status_of(server, job_id: str) -> dict:
    response = httpx.get(f"{server.base}/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def result_of(server, job_id: str, wait: float = 30) -> httpx.Response:
    return httpx.get(
        f"{server.base}/jobs/{job_id}/result", params={"wait": wait}, timeout=wait + 10
    )


def stored_row(url: str, job_id: str) -> dict:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        row = (
            connection.exec_driver_sql(
                "SELECT * FROM deferred_jobs WHERE id = ?"
                if url.startswith("sqlite")
                else "SELECT * FROM deferred_jobs WHERE id = %s",
                (job_id,),
            )
            .mappings()
            .one()
        )
    engine.dispose()
    return dict(row)


def test_answers_202_before_the_handler_finishes_then_replays_its_response(
    server, gates, effects, sqlite_url
):
    accepted = httpx.post(
        server.base + "/report?gate=g1",
        content=b'{"a": 1}',
        headers={"content-type": "application/json", "authorization": "Bearer s3cret"},
    )
    assert accepted.status_code == 202
    document = accepted.json()
    job_id = document["id"]
    assert len(job_id) == 32
    assert accepted.headers["location"] == f"/jobs/{job_id}/result"
    assert accepted.headers["operation-location"] == f"/jobs/{job_id}"
    assert accepted.headers["retry-after"] == "1"
    assert document["status"] == "queued"
    assert document["status_url"] == f"/jobs/{job_id}"
    assert document["result_url"] == f"/jobs/{job_id}/result"
    assert document["created_at"].endswith("Z")

    # The handler is held at its gate: the 202 came while it was still running.
    running = eventually(lambda: (d := status_of(server, job_id))["progress"] == 0.5 and d)
    assert running["status"] == "running"
    assert running["message"] == "halfway"
    assert running["attempts"] == 1
    assert running["started_at"] and running["finished_at"] is None
    pending = httpx.get(server.base + accepted.headers["location"])
    assert pending.status_code == 202
    assert pending.headers["retry-after"] == "1"
    assert pending.json()["status"] == "running"

    gates("g1")
    result = result_of(server, job_id)
    assert result.status_code == 201
    cookies = result.headers.get_list("set-cookie")
    assert len(cookies) == 2
    assert cookies[0].startswith("first=1") and cookies[1].startswith("second=2")
    assert result.json() == {
        "echo": '{"a": 1}',
        "authorization": "Bearer s3cret",
        "job": job_id,
        "attempt": 1,
    }

    final = status_of(server, job_id)
    assert final["status"] == "succeeded"
    assert final["finished_at"] is not None
    assert "retry-after" not in httpx.get(f"{server.base}/jobs/{job_id}").headers
    assert "error" not in final
    assert [line[0] for line in effects()] == [job_id]

    # Credentials were needed for the run, and are forgotten once it is over.
    row = stored_row(sqlite_url, job_id)
    assert row["request_credentials"] is None
    assert "s3cret" not in str(row["request_headers"])


@pytest.mark.parametrize(
    ("path", "status", "content_type", "body"),
    [
        ("/binary", 200, "application/octet-stream", BINARY),
        ("/stream", 200, "text/plain", b"".join(STREAM_CHUNKS)),
        ("/missing", 404, "application/json", None),
    ],
)
def test_result_replays_binary_streamed_and_client_error_responses(
    server, path, status, content_type, body
):
    job_id = httpx.post(server.base + path).json()["id"]
    result = result_of(server, job_id)
    assert result.status_code == status
    assert result.headers["content-type"].startswith(content_type)
    if body is not None:
        assert result.content == body
    else:
        assert result.json() == {"detail": "no such thing"}
    assert status_of(server, job_id)["status"] == "succeeded"


def test_a_chunked_body_reaches_the_handler_on_replay(server):
    def chunks():
        yield b'{"part": '
        yield b'"one and two"}'

    accepted = httpx.post(server.base + "/report", content=chunks())
    assert accepted.status_code == 202
    assert "content-length" not in accepted.request.headers  # it went chunked
    result = result_of(server, accepted.json()["id"])
    assert result.json()["echo"] == '{"part": "one and two"}'


def test_a_raising_handler_fails_with_a_safe_error(server, sqlite_url):
    job_id = httpx.post(server.base + "/boom").json()["id"]
    result = result_of(server, job_id)
    assert result.status_code == 500
    assert result.headers["content-type"] == "application/problem+json"
    assert "secret-token" not in result.text
    assert "Traceback" not in result.text
    document = status_of(server, job_id)
    assert document["status"] == "failed"
    assert document["error"] == "The handler raised an exception."
    assert "secret-token-123" in server.log()  # logged server-side, with the job id
    assert job_id in server.log()
    # ... and kept with the job for operators (jobs show), whichever framework ran it
    detail = stored_row(sqlite_url, job_id)["error_detail"]
    assert detail.startswith("Traceback") and "RuntimeError: secret-token-123" in detail


def test_a_timed_out_attempt_fails(server):
    job_id = httpx.post(server.base + "/too-slow").json()["id"]
    assert result_of(server, job_id).status_code == 500
    document = status_of(server, job_id)
    assert document["status"] == "failed"
    assert document["error"] == "The job timed out after 0.5 seconds."


def test_other_routes_pass_through_byte_for_byte(server, sqlite_url):
    big = os.urandom(3 * 1024 * 1024)
    echoed = httpx.post(server.base + "/echo", content=big, timeout=30)
    assert echoed.status_code == 200
    assert echoed.content == big
    with httpx.stream("GET", server.base + "/stream-plain") as streamed:
        raw = b"".join(streamed.iter_raw())
    assert raw == b"".join(STREAM_CHUNKS)
    assert count_rows(sqlite_url) == 0
    # HEAD and OPTIONS are never deferred.
    assert httpx.request("OPTIONS", server.base + "/report").status_code != 202


def test_fifty_concurrent_requests_make_fifty_jobs_that_each_run_once(server, effects):
    async def submit_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/sync-report", content=str(i)) for i in range(50))
            )

    responses = asyncio.run(submit_all())
    assert [r.status_code for r in responses] == [202] * 50
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 50
    for job_id in ids:
        assert result_of(server, job_id).status_code == 200
        assert status_of(server, job_id)["attempts"] == 1
    runs = [line[0] for line in effects()]
    assert sorted(runs) == sorted(ids)


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread", "flask-dev"])
def test_cancel_and_delete(serve, kind, gates, effects):
    server = serve(kind, CONCURRENCY="1", extra=["-w", "1"] if kind.startswith("gunicorn") else [])
    first = httpx.post(server.base + "/report?gate=hold").json()["id"]
    eventually(lambda: status_of(server, first)["status"] == "running")
    second = httpx.post(server.base + "/report?gate=never").json()["id"]
    assert status_of(server, second)["status"] == "queued"

    canceled = httpx.post(f"{server.base}/jobs/{second}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    result = httpx.get(f"{server.base}/jobs/{second}/result")
    assert result.status_code == 409
    assert result.headers["content-type"] == "application/problem+json"

    # A running job is canceled as far as the runtime allows.
    assert httpx.post(f"{server.base}/jobs/{first}/cancel").json()["status"] == "canceled"
    gates("hold")
    assert status_of(server, first)["status"] == "canceled"

    assert httpx.delete(f"{server.base}/jobs/{second}").status_code == 204
    gone = httpx.get(f"{server.base}/jobs/{second}")
    assert gone.status_code == 404
    assert gone.headers["content-type"] == "application/problem+json"
    assert httpx.delete(f"{server.base}/jobs/{second}").status_code == 404
    assert second not in [line[0] for line in effects()]


def test_unknown_and_malformed_ids_are_404_problems(server):
    unknown = "0" * 32
    for method, path in [
        ("GET", f"/jobs/{unknown}"),
        ("GET", f"/jobs/{unknown}/result"),
        ("POST", f"/jobs/{unknown}/cancel"),
        ("DELETE", f"/jobs/{unknown}"),
        ("GET", "/jobs/not-an-id"),
        ("GET", "/jobs/" + "A" * 32),
        ("GET", f"/jobs/{unknown}/nothing"),
        ("GET", "/jobs"),
        ("GET", "/jobs/"),
        ("GET", "/jobs/%00"),
    ]:
        response = httpx.request(method, server.base + path)
        assert response.status_code == 404, (method, path)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 404
    wrong = httpx.put(f"{server.base}/jobs/{unknown}")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, HEAD, DELETE"


@pytest.mark.parametrize("kind", KINDS)
def test_an_oversized_body_is_413_and_makes_no_job(serve, kind, sqlite_url):
    server = serve(kind, MAX_BODY_SIZE="1000")
    too_big = httpx.post(server.base + "/report", content=b"x" * 2000)
    assert too_big.status_code == 413
    assert too_big.headers["content-type"] == "application/problem+json"
    if kind == "uvicorn":  # WSGI servers reject chunked request bodies of unknown length alike
        chunked = httpx.post(server.base + "/report", content=iter([b"x" * 600, b"y" * 600]))
        assert chunked.status_code == 413
    assert count_rows(sqlite_url) == 0
    # The limit is for deferred requests only.
    assert httpx.post(server.base + "/echo", content=b"z" * 2000).content == b"z" * 2000
    assert httpx.post(server.base + "/report", content=b"x" * 1000).status_code == 202


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_locked_database_gives_503_and_never_a_202_without_a_row(serve, kind, sqlite_url):
    server = serve(kind, LOCK_TIMEOUT="0.3")
    assert httpx.post(server.base + "/sync-report").status_code == 202
    rows_before = count_rows(sqlite_url)
    lock = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        refused = [httpx.post(server.base + "/sync-report", timeout=30) for _ in range(3)]
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    for response in refused:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
    assert count_rows(sqlite_url) == rows_before
    assert httpx.post(server.base + "/sync-report").status_code == 202


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_killed_server_loses_no_accepted_job(serve, kind, gates, effects):
    env = {"LEASE_SECONDS": "1", "POLL_INTERVAL": "0.2"}
    server = serve(kind, **env)
    with_retry = httpx.post(server.base + "/report-retry?gate=r1").json()["id"]
    without_retry = httpx.post(server.base + "/report?gate=r2").json()["id"]
    eventually(lambda: len(effects()) == 2)
    server.kill()

    restarted = serve(kind, **env)
    gates("r1")
    gates("r2")
    result = result_of(restarted, with_retry)
    assert result.status_code == 201
    assert result.json()["attempt"] == 2
    lost = eventually(
        lambda: (d := status_of(restarted, without_retry))["status"] == "failed" and d
    )
    assert lost["error"] == LOST
    assert result_of(restarted, without_retry).status_code == 500
    assert [line[0] for line in effects()].count(with_retry) == 2
    assert [line[0] for line in effects()].count(without_retry) == 1


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_shutdown_returns_a_running_job_to_the_queue(serve, kind, gates, sqlite_url):
    server = serve(kind, GRACE_SECONDS="0.5")
    job_id = httpx.post(server.base + "/report?gate=d1").json()["id"]
    eventually(lambda: status_of(server, job_id)["status"] == "running")
    server.stop()
    row = stored_row(sqlite_url, job_id)
    assert row["status"] == "queued"
    assert row["attempts"] == 0  # an interrupted attempt is not a failed one

    restarted = serve(kind)
    gates("d1")
    result = result_of(restarted, job_id)
    assert result.status_code == 201
    assert result.json()["attempt"] == 1


def test_urls_honour_root_path(serve):
    server = serve("uvicorn", extra=["--root-path", "/api"])
    accepted = httpx.post(server.base + "/report")
    job_id = accepted.json()["id"]
    assert accepted.headers["location"] == f"/api/jobs/{job_id}/result"
    assert accepted.json()["status_url"] == f"/api/jobs/{job_id}"
    assert status_of(server, job_id)["result_url"] == f"/api/jobs/{job_id}/result"


def test_urls_honour_script_name(serve):
    server = serve("gunicorn-gthread", SCRIPT_NAME="/api", health="/api/health")
    accepted = httpx.post(server.base + "/api/report")
    job_id = accepted.json()["id"]
    assert accepted.headers["location"] == f"/api/jobs/{job_id}/result"
    reply = httpx.get(f"{server.base}/api/jobs/{job_id}/result", params={"wait": 20}, timeout=30)
    assert reply.status_code == 201


def test_public_url_makes_absolute_urls(serve):
    server = serve("uvicorn", PUBLIC_URL="https://api.example.com/")
    accepted = httpx.post(server.base + "/report", headers={"host": "evil.example"})
    job_id = accepted.json()["id"]
    assert accepted.headers["location"] == f"https://api.example.com/jobs/{job_id}/result"
    assert accepted.headers["operation-location"] == f"https://api.example.com/jobs/{job_id}"


def test_websockets_pass_through(serve):
    from websockets.sync.client import connect

    server = serve("uvicorn")
    with connect(f"ws://127.0.0.1:{server.port}/ws") as websocket:
        websocket.send("hello")
        assert websocket.recv() == "echo:hello"


def test_an_unchanged_status_document_is_304(server, gates):
    accepted = httpx.post(server.base + "/report?gate=etag")
    status_url = server.base + accepted.headers["operation-location"]
    # Held at its gate after its progress: nothing changes until the gate opens.
    held = eventually(lambda: (r := httpx.get(status_url)).json()["progress"] == 0.5 and r)
    tag = held.headers["etag"]
    unchanged = httpx.get(status_url, headers={"If-None-Match": tag})
    assert (unchanged.status_code, unchanged.content) == (304, b"")
    assert unchanged.headers["etag"] == tag
    gates("etag")
    finished = httpx.get(status_url, params={"wait": 20}, headers={"If-None-Match": tag})
    assert finished.status_code == 200
    assert finished.json()["status"] == "succeeded"
    assert finished.headers["etag"] != tag


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_job_deleted_through_another_server_is_gone_from_this_one(serve, kind):
    """Two servers on one SQLite file: a finished job polled often on one,
    then deleted through the other, is 404 on the next poll of the first."""
    polled = serve(kind, extra=["-w", "1"] if kind.startswith("gunicorn") else [])
    other = serve(kind, extra=["-w", "1"] if kind.startswith("gunicorn") else [])
    job_id = httpx.post(polled.base + "/report").json()["id"]
    assert result_of(polled, job_id).status_code == 201  # the handler's own answer
    for _ in range(3):
        assert status_of(polled, job_id)["status"] == "succeeded"
        assert result_of(polled, job_id).status_code == 201
    assert httpx.delete(f"{other.base}/jobs/{job_id}").status_code == 204
    assert httpx.get(f"{polled.base}/jobs/{job_id}").status_code == 404
    assert httpx.get(f"{polled.base}/jobs/{job_id}/result").status_code == 404


def test_uvicorn_freezes_what_the_app_loaded_once_it_has_started(serve):
    """The middleware's lifespan freezes the loaded app out of garbage
    collection, so full collections under load need not walk it."""
    server = serve("uvicorn")
    accepted = httpx.post(server.base + "/frozen")
    assert accepted.status_code == 202
    result = result_of(server, accepted.json()["id"])
    assert result.status_code == 200
    assert result.json()["frozen"] > 10_000
