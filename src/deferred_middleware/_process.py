"""This process's id, kept rather than asked of the kernel at every use.

The writer, the store's engine and the WSGI adapter check on every request
whether they were forked into a new process (a prefork server's workers
are), and ``os.getpid`` is a system call each time. The id is read once at
import and again in the child after each fork.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    return _pid
