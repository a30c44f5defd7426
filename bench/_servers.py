"""Start a benchmark app under a real server and load it with wrk."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, port: int, app: str | None = None) -> list[str]:
    if kind == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            app or "bench.apps:starlette_app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            "1",
        ]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gthread",
        "-w",
        "2",
        "--threads",
        "4",
        "--no-control-socket",
        "--reuse-port",
        "--log-level",
        "warning",
        "-b",
        f"127.0.0.1:{port}",
        app or "bench.apps:flask_app",
    ]


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process of the bench's, run from the project root, its output discarded."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Server:
    def __init__(self, kind: str, env: dict[str, str], app: str | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = spawn(server_command(kind, self.port, app), env)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.base + "/plain-get", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        children = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout.split()
        return [self.process.pid, *map(int, children)]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def wrk(
    url: str, seconds: int, post: bool, connections: int = 64, server: Server | None = None
) -> dict[str, float]:
    """Requests/s, the count of non-2xx answers (a run with errors is void)
    and, given the server, its CPU time per request in microseconds."""
    pids = server.pids() if server is not None else []
    cpu_before = cpu_seconds(pids)
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if post:
        command += ["-s", str(BENCH / "post.lua")]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pids) - cpu_before
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "rps": rate,
        "errors": float(bad[1]) if bad else 0.0,
        "requests": float(total[1]),
        "p50_ms": float(p50[1]) * scale[p50[2]] if p50 else float("nan"),
        "cpu_us": cpu / float(total[1]) * 1e6 if pids else float("nan"),
    }
