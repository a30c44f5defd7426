"""The operator's commands: ``deferred-middleware worker`` and ``deferred-middleware jobs``."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import timedelta
from typing import Any

try:
    import click
except ImportError:  # pragma: no cover - the [cli] extra is not installed
    sys.exit("deferred-middleware's commands need click: pip install 'deferred-middleware[cli]'")

import sqlalchemy as sa

from ._config import default_database_url
from ._jobs import Job, Status, utcnow
from .store import SQLJobStore, StoreUnavailable
from .store._schema import jobs as jobs_table

JOBS_TABLE = jobs_table.name

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


@click.group()
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def main(log_level: str) -> None:
    """deferred-middleware: run and inspect deferred jobs."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.argument("target")
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs run at once.")
@click.option("--grace", type=float, help="Seconds running jobs get to finish on SIGTERM.")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="Run only this queue's jobs; repeat for several. "
    "Default: the app's queue and those its @deferred routes name.",
)
def worker(
    target: str, concurrency: int | None, grace: float | None, queues: tuple[str, ...]
) -> None:
    """Run the deferred jobs of the app at TARGET (MODULE:ATTR), out of process."""
    from . import worker as worker_module

    try:
        worker_module.run(target, concurrency=concurrency, grace=grace, queues=queues)
    except (ValueError, LookupError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    except StoreUnavailable as exc:
        raise click.ClickException(f"the job store is unavailable: {exc}") from exc


@main.group()
@click.option(
    "--database-url",
    envvar="DEFERRED_DATABASE_URL",
    default=default_database_url,
    show_default="sqlite file in the working directory; env DEFERRED_DATABASE_URL",
)
@click.pass_context
def jobs(ctx: click.Context, database_url: str) -> None:
    """Inspect and manage jobs in the job table."""
    try:
        store = SQLJobStore(database_url)
    except (ValueError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.call_on_close(store.close)
    ctx.obj = store
    if ctx.invoked_subcommand == "migrate":
        return
    try:
        if not _has_job_table(store):
            raise click.ClickException(
                f"no job table at {store.url.render_as_string()}: nothing was ever deferred "
                "there, or the URL is not the app's (--database-url, DEFERRED_DATABASE_URL)"
            )
        store.migrate()  # upgrades an existing table in place; never creates one
    except StoreUnavailable as exc:
        raise click.ClickException(f"the job store is unavailable: {exc}") from exc


def _has_job_table(store: SQLJobStore) -> bool:
    """Without creating anything: connecting to a missing SQLite file would."""
    url = store.url
    if url.get_backend_name() == "sqlite" and not (url.database and os.path.exists(url.database)):
        return False
    try:
        return sa.inspect(store.engine).has_table(JOBS_TABLE)
    except sa.exc.OperationalError as exc:
        raise StoreUnavailable(exc.__class__.__name__) from exc


@jobs.command()
@click.pass_obj
def migrate(store: SQLJobStore) -> None:
    """Create the job table, or upgrade it to this release's schema."""
    try:
        store.migrate()
    except StoreUnavailable as exc:
        raise click.ClickException(f"the job store is unavailable: {exc}") from exc
    click.echo(f"the job table at {store.url.render_as_string()} is up to date")


def _row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "queue": job.queue,
        "owner": job.owner,
        "attempts": job.attempts,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
        "callback_url": job.callback_url,
        "webhook": job.webhook_state,
    }


LIST_COLUMNS = ["id", "status", "queue", "owner", "attempts", "created_at", "finished_at", "error"]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


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
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.pass_obj
def list_jobs(
    store: SQLJobStore,
    statuses: tuple[str, ...],
    older_than: timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    before = utcnow() - older_than if older_than else None
    rows = [
        _row(j)
        for j in store.list([Status(s) for s in statuses], created_before=before, limit=limit)
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(_table(rows, LIST_COLUMNS))
    else:
        click.echo("no jobs")


def _get(store: SQLJobStore, job_id: str) -> Job:
    job = store.get(job_id, response=True)
    if job is None:
        raise click.ClickException(f"no job {job_id}")
    return job


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Show one job, with its response's status and size once it has one."""
    job = _get(store, job_id)
    row = _row(job)
    if job.response is not None:
        row["response_status"] = job.response.status
        row["response_bytes"] = len(job.response.body)
    if as_json:
        click.echo(json.dumps(row, indent=2))
    else:
        width = max(len(k) for k in row)
        for key, value in row.items():
            click.echo(f"{key.ljust(width)}  {'' if value is None else value}")


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def cancel(store: SQLJobStore, job_id: str) -> None:
    """Cancel a queued or running job. A running job's worker stops it at its
    next lease renewal (an asyncio task is canceled; a thread is abandoned)."""
    job = store.cancel(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id}")
    click.echo(f"{job.id} {job.status.value}")
    if job.status is not Status.CANCELED:
        raise click.ClickException("the job had already finished")


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def retry(store: SQLJobStore, job_id: str) -> None:
    """Queue a failed or canceled job again. Its stored credentials were
    forgotten when it finished, so it runs without them."""
    if not store.retry(job_id):
        _get(store, job_id)
        raise click.ClickException("only failed or canceled jobs can be retried")
    click.echo(f"{job_id} queued")


@jobs.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@click.pass_obj
def webhooks(store: SQLJobStore, job_id: str, as_json: bool) -> None:
    """Show every delivery attempt of a job's completion webhook."""
    job = _get(store, job_id)
    if job.callback_url is None:
        raise click.ClickException(f"job {job_id} has no callback")
    rows = [
        {
            "attempt": a.attempt,
            "at": a.at.isoformat(),
            "status_code": a.status_code,
            "error": a.error,
            "duration_ms": a.duration_ms,
            "worker": a.worker,
        }
        for a in store.webhook_attempts_of(job_id)
    ]
    if as_json:
        click.echo(
            json.dumps(
                {"url": job.callback_url, "state": job.webhook_state, "attempts": rows}, indent=2
            )
        )
        return
    click.echo(f"{job.callback_url}  {job.webhook_state or 'not yet due'}")
    if rows:
        click.echo(_table(rows, ["attempt", "at", "status_code", "error", "duration_ms"]))


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def redeliver(store: SQLJobStore, job_id: str) -> None:
    """Send a finished job's completion webhook again (a fresh set of attempts)."""
    if not store.redeliver(job_id):
        job = _get(store, job_id)
        if job.callback_url is None:
            raise click.ClickException(f"job {job_id} has no callback")
        raise click.ClickException("only a finished job's webhook can be sent again")
    click.echo(f"{job_id} webhook due")


@jobs.command()
@click.option(
    "--older-than",
    type=Duration(),
    default="24h",
    show_default=True,
    help="Delete jobs finished longer ago than this.",
)
@click.pass_obj
def prune(store: SQLJobStore, older_than: timedelta) -> None:
    """Delete finished jobs past their retention time, in small batches."""
    removed = store.prune(utcnow() - older_than)
    click.echo(f"pruned {removed} job{'s' if removed != 1 else ''}")


if __name__ == "__main__":
    main()
