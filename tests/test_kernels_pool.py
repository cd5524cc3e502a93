"""The kernel thread pool's handoff (tasks one at a time, and per-thread ranges with stealing):
every task of every job runs exactly once before its job
returns, also when the workers' cores are busy (a job no longer waits for late workers to
check in, so a late worker must never take a task of the next job)."""

import threading

import pytest

from ktlab import _kernels


@pytest.mark.parametrize("ranges", [False, True], ids=["one-at-a-time", "ranges"])
@pytest.mark.parametrize("n_tasks", [1, 2, 3, 7, 64, 513])
def test_every_task_runs_once(n_tasks, ranges):
    assert _kernels.pool_self_check(2000, n_tasks, 0, ranges) == 0


def test_every_task_runs_once_while_the_cores_are_busy():
    stop = threading.Event()

    def spin() -> None:  # takes a core while the pool works (the check releases the GIL)
        x = 0
        while not stop.is_set():
            x += 1

    hogs = [threading.Thread(target=spin, daemon=True) for _ in range(2)]
    for t in hogs:
        t.start()
    try:
        for ranges in (False, True):
            assert _kernels.pool_self_check(20000, 5, 0, ranges) == 0
            assert _kernels.pool_self_check(200, 4096, 0, ranges) == 0
    finally:
        stop.set()
        for t in hogs:
            t.join()


def test_a_job_bigger_than_one_cursor_runs_in_parts():
    assert _kernels.pool_self_check(1, (1 << 20) + 3, 0) == 0
