"""Expert cache policies: budget, determinism, hand-computed cases, Belady as the upper bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktlab.sched.cache import POLICIES, hit_rate, make_policy, next_uses
from ktlab.sched.traces import PRESETS, TraceSpec, generate_trace


def replay(trace, policy, capacity, num_experts, weights=None):
    steps, L, _ = trace.shape
    cache = make_policy(policy, L, num_experts, capacity, trace=trace)
    out = []
    for t in range(steps):
        step = cache.step(trace[t], None if weights is None else weights[t])
        assert np.all(cache.resident.sum(axis=1) <= cache.capacity), "budget exceeded"
        assert not np.any(step.admitted & step.evicted)
        out.append(step.hits.copy())
    return np.stack(out), cache


def one_layer(seq):
    """A one-layer trace, one expert per step: [[a], [b], ...] -> [steps, 1, 1]."""
    return np.asarray(seq, dtype=np.int16).reshape(-1, 1, 1)


def test_lru_hand_computed():
    # capacity 2: a b a c a b -> c evicts b (a is more recent), a hits again, b misses
    hits, _ = replay(one_layer([0, 1, 0, 2, 0, 1]), "lru", 2, 4)
    assert hits.ravel().tolist() == [False, False, True, False, True, False]


def test_lfu_hand_computed():
    # capacity 2: a a b c a b: at c, b (count 1) is evicted rather than a (count 2)
    hits, _ = replay(one_layer([0, 0, 1, 2, 0, 1]), "lfu", 2, 4)
    assert hits.ravel().tolist() == [False, True, False, False, True, False]


def test_belady_hand_computed():
    # capacity 2: a b c a b: at c, Belady bypasses c (never used again) and keeps a and b
    hits, _ = replay(one_layer([0, 1, 2, 0, 1]), "belady", 2, 4)
    assert hits.ravel().tolist() == [False, False, False, True, True]


def test_set_lookup_counts_hits_before_the_update():
    # a token selects {0, 1}; capacity 1: the heavier one stays; next token {0, 1}: one hit
    trace = np.array([[[0, 1]], [[0, 1]]], dtype=np.int16)
    weights = np.array([[[0.3, 0.7]], [[0.5, 0.5]]], dtype=np.float32)
    hits, cache = replay(trace, "lru", 1, 4, weights)
    assert hits[0].sum() == 0 and hits[1].tolist() == [[False, True]]


def test_forced_admission_is_kept():
    cache = make_policy("lfu", 1, 8, 2)
    for _ in range(5):
        cache.step(np.array([[0, 1]]))
    forced = np.zeros((1, 8), dtype=bool)
    forced[0, 5] = True
    cache.step(np.array([[5, 6]]), forced=forced)
    assert cache.resident[0, 5] and cache.resident.sum() == 2


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_and_determinism(policy):
    ids, w = generate_trace(TraceSpec(4, 32, 4, skew=1.0, stick_prev=2.0, stick_window=1.0), 120, seed=3)
    capacity = np.array([0, 3, 8, 32])  # a layer with no GPU slots and one where everything fits
    hits_a, _ = replay(ids, policy, capacity, 32, w)
    hits_b, _ = replay(ids, policy, capacity, 32, w)
    assert np.array_equal(hits_a, hits_b)
    assert not hits_a[:, 0].any()
    # everything fits in layer 3: exactly the first use of each expert misses
    seen_before = np.array([[e in ids[:t, 3] for e in ids[t, 3]] for t in range(len(ids))])
    assert np.array_equal(hits_a[:, 3], seen_before)


def test_next_uses():
    nxt = next_uses(one_layer([0, 1, 0, 2]), 3)
    assert nxt[0, 0].tolist() == [2, 1, 3]
    assert nxt[2, 0, 0] > 10**9 and nxt[2, 0, 2] == 3


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    experts=st.integers(4, 24),
    top_k=st.integers(1, 4),
    capacity=st.integers(0, 12),
    steps=st.integers(1, 60),
    skew=st.floats(0.0, 2.0),
)
def test_belady_bounds_every_online_policy(seed, experts, top_k, capacity, steps, skew):
    top_k = min(top_k, experts)
    capacity = min(capacity, experts)
    ids, w = generate_trace(TraceSpec(2, experts, top_k, skew=skew, stick_prev=1.5, stick_window=1.0), steps, seed)
    best = hit_rate(ids, "belady", capacity, experts, w)
    for policy in ("lru", "lfu", "value"):
        assert hit_rate(ids, policy, capacity, experts, w) <= best + 1e-12, policy


def test_value_driven_beats_lru_and_lfu_on_the_preset():
    ids, w = generate_trace(PRESETS["qwen3-30b-a3b"], 300, seed=1)
    for capacity in (6, 19, 38):
        rates = {p: hit_rate(ids, p, capacity, 128, w) for p in POLICIES}
        assert rates["value"] >= max(rates["lru"], rates["lfu"]), rates
        assert rates["belady"] >= rates["value"], rates


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        make_policy("lru", 2, 8, 9)
    with pytest.raises(ValueError, match="offline"):
        make_policy("belady", 2, 8, 2)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_policy("fifo", 2, 8, 2)
