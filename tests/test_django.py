"""Django: ``@deferred`` views found through Django's URL resolver, on the
project's WSGI application under gunicorn and its ASGI application under
uvicorn, run in process or by ``deferred-middleware worker``."""

from __future__ import annotations

import httpx
import pytest

from .support import eventually

WSGI = "tests.apps.django_project.wsgi:application"
ASGI = "tests.apps.django_project.asgi:application"
STACKS = [("gunicorn-gthread", WSGI, "django-wsgi"), ("uvicorn", ASGI, "django-asgi")]
IDS = ["wsgi-gunicorn", "asgi-uvicorn"]


@pytest.fixture(scope="module")
def django_project() -> None:
    """Django set up in this process for the test project. The settings
    module is named only while Django reads it: servers started by later
    tests inherit the environment and must find their own."""
    import os

    import django

    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.apps.django_project.settings"
    try:
        django.setup()
    finally:
        del os.environ["DJANGO_SETTINGS_MODULE"]


def test_the_resolver_finds_marked_function_and_class_views(django_project):
    from deferred_middleware.django import marked_queues, view_options

    assert view_options("/api/report") is not None
    nightly = view_options("/api/nightly")
    assert nightly is not None and nightly.queue == "nightly"
    assert view_options("/plain") is None
    assert view_options("/nowhere") is None
    assert marked_queues() == {"nightly"}


def test_in_process_through_httpx_s_wsgi_transport(django_project, sqlite_url):
    from django.core.wsgi import get_wsgi_application

    from deferred_middleware.django import deferred_wsgi

    app = deferred_wsgi(get_wsgi_application(), database_url=sqlite_url)
    with httpx.Client(transport=httpx.WSGITransport(app), base_url="http://t") as client:
        accepted = client.post("/api/report", json={"q": 1})
        assert accepted.status_code == 202
        done = client.get(accepted.headers["location"] + "?wait=20")
        assert (done.status_code, done.json()["echo"]) == (201, {"q": 1})
        assert client.get("/health").json() == {"ok": True}
    app.shutdown()


@pytest.mark.anyio
async def test_in_process_through_httpx_s_asgi_transport(django_project, sqlite_url):
    from django.core.asgi import get_asgi_application

    from deferred_middleware.django import deferred_asgi

    app = deferred_asgi(get_asgi_application(), database_url=sqlite_url)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        accepted = await c.post("/api/nightly")
        assert accepted.status_code == 202
        done = await c.get(accepted.headers["location"] + "?wait=20")
        assert (done.status_code, done.text) == (200, "nightly")
        assert (await c.get("/health")).json() == {"ok": True}
    await app.shutdown()


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.servers
@pytest.mark.parametrize(("kind", "target", "_"), STACKS, ids=IDS)
def test_a_marked_view_answers_202_and_its_job_replays_through_django(
    serve, effects, kind, target, _
):
    server = serve(kind, target=target)
    accepted = httpx.post(server.base + "/api/report", json={"q": 3})
    assert accepted.status_code == 202, accepted.text
    status_url = accepted.headers["operation-location"]
    job_id = accepted.json()["id"]
    result = httpx.get(f"{server.base}{accepted.headers['location']}?wait=20", timeout=30)
    assert result.status_code == 201
    assert result.json() == {"echo": {"q": 3}, "job": job_id, "via": "django"}
    document = httpx.get(server.base + status_url).json()
    assert (document["status"], document["progress"]) == ("succeeded", 0.5)
    assert [line[:2] for line in effects()] == [[job_id, "1"]]

    plain = httpx.post(server.base + "/plain", content=b"\x00raw")
    assert (plain.status_code, plain.content) == (200, b"\x00raw")  # untouched
    assert httpx.get(server.base + "/nowhere").status_code == 404  # Django's own answer


@pytest.mark.servers
@pytest.mark.parametrize(("kind", "target", "worker_app"), STACKS, ids=IDS)
def test_a_worker_runs_a_django_project_s_jobs_of_every_queue_its_views_name(
    serve, start_worker, database_url, effects, kind, target, worker_app
):
    web = serve(kind, target=target, EXECUTE="0", DATABASE_URL=database_url)
    worker = start_worker(worker_app)
    ids = [httpx.post(web.base + path).json()["id"] for path in ("/api/report", "/api/nightly")]

    def ended() -> bool:
        states = [httpx.get(f"{web.base}/jobs/{i}").json()["status"] for i in ids]
        return all(state == "succeeded" for state in states)

    eventually(ended, timeout=30, interval=0.1)
    nightly = httpx.get(f"{web.base}/jobs/{ids[1]}/result")
    assert (nightly.status_code, nightly.text) == (200, "nightly")
    assert sorted(line[0] for line in effects()) == sorted(ids)
    assert worker.stop() == 0


@pytest.mark.servers
@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("gunicorn-gthread", "examples.django_app.wsgi:application"),
        ("uvicorn", "examples.django_app.asgi:application"),
    ],
    ids=IDS,
)
def test_the_example_project_defers_its_report(serve, kind, target):
    server = serve(kind, target=target, REPORT_SECONDS="0.05")
    accepted = httpx.post(server.base + "/reports", json={"name": "q3"})
    assert accepted.status_code == 202
    done = httpx.get(f"{server.base}{accepted.headers['location']}?wait=20", timeout=30)
    assert done.status_code == 201
    assert done.json()["report"] == "q3" and len(done.json()["rows"]) == 4
    status = httpx.get(server.base + accepted.headers["operation-location"]).json()
    assert (status["progress"], status["message"]) == (1.0, "summed 4 of 4 regions")
