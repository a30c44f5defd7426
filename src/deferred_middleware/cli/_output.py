"""How the commands answer: a table or lines for a person, one JSON document
for a script, and exit codes a script can rely on.

Styling is click's own: no dependency beyond the [cli] extra, and click
drops the colours by itself when the output is not a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import click

from .._jobs import Job

EXIT_NOT_FOUND = 3
"""No job has that id (or a prefix or suffix of it)."""
EXIT_AMBIGUOUS = 4
"""The prefix or suffix is part of more than one job id."""
EXIT_REFUSED = 5
"""The job's state does not allow the action (cancel a finished job, ...)."""
EXIT_UNAVAILABLE = 6
"""The database is unreachable, or holds no job table."""

STATUS_COLOURS = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "canceled": "magenta",
}


class Refused(click.ClickException):
    """A command that could not do what it was asked, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


def job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "queue": job.queue,
        "owner": job.owner,
        "route": job.route,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
        "callback_url": job.callback_url,
        "webhook": job.webhook_state,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def age(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago ``value`` was, as :func:`span` writes it."""
    if value is None:
        return ""
    return span(((now or datetime.now(timezone.utc)) - value).total_seconds())


def span(seconds: float) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``: to the largest unit."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns with a bold header; statuses in colour on a terminal."""
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    header = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    lines = [click.style(header.rstrip(), bold=True)]
    at = list(columns).index("status") if "status" in columns else None
    for row in cells:
        padded = [value.ljust(width) for value, width in zip(row, widths, strict=True)]
        if at is not None:
            padded[at] = click.style(padded[at], fg=STATUS_COLOURS.get(row[at].strip()))
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def fields(row: dict[str, Any]) -> str:
    """One ``name  value`` line per field, for one job."""
    width = max(len(k) for k in row)
    return "\n".join(f"{k.ljust(width)}  {'' if v is None else v}" for k, v in row.items())
