"""``python -m bench``: every benchmark in one run, ratios side by side.

Writes bench/RESULTS.md and bench/ratios.png. Loopback only, about ten
minutes; ``--quick`` for a short smoke run. Needs wrk (Debian: apt-get
install wrk), the PostgreSQL server on 127.0.0.1:5432 and the [bench] extra.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import psycopg

from . import e2e, e2e_http, http, latency_memory

HERE = Path(__file__).resolve().parent
PACKAGES = [
    "deferred-middleware",
    "starlette",
    "uvicorn",
    "gunicorn",
    "flask",
    "sqlalchemy",
    "psycopg",
    "huey",
    "procrastinate",
    "pgqueuer",
    "httpx",
]


def step(name: str, results: dict[str, Any], fn: Any, *args: Any) -> None:
    started = time.monotonic()
    print(f"-- {name} ...", flush=True)
    results[name] = fn(*args)
    printable = {k: round(v, 3) for k, v in results[name].items()}
    print(f"   {printable} ({time.monotonic() - started:.0f} s)", flush=True)


def interpreter_speed() -> float:
    """Microseconds for ``sum(range(1000))``, best of five: how fast the host
    runs Python right now. The same machine kind has ranged from about 9 to
    25 between sessions, and every absolute figure here follows it."""
    return min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6


def machine() -> dict[str, str]:
    memory = next(
        line
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    with psycopg.connect(e2e.POSTGRES_ADMIN) as connection:
        postgres = connection.execute("SHOW server_version").fetchone()[0]
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[1]
    versions = {name: importlib.metadata.version(name) for name in PACKAGES}
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{int(memory.split()[1]) / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres,
        "wrk": wrk_version,
        **versions,
    }


def run(quick: bool) -> dict[str, Any]:
    # Five short rounds of each route, alternating: the median of five
    # shrugs off a slow spell of the shared host, the mean of two did not.
    seconds, rounds = (3, 1) if quick else (4, 5)
    jobs = 2000 if quick else 10_000
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = f"sqlite:///{folder}/bench.db"
        postgres = e2e.fresh_postgres_database("bench_ours").replace(
            "postgresql://", "postgresql+psycopg://"
        )
        step("accept uvicorn sqlite", results, http.accept, "uvicorn", sqlite, seconds, rounds)
        full = f"sqlite:///{folder}/bench-full.db?synchronous=full"
        step("accept uvicorn sqlite full", results, http.accept, "uvicorn", full, seconds, rounds)
        step(
            "accept uvicorn postgresql", results, http.accept, "uvicorn", postgres, seconds, rounds
        )
        step("accept gunicorn sqlite", results, http.accept, "gunicorn", sqlite, seconds, rounds)
        status_db = f"sqlite:///{folder}/status-%s.db"
        step(
            "status uvicorn sqlite",
            results,
            http.status_poll,
            "uvicorn",
            status_db % "uvicorn",
            seconds,
            rounds,
        )
        step(
            "status gunicorn sqlite",
            results,
            http.status_poll,
            "gunicorn",
            status_db % "gunicorn",
            seconds,
            rounds,
        )
        http_sqlite = f"sqlite:///{folder}/http.db"
        step("http ours sqlite", results, e2e_http.ours, http_sqlite, jobs)
        step("http huey sqlite", results, e2e_http.huey_sqlite, jobs)
        step("http ours postgresql", results, e2e_http.ours, postgres, jobs)
        step("http pgqueuer postgresql", results, e2e_http.pgqueuer_postgres, jobs)
        e2e_sqlite = f"sqlite:///{folder}/e2e.db"
        step("e2e ours sqlite (worker)", results, e2e.ours, e2e_sqlite, jobs)
        step("e2e huey sqlite", results, e2e.huey_sqlite, jobs)
        step("e2e raw sql sqlite batch 1", results, e2e.raw_sqlite, jobs, 1)
        step("e2e raw sql sqlite batch 10", results, e2e.raw_sqlite, jobs, 10)
        raw_table = f"sqlite:///{folder}/raw-table.db"
        for batch in (10, 32):
            name = f"e2e raw sql, job table, sqlite batch {batch}"
            step(name, results, e2e.raw_table_sqlite, raw_table, jobs, batch)
        step("e2e ours postgresql (worker)", results, e2e.ours, postgres, jobs)
        step("e2e procrastinate postgresql", results, e2e.procrastinate_postgres, jobs)
        step("e2e pgqueuer postgresql", results, e2e.pgqueuer_postgres, jobs)
        step("e2e raw sql postgresql batch 1", results, e2e.raw_postgres, jobs, 1)
        step("e2e raw sql postgresql batch 10", results, e2e.raw_postgres, jobs, 10)
        raw_table = e2e.fresh_postgres_database("bench_raw_table")
        for batch in (10, 32):
            name = f"e2e raw sql, job table, postgresql batch {batch}"
            step(name, results, e2e.raw_table_postgres, raw_table, jobs, batch)
        # Low load means an empty table: the accept runs above left a backlog
        # of queued jobs in theirs, which a server that executes would drain.
        samples = 50 if quick else 200
        latency_sqlite = f"sqlite:///{folder}/latency.db"
        step("latency uvicorn sqlite", results, latency_memory.latency, latency_sqlite, samples)
        latency_postgres = e2e.fresh_postgres_database("bench_latency").replace(
            "postgresql://", "postgresql+psycopg://"
        )
        step(
            "latency worker postgresql",
            results,
            latency_memory.latency_worker,
            latency_postgres,
            samples,
        )
        step(
            "memory web",
            results,
            latency_memory.web_memory,
            f"sqlite:///{folder}/mem.db",
            20_000 if quick else 100_000,
        )
        step(
            "memory worker",
            results,
            latency_memory.worker_memory,
            f"sqlite:///{folder}/memw.db",
            5_000 if quick else 100_000,
        )
    return results


def write_results(results: dict[str, Any], info: dict[str, str], command: str) -> None:
    def r(name: str, key: str) -> float:
        return float(results[name][key])

    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.date.today().isoformat()} with `{command}` on one machine: "
        f"{info['cores']} cores, {info['memory']}, Python {info['python']}, SQLite "
        f"{info['sqlite']}, PostgreSQL {info['postgresql']}, wrk {info['wrk']} "
        "(`-t2 -c64`, on the same cores as the server).",
        "",
        "Versions: " + ", ".join(f"{k} {info[k]}" for k in PACKAGES) + ".",
        "",
        f"Host speed: `sum(range(1000))` took {info['speed']}.",
        "",
        "Absolute figures move from run to run on a shared 2-core machine; the ratios,",
        "measured side by side in one run, are what to compare.",
        "",
        "## Accept: a deferred POST answered 202 (row committed) vs the same app's plain POST",
        "",
        "Server CPU is user plus system time of the server's processes per request. "
        "SQLite syncs its log with `NORMAL` (a committed job survives the process "
        "being killed); with `?synchronous=full` on the URL, at every commit (it "
        "survives a power loss too). gunicorn runs gthread, two processes of four threads, "
        "with `--reuse-port`: each process listens on a socket of its own and the "
        "kernel splits wrk's connections between them evenly. On one shared socket "
        "the split was whatever each run's race gave, and a run's figures swung up "
        "to threefold.",
        "",
        "| server, database | plain req/s | deferred req/s | ratio "
        "| server CPU µs plain / deferred (ratio) | p50 plain / deferred ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    accepts = {
        "accept uvicorn sqlite": "uvicorn sqlite",
        "accept uvicorn sqlite full": "uvicorn sqlite, `?synchronous=full`",
        "accept uvicorn postgresql": "uvicorn postgresql",
        "accept gunicorn sqlite": "gunicorn sqlite",
    }
    for name, label in accepts.items():
        lines.append(
            f"| {label} | {r(name, 'plain_rps'):,.0f} | "
            f"{r(name, 'deferred_rps'):,.0f} | **{r(name, 'ratio'):.2f}** | "
            f"{r(name, 'plain_cpu_us'):.0f} / {r(name, 'deferred_cpu_us'):.0f} "
            f"({r(name, 'cpu_ratio'):.2f}) | "
            f"{r(name, 'plain_p50_ms'):.1f} / {r(name, 'deferred_p50_ms'):.1f} |"
        )
    lines += [
        "",
        "## Status poll: GET /jobs/{id} vs a plain GET on the same server",
        "",
        "| server | plain req/s | status req/s | ratio | server CPU µs plain / status |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("status uvicorn sqlite", "status gunicorn sqlite"):
        lines.append(
            f"| {name.removeprefix('status ')} | {r(name, 'plain_rps'):,.0f} | "
            f"{r(name, 'status_rps'):,.0f} | **{r(name, 'ratio'):.2f}** | "
            f"{r(name, 'plain_cpu_us'):.0f} / {r(name, 'status_cpu_us'):.0f} |"
        )
    jobs = "2,000" if "quick" in command else "10,000"
    lines += [
        "",
        f"## End to end through HTTP: {jobs} trivial jobs POSTed to the web tier",
        "",
        "Each tool behind uvicorn (one process, enqueue only) and run by a worker process",
        "of its own; timed from the first submit to the last job done. The client",
        "(`bench/submit.py`) holds 32 keep-alive connections. huey: SqliteHuey, a sync",
        "Starlette endpoint, its consumer with 8 threads. PGQueuer: an async Starlette",
        "endpoint calling `Queries.enqueue`, its `QueueManager` at batch size 10.",
        "",
    ]
    lines += _rate_table(results, "http ", lambda database: f"http ours {database}")
    lines += [
        "",
        f"## Workers alone: {jobs} trivial jobs inserted at once, to the last one done",
        "",
        "No web tier: what a worker does with a full queue, beside the raw claim-and-",
        "complete SQL ceiling. PGQueuer is timed by its last job's completion. The",
        "plain raw cycle claims and completes rows of a three-column table that",
        "stores nothing of a request or a response; the job-table one runs the job",
        "store's own claim and outcome statements on its own table through the bare",
        "driver, with nothing else around them: the ceiling for any worker on that",
        "table. Ours claims up to its free slots (32 by default) at a time.",
        "",
    ]
    lines += _rate_table(results, "e2e ", lambda database: f"e2e ours {database} (worker)")
    lines += [
        "",
        "## Latency at low load (one request at a time, uvicorn)",
        "",
        "| | p50 ms | p95 ms |",
        "|---|---:|---:|",
    ]
    for name, where in (
        ("latency uvicorn sqlite", "SQLite, run in the web process"),
        ("latency worker postgresql", "PostgreSQL, run by a worker"),
    ):
        lat = results[name]
        lines += [
            f"| {where}: submit → handler start | {lat['start_p50_ms']:.1f} | "
            f"{lat['start_p95_ms']:.1f} |",
            f"| {where}: submit → result readable (`?wait`) | {lat['result_p50_ms']:.1f} | "
            f"{lat['result_p95_ms']:.1f} |",
        ]
    web, worker = results["memory web"], results["memory worker"]
    lines += [
        "",
        "## Memory",
        "",
        f"- web (uvicorn, enqueue only): {web['rss_before_mib']:.1f} MiB after warm-up, "
        f"{web['rss_after_mib']:.1f} MiB after {web['requests']:,.0f} accepted requests.",
        f"- worker: {worker['rss_after_first_tenth_mib']:.1f} MiB after the first tenth, "
        f"{worker['rss_after_all_mib']:.1f} MiB after {worker['jobs']:,.0f} jobs.",
        "",
        "![ratios](ratios.png)",
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(lines))


def _rate_table(results: dict[str, Any], prefix: str, ours: Any) -> list[str]:
    """A table with a row per tool whose result is named ``prefix`` + tool +
    database: its jobs/s and how ours (named by ``ours(database)``) compares."""
    rows = ["| tool | jobs/s | ours ÷ it |", "|---|---:|---:|"]
    for name in [k for k in results if k.startswith(prefix)]:
        rate = results[name]["jobs_per_s"]
        database = "postgresql" if "postgresql" in name else "sqlite"
        ratio = results[ours(database)]["jobs_per_s"] / rate
        rows.append(f"| {name.removeprefix(prefix)} | {rate:,.0f} | {ratio:.2f} |")
    return rows


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours_pg = results["e2e ours postgresql (worker)"]["jobs_per_s"]
    http = {name: value["jobs_per_s"] for name, value in results.items() if name.startswith("http")}
    bars = {
        "accept / plain\nuvicorn SQLite": results["accept uvicorn sqlite"]["ratio"],
        "accept / plain\nuvicorn PostgreSQL": results["accept uvicorn postgresql"]["ratio"],
        "accept / plain\ngunicorn SQLite": results["accept gunicorn sqlite"]["ratio"],
        "status / plain GET\nuvicorn": results["status uvicorn sqlite"]["ratio"],
        "HTTP e2e\nours / huey\nSQLite": http["http ours sqlite"] / http["http huey sqlite"],
        "HTTP e2e\nours / PGQueuer\nPostgreSQL": http["http ours postgresql"]
        / http["http pgqueuer postgresql"],
        "workers alone\nours / PGQueuer\nPostgreSQL": ours_pg
        / results["e2e pgqueuer postgresql"]["jobs_per_s"],
    }
    figure, axes = plt.subplots(figsize=(11, 4.5))
    axes.bar(range(len(bars)), list(bars.values()), color="#3b6ea8")
    axes.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    axes.set_xticks(range(len(bars)), list(bars.keys()), fontsize=8)
    axes.set_ylabel("ratio (higher is better for us)")
    axes.set_title("deferred-middleware: ratios measured side by side in one run")
    for index, value in enumerate(bars.values()):
        axes.text(index, value, f"{value:.2f}", ha="center", va="bottom", fontsize=9)
    figure.tight_layout()
    figure.savefig(HERE / "ratios.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    quick = parser.parse_args().quick
    command = "python -m bench" + (" --quick" if quick else "")
    info = machine()
    before = interpreter_speed()
    results = run(quick)
    info["speed"] = f"{before:.1f} µs before the run, {interpreter_speed():.1f} µs after"
    write_results(results, info, command)
    plot(results)
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'ratios.png'}")


if __name__ == "__main__":
    sys.exit(main())
