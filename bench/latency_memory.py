"""Latency at low load, and memory across many jobs."""

from __future__ import annotations

import statistics
import time

import httpx

from deferred_middleware._jobs import Status

from ._servers import Server, rss_mib, wrk
from .e2e import _insert, running_worker


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(database_url: str, samples: int = 200) -> dict[str, float]:
    """One request at a time, jobs run in the web process: submit -> handler
    start, submit -> result readable (a client long-polling the result with
    ?wait), in milliseconds."""
    with Server("uvicorn", {"DATABASE_URL": database_url, "EXECUTE": "1"}) as server:
        return _sample(server, samples)


def latency_worker(database_url: str, samples: int = 200) -> dict[str, float]:
    """As :func:`latency`, with an enqueue-only web process and jobs run by
    ``deferred-middleware worker``."""
    with (
        running_worker(database_url),
        Server("uvicorn", {"DATABASE_URL": database_url, "EXECUTE": "0"}) as server,
    ):
        return _sample(server, samples)


def _sample(server: Server, samples: int) -> dict[str, float]:
    start, result = [], []
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for i in range(samples + 20):
            submitted = time.time()
            location = client.post("/stamp").headers["location"]
            reply = client.get(location, params={"wait": 10})
            readable = time.time()
            if i >= 20:  # warm-up
                start.append((reply.json()["started"] - submitted) * 1000)
                result.append((readable - submitted) * 1000)
    return {
        "start_p50_ms": statistics.median(start),
        "start_p95_ms": _percentile(start, 0.95),
        "result_p50_ms": statistics.median(result),
        "result_p95_ms": _percentile(result, 0.95),
    }


def web_memory(database_url: str, requests: int) -> dict[str, float]:
    """RSS of an enqueue-only uvicorn process across ``requests`` accepts."""
    with Server("uvicorn", {"DATABASE_URL": database_url, "EXECUTE": "0"}) as server:
        done = wrk(server.base + "/deferred", 3, post=True)["requests"]
        before = rss_mib(server.process.pid)
        while done < requests:
            done += wrk(server.base + "/deferred", 5, post=True)["requests"]
        after = rss_mib(server.process.pid)
    return {"requests": done, "rss_before_mib": before, "rss_after_mib": after}


def worker_memory(database_url: str, jobs: int) -> dict[str, float]:
    """RSS of ``deferred-middleware worker`` across ``jobs`` jobs, fed in chunks."""
    chunk = max(jobs // 10, 1)
    samples = []
    with running_worker(database_url) as (store, pid):
        for fed in range(chunk, jobs + chunk, chunk):
            _insert(store, chunk)
            deadline = time.monotonic() + 600
            while store.count(Status.SUCCEEDED) < fed:
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker fell behind")
                time.sleep(0.05)
            samples.append(rss_mib(pid))
    return {
        "jobs": float(jobs),
        "rss_after_first_tenth_mib": samples[0],
        "rss_after_all_mib": samples[-1],
    }
