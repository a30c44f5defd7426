"""FastAPI done right, under uvicorn: a deferred path operation's request is
validated before it is accepted (FastAPI's own 422, no job, no dependency
run), dependencies run once in the job, and /openapi.json documents the 202
and the job routes well enough for schemathesis to find nothing wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import httpx
import pytest

from deferred_middleware._jobs import DeferredOptions
from deferred_middleware._openapi import document_jobs

from .support import ROOT, count_rows

APP = "tests.apps.fastapi_app:app"
VALID = {
    "url": "/items/7?q=3&limit=5",
    "json": {"name": "pen", "price": 2.5},
    "headers": {"x-token": "secret"},
    "cookies": {"flavour": "mint"},
}


def post(server, **changes):
    request = {**VALID, **changes}
    with httpx.Client(base_url=server.base, cookies=request.pop("cookies")) as client:
        return client.post(request.pop("url"), **request)


@pytest.fixture
def database(sqlite_or_postgres_url):
    return sqlite_or_postgres_url


@pytest.mark.servers
@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"json": {"name": "", "price": 2.5}}, ["body", "name"]),
        ({"json": {"name": "pen"}}, ["body", "price"]),
        ({"content": b"{not json", "json": None}, ["body", 1]),
        ({"url": "/items/seven?q=3"}, ["path", "item_id"]),
        ({"url": "/items/7"}, ["query", "q"]),
        ({"url": "/items/7?q=3&limit=500"}, ["query", "limit"]),  # a dependency's parameter
        ({"headers": {}}, ["header", "x-token"]),
        ({"cookies": {"flavour": "Mint!"}}, ["cookie", "flavour"]),
    ],
    ids=[
        "body field",
        "missing body field",
        "bad json",
        "path",
        "query",
        "dependency",
        "header",
        "cookie",
    ],
)
def test_an_invalid_request_gets_fastapi_s_422_and_no_job(
    serve, workdir, database, changes, location
):
    server = serve("uvicorn", target=APP, DATABASE_URL=database)
    if changes.get("content") is not None:
        changes["headers"] = {**VALID["headers"], "content-type": "application/json"}
    answer = post(server, **changes)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert location in [error["loc"] for error in answer.json()["detail"]]
    assert count_rows(database) == 0
    assert not (workdir / "effects.txt").exists()  # no dependency ran


@pytest.mark.servers
def test_a_valid_request_is_accepted_and_its_dependencies_run_once_in_the_job(
    serve, workdir, database
):
    server = serve("uvicorn", target=APP, DATABASE_URL=database)
    accepted = post(server)
    assert accepted.status_code == 202, accepted.text
    done = httpx.get(server.base + accepted.headers["location"], params={"wait": 30}, timeout=40)
    assert done.status_code == 201
    assert done.json() == {"item_id": 7, "name": "pen", "q": 3, "limit": 5, "flavour": "mint"}
    job_id = accepted.json()["id"]
    runs = Counter(line.split()[0] for line in (workdir / "effects.txt").read_text().splitlines())
    assert runs == {"session-open": 1, job_id: 1, "session-closed": 1}


@pytest.mark.servers
def test_the_app_s_own_validation_handler_answers(serve, sqlite_url):
    server = serve("uvicorn", target="tests.apps.fastapi_app:strict")
    answer = httpx.post(server.base + "/items", json={"name": ""})
    assert (answer.status_code, answer.json()) == (418, {"errors": 2})
    assert count_rows(sqlite_url) == 0
    assert httpx.post(server.base + "/items", json={"name": "a", "price": 1}).status_code == 202


@pytest.mark.servers
def test_openapi_documents_the_202_and_the_job_routes(serve):
    server = serve("uvicorn", target=APP)
    document = httpx.get(server.base + "/openapi.json").json()
    operation = document["paths"]["/items/{item_id}"]["post"]
    responses = operation["responses"]
    assert "201" not in responses  # it never answers 201 itself: its job does
    accepted = responses["202"]
    assert set(accepted["headers"]) == {"Location", "Operation-Location", "Retry-After"}
    assert accepted["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeferredJobStatus"
    }
    assert set(responses["422"]["content"]) == {"application/json", "application/problem+json"}
    assert "Idempotency-Key" in [p["name"] for p in operation["parameters"]]
    assert {"/jobs/{job_id}", "/jobs/{job_id}/result", "/jobs/{job_id}/cancel"} <= set(
        document["paths"]
    )
    assert set(document["paths"]["/jobs/{job_id}"]) == {"parameters", "get", "delete"}
    assert "DeferredJobStatus" in document["components"]["schemas"]
    assert document["paths"]["/health"]["get"]["responses"].keys() == {"200"}  # untouched


@pytest.mark.servers
def test_schemathesis_finds_nothing_wrong_with_the_document(serve, workdir):
    server = serve("uvicorn", target=APP, MAX_WAIT="1")
    report = workdir / "schemathesis"
    command = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"),
        "run",
        server.base + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "60",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    junit = "".join(path.read_text() for path in report.glob("*.xml"))
    assert run.returncode == 0, run.stdout[-4000:] + junit[-6000:]
    assert "<testcase" in junit  # it ran the operations


# -- the document, as plain data ---------------------------------------------------


def minimal_schema() -> dict:
    ok = {"description": "OK"}
    return {
        "openapi": "3.1.0",
        "paths": {
            "/a": {"post": {"responses": {"200": ok}}},
            "/b": {"post": {"responses": {"200": ok}, "parameters": []}},
        },
    }


def test_a_route_deferred_always_documents_only_the_202_as_success():
    schema = minimal_schema()
    document_jobs(schema, "/jobs", [("/a", "POST", DeferredOptions())])
    assert "200" not in schema["paths"]["/a"]["post"]["responses"]
    assert "202" in schema["paths"]["/a"]["post"]["responses"]
    assert "202" not in schema["paths"]["/b"]["post"]["responses"]  # not deferred


def test_a_route_deferred_on_request_documents_both_answers():
    schema = minimal_schema()
    document_jobs(schema, "/jobs", [("/b", "POST", DeferredOptions(mode="prefer"))])
    responses = schema["paths"]["/b"]["post"]["responses"]
    assert {"200", "202"} <= set(responses)


def test_the_job_routes_follow_the_prefix_and_documenting_twice_changes_nothing():
    schema = minimal_schema()
    for _ in range(2):
        document_jobs(schema, "/api/jobs", [("/a", "POST", DeferredOptions())])
    assert "/api/jobs/{job_id}/events" in schema["paths"]
    parameters = schema["paths"]["/a"]["post"]["parameters"]
    assert [p["name"] for p in parameters] == ["Idempotency-Key"]
    assert schema["paths"]["/a"]["post"]["description"].count("Deferred:") == 1
    json.dumps(schema)  # plain data all the way down


@pytest.mark.servers
def test_the_example_app_runs_its_report_as_a_job(serve):
    server = serve("uvicorn", target="examples.fastapi_app.app:app", REPORT_SECONDS="0.05")
    assert httpx.post(server.base + "/reports/red", json={"name": ""}).status_code == 422
    accepted = httpx.post(server.base + "/reports/red", json={"name": "q4", "regions": 2})
    assert accepted.status_code == 202
    done = httpx.get(server.base + accepted.headers["location"], params={"wait": 30}, timeout=40)
    assert done.status_code == 201
    assert [row["team"] for row in done.json()["rows"]] == ["red", "red"]
