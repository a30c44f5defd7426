"""Submit a fixed number of POSTs over keep-alive HTTP/1.1 connections, as
cheaply as a client can: every tool's web tier gets the same load, and the
client takes as little as possible of the two cores it shares with it."""

from __future__ import annotations

import asyncio

BODY = b'{"report": "q3"}'


async def _connection(host: str, port: int, path: str, count: int) -> list[int]:
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    statuses = []
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            statuses.append(int(lines[0].split()[1]))
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()
    return statuses


def submit(base: str, path: str, total: int, connections: int = 32) -> None:
    """POST ``total`` requests to ``path``; raises unless every one got a 2xx."""
    host, port = base.removeprefix("http://").split(":")
    shares = [total // connections + (i < total % connections) for i in range(connections)]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(_connection(host, int(port), path, n) for n in shares))

    statuses = [status for part in asyncio.run(run()) for status in part]
    refused = [status for status in statuses if not 200 <= status < 300]
    if len(statuses) != total or refused:
        raise RuntimeError(f"{len(refused)} of {total} submissions were refused: {refused[:5]}")
