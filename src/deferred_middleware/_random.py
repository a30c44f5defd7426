"""Random bytes for job ids, read from the kernel a page at a time.

A job id is a capability, so its bytes come from ``os.urandom``, but one
``getrandom`` call per accepted request is a system call on the hot path,
and a costly one where system calls are intercepted (sandboxes, gVisor).
The pool reads 4 KiB at once and hands each id its own slice: the same
kernel randomness, 409 ids per call. A forked child starts with an empty
pool, so no two processes ever hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

POOL_BYTES = 4096


class RandomPool:
    def __init__(self, size: int = POOL_BYTES) -> None:
        self.size = size
        self._forget()

    def take(self, count: int) -> bytes:
        """``count`` bytes no one else was given."""
        with self._lock:
            if self._at + count > len(self._buffer):
                self._buffer, self._at = os.urandom(max(self.size, count)), 0
            start = self._at
            self._at += count
            return self._buffer[start : self._at]

    def _forget(self) -> None:
        """Empty, with a fresh lock (a fork may copy one held by another thread)."""
        self._lock = threading.Lock()
        self._buffer, self._at = b"", 0


_pool = RandomPool()
os.register_at_fork(after_in_child=_pool._forget)


def token_bytes(count: int) -> bytes:
    """``count`` random bytes, like ``secrets.token_bytes``."""
    return _pool.take(count)
