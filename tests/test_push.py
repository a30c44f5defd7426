"""Push instead of poll, through real servers: ``Prefer: wait`` and
``respond-async``."""

from __future__ import annotations

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
