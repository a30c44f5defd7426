"""How an executor names itself in the job table (leases, webhook claims)."""

from __future__ import annotations

import socket
import uuid


def worker_name() -> str:
    """The host, for operators, and a random part: unique per executor."""
    return f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
