"""Real servers, real databases, and waiting with deadlines instead of sleeps."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from deferred_middleware._jobs import DEFAULT_CREDENTIAL_HEADERS
from deferred_middleware.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def eventually(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gunicorn(worker_class: str, *options: str) -> Callable[[int, list[str]], list[str]]:
    def command(port: int, extra: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            worker_class,
            "-w",
            "2",
            *options,
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "20",
            *extra,
            "tests.apps.flask_app:app",
        ]

    return command


SERVERS = {
    "uvicorn": lambda port, extra: [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.apps.starlette_app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ],
    "gunicorn-sync": _gunicorn("sync"),
    "gunicorn-gthread": _gunicorn("gthread", "--threads", "4"),
    "flask-dev": lambda port, extra: [
        sys.executable,
        "-m",
        "flask",
        "--app",
        "tests.apps.flask_app:app",
        "run",
        "--port",
        str(port),
        "--no-reload",
        *extra,
    ],
}


class Server:
    """One real server process, serving one of the test apps on a free port."""

    def __init__(
        self, kind: str, env: dict[str, str], log: Path, extra: list[str], health: str
    ) -> None:
        self.kind = kind
        self.health = health
        self.env = env
        self.log_path = log
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        command = SERVERS[self.kind](self.port, self.extra)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        eventually(self._up, timeout=30, interval=0.05)
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.kind} exited early:\n{self.log()}")
        try:
            return httpx.get(self.base + self.health, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(
                f"{self.kind} did not stop within {timeout} s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "gates").mkdir()
    return tmp_path


@pytest.fixture
def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{workdir}/jobs.db"


@pytest.fixture
def serve(workdir: Path, sqlite_url: str) -> Iterator[Callable[..., Server]]:
    """Start a test app under a real server: ``serve("uvicorn", LEASE_SECONDS="1")``."""
    started: list[Server] = []

    def start(
        kind: str, *, extra: list[str] | None = None, health: str = "/health", **env: str
    ) -> Server:
        environment = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": sqlite_url,
            "GATE_DIR": str(workdir / "gates"),
            "EFFECTS_FILE": str(workdir / "effects.txt"),
            **env,
        }
        log = workdir / f"{kind}-{len(started)}.log"
        server = Server(kind, environment, log, extra or [], health)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


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


def _require(url: str, what: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"{what} must be reachable under CI at {url}: {exc}")
        pytest.skip(f"{what} is not reachable at {url}: {exc.__class__.__name__}")
    finally:
        engine.dispose()
    return url


def reset_tables(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS deferred_jobs")
        connection.exec_driver_sql("DROP TABLE IF EXISTS deferred_middleware_version")
    engine.dispose()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """The same test against the embedded default and the real servers."""
    if request.param == "sqlite":
        return sqlite_url
    url = _require(POSTGRES_URL if request.param == "postgres" else MYSQL_URL, request.param)
    reset_tables(url)
    return url


def count_rows(url: str) -> int:
    """Rows in the job table; 0 when no job was ever stored (no table yet)."""
    engine = sa.create_engine(url)
    try:
        if not sa.inspect(engine).has_table("deferred_jobs"):
            return 0
        with engine.connect() as connection:
            return int(
                connection.exec_driver_sql("SELECT count(*) FROM deferred_jobs").scalar_one()
            )
    finally:
        engine.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    """The job table on the database under test, migrated, credentials split out."""
    store = JobStore(database_url, credential_headers=DEFAULT_CREDENTIAL_HEADERS)
    store.migrate()
    yield store
    store.close()
