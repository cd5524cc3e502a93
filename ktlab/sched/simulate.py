"""Replay a routing trace through a placement or cache policy at a VRAM budget.

Decode: the trace's tokens one by one; every layer runs its dense part on the GPU
(``t_dense``), then its selected experts as :func:`ktlab.sched.scheduler.schedule_layer`
plans them (hits on the GPU, misses on the CPU or fetched), then the cache policy updates
residency (each admission is a PCIe copy; copies the scheduler did not ask for run in the
background on the link's idle time, and a token takes at least as long as its copies).
Deferral moves a token's ``deferral`` lowest-weight CPU experts of a layer out of its
critical path: they run on the CPU while the GPU does the next layer's dense part.
Prefill: the first ``prefill_tokens`` tokens as one chunk, experts with their token counts.

The cache, scheduler and cost code are the ones the live runtime uses. Every time it
reports comes from the cost model: *simulated* unless the profile was measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ktlab.sched import placement as placements
from ktlab.sched.cache import POLICIES, CachePolicy, make_policy, value_margin
from ktlab.sched.cost import ExpertCost
from ktlab.sched.prefetch import PREFETCH_SUFFIX, Prefetcher, StepTimeline, needs_predictions, split_policy
from ktlab.sched.scheduler import schedule_layer
from ktlab.sched.stats import activation_counts

STATIC_PREFIX = "static:"
REDISTRIBUTE = "redistribute"  # frequency placement re-made every N tokens from the counts so far


@dataclass(frozen=True)
class SimConfig:
    """One simulation: ``policy`` is a cache policy (lru, lfu, value, belady) or
    ``static:<strategy>`` (a placement from the trace's own counts, never changed) or
    ``redistribute`` (runtime redistribution: a frequency placement re-made every
    ``redistribute_every`` tokens from the counts seen so far, starting from none; each newly
    placed expert is a copy); ``budget`` is the share of all experts that fits in VRAM.
    ``fetch``: the scheduler may fetch misses (off: misses always run on the CPU).
    ``horizon``: steps an admitted expert is expected to stay (sets the value policy's
    admission margin)."""

    policy: str
    budget: float
    fetch: bool = True
    deferral: int = 0
    prefill_tokens: int = 512
    horizon: float = 8.0
    redistribute_every: int = 64

    def __post_init__(self) -> None:
        static = self.policy.startswith(STATIC_PREFIX)
        base, prefetch = split_policy(self.policy)
        if not static and base not in (*POLICIES, REDISTRIBUTE) or prefetch and base not in POLICIES:
            strategies = "|".join(placements.STRATEGIES[:4])
            raise ValueError(f"unknown policy {self.policy!r}; one of {', '.join(POLICIES)} (each also with "
                             f"{PREFETCH_SUFFIX}), {REDISTRIBUTE} or {STATIC_PREFIX}<{strategies}>")
        if static and self.policy[len(STATIC_PREFIX):] not in placements.STRATEGIES[:4]:
            raise ValueError(f"unknown static strategy in {self.policy!r}")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"SimConfig.budget is a share of all experts in [0, 1], got {self.budget}")
        if self.deferral < 0 or self.prefill_tokens < 0 or self.horizon <= 0 or self.redistribute_every < 1:
            raise ValueError("SimConfig needs deferral >= 0, prefill_tokens >= 0, horizon > 0, redistribute_every >= 1")


@dataclass
class SimResult:
    """What a replay measured; times are modeled (``simulated`` names the profile)."""

    policy: str
    budget: float
    slots_per_layer: int
    hit_rate: float
    transfers_per_token: float
    pcie_gb_per_token: float
    decode_ms_per_token: float
    decode_tok_s: float
    prefill_tok_s: float | None
    cpu_only_tok_s: float
    simulated: str

    def to_dict(self) -> dict:
        """Plain dict (JSON)."""
        return asdict(self)


def build_cache(policy: str, slots: int, num_layers: int, num_experts: int, cost: ExpertCost, *,
                counts: np.ndarray | None = None, trace: np.ndarray | None = None, fetch: bool = True,
                horizon: float = 8.0) -> CachePolicy:
    """The residency state of ``policy`` with ``slots`` GPU experts in all, split evenly over layers.

    ``static:<strategy>``: the placement made from ``counts`` (never stepped: a cache whose
    capacity is the placement's); a cache policy: empty at first; ``value`` gets its
    admission margin from the cost model (0 when misses are never fetched); ``belady``
    needs the ``trace`` it will replay.
    """
    if policy.startswith(STATIC_PREFIX):
        counts = np.zeros((num_layers, num_experts)) if counts is None else np.asarray(counts)
        place = placements.make_placement(policy[len(STATIC_PREFIX):], slots, counts)
        return make_policy("lru", num_layers, num_experts, place.gpu.sum(axis=1), initial=place.gpu)
    capacity = placements.even_split(slots, num_layers, num_experts)
    params = {"margin": value_margin(cost, horizon) if fetch else 0.0} if policy == "value" else {}
    return make_policy(policy, num_layers, num_experts, capacity, trace=trace, **params)


def _cache(config: SimConfig, trace: np.ndarray, num_experts: int, cost: ExpertCost) -> CachePolicy:
    L, policy = trace.shape[1], split_policy(config.policy)[0]
    slots = placements.budget_from_fraction(config.budget, L, num_experts)
    if config.policy == REDISTRIBUTE:  # residency set from outside; the placement keeps the budget
        start = placements.frequency(slots, np.zeros((L, num_experts)))
        return make_policy("lru", L, num_experts, num_experts, initial=start.gpu)
    counts = activation_counts(trace, num_experts) if policy.startswith(STATIC_PREFIX) else None
    return build_cache(policy, slots, L, num_experts, cost, counts=counts, trace=trace, fetch=config.fetch,
                       horizon=config.horizon)


def simulate(trace: np.ndarray, num_experts: int, cost: ExpertCost, config: SimConfig,
             weights: np.ndarray | None = None, predicted: np.ndarray | None = None) -> SimResult:
    """Replay ``trace`` [tokens, L, k] (``weights`` optional) under ``config``; see the module docstring.
    ``predicted`` [tokens, L, k']: each layer's experts as predicted from the previous layer's hidden
    state (``Trace.predicted[:, :, 0]``), needed by ``<policy>+prefetch`` (``belady+prefetch`` is the
    oracle: it prefetches the trace's own routing)."""
    trace = np.asarray(trace)
    steps, L, k = trace.shape
    static = config.policy.startswith(STATIC_PREFIX) or config.policy == REDISTRIBUTE
    cache = _cache(config, trace, num_experts, cost)
    prefetcher, predicted = _prefetcher(config, cache, cost, trace, predicted)
    initial = cache.resident.copy()  # prefill starts from here (before the replay changes it)
    redistributor = None
    if config.policy == REDISTRIBUTE:
        slots = placements.budget_from_fraction(config.budget, L, num_experts)
        redistributor = placements.Redistributor("frequency", slots, L, num_experts, every=config.redistribute_every)
    hits_total, copies, token_s = 0, 0, []
    dense = cost.t_dense(1)
    ones = np.ones(k, dtype=np.int64)
    for t in range(steps):
        ids = trace[t].astype(np.int64)
        forced = np.zeros_like(cache.resident)
        timeline = StepTimeline(cost, 1, config.deferral)
        prefetched = 0
        for layer in range(L):
            resident = cache.resident[layer, ids[layer]]  # a prefetch may have changed it within the token
            hits_total += int(resident.sum())
            free = int(cache.capacity[layer] - resident.sum())
            plan = timeline.run_layer(layer, ids[layer], ones, resident,
                                      max_fetch=free if (config.fetch and not static) else 0)
            forced[layer, plan.experts[plan.fetch]] = True
            if prefetcher is not None:
                prefetcher.observe(layer, ids[layer])
                if layer + 1 < L:
                    prefetched += len(prefetcher.issue(timeline, layer + 1, predicted[t, layer + 1])[0])
        clock = timeline.finish()
        if not static:
            step = cache.step(ids, None if weights is None else weights[t], forced, admit=prefetcher is None)
            n_copies = int(step.admitted.sum()) + prefetched
            copies += n_copies
            clock = max(clock, n_copies * cost.t_pcie())  # the link carries every copy within the token
        elif redistributor is not None and redistributor.observe(ids):
            new = redistributor.placement.gpu
            n_copies = int((new & ~cache.resident).sum())
            copies += n_copies
            clock = max(clock, n_copies * cost.t_pcie())  # a re-placement's copies burst on the link
            cache.resident = new.copy()
        token_s.append(clock)
    decode_s = float(np.mean(token_s))
    cpu_only = L * (dense + cost.cpu.call_overhead_s + k * cost.t_cpu(1))
    prefill = _prefill_tok_s(trace, initial, cost, config) if config.prefill_tokens else None
    return SimResult(
        policy=config.policy, budget=config.budget, slots_per_layer=round(config.budget * num_experts),
        hit_rate=hits_total / (steps * L * k), transfers_per_token=copies / steps,
        pcie_gb_per_token=copies * cost.expert_bytes / steps / 1e9, decode_ms_per_token=decode_s * 1e3,
        decode_tok_s=1.0 / decode_s, prefill_tok_s=prefill, cpu_only_tok_s=1.0 / cpu_only,
        simulated=cost.gpu.name,
    )


def _prefetcher(config: SimConfig, cache: CachePolicy, cost: ExpertCost, trace: np.ndarray,
                predicted: np.ndarray | None) -> tuple[Prefetcher | None, np.ndarray | None]:
    """The prefetcher of a ``+prefetch`` policy and the predictions it follows (None otherwise)."""
    if not split_policy(config.policy)[1]:
        return None, None
    if not needs_predictions(config.policy):  # the offline bound: it knows the next layer's routing
        return Prefetcher(cache, cost), trace
    if predicted is None:
        raise ValueError(f"{config.policy} needs the trace's predictions of the next layer's experts "
                         "(record the trace again with `ktlab record`)")
    predicted = np.asarray(predicted)
    if predicted.shape[:2] != trace.shape[:2]:
        raise ValueError(f"predictions {predicted.shape} do not match the trace {trace.shape}")
    return Prefetcher(cache, cost), predicted


def _prefill_tok_s(trace: np.ndarray, resident_at_start: np.ndarray, cost: ExpertCost, config: SimConfig) -> float:
    """Tokens/s for one prompt of the trace's first ``prefill_tokens`` tokens, one chunk,
    starting from the policy's initial residency (empty for caches, the placement for static)."""
    return prefill_split(trace, resident_at_start, cost, config.prefill_tokens, config.fetch).tok_s


# ---- per-layer time split of a fixed residency (the lab's CPU / GPU / PCIe bars) ---------------


@dataclass(frozen=True)
class LayerSplit:
    """Modeled seconds per layer of one step of ``tokens`` tokens under a fixed residency: busy
    time of the CPU (experts + call overhead), the GPU (dense part + experts) and the PCIe link
    (copies), and each layer's wall time (they overlap, so wall <= cpu + gpu + pcie).
    ``total_s`` is the step's time (the layers one after another); ``simulated`` names the
    profile every figure comes from."""

    tokens: int
    cpu_s: np.ndarray
    gpu_s: np.ndarray
    pcie_s: np.ndarray
    wall_s: np.ndarray
    total_s: float
    simulated: str

    @property
    def tok_s(self) -> float:
        """Tokens per second of the step (aggregate over its tokens)."""
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


def _busy(plan, counts: np.ndarray, cost: ExpertCost, dense_s: float) -> np.ndarray:
    """(cpu, gpu, pcie, wall) seconds of one layer's plan (the dense part runs on the GPU first)."""
    gpu = dense_s + sum(cost.t_gpu(int(n)) for n in counts[plan.on_gpu])
    return np.array([plan.cpu_s, gpu, int(plan.fetch.sum()) * cost.t_pcie(), dense_s + plan.makespan])


def prefill_split(trace: np.ndarray, resident: np.ndarray, cost: ExpertCost, tokens: int,
                  fetch: bool = True) -> LayerSplit:
    """One prompt of the trace's first ``tokens`` tokens as one chunk from ``resident`` [L, E]:
    every layer's selected experts with their token counts, planned by the scheduler; copies
    stream through a staging buffer (not kept), so any expert may be fetched (``fetch``), and
    the link carries its queue from layer to layer."""
    chunk = np.asarray(trace)[:tokens]
    n, L, _ = chunk.shape
    if n < 1:
        raise ValueError(f"prefill_split needs at least one token, got tokens={tokens} of a {len(trace)}-token trace")
    split = np.zeros((4, L))
    clock, link = 0.0, 0.0
    for layer in range(L):
        experts, counts = np.unique(chunk[:, layer].astype(np.int64), return_counts=True)
        dense = cost.t_dense(n)
        clock += dense
        plan = schedule_layer(experts, counts, resident[layer, experts], cost, max_fetch=None if fetch else 0,
                              link_free=link - clock)
        clock += plan.makespan
        link = clock - plan.makespan + plan.link_free
        split[:, layer] = _busy(plan, counts, cost, dense)
    return LayerSplit(n, *split, total_s=clock, simulated=cost.gpu.name)


def _decode_groups(trace: np.ndarray, resident: np.ndarray, batch: int, max_steps: int | None):
    """Steps of ``batch`` tokens, grouped by what their times depend on: per layer, the sorted
    token counts of the resident and of the non-resident selected experts. Yields
    (layer, counts, resident flags, number of steps, steps in all)."""
    T, L, k = trace.shape
    rows = np.arange(L)
    if batch == 1 and max_steps is None:  # every step: k experts, 1 token each; only the hits vary
        hits = resident[rows[None, :, None], trace].sum(axis=2)  # [T, L]
        for layer in range(L):
            for h, n in enumerate(np.bincount(hits[:, layer], minlength=k + 1)):
                if n:
                    yield layer, np.ones(k, dtype=np.int64), np.arange(k) < h, int(n), T
        return
    stride = T // batch
    steps = stride if max_steps is None else max(1, min(stride, max_steps))
    groups: dict[tuple, int] = {}
    for start in np.linspace(0, stride - 1, steps).round().astype(np.int64):
        tokens = trace[start + stride * np.arange(batch)]  # [B, L, k]: B sequences, far apart in the trace
        for layer in range(L):
            experts, counts = np.unique(tokens[:, layer], return_counts=True)
            res = resident[layer, experts]
            key = (layer, tuple(np.sort(counts[res])), tuple(np.sort(counts[~res])))
            groups[key] = groups.get(key, 0) + 1
    for (layer, hit_counts, miss_counts), n in groups.items():
        counts = np.array(hit_counts + miss_counts, dtype=np.int64)
        yield layer, counts, np.arange(len(counts)) < len(hit_counts), n, steps


def decode_split(trace: np.ndarray, resident: np.ndarray, cost: ExpertCost, batch: int = 1,
                 max_steps: int | None = None) -> LayerSplit:
    """Mean per-layer times of a decode step of ``batch`` concurrent tokens with the fixed
    residency ``resident`` [L, E] (a static placement: misses run on the CPU, nothing is
    copied, as ``simulate`` does for ``static:`` policies). A step's tokens come from trace
    positions ``T // batch`` apart (standing for independent sequences); ``max_steps`` caps
    the steps replayed (evenly spread; None: all). Steps whose per-layer token counts are alike
    are planned once, so a whole single-token replay costs k + 1 plans per layer."""
    trace = np.asarray(trace).astype(np.int64)
    resident = np.asarray(resident, dtype=bool)
    T, L, _ = trace.shape
    if not isinstance(batch, int | np.integer) or not 1 <= batch <= T:
        raise ValueError(f"decode_split needs a batch of 1..{T} tokens (the trace's length), got {batch!r}")
    if resident.shape[0] != L:
        raise ValueError(f"resident has {resident.shape[0]} layers, the trace {L}")
    dense = cost.t_dense(batch)
    split = np.zeros((4, L))
    for layer, counts, res, n, steps in _decode_groups(trace, resident, batch, max_steps):
        plan = schedule_layer(np.arange(len(counts)), counts, res, cost, max_fetch=0)
        split[:, layer] += _busy(plan, counts, cost, dense) * (n / steps)
    return LayerSplit(batch, *split, total_s=float(split[3].sum()), simulated=cost.gpu.name)
