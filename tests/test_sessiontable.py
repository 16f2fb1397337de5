"""sessiontable.py: the session limits counted across the workers of one host, each in its slot; a dead
worker's slot cleared (the supervisor's side: tests/test_workers.py)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator

import pytest

from gateway.core import replies
from gateway.edge.sessiontable import (
    MAX_BUCKETS,
    MIN_BUCKETS,
    ListenerLimits,
    SessionTable,
    bucket_count,
)

CLIENT = "192.0.2.7"


@pytest.fixture
def table() -> Iterator[SessionTable]:
    made = SessionTable(2, [ListenerLimits(max_sessions=5, max_per_client=3), ListenerLimits(0, 0)])
    yield made
    made.close()


def test_a_clients_limit_holds_across_the_workers_slots(table: SessionTable) -> None:
    (mx0, _), (mx1, _) = table.gates(0), table.gates(1)
    assert mx0.admit(CLIENT) is None
    assert mx1.admit(CLIENT) is None
    assert mx1.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT
    assert mx1.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT
    # Another client has its own count; leaving frees one place, in whichever slot.
    assert mx0.admit("198.51.100.1") is None
    mx1.leave(CLIENT)
    assert mx0.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT
    assert table.open_sessions(0) == 4


def test_the_listeners_total_holds_across_the_slots_and_each_listener_counts_alone(
    table: SessionTable,
) -> None:
    (mx0, other0), (mx1, other1) = table.gates(0), table.gates(1)
    for n in range(5):
        assert (mx0 if n % 2 else mx1).admit(f"198.51.100.{n}") is None
    assert mx0.admit("203.0.113.1") is replies.TOO_MANY_SESSIONS
    assert mx1.admit("203.0.113.1") is replies.TOO_MANY_SESSIONS
    # The second listener has no limits (0) and its own counts.
    for _ in range(100):
        assert other0.admit(CLIENT) is None
        assert other1.admit(CLIENT) is None
    assert (table.open_sessions(0), table.open_sessions(1)) == (5, 200)


def test_the_counts_are_shared_with_a_forked_worker(table: SessionTable) -> None:
    pid = os.fork()
    if pid == 0:  # a worker in slot 1: its sessions are what the slot-0 worker sees
        code = 0 if all(table.gates(1)[0].admit(CLIENT) is None for _ in range(2)) else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mx0 = table.gates(0)[0]
    assert mx0.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT


def test_clearing_a_dead_workers_slot_frees_its_counts_and_only_them(table: SessionTable) -> None:
    (mx0, other0), (mx1, _) = table.gates(0), table.gates(1)
    assert mx0.admit(CLIENT) is None
    for _ in range(2):
        assert mx1.admit(CLIENT) is None
    assert other0.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT
    table.clear(1)  # the worker in slot 1 was killed with its two sessions open
    assert (table.open_sessions(0), table.open_sessions(1)) == (1, 1)
    replacement = table.gates(1)[0]
    assert replacement.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is None
    assert mx0.admit(CLIENT) is replies.TOO_MANY_FROM_CLIENT
    # A leave for a session the cleared slot held never takes a count below zero (it would wrap).
    table.clear(0)
    mx0.leave(CLIENT)
    assert table.open_sessions(0) == 1


def test_clients_whose_ips_share_a_bucket_share_its_limit() -> None:
    """The conservative side of hashing: with one bucket every client collides, and is refused early."""
    table = SessionTable(1, [ListenerLimits(max_sessions=0, max_per_client=2)], buckets=1)
    try:
        gate = table.gates(0)[0]
        assert gate.admit("192.0.2.1") is None
        assert gate.admit("192.0.2.2") is None
        assert gate.admit("192.0.2.3") is replies.TOO_MANY_FROM_CLIENT
    finally:
        table.close()


def test_admit_waits_while_another_worker_holds_the_lock(table: SessionTable) -> None:
    """The lock is what keeps two workers from both taking the last place: admit reads and counts only
    while no other process holds it (a POSIX record lock, which the kernel drops with its holder)."""
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        fcntl.lockf(table._fd, fcntl.LOCK_EX)
        os.write(held_w, b"1")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(held_r, 1) == b"1"
        done = threading.Event()
        thread = threading.Thread(target=lambda: (table.gates(0)[0].admit(CLIENT), done.set()))
        thread.start()
        assert not done.wait(0.3), "admit went ahead while another process held the lock"
        os.write(go_w, b"1")
        assert done.wait(10)
        thread.join()
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        for fd in (held_r, held_w, go_r, go_w):
            os.close(fd)
    assert table.open_sessions(0) == 1


def test_there_are_at_least_64_buckets_per_session_a_listener_may_hold() -> None:
    assert bucket_count([ListenerLimits(100, 50)]) == 8192
    assert bucket_count([ListenerLimits(100, 50), ListenerLimits(1000, 50)]) == 65536
    assert bucket_count([ListenerLimits(10, 5)]) == MIN_BUCKETS
    assert bucket_count([ListenerLimits(10**6, 5)]) == MAX_BUCKETS
    assert bucket_count([ListenerLimits(0, 5)]) == 65536
    with pytest.raises(ValueError, match="slot 2 is not one of 2 workers"):
        SessionTable(2, [ListenerLimits(100, 50)]).gates(2)
