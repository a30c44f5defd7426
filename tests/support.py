"""Helpers the tests share: real processes, real databases, a clock the tests
move, and waiting with deadlines instead of sleeps. Not a test module."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from deferred_middleware._ids import new_job_id
from deferred_middleware._jobs import (
    DeferredOptions,
    Idempotency,
    Job,
    Status,
    StoredRequest,
    utcnow,
)
from deferred_middleware.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
LOST = "The worker running this job was lost before it finished."


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


class FakeClock:
    """Wall-clock time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = utcnow()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


def make_job(
    path: str = "/reports/é",
    *,
    retries: int = 0,
    timeout: float | None = 30,
    body: bytes = b"{}",
    headers: list[tuple[str, str]] | None = None,
    query: bytes = b"a=1&b=%20",
    created_at: datetime | None = None,
    callback_url: str | None = None,
    owner: str | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """A job as the core makes one; ``idempotency_key`` as the client sends it."""
    if idempotency_key is not None:
        headers = [*(headers or []), ("idempotency-key", idempotency_key)]
    request = StoredRequest(
        method="POST",
        path=path,
        query_string=query,
        headers=headers if headers is not None else [("content-type", "application/json")],
        body=body,
        server=("example", 443),
        client=("10.0.0.1", 5555),
        scheme="https",
        root_path="/api",
        http_version="2",
    )
    return Job(
        id=new_job_id(),
        status=Status.QUEUED,
        created_at=created_at or utcnow(),
        request=request,
        options=DeferredOptions(retries=retries, timeout=timeout),
        callback_url=callback_url,
        owner=owner,
        idempotency=Idempotency.of(request, owner),
    )


def enqueue(
    store: JobStore,
    path: str,
    count: int = 1,
    retries: int = 0,
    query: bytes = b"",
    timeout: float | None = None,
) -> list[str]:
    """Jobs as the middleware would store them, without going through HTTP."""
    made = [
        make_job(path, retries=retries, timeout=timeout, body=b"", headers=[], query=query)
        for _ in range(count)
    ]
    for start in range(0, len(made), 500):
        store.insert(made[start : start + 500])
    return [job.id for job in made]


# -- databases -------------------------------------------------------------


def require(url: str, what: str) -> str:
    """Skip (outside CI) or fail (under CI) when the server is not there."""
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
        for table in ("deferred_jobs", "deferred_webhook_attempts", "deferred_middleware_version"):
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    engine.dispose()


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


def _postgres_bin(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: the PostgreSQL server package is needed")
    return found


class ThrowawayPostgres:
    """A PostgreSQL server of the test's own, on a free port in a temporary
    folder, for tests that need an outage: the machine's server is never touched."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="deferred-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.folder, "postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self._run(
            _postgres_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        )

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_postgres, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            _postgres_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        subprocess.run(
            [
                *self._as_postgres,
                _postgres_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


# -- processes -------------------------------------------------------------


def _gunicorn(worker_class: str, *options: str) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
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
        ]

    return command


SERVERS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    "uvicorn": (
        lambda port: [
            sys.executable,
            "-m",
            "uvicorn",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        "tests.apps.starlette_app:app",
    ),
    "hypercorn": (
        lambda port: [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}"],
        "tests.apps.starlette_app:app",
    ),
    "gunicorn-sync": (_gunicorn("sync"), "tests.apps.flask_app:app"),
    "gunicorn-gthread": (_gunicorn("gthread", "--threads", "4"), "tests.apps.flask_app:app"),
    "flask-dev": (
        lambda port: [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "tests.apps.flask_app:app",
            "run",
            "--port",
            str(port),
            "--no-reload",
        ],
        "",
    ),
}
WORKER_APPS = {
    "starlette": "tests.apps.starlette_app:app",
    "flask": "tests.apps.flask_app:app",
    "django-wsgi": "tests.apps.django_project.wsgi:application",
    "django-asgi": "tests.apps.django_project.asgi:application",
}


class Process:
    """One real server or worker process, in a session of its own so a kill
    reaches its children; stopped the same way whatever it is."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                list(command),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code; kill the whole group and
        fail if it does not stop in time."""
        if self.alive():
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"did not stop within {timeout} s:\n{self.log()}") from None

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Server(Process):
    """A test app under a real server on a free port, up once ``health`` answers."""

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log: Path,
        extra: list[str],
        health: str,
        target: str | None = None,
    ) -> None:
        """``target``: another app than the kind's test app (``module:attr``)."""
        self.kind = kind
        self.port = free_port()
        self.health = health
        command, default_target = SERVERS[kind]
        target = target or default_target
        super().__init__([*command(self.port), *extra, *([target] if target else [])], env, log)
        eventually(self._up, timeout=30, interval=0.05)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.kind} exited early:\n{self.log()}")
        try:
            return httpx.get(self.base + self.health, timeout=1).status_code == 200
        except httpx.TransportError:
            return False


class Worker(Process):
    """One ``deferred-middleware worker`` process."""

    def __init__(self, app: str, env: dict[str, str], log: Path, *args: str) -> None:
        command = [
            sys.executable,
            "-m",
            "deferred_middleware.cli",
            "--log-level",
            "info",
            "worker",
            WORKER_APPS[app],
            *args,
        ]
        super().__init__(command, env, log)


class ThrowawayMariaDB:
    """A MariaDB server of the test's own, on a free port in a temporary folder."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="deferred-mariadb-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/test"
        self.process: subprocess.Popen[bytes] | None = None
        install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if install is None:
            pytest.fail("mariadb-install-db is not installed: the MariaDB server package is needed")
        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )

    def start(self) -> None:
        server = shutil.which("mariadbd", path="/usr/sbin:/usr/bin") or "/usr/sbin/mysqld"
        with open(self.folder / "log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    server,
                    "--no-defaults",
                    f"--datadir={self.data}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--socket={self.folder}/sock",
                    "--user=root",
                    "--skip-log-bin",
                    "--innodb-buffer-pool-size=16M",
                    "--skip-name-resolve",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        eventually(self._up, timeout=60, interval=0.1)

    def _up(self) -> bool:
        import pymysql

        try:
            connection = pymysql.connect(host="127.0.0.1", port=self.port, user="root")
        except pymysql.err.OperationalError:
            return False
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS test")
        connection.close()
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def destroy(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class Tmpfs:
    """A small filesystem of the test's own, to fill up. Skips the test (with
    the reason) where mounting is not allowed."""

    def __init__(self, folder: Path, size: str) -> None:
        self.path = folder
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
