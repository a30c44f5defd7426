"""Many users on one API, as policy against the in-memory store: a job is
seen only by its owner, and an Idempotency-Key makes a retried submit
answer with the job the first one made."""

from __future__ import annotations

import json

import pytest

from deferred_middleware import _protocol as protocol
from deferred_middleware._jobs import (
    DeferredOptions,
    Idempotency,
    RequestInfo,
    Status,
    StoredRequest,
    owner_key,
)
from deferred_middleware._refusals import BadRequest, KeyReused, NoOwner
from deferred_middleware.store import StoreUnavailable, Unstorable

from .policy_harness import Harness

OPTIONS = DeferredOptions()


def owner_from_api_key(request: RequestInfo) -> str | None:
    return request.headers.get("x-api-key")


@pytest.fixture
def h() -> Harness:
    return Harness(owner=owner_from_api_key)


def request(path: str = "/reports", body: bytes = b"{}", key: str | None = None, **more):
    headers = [("content-type", "application/json")]
    if key is not None:
        headers.append(("idempotency-key", key))
    return StoredRequest("POST", path, body=body, headers=headers, **more)


def submit(h: Harness, owner: str | None = "alice", **request_args) -> str:
    return h.core.accept(request(**request_args), OPTIONS, owner).id


def answer(h: Harness, job_id: str, owner: str | None, action: str = "", method: str = "GET"):
    tail = f"/{job_id}/{action}" if action else f"/{job_id}"
    return h.core.answer(tail, method, b"", "", protocol.NO_CONDITIONS, owner)


# -- owners --------------------------------------------------------------------


def test_a_job_keeps_the_owner_that_submitted_it(h):
    job_id = submit(h, "alice")
    assert h.job(job_id).owner == "alice"
    assert answer(h, job_id, "alice").status == 200
    assert json.loads(answer(h, job_id, "alice").body)["id"] == job_id


@pytest.mark.parametrize(
    ("action", "method"),
    [("", "GET"), ("", "HEAD"), ("result", "GET"), ("events", "GET"), ("cancel", "POST")],
)
@pytest.mark.parametrize("asker", ["bob", None])
def test_every_job_route_answers_404_to_anyone_but_the_owner(h, action, method, asker):
    job_id = submit(h, "alice")
    reply = answer(h, job_id, asker, action, method)
    assert reply.status == 404
    assert reply.body == (b"" if method == "HEAD" else protocol.not_found().body)
    assert reply.stream is None
    assert h.job(job_id).status is Status.QUEUED  # a refused cancel changed nothing


@pytest.mark.parametrize("asker", ["bob", None])
def test_another_owner_cannot_delete_a_job(h, asker):
    job_id = submit(h, "alice")
    assert answer(h, job_id, asker, method="DELETE").status == 404
    assert h.store.get(job_id) is not None
    assert answer(h, job_id, "alice", method="DELETE").status == 204
    assert h.store.get(job_id) is None


@pytest.mark.parametrize(
    ("action", "method"),
    [("", "GET"), ("", "HEAD"), ("result", "GET"), ("events", "GET"), ("cancel", "POST")],
)
def test_the_async_face_hides_jobs_from_other_owners_too(h, action, method):
    import asyncio

    job_id = submit(h, "alice")
    tail = f"/{job_id}/{action}" if action else f"/{job_id}"

    def ask(owner):
        reply = asyncio.run(
            h.core.answer_async(tail, method, b"", "", protocol.NO_CONDITIONS, owner)
        )
        if reply.stream is not None:
            asyncio.run(reply.stream.aclose())
        return reply

    for asker in ("bob", None):
        hidden = ask(asker)
        assert (hidden.status, hidden.stream) == (404, None)
        assert hidden.body == (b"" if method == "HEAD" else protocol.not_found().body)
    assert h.job(job_id).status is Status.QUEUED
    assert ask("alice").status in (200, 202)  # the status, or a result still pending


def test_the_owner_can_cancel_its_own_job(h):
    job_id = submit(h, "alice")
    assert answer(h, job_id, "alice", "cancel", "POST").status == 200
    assert h.job(job_id).status is Status.CANCELED


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_an_unknown_id_and_another_s_job_look_the_same(h, method):
    job_id = submit(h, "alice")
    theirs = answer(h, job_id, "bob", method=method)
    unknown = answer(h, "0" * 32, "bob", method=method)
    assert (theirs.status, theirs.headers, theirs.body) == (
        unknown.status,
        unknown.headers,
        unknown.body,
    )


def test_a_submit_that_names_no_owner_is_refused_and_makes_no_job(h):
    with pytest.raises(NoOwner) as refused:
        submit(h, None)
    reply = h.core.refused(refused.value)
    assert reply.status == 403
    assert json.loads(reply.body) == {
        "type": "about:blank",
        "title": "Forbidden",
        "status": 403,
        "detail": "The request names no owner for its job.",
    }
    assert h.store.count(Status.QUEUED) == 0


def test_without_owners_every_job_is_seen_by_anyone():
    h = Harness()
    job_id = submit(h, None)
    assert h.job(job_id).owner is None
    assert answer(h, job_id, None).status == 200


def test_owner_of_asks_the_function_with_the_request():
    seen = []
    h = Harness(owner=lambda request: seen.append(request) or "x" * 300)
    info = RequestInfo("GET", "/jobs/1", b"a=1", [("X-Api-Key", "k")], scope={"user": "u"})
    owner = h.core.owner_of(info)
    assert seen == [info]
    assert info.headers["x-api-key"] == "k" and info.scope == {"user": "u"}
    assert owner == owner_key("x" * 300)
    assert owner.startswith("sha256:") and len(owner) <= 255


def test_a_long_owner_is_kept_as_its_digest():
    assert owner_key("a" * 255) == "a" * 255
    assert owner_key("a" * 256) != owner_key("a" * 255 + "b")
    assert len(owner_key("a" * 10_000)) < 255
    assert owner_key(None) is None


# -- Idempotency-Key -----------------------------------------------------------


def test_the_same_key_answers_the_first_job(h):
    first = submit(h, key="order-17")
    again = submit(h, key="order-17")
    assert again == first
    assert h.store.count(Status.QUEUED) == 1


def test_a_repeated_key_answers_the_first_job_whatever_its_state(h):
    first = submit(h, key="k1")
    assert h.claim() == 1
    h.launcher.last(first).respond(201, b"done")
    assert h.job(first).status is Status.SUCCEEDED
    assert submit(h, key="k1") == first
    assert h.store.count(Status.QUEUED) == 0


def test_the_same_key_with_another_body_is_refused(h):
    submit(h, key="k1", body=b'{"n": 1}')
    with pytest.raises(KeyReused) as refused:
        submit(h, key="k1", body=b'{"n": 2}')
    reply = h.core.refused(refused.value)
    assert reply.status == 422
    assert json.loads(reply.body) == {
        "type": "about:blank",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": "This Idempotency-Key was used for a different request.",
    }
    assert h.store.count(Status.QUEUED) == 1


def test_the_same_key_with_another_query_is_refused(h):
    submit(h, key="k1", query_string=b"n=1")
    with pytest.raises(KeyReused):
        submit(h, key="k1", query_string=b"n=2")


@pytest.mark.parametrize(
    "other",
    [{"owner": "bob"}, {"path": "/other"}],
    ids=["another owner", "another route"],
)
def test_a_key_belongs_to_one_owner_and_one_route(h, other):
    first = submit(h, key="k1")
    other = dict(other)  # the parameter is shared between runs: never change it
    owner = other.pop("owner", "alice")
    assert submit(h, owner, key="k1", **other) != first
    assert h.store.count(Status.QUEUED) == 2


def test_a_key_is_free_again_once_its_job_is_gone(h):
    first = submit(h, key="k1")
    assert h.store.delete(first)
    assert submit(h, key="k1") != first


def test_without_a_key_every_submit_makes_a_job(h):
    assert submit(h) != submit(h)
    assert h.store.count(Status.QUEUED) == 2


@pytest.mark.parametrize("key", ["", " ", "a b", "é", "k\x7f", "x" * 256])
def test_a_malformed_key_is_a_bad_request_and_makes_no_job(h, key):
    with pytest.raises(BadRequest) as refused:
        submit(h, key=key)
    assert h.core.refused(refused.value).status == 400
    assert h.store.count(Status.QUEUED) == 0


def test_a_key_sent_twice_is_a_bad_request(h):
    twice = request(key="a")
    twice.headers.append(("idempotency-key", "a"))
    with pytest.raises(BadRequest):
        h.core.accept(twice, OPTIONS, "alice")


@pytest.mark.parametrize("key", ["a", "x" * 255, '"quoted"', "!~#%&"])
def test_keys_of_1_to_255_visible_characters_are_accepted(key):
    claim = Idempotency.of(request(key=key), "alice")
    assert claim is not None and len(claim.key) == 64 and len(claim.request) == 64


def test_the_key_digest_binds_owner_method_path_and_key():
    def key_of(owner="o", key="k", **more):
        return Idempotency.of(request(key=key, **more), owner).key

    base = key_of()
    assert base == key_of()
    assert len({base, key_of(owner="p"), key_of(key="j"), key_of(path="/x")}) == 4
    post = StoredRequest("POST", "/r", headers=[("idempotency-key", "k")])
    put = StoredRequest("PUT", "/r", headers=[("idempotency-key", "k")])
    assert Idempotency.of(post, "o").key != Idempotency.of(put, "o").key
    assert Idempotency.of(post, "o").request == Idempotency.of(put, "o").request


def test_an_async_submit_with_a_key_answers_the_first_job(h):
    import asyncio

    async def twice():
        first = await h.core.accept_async(request(key="k"), OPTIONS, "alice")
        again = await h.core.accept_async(request(key="k"), OPTIONS, "alice")
        return first.id, again.id

    first, again = asyncio.run(twice())
    assert first == again
    assert h.store.count(Status.QUEUED) == 1


# -- OPTIONS (a CORS preflight carries no credentials) ------------------------------


@pytest.mark.parametrize(
    ("action", "allowed"),
    [
        ("", "GET, HEAD, DELETE, OPTIONS"),
        ("result", "GET, HEAD, OPTIONS"),
        ("cancel", "POST, OPTIONS"),
        ("events", "GET, HEAD, OPTIONS"),
    ],
)
@pytest.mark.parametrize("asker", ["alice", "bob", None])
def test_options_on_a_job_route_answers_its_methods_to_anyone(h, action, allowed, asker):
    job_id = submit(h, "alice")
    reply = answer(h, job_id, asker, action, "OPTIONS")
    assert (reply.status, reply.headers, reply.body) == (204, [("allow", allowed)], b"")


def test_options_on_a_job_route_answers_without_the_store(h, monkeypatch):
    monkeypatch.setattr(h.store, "get", lambda *a, **k: pytest.fail("read the store"))
    assert answer(h, "0" * 32, None, "", "OPTIONS").status == 204


def test_options_on_a_job_route_answers_the_same_on_the_async_face(h):
    import asyncio

    tail = f"/{'0' * 32}/result"
    reply = asyncio.run(h.core.answer_async(tail, "OPTIONS", b"", ""))
    assert (reply.status, reply.headers) == (204, [("allow", "GET, HEAD, OPTIONS")])


@pytest.mark.parametrize(
    ("raised", "answered"),
    [(ValueError("refused"), Unstorable), (StoreUnavailable("down"), StoreUnavailable)],
)
def test_a_key_the_store_cannot_take_fails_that_submit_alone(h, monkeypatch, raised, answered):
    def insert_once(job):
        raise raised

    monkeypatch.setattr(h.store, "insert_once", insert_once)
    with pytest.raises(answered):
        submit(h, key="k1")
    assert submit(h) is not None  # a plain submit beside it is stored
    assert h.store.count(Status.QUEUED) == 1
