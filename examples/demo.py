"""The quick-start demo: start an example app under a real server, send it a
deferred request, and show 202 -> status -> result in the terminal.

    python examples/demo.py            # Starlette under uvicorn
    python examples/demo.py --flask    # Flask under gunicorn

Everything is stored in an embedded SQLite file in a temporary folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from deferred_middleware.client import follow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(flask: bool, port: int) -> list[str]:
    if flask:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "1",
            "--threads",
            "4",
            "-b",
            f"127.0.0.1:{port}",
            "examples.flask_app.app:app",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.starlette_app.app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


def wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("the server exited before it was ready")
        try:
            httpx.get(f"{base}/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    sys.exit("the server did not start within 30 s")


def show(response: httpx.Response) -> None:
    print(f"HTTP/1.1 {response.status_code} {response.reason_phrase}")
    for name in ("location", "operation-location", "retry-after", "content-type"):
        if name in response.headers:
            print(f"{name.title()}: {response.headers[name]}")
    print(json.dumps(response.json(), indent=2))
    print()


def tour(client: httpx.Client, base: str) -> None:
    print(f'$ curl -X POST {base}/reports -d \'{{"name": "q3"}}\'')
    accepted = client.post("/reports", json={"name": "q3"})
    show(accepted)

    status_url = accepted.headers["operation-location"]
    print(f"$ curl {base}{status_url}")
    show(client.get(status_url))

    print("... follow(client, accepted): long-polls the result until the job ends ...\n")
    result = follow(client, accepted, timeout=60)
    print(f"$ curl {base}{accepted.headers['location']}")
    show(result)


def main() -> None:
    flask = "--flask" in sys.argv
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir}/jobs.db", "PYTHONPATH": ROOT}
        server = subprocess.Popen(server_command(flask, port), cwd=ROOT, env=env)
        try:
            wait_until_up(base, server)
            with httpx.Client(base_url=base) as client:
                tour(client, base)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
