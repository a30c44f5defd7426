"""``dashboard=fn``: who gets in, what the pages show, and what the cancel and
retry actions do, over the in-memory store one step at a time; then both
adapters asking ``fn`` as they ask ``owner``."""

from __future__ import annotations

import dataclasses
import html
import json
import re
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from deferred_middleware import _dashboard as dashboard
from deferred_middleware import _policy as policy
from deferred_middleware._dashboard import ACTION_HEADER, age
from deferred_middleware._jobs import DeferredOptions, Job, Status, StoredRequest
from deferred_middleware.store import StoreUnavailable

from .policy_harness import Harness

FROM_PAGE = True


@pytest.fixture
def h() -> Harness:
    return Harness(dashboard=lambda request: True)


def page(h: Harness, query: str = "", method: str = "GET") -> str:
    reply = h.operator.dashboard(method, query.encode(), True, False)
    assert reply.status == 200, reply.body
    assert dict(reply.headers)["content-type"] == "text/html; charset=utf-8"
    return reply.body.decode()


def act(h: Harness, action: str, job_id: str, from_page: bool = FROM_PAGE) -> int:
    query = f"action={action}&job={job_id}".encode()
    return h.operator.dashboard("POST", query, True, from_page).status


def rows(text: str) -> dict[str, str]:
    """Each job's row in a list: job id -> its status."""
    return dict(re.findall(r'<tr data-job="([0-9a-f]+)" data-status="(\w+)">', text))


def test_the_route_is_there_only_with_the_option():
    assert Harness().operator.route_of("/") is None
    assert Harness().route("/jobs/").status == 404
    h = Harness(dashboard=lambda request: True)
    assert h.operator.route_of("/") == "dashboard"
    assert h.operator.route_of("") is None and h.operator.route_of("//") is None


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT"])
def test_anyone_fn_refuses_gets_what_an_unknown_route_gets(h, method):
    job_id = h.submit()
    refused = h.operator.dashboard(method, f"action=cancel&job={job_id}".encode(), False, True)
    unknown = h.route(f"/jobs/{'f' * 32}", method if method in ("GET", "HEAD") else "GET")
    assert (refused.status, refused.headers) == (unknown.status, unknown.headers)
    assert refused.body == (b"" if method == "HEAD" else unknown.body)
    assert h.job(job_id).status is Status.QUEUED  # the refused cancel did nothing


def test_the_list_shows_each_job_s_status_route_queue_owner_progress_and_age(h):
    running = h.submit(owner="alice")
    queued = h.submit(queue="mail", owner="bob")
    h.claim()
    h.launcher.last(running).progress(0.42, "half way")
    h.advance(125)
    text = page(h)
    assert rows(text) == {running: "running", queued: "queued"}
    row = re.search(rf'<tr data-job="{running}".*?</tr>', text).group(0)
    for shown in ("POST /reports", "default", "alice", 'value="42"', "42%", "half way", "2 min"):
        assert shown in row
    assert "mail" in re.search(rf'<tr data-job="{queued}".*?</tr>', text).group(0)
    assert "<option>mail</option>" in text  # the queues to filter by, from the table


def test_everything_from_the_table_is_escaped(h):
    job_id = h.submit(owner="<img src=x onerror=alert(1)>")
    h.claim()
    h.launcher.last(job_id).progress(0.5, "<script>alert(2)</script>")
    for text in (page(h), page(h, f"job={job_id}")):
        assert "<img src=x" not in text and "<script>alert" not in text
        assert html.escape("<script>alert(2)</script>") in text


def test_filters_by_status_and_queue(h):
    mail = h.submit(queue="mail")
    default = h.submit()
    h.route(f"/jobs/{default}/cancel", "POST")
    assert rows(page(h, "queue=mail")) == {mail: "queued"}
    assert rows(page(h, "status=canceled")) == {default: "canceled"}
    assert rows(page(h, "status=canceled&queue=mail")) == {}
    assert "No jobs." in page(h, "status=canceled&queue=mail")
    assert "<option selected>canceled</option>" in page(h, "status=canceled")
    bad = h.operator.dashboard("GET", b"status=lost", True, False)
    assert bad.status == 400


def test_the_live_fragment_is_the_table_alone_and_keeps_the_filters(h):
    job_id = h.submit(queue="mail")
    full = page(h, "queue=mail")
    assert 'data-src="?queue=mail&amp;part=rows"' in full
    fragment = page(h, "queue=mail&part=rows")
    assert fragment.startswith("<table>") and "<html" not in fragment
    assert rows(fragment) == {job_id: "queued"}


def test_a_job_s_page_shows_its_request_timings_attempts_and_error(h):
    job_id = h.submit(retries=1, query=b"year=2026")
    for _ in range(2):
        assert h.claim() == 1
        h.launcher.last(job_id).end(policy.raised(ValueError("no ledger")))
        h.advance(2)
    text = page(h, f"job={job_id}")
    assert "POST /reports?year=2026" in text
    assert "2 of 2" in text  # attempts
    assert "Created" in text and "UTC" in text and "Finished" in text
    assert "The handler raised an exception." in text
    assert "ValueError: no ledger" in text  # the traceback, for operators
    assert 'data-action="retry"' in text
    fragment = page(h, f"job={job_id}&part=job")
    assert "ValueError: no ledger" in fragment and "<html" not in fragment


@pytest.mark.parametrize("job_id", ["f" * 32, "nope", "../x"])
def test_an_unknown_or_malformed_job_is_404(h, job_id):
    assert h.operator.dashboard("GET", f"job={job_id}".encode(), True, False).status == 404


def test_cancel_and_retry_from_the_page(h):
    job_id = h.submit()
    assert act(h, "cancel", job_id) == 204
    assert h.job(job_id).status is Status.CANCELED
    assert act(h, "cancel", job_id) == 204  # as the cancel route: asked twice, done once
    assert act(h, "retry", job_id) == 204
    assert h.job(job_id).status is Status.QUEUED
    assert act(h, "retry", job_id) == 409  # only failed or canceled jobs run again
    assert h.claim() == 1  # the retried job is due at once
    h.launcher.last(job_id).respond(200)
    assert act(h, "cancel", job_id) == 409  # it has finished


def test_cancel_stops_a_job_running_here(h):
    job_id = h.submit()
    h.claim()
    assert act(h, "cancel", job_id) == 204
    assert h.launcher.last(job_id).cancel_calls == 1


def test_actions_need_the_page_s_header_a_known_action_and_a_job(h):
    job_id = h.submit()
    assert act(h, "cancel", job_id, from_page=False) == 403  # a form on another site
    assert act(h, "delete", job_id) == 400
    assert act(h, "cancel", "nope") == 400
    assert act(h, "cancel", "f" * 32) == 404
    assert act(h, "retry", "f" * 32) == 404
    assert h.job(job_id).status is Status.QUEUED


def test_other_methods_are_405_and_head_has_no_body(h):
    refused = h.operator.dashboard("DELETE", b"", True, True)
    assert refused.status == 405 and ("allow", "GET, HEAD, POST") in refused.headers
    head = h.operator.dashboard("HEAD", b"", True, False)
    assert head.status == 200 and head.body == b""


def test_the_page_runs_only_its_own_script_and_is_never_framed_or_cached(h):
    reply = h.operator.dashboard("GET", b"", True, False)
    headers = dict(reply.headers)
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}">' in reply.body.decode()
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store" and headers["x-frame-options"] == "DENY"
    other = dict(h.operator.dashboard("GET", b"", True, False).headers)
    assert other["content-security-policy"] != headers["content-security-policy"]  # fresh nonce


def test_the_store_being_down_is_503(h, monkeypatch):
    def down(*_args, **_kwargs):
        raise StoreUnavailable("down")

    monkeypatch.setattr(h.store, "list", down)
    reply = h.operator.dashboard("GET", b"", True, False)
    assert reply.status == 503 and ("retry-after", "1") in reply.headers


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(-3, "0 s"), (59.9, "59 s"), (60, "1 min"), (3599, "59 min"), (3600, "1 h"), (86400, "1 d")],
)
def test_ages_read_at_a_glance(seconds, shown):
    assert age(seconds) == shown


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_asgi_adapter_awaits_an_async_fn_and_passes_the_page_header(sqlite_url):
    from starlette.applications import Starlette

    from deferred_middleware import DeferredMiddleware

    async def admins_only(request) -> bool:
        return request.headers.get("x-role") == "admin" and request.scope["type"] == "http"

    app = DeferredMiddleware(Starlette(), database_url=sqlite_url, dashboard=admins_only)
    admin = {"x-role": "admin"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/jobs/")).status_code == 404
        assert (await c.get("/jobs/", headers=admin)).text.startswith("<!doctype html>")
        job = f"job={'f' * 32}"
        sent = await c.post(f"/jobs/?action=cancel&{job}", headers=admin)
        assert sent.status_code == 403
        sent = await c.post(f"/jobs/?action=cancel&{job}", headers={**admin, ACTION_HEADER: "1"})
        assert sent.status_code == 404  # past the header check: no such job
    await app.shutdown()


def test_flask_asks_fn_inside_a_request_context(sqlite_url):
    from flask import Flask, session

    from deferred_middleware.flask import FlaskDeferred

    app = Flask(__name__)
    app.secret_key = "test"

    @app.post("/login")
    def login():
        session["admin"] = True
        return "in"

    FlaskDeferred(app, database_url=sqlite_url, dashboard=lambda request: session.get("admin"))
    with app.test_client() as client:
        assert client.get("/jobs/").status_code == 404
        client.post("/login")
        shown = client.get("/jobs/")
        assert shown.status_code == 200 and b"<h1>Jobs</h1>" in shown.data
        job = f"job={'f' * 32}"
        sent = client.post(f"/jobs/?action=retry&{job}", headers={ACTION_HEADER: "1"})
        assert sent.status_code == 404
        assert client.post(f"/jobs/?action=retry&{job}").status_code == 403
    app.extensions["deferred_middleware"].shutdown()


# -- the HTML, exactly: what an operator reads, and what the page's script and
# -- the browser test select on -------------------------------------------

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)
HEAD = (
    "<table><thead><tr><th>Job</th><th>Status</th><th>Route</th><th>Queue</th><th>Owner</th>"
    "<th>Progress</th><th>Tries</th><th>Age</th><th></th></tr></thead><tbody>"
)


def test_a_row_shows_a_running_job_with_its_cancel_button():
    job = Job(
        id="a" * 32,
        status=Status.RUNNING,
        created_at=NOW - timedelta(seconds=75),
        attempts=1,
        options=DeferredOptions(retries=2),
        progress=0.256,
        message="step <2>",
        queue="mail",
        owner="ann",
        route="POST /r",
    )
    a = "a" * 32
    assert dashboard.job_rows([job], NOW) == (
        f'{HEAD}<tr data-job="{a}" data-status="running">'
        f'<td><a href="?job={a}"><code>aaaaaaaaaaaa</code></a></td>'
        '<td><span class="status running">running</span></td><td><code>POST /r</code></td>'
        "<td>mail</td><td>ann</td>"
        '<td><progress max="100" value="26"></progress> 26% step &lt;2&gt;</td>'
        "<td>1/3</td><td>1 min</td>"
        f'<td><button type="button" data-action="cancel" data-job="{a}">Cancel</button></td>'
        "</tr></tbody></table>"
    )
    assert (
        dashboard.job_rows([], NOW)
        == f'{HEAD}<tr><td colspan="9">No jobs.</td></tr></tbody></table>'
    )


def test_a_job_s_facts_with_its_retry_button_and_traceback():
    job = Job(
        id="b" * 32,
        status=Status.FAILED,
        created_at=NOW - timedelta(hours=2),
        started_at=NOW - timedelta(hours=2),
        finished_at=NOW - timedelta(hours=1),
        attempts=1,
        error="The handler raised an exception.",
        request=StoredRequest("PUT", "/x/é", b"a=1&b=2"),
    )
    b = "b" * 32
    assert dashboard.job_detail(job, "Traceback...\nValueError: <x>", NOW) == (
        f"<dl><dt>Id</dt><dd><code>{b}</code></dd>"
        '<dt>Status</dt><dd><span class="status failed">failed</span></dd>'
        "<dt>Request</dt><dd><code>PUT /x/é?a=1&amp;b=2</code></dd>"
        "<dt>Queue</dt><dd>default</dd><dt>Owner</dt><dd></dd><dt>Progress</dt><dd></dd>"
        "<dt>Attempts</dt><dd>1 of 1</dd>"
        "<dt>Created</dt><dd>2026-11-27 10:00:00 UTC (2 h ago)</dd>"
        "<dt>Started</dt><dd>2026-11-27 10:00:00 UTC (2 h ago)</dd>"
        "<dt>Finished</dt><dd>2026-11-27 11:00:00 UTC (1 h ago)</dd>"
        "<dt>Error</dt><dd>The handler raised an exception.</dd></dl>"
        f'<p><button type="button" data-action="retry" data-job="{b}">Retry</button></p>'
        "<h2>Traceback</h2><pre>Traceback...\nValueError: &lt;x&gt;</pre>"
    )
    listed = dataclasses.replace(job, request=None, route="PUT /x/é", status=Status.SUCCEEDED)
    facts = dashboard.job_detail(listed, None, NOW)
    assert "<dd><code>PUT /x/é</code></dd>" in facts  # read from a list: the route alone
    assert "<h2>" not in facts and "<button" not in facts  # no traceback; nothing to do


def test_the_filters_keep_what_was_chosen():
    form = dashboard._filter_form(dashboard.Filters(Status.FAILED, "mail"), ["default", "b"])
    assert form == (
        '<form method="get"><label>Status <select name="status"><option value="">all</option>'
        "<option>queued</option><option>running</option><option>succeeded</option>"
        "<option selected>failed</option><option>canceled</option></select></label> "
        '<label>Queue <select name="queue"><option value="">all</option><option>b</option>'
        "<option>default</option><option selected>mail</option></select></label> "
        "<button>Show</button></form>"
    )
    assert dashboard.Filters(None, "q 1").query(part="rows") == "?queue=q+1&part=rows"
    assert dashboard.Filters(Status.QUEUED).query() == "?status=queued"
    assert dashboard.Filters().query() == "?"


def test_the_pages_are_titled_and_refresh_their_own_fragment(h):
    job_id = h.submit()
    listing, job = page(h), page(h, f"job={job_id}")
    assert "<title>Jobs</title>" in listing and f"<title>Job {job_id}</title>" in job
    assert f'data-src="?job={job_id}&amp;part=job"' in job
    assert '<a href="./">All jobs</a>' in job
    for reply in (
        h.operator.dashboard("GET", b"", True, False),
        h.operator.dashboard("GET", b"part=rows", True, False),
    ):
        assert dict(reply.headers)["content-length"] == str(len(reply.body))


def test_a_list_shows_at_most_a_hundred_jobs(h):
    for _ in range(101):
        h.submit()
    assert len(rows(page(h, "part=rows"))) == 100


def problem(status: int, title: str, detail: str | None = None) -> dict:
    document = {"type": "about:blank", "title": title, "status": status}
    if detail is not None:
        document["detail"] = detail
    return document


def test_each_refused_action_says_why(h):
    job_id = h.submit()

    def answer(query: str, from_page: bool = True) -> tuple[int, dict]:
        reply = h.operator.dashboard("POST", query.encode(), True, from_page)
        return reply.status, json.loads(reply.body)

    header = f"Send the {ACTION_HEADER} header, as the dashboard does."
    assert answer(f"action=cancel&job={job_id}", False) == (403, problem(403, "Forbidden", header))
    expected = "Expected action=cancel or retry and a job id."
    assert answer(f"action=stop&job={job_id}") == (400, problem(400, "Bad Request", expected))
    assert answer("action=cancel") == (400, problem(400, "Bad Request", expected))
    nobody = "No job with this id."
    assert answer(f"action=cancel&job={'f' * 32}") == (404, problem(404, "Not Found", nobody))
    assert answer(f"action=retry&job={job_id}") == (
        409,
        problem(409, "Conflict", "Only failed or canceled jobs run again."),
    )
    h.claim()
    h.launcher.last(job_id).respond(200)
    assert answer(f"action=cancel&job={job_id}") == (
        409,
        problem(409, "Conflict", "The job has already finished."),
    )
    assert json.loads(h.operator.dashboard("GET", b"status=x", True, False).body) == problem(
        400, "Bad Request", "Unknown status."
    )
    done = h.operator.dashboard("POST", f"action=retry&job={job_id}".encode(), True, True)
    assert done.status == 409
    refused = h.operator.dashboard("PATCH", b"", True, True)
    assert json.loads(refused.body) == problem(405, "Method Not Allowed")
    h.route(f"/jobs/{job_id}", "DELETE")
    assert answer(f"action=retry&job={job_id}") == (404, problem(404, "Not Found", nobody))


def test_a_done_action_answers_204_with_nothing_more(h):
    job_id = h.submit()
    done = h.operator.dashboard("POST", f"action=cancel&job={job_id}".encode(), True, True)
    assert (done.status, done.headers, done.body) == (204, [], b"")


def test_rows_without_a_route_or_an_owner_leave_their_cells_empty():
    plain = Job(id="c" * 32, status=Status.SUCCEEDED, created_at=NOW)
    other = dataclasses.replace(plain, id="d" * 32)
    table = dashboard.job_rows([plain, other], NOW)
    cells = re.findall(r"<td>(.*?)</td>", table)
    assert cells[2:7] == ["<code></code>", "default", "", "", "0/1"]
    assert "</tr><tr " in table  # two rows, side by side
    facts = dashboard.job_detail(plain, None, NOW)
    assert facts.endswith("<dt>Error</dt><dd></dd></dl><p></p>")  # no button, no traceback
    assert "<dt>Request</dt><dd><code></code></dd>" in facts


def test_a_form_without_filters_chooses_nothing():
    form = dashboard._filter_form(dashboard.Filters(), ["a"])
    assert "selected" not in form
    assert re.findall(r"<option[^>]*>([^<]*)</option>", form)[-2:] == ["all", "a"]


def test_a_retry_from_the_page_wakes_the_executor_and_whoever_waits(h, monkeypatch):
    job_id = h.submit()
    act(h, "cancel", job_id)
    woken, heard = [], []
    monkeypatch.setattr(h.dispatcher, "wake", lambda: woken.append(True))
    h.notifier.subscribe(job_id, lambda: heard.append(True))
    assert act(h, "retry", job_id) == 204
    assert woken == [True] and heard == [True]
