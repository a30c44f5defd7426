"""Many users on one API, through real servers: owners see only their own
jobs, and concurrent submits with one Idempotency-Key make exactly one job,
on SQLite under uvicorn and across two web processes on PostgreSQL and MariaDB."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from .support import MYSQL_URL, POSTGRES_URL, count_rows, require, reset_tables

pytestmark = pytest.mark.servers

ALICE, BOB = {"x-api-key": "alice"}, {"x-api-key": "bob"}


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_job_is_seen_only_by_its_owner(serve, kind, sqlite_or_postgres_url):
    server = serve(kind, OWNER="api-key", DATABASE_URL=sqlite_or_postgres_url)
    accepted = httpx.post(server.base + "/tiny", headers=ALICE)
    assert accepted.status_code == 202, accepted.text
    status_url = server.base + accepted.headers["operation-location"]
    result_url = server.base + accepted.headers["location"]
    done = httpx.get(result_url, params={"wait": 30}, headers=ALICE, timeout=40)
    assert (done.status_code, done.content) == (200, b"ok")

    for asker in (BOB, {}):
        for method, url in (
            ("GET", status_url),
            ("GET", result_url),
            ("GET", status_url + "/events"),
            ("POST", status_url + "/cancel"),
            ("DELETE", status_url),
        ):
            answer = httpx.request(method, url, headers=asker)
            assert answer.status_code == 404, (method, url, asker, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
    assert httpx.get(status_url, headers=ALICE).json()["status"] == "succeeded"
    assert httpx.delete(status_url, headers=ALICE).status_code == 204


@pytest.mark.parametrize("kind", ["uvicorn", "gunicorn-gthread"])
def test_a_submit_without_an_owner_gets_403_and_no_job(serve, kind, sqlite_url):
    server = serve(kind, OWNER="api-key")
    refused = httpx.post(server.base + "/tiny")
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert count_rows(sqlite_url) == 0


async def _race(bases: list[str], key: str, copies: int = 50) -> list[httpx.Response]:
    """``copies`` submits of one request with one key, all in flight at once,
    spread over the given web processes."""
    limits = httpx.Limits(max_connections=copies)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(
                    bases[i % len(bases)] + "/tiny",
                    headers={**ALICE, "idempotency-key": key},
                    content=b"same",
                )
                for i in range(copies)
            )
        )


def _one_job_for_all(answers: list[httpx.Response]) -> str:
    assert [a.status_code for a in answers] == [202] * len(answers), answers[0].text
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    locations = {a.headers["location"].rsplit("/", 2)[-2] for a in answers}
    assert locations == ids
    return ids.pop()


def test_50_concurrent_duplicates_make_one_job_on_sqlite(serve, sqlite_url):
    server = serve("uvicorn", OWNER="api-key", EXECUTE="0")
    job_id = _one_job_for_all(asyncio.run(_race([server.base], "order-1")))
    assert count_rows(sqlite_url) == 1
    # a later retry, and one with another body
    again = httpx.post(
        server.base + "/tiny", headers={**ALICE, "idempotency-key": "order-1"}, content=b"same"
    )
    assert (again.status_code, again.json()["id"]) == (202, job_id)
    other = httpx.post(
        server.base + "/tiny", headers={**ALICE, "idempotency-key": "order-1"}, content=b"new"
    )
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    malformed = httpx.post(server.base + "/tiny", headers={**ALICE, "idempotency-key": "a b"})
    assert malformed.status_code == 400
    assert count_rows(sqlite_url) == 1

    server.stop()  # and after a restart, the key still names its job
    restarted = serve("uvicorn", OWNER="api-key", EXECUTE="0")
    again = httpx.post(
        restarted.base + "/tiny", headers={**ALICE, "idempotency-key": "order-1"}, content=b"same"
    )
    assert (again.status_code, again.json()["id"]) == (202, job_id)
    theirs = httpx.post(
        restarted.base + "/tiny", headers={**BOB, "idempotency-key": "order-1"}, content=b"same"
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != job_id  # keys are per owner
    assert count_rows(sqlite_url) == 2


@pytest.mark.parametrize(
    "database",
    [
        pytest.param(POSTGRES_URL, marks=pytest.mark.postgres, id="postgres"),
        pytest.param(MYSQL_URL, marks=pytest.mark.mysql, id="mariadb"),
    ],
)
def test_50_concurrent_duplicates_over_two_web_processes_make_one_job(serve, database):
    url = require(database, "postgres" if database == POSTGRES_URL else "mysql")
    reset_tables(url)
    env = {"OWNER": "api-key", "EXECUTE": "0", "DATABASE_URL": url}
    first, second = serve("uvicorn", **env), serve("gunicorn-gthread", **env)
    for key in ("order-1", "order-2"):
        _one_job_for_all(asyncio.run(_race([first.base, second.base], key)))
    assert count_rows(url) == 2


# -- the README's recipes ---------------------------------------------------------


def test_bearer_tokens_with_starlette_s_authentication_middleware(serve):
    server = serve("uvicorn", target="tests.apps.auth_starlette:app")
    alice = {"authorization": "Bearer token-alice"}
    bob = {"authorization": "Bearer token-bob"}
    assert httpx.post(server.base + "/report").status_code == 403  # no owner, no job
    accepted = httpx.post(server.base + "/report", headers=alice)
    assert accepted.status_code == 202, accepted.text
    result_url = server.base + accepted.headers["location"]
    done = httpx.get(result_url, params={"wait": 30}, headers=alice, timeout=40)
    # The replay went through the authentication middleware with the kept token.
    assert (done.status_code, done.json()) == (200, {"made for": "alice"})
    assert httpx.get(result_url, headers=bob).status_code == 404
    assert httpx.get(result_url).status_code == 404


def test_flask_login_sessions(serve):
    server = serve("gunicorn-gthread", target="tests.apps.auth_flask:app")
    alice, bob = httpx.Client(base_url=server.base), httpx.Client(base_url=server.base)
    with alice, bob:
        for client, name in ((alice, "alice"), (bob, "bob")):
            assert client.post("/login", data={"name": name}).status_code == 200
        assert httpx.post(server.base + "/report").status_code == 403
        accepted = alice.post("/report")
        assert accepted.status_code == 202, accepted.text
        result = accepted.headers["location"]
        done = alice.get(result, params={"wait": 30}, timeout=40)
        assert (done.status_code, done.json()) == (200, {"made for": "alice"})
        assert bob.get(result).status_code == 404
        assert bob.delete(accepted.headers["operation-location"]).status_code == 404
        assert alice.get(accepted.headers["operation-location"]).status_code == 200
