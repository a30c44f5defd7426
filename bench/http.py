"""Accept and status-poll throughput: the deferred route against the same
app's plain endpoint, on the same server, in the same run."""

from __future__ import annotations

import statistics
import time

import httpx

from ._servers import Server, wrk


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    for run in runs:
        if run["errors"]:
            raise RuntimeError(f"a load run had {run['errors']:.0f} non-2xx answers")
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _side_by_side(
    server: Server, plain: str, measured: str, seconds: int, rounds: int, post: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Both routes warmed up, then loaded in turn, so drift hits both alike:
    the median of each."""
    urls = [server.base + plain, measured if "://" in measured else server.base + measured]
    for url in urls:
        wrk(url, 2, post=post)
    runs: list[list[dict[str, float]]] = [[], []]
    for _ in range(rounds):
        for url, kept in zip(urls, runs, strict=True):
            kept.append(wrk(url, seconds, post=post, server=server))
    return _median(runs[0]), _median(runs[1])


def accept(kind: str, database_url: str, seconds: int, rounds: int) -> dict[str, float]:
    """Plain POST vs deferred POST, alternated so drift hits both alike. The
    server enqueues only (EXECUTE=0): this measures accepting, not running."""
    with Server(kind, {"DATABASE_URL": database_url, "EXECUTE": "0"}) as server:
        p, d = _side_by_side(server, "/plain", "/deferred", seconds, rounds, post=True)
    return {
        "plain_rps": p["rps"],
        "deferred_rps": d["rps"],
        "ratio": d["rps"] / p["rps"],
        "plain_p50_ms": p["p50_ms"],
        "deferred_p50_ms": d["p50_ms"],
        "plain_cpu_us": p["cpu_us"],
        "deferred_cpu_us": d["cpu_us"],
        "cpu_ratio": d["cpu_us"] / p["cpu_us"],
    }


def status_poll(kind: str, database_url: str, seconds: int, rounds: int) -> dict[str, float]:
    """GET of a finished job's status document vs a plain GET of a small JSON."""
    with Server(kind, {"DATABASE_URL": database_url, "EXECUTE": "1"}) as server:
        accepted = httpx.post(server.base + "/deferred", json={})
        job_url = server.base + accepted.headers["operation-location"]
        deadline = time.monotonic() + 30
        while httpx.get(job_url, params={"wait": 5}, timeout=15).json()["status"] != "succeeded":
            if time.monotonic() > deadline:
                raise RuntimeError("the job did not finish")
        p, s = _side_by_side(server, "/plain-get", job_url, seconds, rounds, post=False)
    return {
        "plain_rps": p["rps"],
        "status_rps": s["rps"],
        "ratio": s["rps"] / p["rps"],
        "plain_cpu_us": p["cpu_us"],
        "status_cpu_us": s["cpu_us"],
    }
