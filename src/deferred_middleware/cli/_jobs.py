"""``deferred-middleware jobs``: list, show, count, cancel, retry and prune
jobs from a shell. Every command takes ``--json``; ``show``, ``cancel``,
``retry``, ``webhooks`` and ``redeliver`` take a unique prefix or suffix of a
job id."""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from typing import Any

import click
import sqlalchemy as sa

from .._config import default_database_url
from .._jobs import Job, Status, utcnow
from ..store import SQLJobStore, StoreUnavailable
from ..store._errors import cause_of
from ..store._schema import jobs as jobs_table
from ._output import (
    EXIT_AMBIGUOUS,
    EXIT_NOT_FOUND,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    Refused,
    age,
    emit,
    fields,
    job_row,
    span,
    table,
)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LIST_COLUMNS = ["id", "status", "queue", "owner", "route", "attempts", "age", "error"]
JSON_FLAG = click.option("--json", "as_json", is_flag=True, help="JSON, for scripts.")
DATABASE_URL = click.option(
    "--database-url",
    envvar="DEFERRED_DATABASE_URL",
    default=default_database_url,
    show_default="sqlite file in the working directory; env DEFERRED_DATABASE_URL",
)


class Duration(click.ParamType):
    """``90s``, ``15m``, ``24h``, ``7d`` (a bare number is seconds)."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration such as 90s, 15m, 24h or 7d", param, ctx)
        return timedelta(seconds=float(match[1]) * UNITS[match[2] or "s"])


def _open(database_url: str) -> SQLJobStore:
    try:
        return SQLJobStore(database_url)
    except (ValueError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc


def migrate_to_head(database_url: str, as_json: bool) -> None:
    """Create or upgrade the table, and say so: both ``migrate`` commands."""
    store = _open(database_url)
    try:
        store.migrate()
    except StoreUnavailable as exc:
        raise Refused(f"the job store is unavailable: {exc}", EXIT_UNAVAILABLE) from exc
    finally:
        store.close()
    done = {"database": store.url.render_as_string(), "schema": "up to date"}
    emit(done, as_json, lambda d: f"the job table at {d['database']} is up to date")


@click.group()
@DATABASE_URL
@click.pass_context
def jobs(ctx: click.Context, database_url: str) -> None:
    """Inspect and manage jobs in the job table."""
    if ctx.invoked_subcommand == "migrate":
        ctx.obj = database_url
        return
    store = _open(database_url)
    ctx.call_on_close(store.close)
    ctx.obj = store
    try:
        if not _has_job_table(store):
            raise Refused(
                f"no job table at {store.url.render_as_string()}: nothing was ever deferred "
                "there, or the URL is not the app's (--database-url, DEFERRED_DATABASE_URL)",
                EXIT_UNAVAILABLE,
            )
        store.migrate()  # upgrades an existing table in place; never creates one
    except StoreUnavailable as exc:
        raise Refused(f"the job store is unavailable: {exc}", EXIT_UNAVAILABLE) from exc


def _has_job_table(store: SQLJobStore) -> bool:
    """Without creating anything: connecting to a missing SQLite file would."""
    url = store.url
    if url.get_backend_name() == "sqlite" and not (url.database and os.path.exists(url.database)):
        return False
    try:
        return sa.inspect(store.engine).has_table(jobs_table.name)
    except sa.exc.OperationalError as exc:
        raise StoreUnavailable(cause_of(exc)) from exc


@jobs.command("migrate")
@JSON_FLAG
@click.pass_obj
def jobs_migrate(database_url: str, as_json: bool) -> None:
    """Create the job table, or upgrade it to this release's schema."""
    migrate_to_head(database_url, as_json)


def _resolve(store: SQLJobStore, id_or_part: str) -> str:
    """The one job id that a full id, or a unique prefix or suffix of one,
    names. Ids start with the time they were made, so jobs made together
    share long prefixes; their last digits are random, so a few of those
    name a job as well."""
    part = id_or_part.strip().lower()
    starting = store.ids_starting(part) if part else []
    if part in starting:
        return part
    found = starting
    if part and len(starting) < 2:  # reading every id is for a part that may name one
        found = sorted({*starting, *store.ids_ending(part)})
    if not found:
        raise Refused(f"no job {id_or_part}", EXIT_NOT_FOUND)
    if len(found) > 1:
        more = f"{id_or_part} starts or ends more than one job id: give more"
        raise Refused(more, EXIT_AMBIGUOUS)
    return found[0]


def _get(store: SQLJobStore, id_or_part: str) -> Job:
    job = store.get(_resolve(store, id_or_part), request=True, response=True)
    if job is None:
        raise Refused(f"no job {id_or_part}", EXIT_NOT_FOUND)
    return job


@jobs.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in Status]),
    help="Repeat for several.",
)
@click.option("--older-than", type=Duration(), help="Only jobs created longer ago than this.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@JSON_FLAG
@click.pass_obj
def list_jobs(
    store: SQLJobStore,
    statuses: tuple[str, ...],
    older_than: timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first; says so on stderr when more match than --limit."""
    before = utcnow() - older_than if older_than else None
    found = store.list([Status(s) for s in statuses], created_before=before, limit=limit + 1)
    rows = [job_row(job) for job in found[:limit]]
    emit(rows, as_json, _list_text)
    if len(found) > limit:
        click.echo(f"showing the newest {limit} jobs; more match (--limit N)", err=True)


def _list_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    now = utcnow()
    shown = [{**r, "age": age(datetime.fromisoformat(r["created_at"]), now)} for r in rows]
    return table(shown, LIST_COLUMNS)


@jobs.command()
@click.argument("job_id")
@JSON_FLAG
@click.pass_obj
def show(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Show one job, with its response's status and size once it has one."""
    job = _get(store, job_id)
    row = job_row(job)
    if job.response is not None:
        row["response_status"] = job.response.status
        row["response_bytes"] = len(job.response.body)
    row["error_detail"] = store.error_detail(job.id)  # the traceback: operators only
    emit(row, as_json, _show_text)


def _show_text(row: dict[str, Any]) -> str:
    """Fields, then the traceback below them, as Python prints it."""
    detail = row.pop("error_detail")
    return fields(row) + (f"\n\n{detail}" if detail else "")


@jobs.command()
@JSON_FLAG
@click.pass_obj
def stats(store: SQLJobStore, as_json: bool) -> None:
    """Jobs per queue and status, and how long the oldest queued job has waited."""
    now = utcnow()
    counts = store.counts()
    queues: dict[str, dict[str, Any]] = {}
    for found in counts:
        queue = queues.setdefault(
            found.queue, {"queue": found.queue, **{s.value: 0 for s in Status}}
        )
        queue[found.status.value] = found.count
        if found.status is Status.QUEUED:
            queue["oldest_queued_seconds"] = round(found.waited(now), 3)
    data = [{"oldest_queued_seconds": None, **q} for q in queues.values()]
    emit(data, as_json, _stats_text)


def _stats_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no jobs"
    columns = ["queue", *(s.value for s in Status), "oldest_queued"]
    shown = [
        {
            **r,
            "oldest_queued": ""
            if r["oldest_queued_seconds"] is None
            else span(r["oldest_queued_seconds"]),
        }
        for r in rows
    ]
    return table(shown, columns)


@jobs.command()
@JSON_FLAG
@click.pass_obj
def workers(store: SQLJobStore, as_json: bool) -> None:
    """The executors holding running jobs: how many each, and when the
    soonest of its leases runs out (in the past: it stopped renewing, and its
    jobs are taken back at the next reap)."""
    now = utcnow()
    data = [
        {
            "worker": load.worker,
            "running": load.running,
            "lease_expires_at": load.lease_expires_at.isoformat(),
            "lease_seconds_left": round((load.lease_expires_at - now).total_seconds(), 3),
        }
        for load in store.workers()
    ]
    emit(data, as_json, _workers_text)


def _workers_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no worker holds a running job"
    shown = [
        {
            **row,
            "lease": f"{span(left)} left"
            if (left := row["lease_seconds_left"]) >= 0
            else f"lost {span(-left)} ago",
        }
        for row in rows
    ]
    return table(shown, ["worker", "running", "lease"])


@jobs.command()
@click.argument("job_id")
@JSON_FLAG
@click.pass_obj
def cancel(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Cancel a queued or running job. A running job's worker stops it at its
    next lease renewal (an asyncio task is canceled; a thread is abandoned)."""
    job = store.cancel(_resolve(store, job_id))
    if job is None:
        raise Refused(f"no job {job_id}", EXIT_NOT_FOUND)
    if job.status is not Status.CANCELED:
        raise Refused(f"{job.id} had already finished ({job.status.value})", EXIT_REFUSED)
    emit({"id": job.id, "status": job.status.value}, as_json, _id_and_status)


@jobs.command()
@click.argument("job_id")
@JSON_FLAG
@click.pass_obj
def retry(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Queue a failed or canceled job again. Its stored credentials were
    forgotten when it finished, so it runs without them."""
    full_id = _resolve(store, job_id)
    if not store.retry(full_id):
        raise Refused("only failed or canceled jobs can be retried", EXIT_REFUSED)
    emit({"id": full_id, "status": Status.QUEUED.value}, as_json, _id_and_status)


def _id_and_status(data: dict[str, str]) -> str:
    return f"{data['id']} {data['status']}"


@jobs.command()
@click.argument("job_id")
@JSON_FLAG
@click.pass_obj
def webhooks(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Show every delivery attempt of a job's completion webhook."""
    job = _with_callback(store, job_id)
    attempts = [
        {
            "attempt": a.attempt,
            "at": a.at.isoformat(),
            "status_code": a.status_code,
            "error": a.error,
            "duration_ms": a.duration_ms,
            "worker": a.worker,
        }
        for a in store.webhook_attempts_of(job.id)
    ]
    data = {"url": job.callback_url, "state": job.webhook_state, "attempts": attempts}
    emit(data, as_json, _webhooks_text)


def _with_callback(store: SQLJobStore, job_id: str) -> Job:
    job = _get(store, job_id)
    if job.callback_url is None:
        raise Refused(f"job {job.id} has no callback", EXIT_REFUSED)
    return job


def _webhooks_text(data: dict[str, Any]) -> str:
    lines = [f"{data['url']}  {data['state'] or 'not yet due'}"]
    if data["attempts"]:
        columns = ["attempt", "at", "status_code", "error", "duration_ms"]
        lines.append(table(data["attempts"], columns))
    return "\n".join(lines)


@jobs.command()
@click.argument("job_id")
@JSON_FLAG
@click.pass_obj
def redeliver(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Send a finished job's completion webhook again (a fresh set of attempts)."""
    job = _with_callback(store, job_id)
    if not store.redeliver(job.id):
        raise Refused("only a finished job's webhook can be sent again", EXIT_REFUSED)
    emit({"id": job.id, "webhook": "due"}, as_json, lambda d: f"{d['id']} webhook due")


@jobs.command()
@click.option(
    "--older-than",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Delete jobs finished longer ago than this.",
)
@JSON_FLAG
@click.pass_obj
def prune(store: SQLJobStore, older_than: timedelta, as_json: bool) -> None:
    """Delete finished jobs past their retention time, in small batches."""
    removed = store.prune(utcnow() - older_than)
    emit(
        {"pruned": removed},
        as_json,
        lambda d: f"pruned {d['pruned']} job{'s' if d['pruned'] != 1 else ''}",
    )
