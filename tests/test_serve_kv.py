"""Paged KV bookkeeping and the FCFS scheduler (torch-free)."""

from __future__ import annotations

import pytest

from ktlab.serve.kv import BlockManager, KVConfig, page_bytes, pages_needed
from ktlab.serve.scheduler import Scheduler, Sequence, Status


def test_pages_needed_and_pool_size():
    assert [pages_needed(n, 16) for n in (1, 16, 17, 32)] == [1, 1, 2, 2]
    assert page_bytes(16, 2, 2, 16) == 2 * 2 * 16 * 2 * 16 * 4
    assert page_bytes(16, 2, 1, 576, shared_kv=True) == 2 * 16 * 576 * 4  # a latent row serves keys and values
    assert KVConfig(page_size=16, memory_gb=page_bytes(16, 2, 2, 16) * 10 / 1e9).pages_for(2, 2, 16) == 10
    assert KVConfig(num_pages=7).pages_for(48, 4, 128) == 7


@pytest.mark.parametrize("kwargs, match", [
    ({"page_size": 0}, "page_size"), ({"num_pages": 0}, "num_pages"), ({"memory_gb": 0}, "memory_gb"),
])
def test_kv_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVConfig(**kwargs)


def test_block_manager_allocates_and_frees():
    bm = BlockManager(4, 8)
    assert bm.allocate(1, 9) == (0, 1)
    assert bm.num_used == 2 and not bm.can_allocate(17) and bm.can_allocate(16)
    with pytest.raises(ValueError, match="already"):
        bm.allocate(1, 1)
    assert bm.free(1) == 2 and bm.num_free == 4 and bm.free(1) == 0


def test_scheduler_fcfs_budget_and_waiting_for_pages():
    bm = BlockManager(4, 8)  # 32 positions
    sched = Scheduler(bm, max_batch_size=4, max_tokens_in_batch=10)
    a, b, c = Sequence(1, list(range(12)), 4), Sequence(2, list(range(5)), 3), Sequence(3, [1, 2], 30)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()  # a gets 10 of its 12 prompt tokens, nothing left for b
    assert [(x.seq.seq_id, x.n_tokens) for x in step] == [(1, 10)] and not step[0].samples
    a.num_computed += 10
    step = sched.schedule()  # a finishes prefill (2), b admitted with 5
    assert [(x.seq.seq_id, x.n_tokens) for x in step] == [(1, 2), (2, 5)]
    assert bm.num_used == 3  # a: 16 positions (2 pages), b: 8 (1 page); c (32) must wait
    assert c.status is Status.WAITING
    with pytest.raises(ValueError, match="pool holds 32"):
        sched.add(Sequence(4, [1] * 30, 3))
    sched.finish(a)
    sched.finish(b)
    assert bm.num_used == 0
    assert [(x.seq.seq_id, x.n_tokens) for x in sched.schedule()] == [(3, 2)]
