"""The dashboard's HTML, sans I/O: a page of recent jobs and a page per job.

Rendered on the server; the one script keeps the page live by fetching the
same page's fragment every second and sends the cancel and retry buttons.
Everything from the table is escaped, and the page's policy runs no script
but its own (a nonce per response).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from urllib.parse import urlencode

from ._jobs import Job, Status, request_line

ACTION_HEADER = "x-deferred-dashboard"
"""Sent by the page's buttons. A form on another site cannot set it, so a
cancel or retry never comes from a page the operator did not open."""

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .8rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}
th{background:#f4f4f4}
.status{font-weight:600}.queued{color:#777}.running{color:#06c}.succeeded{color:#080}
.failed{color:#b00}.canceled{color:#a60}
code,pre{font:12px ui-monospace,monospace}pre{background:#f6f6f6;padding:.6rem;overflow:auto}
form{margin:0 0 1rem}dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{font-weight:600}progress{width:6rem}button{cursor:pointer}
"""

SCRIPT = """
const live = document.getElementById("live");
let shown = null;
async function refresh() {
  const answer = await fetch(live.dataset.src, {cache: "no-store"});
  const text = answer.ok ? await answer.text() : shown;
  if (text !== shown) live.innerHTML = shown = text;  // untouched while nothing changed
}
setInterval(() => refresh().catch(() => {}), 1000);
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  button.disabled = true;
  const query = new URLSearchParams({action: button.dataset.action, job: button.dataset.job});
  const answer = await fetch("?" + query, {method: "POST", headers: {"ACTION_HEADER": "1"}});
  document.getElementById("said").textContent = answer.ok ? "" : await answer.text();
  await refresh();
});
""".replace("ACTION_HEADER", ACTION_HEADER)


@dataclasses.dataclass(frozen=True)
class Filters:
    """What the list shows: one status and one queue, or all of either."""

    status: Status | None = None
    queue: str | None = None

    def query(self, **more: str) -> str:
        pairs = {"status": self.status.value if self.status else "", "queue": self.queue or ""}
        pairs.update(more)
        return "?" + urlencode({k: v for k, v in pairs.items() if v})


@dataclasses.dataclass(frozen=True)
class Page:
    body: bytes
    nonce: str

    @property
    def policy(self) -> str:
        return (
            f"default-src 'none'; script-src 'nonce-{self.nonce}'; "
            f"style-src 'nonce-{self.nonce}'; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )


def list_page(jobs: Sequence[Job], queues: Iterable[str], filters: Filters, now: datetime) -> Page:
    controls = _filter_form(filters, queues)
    live = _live(filters.query(part="rows"), job_rows(jobs, now))
    return _page("Jobs", f"<h1>Jobs</h1>{controls}{live}")


def job_page(job: Job, detail: str | None, now: datetime) -> Page:
    live = _live(f"?{urlencode({'job': job.id, 'part': 'job'})}", job_detail(job, detail, now))
    return _page(f"Job {job.id}", f'<p><a href="./">All jobs</a></p><h1>Job</h1>{live}')


def job_rows(jobs: Sequence[Job], now: datetime) -> str:
    """The table of jobs: the fragment the list page refreshes."""
    head = "".join(
        f"<th>{name}</th>"
        for name in ("Job", "Status", "Route", "Queue", "Owner", "Progress", "Tries", "Age", "")
    )
    rows = "".join(_row(job, now) for job in jobs) or '<tr><td colspan="9">No jobs.</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def job_detail(job: Job, detail: str | None, now: datetime) -> str:
    """One job's facts: the fragment its page refreshes."""
    request = job.request
    line = request_line(request.method, request.path) if request is not None else job.route or ""
    if request is not None and request.query_string:
        line += "?" + request.query_string.decode("latin-1")
    facts = [
        ("Id", f"<code>{escape(job.id)}</code>"),
        ("Status", _status(job)),
        ("Request", f"<code>{escape(line)}</code>"),
        ("Queue", escape(job.queue)),
        ("Owner", escape(job.owner or "")),
        ("Progress", _progress(job)),
        ("Attempts", f"{job.attempts} of {job.max_attempts}"),
        ("Created", _time(job.created_at, now)),
        ("Started", _time(job.started_at, now)),
        ("Finished", _time(job.finished_at, now)),
        ("Error", escape(job.error or "")),
    ]
    listed = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    trace = f"<h2>Traceback</h2><pre>{escape(detail)}</pre>" if detail else ""
    return f"<dl>{listed}</dl><p>{_buttons(job)}</p>{trace}"


def age(seconds: float) -> str:
    """A short age for a table cell: ``4 s``, ``3 min``, ``2 h``, ``5 d``."""
    seconds = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _page(title: str, content: str) -> Page:
    nonce = secrets.token_urlsafe(16)
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f'<title>{escape(title)}</title><style nonce="{nonce}">{STYLE}</style></head>'
        f'<body>{content}<p id="said" role="status"></p>'
        f'<script nonce="{nonce}">{SCRIPT}</script></body></html>'
    )
    return Page(html.encode(), nonce)


def _live(source: str, content: str) -> str:
    return f'<div id="live" data-src="{escape(source)}">{content}</div>'


def _filter_form(filters: Filters, queues: Iterable[str]) -> str:
    statuses = _options([s.value for s in Status], filters.status.value if filters.status else "")
    in_queues = _options(sorted(set(queues) | {filters.queue or ""} - {""}), filters.queue or "")
    return (
        '<form method="get"><label>Status <select name="status">'
        f'<option value="">all</option>{statuses}</select></label> '
        '<label>Queue <select name="queue">'
        f'<option value="">all</option>{in_queues}</select></label> '
        "<button>Show</button></form>"
    )


def _options(values: Iterable[str], chosen: str) -> str:
    return "".join(
        f"<option{' selected' if value == chosen else ''}>{escape(value)}</option>"
        for value in values
    )


def _row(job: Job, now: datetime) -> str:
    link = f'<a href="?{urlencode({"job": job.id})}"><code>{escape(job.id[:12])}</code></a>'
    cells = (
        link,
        _status(job),
        f"<code>{escape(job.route or '')}</code>",
        escape(job.queue),
        escape(job.owner or ""),
        _progress(job),
        f"{job.attempts}/{job.max_attempts}",
        age((now - job.created_at).total_seconds()),
        _buttons(job),
    )
    data = f'data-job="{escape(job.id)}" data-status="{job.status.value}"'
    return f"<tr {data}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _status(job: Job) -> str:
    return f'<span class="status {job.status.value}">{job.status.value}</span>'


def _progress(job: Job) -> str:
    bar = ""
    if job.progress is not None:
        percent = round(job.progress * 100)
        bar = f'<progress max="100" value="{percent}"></progress> {percent}% '
    return bar + escape(job.message or "")


def _buttons(job: Job) -> str:
    if job.status in (Status.QUEUED, Status.RUNNING):
        return _button("cancel", job)
    if job.status in (Status.FAILED, Status.CANCELED):
        return _button("retry", job)
    return ""


def _button(action: str, job: Job) -> str:
    return (
        f'<button type="button" data-action="{action}" data-job="{escape(job.id)}">'
        f"{action.capitalize()}</button>"
    )


def _time(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    stamp = value.replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")
    return f"{stamp} UTC ({age((now - value).total_seconds())} ago)"
