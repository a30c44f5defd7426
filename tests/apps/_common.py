"""What the test apps share: options from the environment, gates and effects.

A gate is a file the test creates to let a handler finish, so a test can hold
a job mid-run without sleeping. An effect is a line a handler appends to a
file each time it runs, so a test counts real runs, not rows.
"""

import asyncio
import os
import time
from pathlib import Path

GATE_DIR = Path(os.environ.get("GATE_DIR", "/tmp"))
EFFECTS_FILE = os.environ.get("EFFECTS_FILE")


def middleware_options() -> dict:
    env = os.environ
    options: dict = {"database_url": env["DATABASE_URL"]}
    for name, kind in (
        ("lease_seconds", float),
        ("lock_timeout", float),
        ("concurrency", int),
        ("grace_seconds", float),
        ("max_body_size", int),
        ("poll_interval", float),
        ("retry_backoff", float),
        ("max_wait", float),
        ("max_header_size", int),
        ("event_keep_alive", float),
        ("webhook_backoff", float),
        ("webhook_retry_for", float),
        ("webhook_timeout", float),
    ):
        if name.upper() in env:
            options[name] = kind(env[name.upper()])
    if "EXECUTE" in env:
        options["execute"] = env["EXECUTE"] == "1"
    if "PUBLIC_URL" in env:
        options["public_url"] = env["PUBLIC_URL"]
    if "QUEUE" in env:
        options["queue"] = env["QUEUE"]
    if "WEBHOOK_SECRET" in env:
        options["webhook_secret"] = env["WEBHOOK_SECRET"]
        options["webhook_allowlist"] = [e for e in env.get("WEBHOOK_ALLOWLIST", "").split(";") if e]
    if "ROUTES" in env:
        options["routes"] = env["ROUTES"].split(";")
    if env.get("OWNER") == "api-key":
        options["owner"] = owner_from_api_key
    if env.get("METRICS") == "1":
        options["metrics"] = True
    if env.get("DASHBOARD") == "open":
        options["dashboard"] = lambda request: True  # a test server on loopback only
    return options


def owner_from_api_key(request) -> str | None:
    """The API-key recipe: whoever holds a key owns the jobs made with it."""
    return request.headers.get("x-api-key")


def record_effect(job_id: str, attempt: int) -> None:
    if EFFECTS_FILE:
        with open(EFFECTS_FILE, "a") as effects:
            effects.write(f"{job_id} {attempt} {os.getpid()}\n")


def gate_open(name: str | None) -> bool:
    return not name or (GATE_DIR / name).exists()


def wait_gate(name: str | None, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not gate_open(name) and time.monotonic() < end:
        time.sleep(0.01)


async def wait_gate_async(name: str | None, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not gate_open(name) and time.monotonic() < end:
        await asyncio.sleep(0.01)


BINARY = bytes(range(256)) * 64
STREAM_CHUNKS = [f"chunk-{i}\n".encode() * 100 for i in range(20)]
