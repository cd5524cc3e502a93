"""The greedy per-layer scheduler against a brute-force search, on hand-made cost settings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ktlab.sched.cost import CpuCost, ExpertCost, GpuProfile, fit_cpu_cost
from ktlab.sched.scheduler import brute_force, evaluate, schedule_layer

# Hand-made machines: a slow PCIe link (fetching rarely pays), a fast one (it often does),
# and one where the GPU is barely faster than the CPU.
SLOW_LINK = GpuProfile("slow-link", 24, 1000, 100, pcie_gbps=5)
FAST_LINK = GpuProfile("fast-link", 24, 1000, 100, pcie_gbps=60)
WEAK_GPU = GpuProfile("weak-gpu", 8, 60, 2, pcie_gbps=25, compute_efficiency=1.0, mem_efficiency=1.0)
CPU = CpuCost(bandwidth_gbps=25, gops=400, call_overhead_s=2e-5)
COSTS = {p.name: ExpertCost.for_shape(2048, 768, 34 / 32, p, CPU) for p in (SLOW_LINK, FAST_LINK, WEAK_GPU)}


@pytest.mark.parametrize("machine", COSTS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_decode_matches_brute_force_for_every_hit_pattern(machine, k):
    cost = COSTS[machine]
    experts, counts = np.arange(k), np.ones(k, dtype=np.int64)
    for pattern in itertools.product([False, True], repeat=k):
        resident = np.array(pattern)
        for max_fetch in (None, 0, 2):
            plan = schedule_layer(experts, counts, resident, cost, max_fetch=max_fetch)
            best = brute_force(experts, counts, resident, cost, max_fetch=max_fetch)
            assert plan.makespan == pytest.approx(best, rel=1e-12), (pattern, max_fetch)


PREFILL_CASES = [
    # counts, resident
    ([512, 1, 1, 1], [False, False, False, False]),  # one expert with many tokens: fetch it
    ([300, 200, 100, 50, 20, 10, 5, 1], [False] * 8),
    ([64, 64, 64, 64, 8, 8, 8, 8], [True, False] * 4),
    ([1000, 900, 800, 700, 600, 500, 400, 300], [False] * 8),  # everything heavy
    ([3, 2, 1], [True, True, True]),
]


# The greedy is exact where the GPU is much faster than the CPU (real machines); where the two
# are close (weak-gpu) balancing them is a partition problem and it may miss by a few percent.
PREFILL_GAP = {"slow-link": 1e-12, "fast-link": 1e-12, "weak-gpu": 0.06}
RANDOM_GAP = {"slow-link": 0.01, "fast-link": 0.01, "weak-gpu": 0.15}


@pytest.mark.parametrize("machine", COSTS)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
@pytest.mark.parametrize("link_free", [0.0, 1e-3])
def test_prefill_matches_brute_force(machine, case, link_free):
    counts, resident = (np.array(v) for v in PREFILL_CASES[case])
    experts = np.arange(len(counts)) * 3
    cost = COSTS[machine]
    plan = schedule_layer(experts, counts, resident, cost, link_free=link_free)
    best = brute_force(experts, counts, resident, cost, link_free=link_free)
    assert best <= plan.makespan <= best * (1 + PREFILL_GAP[machine])


@pytest.mark.parametrize("machine", COSTS)
def test_random_prefill_is_near_optimal(machine):
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(100):
        m = int(rng.integers(1, 9))
        counts, resident = rng.integers(1, 400, size=m), rng.random(m) < 0.4
        link_free = float(rng.choice([0.0, 5e-4, 2e-3]))
        plan = schedule_layer(np.arange(m), counts, resident, COSTS[machine], link_free=link_free)
        best = brute_force(np.arange(m), counts, resident, COSTS[machine], link_free=link_free)
        worst = max(worst, plan.makespan / best - 1)
    assert worst <= RANDOM_GAP[machine], worst


def test_plan_bookkeeping():
    cost = COSTS["fast-link"]
    counts = np.array([512, 1, 1])
    plan = schedule_layer(np.array([7, 8, 9]), counts, np.array([False, True, False]), cost)
    assert plan.fetch[0] and not plan.fetch[1]  # the heavy miss is fetched, the hit is not a fetch
    assert set(plan.gpu_experts) | set(plan.cpu_experts) == {7, 8, 9}
    c, g, _ = evaluate(plan.on_gpu, np.array([False, True, False]), counts, np.array([7, 8, 9]), cost)
    assert (c, g) == (plan.cpu_s, plan.gpu_s)


def test_no_fetch_when_forbidden():
    plan = schedule_layer(np.arange(4), np.full(4, 500), np.zeros(4, bool), COSTS["fast-link"], max_fetch=0)
    assert not plan.fetch.any() and not plan.on_gpu.any()


def test_cpu_cost_fit_recovers_its_parameters():
    truth = CpuCost(bandwidth_gbps=30.0, gops=500.0, call_overhead_s=4e-5)
    cost = ExpertCost.for_shape(2048, 768, 34 / 32, FAST_LINK, truth)
    E, k = 128, 8
    rows = []
    for T in (1, 4, 16, 64, 512):
        touched = E * (1 - (1 - k / E) ** T)
        seconds = truth.call_overhead_s + touched * cost.expert_bytes / 30e9 + T * k * cost.ops_per_token / 500e9
        rows.append((T, seconds))
    fit = fit_cpu_cost(rows, cost.expert_bytes, cost.ops_per_token, E, k, "test")
    assert fit.bandwidth_gbps == pytest.approx(30.0, rel=1e-6)
    assert fit.gops == pytest.approx(500.0, rel=1e-6)
    assert fit.call_overhead_s == pytest.approx(4e-5, rel=1e-5)


def test_model_cost_counts_shared_experts_and_dense_layers_as_gpu_weights():
    """The dense part of a layer (always on the GPU) holds every non-routed weight a token reads,
    spread over the MoE layers: attention of all layers, shared experts, leading dense MLPs."""
    from ktlab.config import ModelConfig
    from ktlab.sched.cost import PROFILES

    base = dict(arch="glm4moe", vocab_size=100, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512)
    plain = ModelConfig(**base)
    glm = ModelConfig(**base, shared_expert_size=128, first_dense_layers=1)
    gpu = PROFILES["rtx4090-24g"]
    expert_bytes = 3 * 256 * 128  # one byte a weight
    attention = (256 + 2 * 128) * 256 + 256 * 256  # q, k, v, o
    assert ExpertCost.for_model(plain, expert_bytes, gpu).dense_bytes == attention
    want = (4 * attention + 3 * 3 * 256 * 128 + 1 * 3 * 256 * 512) // 3  # over the 3 MoE layers
    cost = ExpertCost.for_model(glm, expert_bytes, gpu)
    assert cost.dense_bytes == want and cost.dense_ops_per_token == pytest.approx(2.0 * want)


@pytest.mark.parametrize("machine", COSTS)
@pytest.mark.parametrize("k", [2, 4, 8])
def test_decode_with_copies_in_flight_matches_brute_force(machine, k):
    """Prefetched experts still in flight (``ready`` > 0): the greedy waits for them or runs them on
    the CPU, whichever is faster, exactly as the best of all 2^k assignments."""
    cost = COSTS[machine]
    rng = np.random.default_rng(k)
    experts, counts = np.arange(k), np.ones(k, dtype=np.int64)
    waited = moved = 0
    for _ in range(40):
        resident = rng.random(k) < 0.6
        ready = np.where(resident & (rng.random(k) < 0.5), rng.random(k) * 4 * cost.t_pcie(), 0.0)
        link_free = float(ready.max()) if ready.any() else 0.0  # the link is busy until the last copy lands
        for max_fetch in (None, 0):
            plan = schedule_layer(experts, counts, resident, cost, max_fetch=max_fetch, link_free=link_free,
                                  ready=ready)
            best = brute_force(experts, counts, resident, cost, max_fetch=max_fetch, link_free=link_free, ready=ready)
            assert plan.makespan == pytest.approx(best, rel=1e-12), (resident, ready, max_fetch)
            in_flight = resident & (ready > 0)
            waited += int((plan.on_gpu & in_flight).sum())
            moved += int((~plan.on_gpu & in_flight).sum())
    assert waited and (moved or machine == "weak-gpu")  # both choices occur
    plan = schedule_layer(experts, counts, np.ones(k, dtype=bool), cost, ready=np.full(k, 1.0))
    assert plan.makespan < 1.0  # an expert that lands in a second runs on the CPU instead
