"""Job ids draw their bytes from a pool of kernel randomness: every id gets
bytes nobody else got, across refills, threads and forks."""

from __future__ import annotations

import os
import threading

import pytest

from deferred_middleware import _random
from deferred_middleware._jobs import is_job_id, new_job_id
from deferred_middleware._random import RandomPool


def test_each_take_is_a_fresh_slice_and_the_pool_refills(monkeypatch):
    reads = []

    def urandom(count: int) -> bytes:
        reads.append(count)
        return bytes((len(reads) * 16 + i) % 256 for i in range(count))

    monkeypatch.setattr(_random.os, "urandom", urandom)
    pool = RandomPool(size=32)
    first, second = pool.take(16), pool.take(16)
    assert (first, second) == (bytes(range(16, 32)), bytes(range(32, 48)))
    assert reads == [32]  # two ids from one read
    third = pool.take(16)
    assert reads == [32, 32] and third == bytes(range(32, 48))  # the second read's first slice
    assert pool.take(20) != third and pool.take(100) and reads[-1] == 100  # larger than the pool


def test_ids_never_repeat_across_threads():
    found: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        made = [new_job_id() for _ in range(5000)]
        with lock:
            found.extend(made)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == len(found) == 40000
    assert all(is_job_id(job_id) for job_id in found)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_its_parent_s_bytes():
    new_job_id()  # the parent's pool holds unused bytes now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, new_job_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    childs = os.read(read, 64).decode()
    os.close(read)
    assert is_job_id(childs) and childs != new_job_id()
