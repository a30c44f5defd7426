"""Fixtures: real servers and workers, the databases under test, and stores
held to one contract. Helpers live in ``tests/support.py``."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deferred_middleware._causes import store_away
from deferred_middleware._jobs import DEFAULT_CREDENTIAL_HEADERS
from deferred_middleware.runner._dispatch import Dispatcher
from deferred_middleware.store import JobStore, MemoryJobStore, SQLJobStore
from deferred_middleware.store._writer import BatchWriter

from .support import (
    IN_CI,
    MYSQL_URL,
    POSTGRES_URL,
    ROOT,
    FakeClock,
    Process,
    Server,
    Worker,
    require,
    reset_tables,
)


@pytest.fixture(autouse=True)
def each_test_hears_every_cause() -> None:
    """The process's log of store outages says each cause once a minute; a
    test must not miss its own line because an earlier test met the cause."""
    store_away.forget()


@pytest.fixture(autouse=True)
def nothing_runs_on_after_its_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An app driven without a lifespan (as test clients do) starts its
    executor on its first deferred request and is never shut down: left
    alone, its threads would go on claiming from a deleted file while later
    tests run. Stop whatever a test started."""
    started: list[Dispatcher | BatchWriter] = []
    for cls, method in ((Dispatcher, "start"), (BatchWriter, "_start")):
        original = getattr(cls, method)

        def record(self, *args, _original=original, **kwargs):
            started.append(self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, record)
    yield
    for part in started:
        if isinstance(part, Dispatcher):
            part.stop(grace=0)
    for part in started:
        if isinstance(part, BatchWriter):
            part.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "gates").mkdir()
    return tmp_path


@pytest.fixture
def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir}/jobs.db"


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The same test against the embedded default and the real servers."""
    return _database(request.param, sqlite_url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sqlite_or_postgres_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The embedded default and the first-class server, for server tests."""
    return _database(request.param, sqlite_url)


def _database(kind: str, sqlite_url: str) -> str:
    if kind == "sqlite":
        return sqlite_url
    url = require(POSTGRES_URL if kind == "postgres" else MYSQL_URL, kind)
    reset_tables(url)
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[SQLJobStore]:
    """The job table on the database under test, migrated, credentials split out."""
    store = SQLJobStore(database_url, credential_headers=DEFAULT_CREDENTIAL_HEADERS)
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def any_store(
    request: pytest.FixtureRequest, sqlite_url: str, clock: FakeClock
) -> Iterator[JobStore]:
    """Every implementation of the store protocol, on the test's clock."""
    if request.param == "memory":
        yield MemoryJobStore(credential_headers=DEFAULT_CREDENTIAL_HEADERS, clock=clock)
        return
    url = sqlite_url
    if request.param != "sqlite":
        url = require(POSTGRES_URL if request.param == "postgres" else MYSQL_URL, request.param)
        reset_tables(url)
    store = SQLJobStore(url, credential_headers=DEFAULT_CREDENTIAL_HEADERS, clock=clock)
    store.migrate()
    yield store
    store.close()


@pytest.fixture
def test_env(workdir: Path, sqlite_url: str) -> dict[str, str]:
    """What the test apps read: where the database, gates and effects are."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": sqlite_url,
        "GATE_DIR": str(workdir / "gates"),
        "EFFECTS_FILE": str(workdir / "effects.txt"),
    }


LOG_TAIL = 20_000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """A failed test shows the end of each log its servers and workers
    wrote: a failure seen once, on a loaded machine, can then be read."""
    report: pytest.TestReport = yield
    if report.failed and report.when == "call":
        for process in getattr(item, "funcargs", {}).get("processes", []):
            report.sections.append((f"log of {process.log_path.name}", process.log()[-LOG_TAIL:]))
    return report


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test started, killed at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.alive():
            process.stop(signal.SIGKILL)


@pytest.fixture
def serve(
    workdir: Path, test_env: dict[str, str], processes: list[Process]
) -> Callable[..., Server]:
    """Start a test app under a real server: ``serve("uvicorn", LEASE_SECONDS="1")``."""

    def start(
        kind: str,
        *,
        extra: list[str] | None = None,
        health: str = "/health",
        target: str | None = None,
        **env: str,
    ) -> Server:
        log = workdir / f"{kind}-{len(processes)}.log"
        server = Server(kind, {**test_env, **env}, log, extra or [], health, target)
        processes.append(server)
        return server

    return start


@pytest.fixture
def start_worker(
    workdir: Path, test_env: dict[str, str], database_url: str, processes: list[Process]
) -> Callable[..., Worker]:
    """Start ``deferred-middleware worker`` on a test app and the database under test."""

    def start(app: str = "starlette", *args: str, **env: str) -> Worker:
        log = workdir / f"worker-{len(processes)}.log"
        environment = {**test_env, "DATABASE_URL": database_url, "POLL_INTERVAL": "0.2", **env}
        worker = Worker(app, environment, log, *args)
        processes.append(worker)
        return worker

    return start


@pytest.fixture
def gates(workdir: Path) -> Callable[[str], None]:
    def open_gate(name: str) -> None:
        (workdir / "gates" / name).touch()

    return open_gate


@pytest.fixture
def effects(workdir: Path) -> Callable[[], list[list[str]]]:
    def read() -> list[list[str]]:
        path = workdir / "effects.txt"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    return read


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's), driven by Selenium; one for the whole run."""
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        message = "Debian's chromium and chromium-driver are not installed (README, test command)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
