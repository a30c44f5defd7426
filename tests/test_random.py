"""Job ids are UUIDv7s: the time they were made, then random bits drawn from
a pool of kernel randomness, where every id gets bytes nobody else got,
across refills, threads and forks."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from deferred_middleware import _random
from deferred_middleware._ids import is_job_id, new_job_id
from deferred_middleware._process import current_pid
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_knows_its_own_process_id():
    """Forked server workers restart their writer by this id, kept rather
    than asked of the kernel at every request."""
    assert current_pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.write(write, f"{current_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    kept, actual = os.read(read, 64).decode().split()
    os.close(read)
    assert int(kept) == int(actual) == child != current_pid()


MADE_AT = datetime(2026, 11, 28, 1, 2, 3, 456789, tzinfo=timezone.utc)


def test_an_id_is_a_uuid7_of_the_millisecond_it_was_made():
    job_id = new_job_id(MADE_AT)
    parsed = uuid.UUID(job_id)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert parsed.hex == job_id and is_job_id(job_id)
    assert int(job_id[:12], 16) == 1795827723456  # 2026-11-28T01:02:03.456Z


def test_an_id_made_now_carries_this_millisecond():
    before = time.time_ns() // 1_000_000
    job_id = new_job_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(job_id[:12], 16) <= after


@pytest.mark.parametrize("text", ["X" * 32, "A" * 32, "a" * 31, "a" * 33, str(uuid.uuid4())])
def test_only_32_lower_case_hex_digits_pass_for_an_id(text):
    assert not is_job_id(text)


def test_an_id_made_later_sorts_after_whatever_its_random_bits():
    for step in range(1, 500):
        later = MADE_AT + timedelta(milliseconds=step)
        assert new_job_id(MADE_AT) < new_job_id(later)


def test_an_id_has_74_random_bits():
    """Every bit but the 48 of the time, the 4 of the version and the 2 of
    the variant takes both values across ids made in one millisecond."""
    ids = [int(new_job_id(MADE_AT), 16) for _ in range(2000)]
    ones = zeros = 0
    for value in ids:
        ones |= value
        zeros |= ~value
    varying = ones & zeros & ((1 << 128) - 1)
    rand_a, rand_b = 0xFFF << 64, (1 << 62) - 1  # RFC 9562's names
    assert varying == rand_a | rand_b and bin(varying).count("1") == 74
