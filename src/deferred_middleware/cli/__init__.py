"""The operator's commands: ``deferred-middleware worker``, ``migrate`` and ``jobs``."""

from __future__ import annotations

import logging
import sys

try:
    import click
except ImportError:  # pragma: no cover - the [cli] extra is not installed
    sys.exit("deferred-middleware's commands need click: pip install 'deferred-middleware[cli]'")

from ..store import StoreUnavailable
from ._jobs import DATABASE_URL, JSON_FLAG, jobs, migrate_to_head
from ._output import EXIT_UNAVAILABLE, Refused


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
    if log_level != "debug":  # Alembic's own lines say nothing an operator acts on
        logging.getLogger("alembic").setLevel(logging.WARNING)


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
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve Prometheus metrics on this port (the [metrics] extra).",
)
@click.option(
    "--metrics-host", default="0.0.0.0", show_default=True, help="Address for --metrics-port."
)
def worker(
    target: str,
    concurrency: int | None,
    grace: float | None,
    queues: tuple[str, ...],
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the deferred jobs of the app at TARGET (MODULE:ATTR), out of process."""
    from .. import worker as worker_module

    try:
        worker_module.run(
            target,
            concurrency=concurrency,
            grace=grace,
            queues=queues,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
    except (ValueError, LookupError, ImportError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    except StoreUnavailable as exc:
        raise Refused(f"the job store is unavailable: {exc}", EXIT_UNAVAILABLE) from exc


@main.command()
@DATABASE_URL
@JSON_FLAG
def migrate(database_url: str, as_json: bool) -> None:
    """Create the job table, or upgrade it in place: for deploy scripts."""
    migrate_to_head(database_url, as_json)


main.add_command(jobs)

__all__ = ["main"]
