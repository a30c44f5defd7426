"""Putting the parts together, the same way for every adapter: options into
a config, a store, its writer, an executor around the adapter's launcher,
and the core over them."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

from ._config import Config
from ._core import JobCore
from ._jobs import DeferredOptions
from ._metrics import Metrics
from ._notify import Notifier
from ._operator import OperatorRoutes
from ._routes import RoutePatterns
from .runner._deliver import WebhookDeliverer
from .runner._dispatch import Dispatcher, Launcher
from .store import JOB_CHANGES, open_store
from .store._writer import BatchWriter


@dataclasses.dataclass
class Parts:
    config: Config
    patterns: RoutePatterns
    core: JobCore
    dispatcher: Dispatcher
    metrics: Metrics
    operator: OperatorRoutes


def assemble(
    launcher: Launcher,
    *,
    routes: Iterable[str] = (),
    retries: int = 0,
    timeout: float | None = None,
    credential_headers: Iterable[str] = (),
    **options: object,
) -> Parts:
    config = Config.build(credential_headers=credential_headers, **options)
    store = open_store(
        config.database_url,
        lock_timeout=config.lock_timeout,
        credential_headers=config.credential_headers,
    )
    writer = BatchWriter(store)
    notifier = Notifier(
        functools.partial(store.listen, JOB_CHANGES) if store.pushes_wakeups else None
    )
    metrics = Metrics()
    if config.metrics:
        metrics.switch_on(store)
    side_loops = [WebhookDeliverer(config, store, metrics=metrics)] if config.webhook_secret else []
    dispatcher = Dispatcher(
        config, store, writer, notifier, launcher, side_loops=side_loops, metrics=metrics
    )
    core = JobCore(config, store, writer, notifier, dispatcher, metrics=metrics)
    return Parts(
        config=config,
        patterns=RoutePatterns(
            routes, DeferredOptions(retries=retries, timeout=timeout), config.prefix
        ),
        core=core,
        dispatcher=dispatcher,
        metrics=metrics,
        operator=OperatorRoutes(core),
    )
