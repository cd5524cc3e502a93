"""Per-layer time splits of a fixed residency (decode_split, prefill_split) and the batch-size model."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab.sched import batching
from ktlab.sched import placement as placements
from ktlab.sched.cost import DEFAULT_CPU, ExpertCost, get_profile
from ktlab.sched.simulate import SimConfig, decode_split, prefill_split, simulate
from ktlab.sched.stats import activation_counts
from ktlab.sched.traces import PRESETS, generate_trace

E, K = 128, 8
COST = ExpertCost.for_shape(2048, 768, 34 / 32, get_profile("rtx4090-24g"), DEFAULT_CPU, dense_params=2048 * 4096)


@pytest.fixture(scope="module")
def trace():
    ids, weights = generate_trace(PRESETS["qwen3-30b-a3b"], 300, seed=1)
    return ids[:, :4], weights[:, :4]  # 4 layers keep it quick


def frequency_mask(ids, budget: float) -> np.ndarray:
    L = ids.shape[1]
    return placements.frequency(placements.budget_from_fraction(budget, L, E), activation_counts(ids, E)).gpu


@pytest.mark.parametrize("budget", [0.0, 0.15, 0.5])
def test_single_token_decode_split_is_the_simulators_static_replay(trace, budget):
    ids, weights = trace
    split = decode_split(ids, frequency_mask(ids, budget), COST)
    sim = simulate(ids, E, COST, SimConfig("static:frequency", budget, prefill_tokens=64), weights)
    assert split.total_s * 1e3 == pytest.approx(sim.decode_ms_per_token, rel=1e-12)
    assert split.tok_s == pytest.approx(sim.decode_tok_s, rel=1e-12)
    prefill = prefill_split(ids, frequency_mask(ids, budget), COST, 64)
    assert prefill.tok_s == sim.prefill_tok_s  # the simulator's prefill is this function
    assert split.simulated == "rtx4090-24g" and np.all(split.pcie_s == 0)  # a static placement copies nothing


def test_split_parts_price_where_the_experts_live(trace):
    ids, _ = trace
    L = ids.shape[1]
    nothing = decode_split(ids, np.zeros((L, E), dtype=bool), COST)
    cpu_layer = COST.cpu.call_overhead_s + K * COST.t_cpu(1)
    np.testing.assert_allclose(nothing.cpu_s, cpu_layer, rtol=1e-12)
    np.testing.assert_allclose(nothing.gpu_s, COST.t_dense(1), rtol=1e-12)  # only the dense part
    everything = decode_split(ids, np.ones((L, E), dtype=bool), COST)
    np.testing.assert_array_equal(everything.cpu_s, 0.0)
    np.testing.assert_allclose(everything.gpu_s, COST.t_dense(1) + K * COST.t_gpu(1), rtol=1e-12)
    for split in (nothing, everything, decode_split(ids, frequency_mask(ids, 0.15), COST, batch=4)):
        busy = split.cpu_s + split.gpu_s + split.pcie_s
        assert np.all(split.wall_s <= busy + 1e-15)  # CPU and GPU overlap
        assert np.all(split.wall_s >= np.maximum(split.cpu_s, split.gpu_s) - 1e-15)
        assert split.total_s == pytest.approx(split.wall_s.sum())
    assert everything.tok_s > nothing.tok_s


def test_prefill_copies_show_on_the_link_only_when_fetching(trace):
    ids, _ = trace
    cold = np.zeros((ids.shape[1], E), dtype=bool)
    fetched = prefill_split(ids, cold, COST, 256)
    assert np.all(fetched.pcie_s > 0)  # 30B experts with many tokens each: copying them pays
    on_cpu = prefill_split(ids, cold, COST, 256, fetch=False)
    assert np.all(on_cpu.pcie_s == 0) and fetched.tok_s > on_cpu.tok_s


def test_batched_decode_reads_each_distinct_expert_once(trace):
    ids, _ = trace
    gpu = frequency_mask(ids, 0.15)
    one, eight = decode_split(ids, gpu, COST, batch=1), decode_split(ids, gpu, COST, batch=8, max_steps=8)
    assert eight.tokens == 8 and eight.tok_s > 1.2 * one.tok_s  # experts shared by tokens are read once
    assert one.total_s < eight.total_s < 8 * one.total_s  # a longer step, shorter than 8 single ones
    with pytest.raises(ValueError, match="batch"):
        decode_split(ids, gpu, COST, batch=0)


def test_distinct_experts_follow_the_random_routing_formula():
    resident = np.zeros((3, E), dtype=bool)
    uniform = batching.random_routing(resident, K)
    for b in (1, 2, 8, 64):
        np.testing.assert_allclose(batching.distinct_experts(uniform, b), E * (1 - (1 - K / E) ** b))
    rng = np.random.default_rng(0)
    steps = np.array([[rng.choice(E, K, replace=False) for _ in range(16)] for _ in range(2000)])  # [steps, B, k]
    empirical = np.mean([len(np.unique(step)) for step in steps])
    assert empirical == pytest.approx(E * (1 - (1 - K / E) ** 16), rel=0.02)


def test_expected_step_matches_the_trace_replay(trace):
    """On random routing the model's expectation is the replay's mean (within sampling noise)."""
    rng = np.random.default_rng(2)
    L, T = 2, 4096
    ids = np.array([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)])
    gpu = np.zeros((L, E), dtype=bool)
    gpu[:, :32] = True
    uniform = batching.random_routing(gpu, K)
    recorded = batching.recorded_routing(ids, E, gpu)
    for b in (1, 4, 16):
        replay = decode_split(ids, gpu, COST, batch=b, max_steps=256)
        for routing in (uniform, recorded):
            assert batching.expected_step(routing, gpu, COST, b).tok_s == pytest.approx(replay.tok_s, rel=0.03)
    curve = batching.batch_tok_s(recorded, gpu, COST, (1, 2, 4, 8, 16))
    assert np.all(np.diff(curve) > 0)


def test_skewed_routing_reads_fewer_experts_than_random(trace):
    ids, _ = trace
    gpu = frequency_mask(ids, 0.15)
    recorded, uniform = batching.recorded_routing(ids, E, gpu), batching.random_routing(gpu, K)
    assert np.all(batching.distinct_experts(recorded, 16) < batching.distinct_experts(uniform, 16))
    assert batching.expected_step(recorded, gpu, COST, 16).tok_s > batching.expected_step(uniform, gpu, COST, 16).tok_s


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="batch"):
        batching.distinct_experts(batching.random_routing(np.zeros((1, 8), dtype=bool), 2), 0)
    with pytest.raises(ValueError, match="top_k"):
        batching.random_routing(np.zeros((1, 8), dtype=bool), 9)
    with pytest.raises(ValueError, match="RoutingModel"):
        batching.RoutingModel(np.zeros((2, 4)), np.zeros(3))
