"""Bad input against real servers, sent as raw bytes: each case gets a clear
answer (never a 500), a job exists only where a 202 promised one, and the
server still serves afterwards. Both stacks: uvicorn with the Starlette app,
gunicorn (gthread) with the Flask app."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .support import ROOT, Server, count_rows, eventually

pytestmark = pytest.mark.servers

JOB = "{job}"  # replaced by the id of a real job
UNKNOWN = "f" * 32
LIMITS = {"MAX_BODY_SIZE": "1024", "MAX_HEADER_SIZE": "4096", "MAX_WAIT": "1"}


@dataclass
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: bytes


def send_raw(port: int, data: bytes, *, close_after: bool = False) -> Answer:
    """One request as raw bytes; ``close_after``: hang up without waiting."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if close_after:
            return Answer(None, {}, b"")
        received = b""  # the request says Connection: close: read until the server closes
        while chunk := sock.recv(65536):
            received += chunk
    if not received:
        return Answer(None, {}, b"")
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return Answer(int(lines[0].split()[1]), headers, body)


def request(
    method: bytes, target: bytes, headers: list[bytes] = (), body: bytes = b"", length: bool = True
) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n" + body


def chunked(target: bytes, *chunks: bytes, extra: list[bytes] = ()) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return request(b"POST", target, [b"Transfer-Encoding: chunked", *extra], encoded, length=False)


POST = b"POST"
GET = b"GET"
REFUSED_BY_SERVER = {400, 413, 414, 431, 501, None}

# name: (request, statuses allowed)
CASES: dict[str, tuple[bytes, set[int | None]]] = {
    "a plain deferred POST": (request(POST, b"/tiny", body=b"{}"), {202}),
    "an empty body": (request(POST, b"/tiny"), {202}),
    "binary bytes in the body": (request(POST, b"/tiny", body=bytes(range(256))), {202}),
    "a body over the limit, declared": (request(POST, b"/tiny", body=b"x" * 2000), {413}),
    "a body over the limit, chunked": (chunked(b"/tiny", b"x" * 700, b"y" * 700), {413}),
    "a small chunked body": (chunked(b"/tiny", b"he", b"llo"), {202}),
    "a declared length over the limit without the body": (
        request(POST, b"/tiny", [b"Content-Length: 999999"], length=False),
        {413},
    ),
    "a non-numeric Content-Length": (
        request(POST, b"/tiny", [b"Content-Length: abc"], length=False),
        REFUSED_BY_SERVER,
    ),
    "two different Content-Lengths": (
        request(POST, b"/tiny", [b"Content-Length: 2", b"Content-Length: 3"], b"{}", False),
        REFUSED_BY_SERVER,
    ),
    "chunked and a Content-Length": (
        chunked(b"/tiny", b"abc", extra=[b"Content-Length: 50"]),
        {202} | REFUSED_BY_SERVER,
    ),
    "a NUL in the path": (request(POST, b"/any/a%00b"), {400}),
    "a NUL in the path of a pattern route, any method": (request(b"PATCH", b"/any/%00"), {400}),
    "a raw NUL in a header": (request(POST, b"/tiny", [b"X-Bad: a\x00b"]), REFUSED_BY_SERVER),
    "non-UTF-8 bytes in the path": (request(POST, b"/any/%ff%fe"), {202, 400}),
    "non-UTF-8 bytes in the query": (request(POST, b"/tiny?q=\xff\xfe"), {202} | REFUSED_BY_SERVER),
    "non-UTF-8 bytes in a header": (request(POST, b"/tiny", [b"X-Name: caf\xe9"]), {202}),
    "one header over the header limit": (
        request(POST, b"/tiny", [b"X-Big: " + b"v" * 5000]),
        {431} | REFUSED_BY_SERVER,
    ),
    "many headers over the header limit": (
        request(POST, b"/tiny", [b"X-H%d: %s" % (i, b"v" * 100) for i in range(60)]),
        {431} | REFUSED_BY_SERVER,
    ),
    "a method longer than the table keeps": (
        request(b"SUPERCALIFRAGILISTIC", b"/any/x"),
        {400} | REFUSED_BY_SERVER,
    ),
    "a lower-case method": (request(b"post", b"/tiny"), {404, 405} | REFUSED_BY_SERVER),
    "HEAD is never deferred": (request(b"HEAD", b"/tiny"), {200, 404, 405}),
    "OPTIONS is never deferred": (request(b"OPTIONS", b"/tiny"), {200, 204, 404, 405}),
    "GET on a POST-only deferred route": (request(GET, b"/tiny"), {405}),
    "a very long path": (request(POST, b"/any/" + b"a" * 8000), {202} | REFUSED_BY_SERVER),
    "a Host that is not ours": (
        request(POST, b"/tiny", [b"X-Forwarded-Host: evil.example"]),
        {202},
    ),
    "a trailing slash on the status route": (request(GET, b"/jobs/" + JOB.encode() + b"/"), {404}),
    "a trailing slash on the result route": (
        request(GET, b"/jobs/" + JOB.encode() + b"/result/"),
        {404},
    ),
    "an encoded slash before result": (
        request(GET, b"/jobs/" + JOB.encode() + b"%2Fresult"),
        {404},
    ),
    "an upper-case id": (request(GET, b"/jobs/" + b"A" * 32), {404}),
    "a short id": (request(GET, b"/jobs/abc"), {404}),
    "an id with a dot segment": (request(GET, b"/jobs/x/../" + JOB.encode()), {404}),
    "a double slash before the id": (request(GET, b"/jobs//" + JOB.encode()), {404}),
    "an unknown id": (request(GET, b"/jobs/" + UNKNOWN.encode()), {404}),
    "an unknown action": (request(GET, b"/jobs/" + JOB.encode() + b"/rerun"), {404}),
    "the prefix alone": (request(GET, b"/jobs"), {404}),
    "wait=-1": (request(GET, b"/jobs/" + JOB.encode() + b"?wait=-1"), {200}),
    "wait=nan": (request(GET, b"/jobs/" + JOB.encode() + b"?wait=nan"), {200}),
    "wait=1e309 (capped)": (request(GET, b"/jobs/" + JOB.encode() + b"?wait=1e309"), {200}),
    "wait=abc": (request(GET, b"/jobs/" + JOB.encode() + b"?wait=abc"), {200}),
    "an empty wait": (request(GET, b"/jobs/" + JOB.encode() + b"?wait="), {200}),
    "wait on the result": (request(GET, b"/jobs/" + JOB.encode() + b"/result?wait=0.1"), {202}),
    "POST on the status route": (request(POST, b"/jobs/" + JOB.encode()), {405}),
    "PUT on cancel": (request(b"PUT", b"/jobs/" + JOB.encode() + b"/cancel"), {405}),
    "DELETE on the result": (request(b"DELETE", b"/jobs/" + JOB.encode() + b"/result"), {405}),
    "cancel of an unknown job": (request(POST, b"/jobs/" + UNKNOWN.encode() + b"/cancel"), {404}),
    "DELETE of an unknown job": (request(b"DELETE", b"/jobs/" + UNKNOWN.encode()), {404}),
    "HEAD on the status route": (request(b"HEAD", b"/jobs/" + JOB.encode()), {200}),
}


@dataclass
class Stack:
    server: Server
    url: str
    job_id: str


@pytest.fixture(scope="module", params=["uvicorn", "gunicorn-gthread"])
def stack(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Stack]:
    folder: Path = tmp_path_factory.mktemp(request.param)
    url = f"sqlite:///{folder}/jobs.db"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": url,
        "GATE_DIR": str(folder),
        "EXECUTE": "0",
        "ROUTES": "/any/**",
        **LIMITS,
    }
    server = Server(request.param, env, folder / "server.log", [], "/health")
    job_id = httpx.post(server.base + "/tiny").json()["id"]
    yield Stack(server, url, job_id)
    server.kill()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_answer_and_makes_no_unpromised_job(stack, case):
    data, allowed = CASES[case]
    before = count_rows(stack.url)
    answer = send_raw(stack.server.port, data.replace(JOB.encode(), stack.job_id.encode()))
    assert answer.status in allowed, (case, answer)
    assert answer.status != 500
    job_route = b" /jobs" in data
    made = count_rows(stack.url) - before
    assert made == (1 if answer.status == 202 and not job_route else 0), case
    if answer.status == 202 and not job_route:
        location = answer.headers["location"]
        assert location.startswith("/jobs/") and not location.startswith("//")
    if answer.status in (413, 431) or (job_route and answer.status in (404, 405)):
        assert answer.headers["content-type"] == "application/problem+json", case
    assert httpx.get(stack.server.base + "/health").status_code == 200


def test_a_client_gone_mid_body_makes_no_job(stack):
    before = count_rows(stack.url)
    partial = request(POST, b"/tiny", [b"Content-Length: 500"], b"x" * 100, length=False)
    send_raw(stack.server.port, partial, close_after=True)
    partial_chunked = chunked(b"/tiny", b"abc")[:-5]  # no last chunk
    send_raw(stack.server.port, partial_chunked, close_after=True)
    assert httpx.get(stack.server.base + "/health").status_code == 200
    assert count_rows(stack.url) == before


def test_a_lying_content_length_stores_only_what_it_declared(stack):
    before = count_rows(stack.url)
    data = request(POST, b"/tiny", [b"Content-Length: 2"], b"{}GET /health HTTP/1.1\r\n", False)
    answer = send_raw(stack.server.port, data)
    assert answer.status == 202
    assert count_rows(stack.url) == before + 1
    assert httpx.get(stack.server.base + "/health").status_code == 200


def test_concurrent_cancel_delete_and_get_on_one_job(stack):
    job_id = httpx.post(stack.server.base + "/tiny").json()["id"]
    base = f"{stack.server.base}/jobs/{job_id}"
    calls: list[Callable[[httpx.Client], httpx.Response]] = [
        lambda c: c.post(base + "/cancel"),
        lambda c: c.delete(base),
        lambda c: c.get(base),
        lambda c: c.get(base + "/result"),
    ] * 5
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda call: call(client).status_code, calls))
    assert 500 not in answers
    assert set(answers) <= {200, 202, 204, 404, 409}
    assert answers.count(204) == 1  # deleted once
    eventually(lambda: httpx.get(base).status_code == 404)


def test_a_script_name_header_never_moves_job_urls_to_another_host(tmp_path):
    """gunicorn takes SCRIPT_NAME from a request header."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite:///{tmp_path}/jobs.db",
        "GATE_DIR": str(tmp_path),
        "EXECUTE": "0",
    }
    server = Server("gunicorn-sync", env, tmp_path / "log", [], "/health")
    try:
        for script_name in ("//evil.example", "/\\evil.example", "/a/../..//evil.example"):
            reply = httpx.post(server.base + "/tiny", headers={"SCRIPT_NAME": script_name})
            if reply.status_code == 202:
                for header in ("location", "operation-location"):
                    assert reply.headers[header].startswith("/jobs/"), reply.headers
    finally:
        server.kill()


def test_the_matrix_has_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (request(POST, b"/any/a%00b"), b"The request contains a NUL character."),
        (request(b"SUPERCALIFRAGILISTIC", b"/any/x"), b"The request method cannot be stored."),
    ],
)
def test_what_the_table_cannot_keep_is_a_400_problem_of_ours(stack, data, detail):
    answer = send_raw(stack.server.port, data)
    if answer.status == 400 and answer.headers.get("content-type") != "application/problem+json":
        assert stack.server.kind == "uvicorn"  # its parser refuses unknown methods itself
        return
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert detail in answer.body
