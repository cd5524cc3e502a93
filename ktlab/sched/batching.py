"""Modeled throughput of B concurrent decode tokens: a step reads each *distinct* selected expert once.

With B independent tokens and a per-token chance ``p[l, e]`` that expert e of layer l is among a
token's top-k (each row of ``p`` sums to k), expert e is read by a step with chance
``q = 1 - (1 - p)^B``, for ``B p / q`` tokens on average; a layer reads ``sum_e q`` distinct
experts, ``E (1 - (1 - k/E)^B)`` under uniformly random routing. The expected step then prices
every expert where the residency puts it (resident: GPU, else CPU, no copies: a static
placement), plus the dense part on the GPU and the CPU's call overhead when any selected expert
is not resident. CPU and GPU overlap: a layer takes its dense part plus the larger of the two
(the expectation of a max is taken as the max of the expectations, and the scheduler's moves of
resident experts to an idle CPU are left out, so it is a model, checked against the trace replay
of :func:`ktlab.sched.simulate.decode_split` in the tests). Pure numpy; every time is modeled.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np

from ktlab.sched.cost import ExpertCost
from ktlab.sched.simulate import LayerSplit


@dataclass(frozen=True)
class RoutingModel:
    """One token's routing, per layer: ``p`` [L, E] the chance each expert is selected (rows sum
    to top-k) and ``all_resident`` [L] the chance that all of its selected experts are resident."""

    p: np.ndarray
    all_resident: np.ndarray

    def __post_init__(self) -> None:
        p, a = np.asarray(self.p, dtype=float), np.asarray(self.all_resident, dtype=float)
        if p.ndim != 2 or a.shape != (p.shape[0],):
            raise ValueError(f"RoutingModel needs p [L, E] and all_resident [L], got {p.shape} and {a.shape}")
        if np.any(p < 0) or np.any(p > 1) or np.any(a < 0) or np.any(a > 1):
            raise ValueError("RoutingModel probabilities must be in [0, 1]")


def recorded_routing(trace: np.ndarray, num_experts: int, resident: np.ndarray) -> RoutingModel:
    """The routing of a recorded trace [T, L, k]: selection frequencies and, for ``resident``
    [L, E], the share of tokens whose experts were all resident."""
    trace = np.asarray(trace).astype(np.int64)
    T, L, _ = trace.shape
    if T < 1:
        raise ValueError("recorded_routing needs a trace of at least one token")
    p = np.zeros((L, num_experts))
    np.add.at(p, (np.arange(L)[None, :, None], trace), 1.0)
    hits = np.asarray(resident, dtype=bool)[np.arange(L)[None, :, None], trace]
    return RoutingModel(p / T, hits.all(axis=2).mean(axis=0))


def random_routing(resident: np.ndarray, top_k: int) -> RoutingModel:
    """Uniformly random top-k routing (every expert equally likely) for ``resident`` [L, E]."""
    resident = np.asarray(resident, dtype=bool)
    L, E = resident.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    all_res = np.array([comb(int(r), top_k) / comb(E, top_k) for r in resident.sum(axis=1)])
    return RoutingModel(np.full((L, E), top_k / E), all_res)


def _read_chance(routing: RoutingModel, batch: int) -> np.ndarray:
    if not isinstance(batch, int | np.integer) or batch < 1:
        raise ValueError(f"batch must be a positive integer of concurrent tokens, got {batch!r}")
    return 1.0 - (1.0 - routing.p) ** batch


def distinct_experts(routing: RoutingModel, batch: int) -> np.ndarray:
    """[L] expected distinct experts a step of ``batch`` tokens reads per layer."""
    return _read_chance(routing, batch).sum(axis=1)


def expected_step(routing: RoutingModel, resident: np.ndarray, cost: ExpertCost, batch: int) -> LayerSplit:
    """Expected per-layer busy and wall times of one step of ``batch`` concurrent decode tokens."""
    resident = np.asarray(resident, dtype=bool)
    if resident.shape != routing.p.shape:
        raise ValueError(f"resident {resident.shape} and the routing {routing.p.shape} differ in shape")
    q = _read_chance(routing, batch)
    tokens = np.divide(batch * routing.p, q, out=np.zeros_like(q), where=q > 0)  # per expert read
    t_cpu, t_gpu = np.vectorize(cost.t_cpu)(tokens), np.vectorize(cost.t_gpu)(tokens)
    called = 1.0 - routing.all_resident ** batch  # chance the CPU has any expert of the step
    cpu = cost.cpu.call_overhead_s * called + (q * t_cpu * ~resident).sum(axis=1)
    gpu_experts = (q * t_gpu * resident).sum(axis=1)
    dense = cost.t_dense(batch)
    wall = dense + np.maximum(cpu, gpu_experts)
    return LayerSplit(int(batch), cpu, dense + gpu_experts, np.zeros_like(cpu), wall, float(wall.sum()),
                      cost.gpu.name)


def batch_tok_s(routing: RoutingModel, resident: np.ndarray, cost: ExpertCost, batches) -> np.ndarray:
    """Modeled aggregate decode tokens/s for each batch size in ``batches``."""
    return np.array([expected_step(routing, resident, cost, int(b)).tok_s for b in batches])
