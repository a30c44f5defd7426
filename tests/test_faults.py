"""Faults against real servers and databases: a database down for less and
for more than a lease, a full disk, a database file deleted while serving,
a web process killed mid-burst. (A file made read-only under a running
server cannot be staged: Linux refuses a read-only remount while SQLite
holds the file open for writing, and chmod does not reach open files; the
per-connection read-only state SQLite then keeps is reproduced in
tests/test_sql_store.py.) Each time: no 202 without a row,
every promised job ends, each side effect once per attempt.

Outages are of throwaway servers and filesystems the tests make themselves;
the machine's own database services are never touched."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .support import (
    MYSQL_URL,
    POSTGRES_URL,
    Server,
    ThrowawayMariaDB,
    ThrowawayPostgres,
    Tmpfs,
    count_rows,
    eventually,
    require,
)

pytestmark = pytest.mark.servers
LEASE = 2.0


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mysql),
    ]
)
def throwaway(request: pytest.FixtureRequest) -> Iterator[ThrowawayPostgres | ThrowawayMariaDB]:
    """A database server this test may stop and start."""
    if request.param == "postgres":
        require(POSTGRES_URL, "postgres")  # the machine has the server package
        server: ThrowawayPostgres | ThrowawayMariaDB = ThrowawayPostgres()
    else:
        require(MYSQL_URL, "mysql")
        server = ThrowawayMariaDB()
    server.start()
    yield server
    server.destroy()


OWN_DATABASE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@OWN_DATABASE  # the test brings its own server: the usual database parameter is not used
@pytest.mark.parametrize("outage", [0.5 * LEASE, 3 * LEASE], ids=["shorter", "longer"])
def test_an_outage_reruns_nothing_and_fails_nothing(
    throwaway, serve, start_worker, gates, effects, outage
):
    """Jobs mid-run while the database is away finish once each, whether the
    outage is shorter or longer than their lease."""
    url = throwaway.url
    web = serve("uvicorn", DATABASE_URL=url, EXECUTE="0")
    worker = start_worker("starlette", DATABASE_URL=url, LEASE_SECONDS=str(LEASE))
    ids = [httpx.post(f"{web.base}/report-retry?gate=held").json()["id"] for _ in range(4)]
    ids += [httpx.post(f"{web.base}/report?gate=held").json()["id"] for _ in range(4)]
    eventually(lambda: len(effects()) == 8, timeout=30)  # all eight are running
    throwaway.stop()
    try:
        gates("held")  # they finish while the database is away: outcomes wait
        time.sleep(outage)  # the length of the fault itself
    finally:
        throwaway.start()
    for job_id in ids:
        reply = httpx.get(f"{web.base}/jobs/{job_id}", params={"wait": 30}, timeout=60)
        assert reply.json()["status"] == "succeeded", reply.json()
    runs = Counter((line[0], line[1]) for line in effects())
    assert set(runs) == {(job_id, "1") for job_id in ids}  # one attempt each, run once
    assert worker.stop() == 0


def test_a_web_process_killed_mid_burst_loses_no_promised_job(serve, effects):
    server = serve("uvicorn", LEASE_SECONDS="1")
    promised: list[str] = []
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    reply = client.post(server.base + "/tiny")
                except httpx.TransportError:
                    return
                if reply.status_code == 202:
                    promised.append(reply.json()["id"])

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: len(promised) >= 100, timeout=30)
    server.kill()
    stop.set()
    for thread in threads:
        thread.join()
    again = serve("uvicorn", LEASE_SECONDS="1")
    ended = {}
    for job_id in promised:
        reply = httpx.get(f"{again.base}/jobs/{job_id}", params={"wait": 30}, timeout=40)
        assert reply.status_code == 200, (job_id, reply.text)
        ended[job_id] = reply.json()["status"]
    assert set(ended.values()) <= {"succeeded", "failed"}  # every promise ends
    runs = Counter((line[0], line[1]) for line in effects())
    assert {j for j, status in ended.items() if status == "succeeded"} <= {j for j, _ in runs}
    assert max(runs.values()) == 1


def post_until(base: str, status: int, body: bytes = b"", tries: int = 200) -> list[httpx.Response]:
    """POST until one answer has ``status``; every answer on the way."""
    answers = []
    for _ in range(tries):
        answers.append(httpx.post(base + "/tiny", content=body, timeout=30))
        if answers[-1].status_code == status:
            return answers
    raise AssertionError(f"no {status} in {tries} tries: {[a.status_code for a in answers]}")


def promised_ids(answers: list[httpx.Response]) -> list[str]:
    assert {a.status_code for a in answers} <= {202, 503}, [a.status_code for a in answers]
    return [a.json()["id"] for a in answers if a.status_code == 202]


def all_exist(server: Server, ids: list[str]) -> None:
    for job_id in ids:
        assert httpx.get(f"{server.base}/jobs/{job_id}").status_code == 200, job_id


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Tmpfs]:
    disk = Tmpfs(tmp_path / "disk", "4m")
    yield disk
    disk.unmount()


def test_a_full_disk_gives_503_never_an_unkept_promise_and_recovers(serve, small_disk):
    url = f"sqlite:///{small_disk.path}/jobs.db"
    server = serve("uvicorn", DATABASE_URL=url, EXECUTE="0")
    first = promised_ids(post_until(server.base, 202))
    filler = small_disk.path / "filler"
    with open(filler, "wb") as out:  # fill what is left, to the last block
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    answers = post_until(server.base, 503, b"x" * 20000)
    assert answers[-1].headers["retry-after"] == "1"
    filler.unlink()
    answers += post_until(server.base, 202)
    all_exist(server, first + promised_ids(answers))


def test_a_database_file_deleted_while_serving_is_never_promised_into(serve, sqlite_url):
    server = serve("uvicorn", EXECUTE="0")
    before = promised_ids(post_until(server.base, 202))
    path = sqlite_url.removeprefix("sqlite:///")
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)
    # The first write to notice refuses (503) or, inserting at once, leaves
    # the request to the writer thread, which opens the file anew (202).
    answers = [httpx.post(server.base + "/tiny", timeout=30) for _ in range(5)]
    after = promised_ids(answers + post_until(server.base, 202))
    assert after and count_rows(sqlite_url) == len(after)  # each one is in the new file
    all_exist(server, after)
    assert before  # promised into the file that was deleted: gone with it, by the operator


@OWN_DATABASE
@pytest.mark.load
@pytest.mark.postgres
def test_a_killed_worker_s_jobs_end_once_per_attempt_under_load(
    throwaway_postgres_for_load, serve, start_worker, effects, tmp_path
):
    """The load run: 10,000 accepted jobs, four workers, one killed and the
    database restarted during the run."""
    url = throwaway_postgres_for_load.url
    web = serve("uvicorn", DATABASE_URL=url, EXECUTE="0")
    workers = [
        start_worker("starlette", "--concurrency", "16", DATABASE_URL=url, LEASE_SECONDS="3")
        for _ in range(4)
    ]
    promised: list[str] = []
    started = time.monotonic()

    def submit(count: int) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(count):
                reply = client.post(web.base + "/report-retry")
                while reply.status_code == 503:  # during the restart: try again, as told
                    reply = client.post(web.base + "/report-retry")
                assert reply.status_code == 202, reply.text
                promised.append(reply.json()["id"])

    threads = [threading.Thread(target=submit, args=(2500,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: len(effects()) > 2000, timeout=120, interval=0.2)
    workers[0].stop(signal.SIGKILL)
    throwaway_postgres_for_load.stop()
    throwaway_postgres_for_load.start()
    for thread in threads:
        thread.join()
    accepted_in = time.monotonic() - started
    assert len(promised) == 10_000

    def finished() -> bool:
        return count_finished(url) == 10_000

    eventually(finished, timeout=600, interval=1)
    elapsed = time.monotonic() - started
    runs = Counter((line[0], line[1]) for line in effects())
    assert {job_id for job_id, _ in runs} == set(promised)  # every promised job ran
    assert max(runs.values()) == 1  # each side effect once per attempt
    reruns = sum(1 for _, attempt in runs if attempt != "1")
    for worker in workers[1:]:
        assert worker.stop() == 0
    print(
        f"\nload: 10,000 jobs accepted in {accepted_in:.1f} s, all ended in {elapsed:.1f} s; "
        f"{reruns} re-run after the kill; statuses {count_by_status(url)}"
    )


def count_finished(url: str) -> int:
    counts = count_by_status(url)
    return sum(counts.values()) - counts.get("queued", 0) - counts.get("running", 0)


def count_by_status(url: str) -> dict[str, int]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT status, count(*) FROM deferred_jobs GROUP BY status"
            )
            return {status: int(n) for status, n in rows}
    except sa.exc.OperationalError:
        return {}
    finally:
        engine.dispose()


@pytest.fixture
def throwaway_postgres_for_load() -> Iterator[ThrowawayPostgres]:
    require(POSTGRES_URL, "postgres")
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.destroy()
