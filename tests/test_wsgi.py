"""DeferredWSGIMiddleware and FlaskDeferred driven through httpx's WSGI transport."""

from __future__ import annotations

import httpx
import pytest
from flask import Flask

from deferred_middleware import DeferredWSGIMiddleware, deferred
from deferred_middleware.flask import FlaskDeferred
from deferred_middleware.runner.wsgi import build_environ
from deferred_middleware.wsgi import stored_request

from .support import count_rows


def finished(client: httpx.Client, accepted: httpx.Response) -> httpx.Response:
    return client.get(accepted.headers["location"], params={"wait": 20})


def test_routes_option_defers_a_plain_wsgi_app(sqlite_url):
    def plain_app(environ, start_response):
        body = environ["wsgi.input"].read()
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("X-Twice", "1"), ("X-Twice", "2")]
        )
        return [environ["REQUEST_METHOD"].encode(), b" ", environ["PATH_INFO"].encode(), b" ", body]

    middleware = DeferredWSGIMiddleware(plain_app, database_url=sqlite_url, routes=["/exports/**"])
    client = httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://t")
    accepted = client.post("/exports/a/b", content=b"payload")
    assert accepted.status_code == 202
    result = finished(client, accepted)
    assert result.content == b"POST /exports/a/b payload"
    assert result.headers.get_list("x-twice") == ["1", "2"]
    assert client.post("/other", content=b"x").content == b"POST /other x"
    middleware.shutdown()


def test_the_extension_follows_the_factory_pattern(sqlite_url, tmp_path):
    extension = FlaskDeferred(database_url=sqlite_url)

    def create_app(name: str) -> Flask:
        app = Flask(name)

        @app.post("/hello")
        @deferred
        def hello():
            return f"hello from {name}"

        extension.init_app(app)
        return app

    first, second = create_app("first"), create_app("second")
    assert first.extensions["deferred_middleware"] is not second.extensions["deferred_middleware"]
    for app, name in ((first, "first"), (second, "second")):
        client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t")
        accepted = client.post("/hello")
        assert accepted.status_code == 202
        assert finished(client, accepted).text == f"hello from {name}"
        FlaskDeferred.middleware(app).shutdown()
    with pytest.raises(RuntimeError):
        extension.init_app(first)


def test_the_replayed_environ_is_built_fresh_from_stored_data():
    environ = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "/api",
        "PATH_INFO": "/caf\xc3\xa9",  # WSGI's latin-1 view of UTF-8 bytes
        "QUERY_STRING": "a=1&b=2",
        "SERVER_NAME": "example",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "2",
        "HTTP_X_THING": "one",
        "REMOTE_ADDR": "10.0.0.1",
        "wsgi.url_scheme": "https",
    }
    request = stored_request(environ, b"{}")
    assert request.path == "/café"
    rebuilt = build_environ(request)
    for key in (
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_NAME",
        "SERVER_PORT",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "HTTP_X_THING",
        "REMOTE_ADDR",
        "wsgi.url_scheme",
    ):
        assert rebuilt[key] == environ[key], key
    assert rebuilt["wsgi.input"].read() == b"{}"


def test_a_full_queue_answers_503_and_makes_no_job(sqlite_url):

    middleware = DeferredWSGIMiddleware(
        lambda e, s: [],
        database_url=sqlite_url,
        routes=["POST /work"],
        execute=False,
        max_queued=1,
    )
    client = httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://t")
    assert client.post("/work").status_code == 202
    refused = client.post("/work")
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert count_rows(sqlite_url) == 1


def test_the_last_progress_before_returning_is_kept(sqlite_url):
    from deferred_middleware import current_job

    def app(environ, start_response):
        for step in range(1, 5):
            current_job().progress(step / 4, f"step {step} of 4")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    middleware = DeferredWSGIMiddleware(app, database_url=sqlite_url, routes=["POST /work"])
    client = httpx.Client(transport=httpx.WSGITransport(app=middleware), base_url="http://t")
    for _ in range(5):
        accepted = client.post("/work")
        assert finished(client, accepted).text == "done"
        document = client.get(accepted.headers["operation-location"]).json()
        assert (document["progress"], document["message"]) == (1.0, "step 4 of 4")
    middleware.shutdown()


def test_the_extension_s_answers_go_through_the_app_s_after_request_hooks():
    app = Flask("hooked")

    @app.post("/slow")
    @deferred
    def slow():
        return "done"

    @app.after_request
    def stamp(response):
        response.headers["X-Stamped"] = "yes"
        response.vary.add("Origin")
        return response

    FlaskDeferred(app, database_url="memory://", execute=False)
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t")
    accepted = client.post("/slow")
    assert accepted.status_code == 202
    assert accepted.headers["x-stamped"] == "yes"
    assert accepted.headers["content-type"] == "application/json"
    assert {v.strip() for v in accepted.headers["vary"].split(",")} == {"Prefer", "Origin"}
    assert accepted.json()["status"] == "queued"  # the body is the middleware's
    status = client.get(accepted.headers["operation-location"])
    assert (status.status_code, status.headers["x-stamped"]) == (200, "yes")
    preflight = client.options(accepted.headers["operation-location"])
    assert preflight.status_code == 204
    assert preflight.headers["x-stamped"] == "yes"
    assert "content-type" not in preflight.headers  # werkzeug's default is not added
    missing = client.get("/jobs/" + "0" * 32)
    assert (missing.status_code, missing.headers["content-type"]) == (
        404,
        "application/problem+json",
    )
    assert missing.headers["x-stamped"] == "yes"
    FlaskDeferred.middleware(app).shutdown()


def test_without_after_request_hooks_the_answers_are_left_as_they_are():
    app = Flask("plain")

    @app.post("/slow")
    @deferred
    def slow():
        return "done"

    FlaskDeferred(app, database_url="memory://", execute=False)
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://t")
    accepted = client.post("/slow")
    assert accepted.status_code == 202
    assert set(accepted.headers) == {
        "content-type",
        "content-length",
        "location",
        "operation-location",
        "retry-after",
        "vary",
    }
    FlaskDeferred.middleware(app).shutdown()
