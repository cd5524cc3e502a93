"""Per-layer greedy scheduling of the selected experts: CPU, GPU (resident) or fetch-then-GPU.

For one layer step, the selected experts come with their token counts ``n`` and whether
they are resident in VRAM. Each can run

- on the CPU engine: ``t_cpu(n)``, all CPU experts of the step back to back, plus one call
  overhead;
- on the GPU if resident: ``t_gpu(n)``, from when its copy has landed (``ready``: a prefetched
  expert may still be in flight when the layer starts, :mod:`ktlab.sched.prefetch`);
- fetched (copied over PCIe into the cache, then run on the GPU): its copy queues on the PCIe
  link (which may still be busy with earlier copies, ``link_free``) and its GPU run starts
  when the copy is done.

CPU and GPU run in parallel; the step ends when both are done (the makespan). The greedy
rule: sort non-resident experts by the CPU time they would cost (largest first) and resident
experts by the CPU time they cost the least first; try every number of fetches f (the first f
in that order) and every number of resident experts moved to the CPU g, and keep the
smallest makespan; then improve by single moves until none helps. In decode (n = 1 for every
expert) that is exact; in prefill it fetches exactly the experts whose token counts make the
transfer pay (instead of KTransformers' fixed token threshold). Tests compare it with a
brute-force search over all 2^k assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ktlab.sched.cost import ExpertCost

LOCAL_SEARCH_MAX = 16  # steps with more selected experts (prefill) skip the single-move pass


@dataclass(frozen=True)
class LayerPlan:
    """Where each selected expert runs: ``on_gpu`` [m] (True: GPU, resident or fetched),
    ``fetch`` [m] (True: copied over PCIe in this step); with the modeled times."""

    experts: np.ndarray
    on_gpu: np.ndarray
    fetch: np.ndarray
    cpu_s: float
    gpu_s: float
    link_free: float  # when the PCIe link is free after this step's copies (same clock as link_free in)

    @property
    def makespan(self) -> float:
        """The step's modeled time: CPU and GPU in parallel."""
        return max(self.cpu_s, self.gpu_s)

    @property
    def cpu_experts(self) -> np.ndarray:
        """Expert ids the CPU runs."""
        return self.experts[~self.on_gpu]

    @property
    def gpu_experts(self) -> np.ndarray:
        """Expert ids the GPU runs (resident and fetched)."""
        return self.experts[self.on_gpu]


def deferred_makespan(plan: LayerPlan, deferral: int, carry: float, next_dense_s: float,
                      cost: ExpertCost) -> tuple[float, float]:
    """(this layer's modeled time, carry to the next layer) of a decode layer whose tokens defer
    their ``deferral`` lowest-weight CPU experts: that CPU work leaves the critical path and runs
    while the next layer's dense part (``next_dense_s``) does; ``carry`` is the previous layer's
    deferred work that spilled past it (the CPU does it first)."""
    deferred_s = min(deferral, len(plan.cpu_experts)) * cost.t_cpu(1)
    cpu_s = max(0.0, plan.cpu_s - deferred_s) + carry
    return max(cpu_s, plan.gpu_s), max(0.0, deferred_s - next_dense_s)


def _fetch_order(counts: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Copies are issued most-tokens first (then by id)."""
    return np.lexsort((experts, -counts))


def _landed_gpu_s(times: list[float], ready: np.ndarray | None) -> float:
    """GPU time of resident experts (each its run ``times``) run in the order their copies land
    (``ready``; None or all 0: all there, back to back)."""
    if ready is None or not np.any(ready > 0):
        return sum(times)
    clock = 0.0
    for i in np.argsort(ready, kind="stable"):
        clock = max(clock, float(ready[i])) + times[i]
    return clock


def evaluate(on_gpu: np.ndarray, resident: np.ndarray, counts: np.ndarray, experts: np.ndarray, cost: ExpertCost,
             link_free: float = 0.0, ready: np.ndarray | None = None) -> tuple[float, float, float]:
    """(cpu_s, gpu_s, link_free after) of one assignment; times from the step's start (0).
    ``ready`` [m]: when each resident expert's copy lands (None or 0: already there)."""
    cpu_n = counts[~on_gpu]
    cpu_s = (cost.cpu.call_overhead_s + sum(cost.t_cpu(int(n)) for n in cpu_n)) if len(cpu_n) else 0.0
    kept = on_gpu & resident
    landing = None if ready is None else np.asarray(ready)[kept]
    gpu_s = _landed_gpu_s([cost.t_gpu(int(n)) for n in counts[kept]], landing)
    link = max(0.0, link_free)
    fetched = on_gpu & ~resident
    for i in _fetch_order(counts, experts):
        if fetched[i]:
            link += cost.t_pcie()
            gpu_s = max(gpu_s, link) + cost.t_gpu(int(counts[i]))
    return cpu_s, gpu_s, link


def schedule_layer(experts: np.ndarray, counts: np.ndarray, resident: np.ndarray, cost: ExpertCost,
                   max_fetch: int | None = None, link_free: float = 0.0, ready: np.ndarray | None = None) -> LayerPlan:
    """The greedy plan for one layer step (see the module docstring).

    ``experts`` [m] selected ids, ``counts`` [m] tokens each, ``resident`` [m] bool;
    ``max_fetch``: copies allowed (free cache slots; None: no limit, 0: no fetching);
    ``link_free``: seconds from the step's start until the PCIe link is free (after any copies
    in flight); ``ready`` [m]: seconds from the step's start until a resident expert's copy has
    landed (in flight: prefetched; None or 0: there). Experts still in flight are the first
    moved to the CPU when that is faster than waiting for them.
    """
    experts, counts, resident = np.asarray(experts), np.asarray(counts), np.asarray(resident, dtype=bool)
    arrival = np.zeros(len(experts)) if ready is None else np.maximum(np.asarray(ready, dtype=float), 0.0)
    m = len(experts)
    limit = m if max_fetch is None else max(0, min(max_fetch, m))
    misses, hits = np.flatnonzero(~resident), np.flatnonzero(resident)
    miss_order = misses[_fetch_order(counts[misses], experts[misses])]  # costliest on the CPU first
    # latest to land first, then cheapest to move to the CPU first
    hit_order = hits[np.lexsort((experts[hits], counts[hits], -arrival[hits]))]
    tc_miss = [cost.t_cpu(int(n)) for n in counts[miss_order]]
    tg_miss = [cost.t_gpu(int(n)) for n in counts[miss_order]]
    tc_hit = [cost.t_cpu(int(n)) for n in counts[hit_order]]
    tg_hit = [cost.t_gpu(int(n)) for n in counts[hit_order]]
    landing = arrival[hit_order]  # later entries land no later: the first g moved to the CPU are the latest
    kept_gpu = [_landed_gpu_s(tg_hit[g:], landing[g:]) for g in range(len(hits) + 1)]
    tp, link0 = cost.t_pcie(), max(0.0, link_free)
    best, best_fg = np.inf, (0, 0)
    for g in range(len(hits) + 1):  # g cheapest resident experts moved to the CPU
        gpu = kept_gpu[g]
        cpu_work = sum(tc_miss) + sum(tc_hit[:g])
        for f in range(min(limit, len(misses)) + 1):  # f costliest misses fetched
            if f:
                gpu = max(gpu, link0 + f * tp) + tg_miss[f - 1]
                cpu_work -= tc_miss[f - 1]
            cpu = cost.cpu.call_overhead_s + cpu_work if len(misses) - f + g else 0.0
            if max(cpu, gpu) < best - 1e-15:
                best, best_fg = max(cpu, gpu), (f, g)
    on_gpu = resident.copy()
    on_gpu[miss_order[: best_fg[0]]] = True
    on_gpu[hit_order[: best_fg[1]]] = False
    if m <= LOCAL_SEARCH_MAX and (np.any(counts != counts[0]) or np.any(arrival > 0)):  # else the search is exact
        on_gpu = _improve(on_gpu, best, resident, counts, experts, cost, limit, link_free, ready)
    cpu_s, gpu_s, link = evaluate(on_gpu, resident, counts, experts, cost, link_free, ready)
    return LayerPlan(experts, on_gpu, on_gpu & ~resident, cpu_s, gpu_s, link)


def _improve(on_gpu: np.ndarray, span: float, resident: np.ndarray, counts: np.ndarray, experts: np.ndarray,
             cost: ExpertCost, limit: int, link_free: float, ready: np.ndarray | None = None) -> np.ndarray:
    """Local search: single moves (one expert to the other side) and swaps (one each way)
    while one shortens the makespan (the prefix search alone can miss balanced partitions
    when the GPU is not much faster than the CPU)."""

    def trials(current: np.ndarray):
        m = len(current)
        for i in range(m):
            yield (i,)
        for i in range(m):
            for j in range(i + 1, m):
                if current[i] != current[j]:
                    yield (i, j)

    improved = True
    while improved:
        improved = False
        for move in trials(on_gpu):
            trial = on_gpu.copy()
            trial[list(move)] = ~trial[list(move)]
            if (trial & ~resident).sum() > limit:
                continue
            c, g, _ = evaluate(trial, resident, counts, experts, cost, link_free, ready)
            if max(c, g) < span - 1e-15:
                span, on_gpu, improved = max(c, g), trial, True
                break
    return on_gpu


def brute_force(experts: np.ndarray, counts: np.ndarray, resident: np.ndarray, cost: ExpertCost,
                max_fetch: int | None = None, link_free: float = 0.0, ready: np.ndarray | None = None) -> float:
    """The optimal makespan over all 2^m assignments (for tests; m <= ~12)."""
    experts, counts, resident = np.asarray(experts), np.asarray(counts), np.asarray(resident, dtype=bool)
    m = len(experts)
    limit = m if max_fetch is None else max_fetch
    best = np.inf
    for code in range(1 << m):
        on_gpu = np.array([(code >> i) & 1 for i in range(m)], dtype=bool)
        if (on_gpu & ~resident).sum() > limit:
            continue
        c, g, _ = evaluate(on_gpu, resident, counts, experts, cost, link_free, ready)
        best = min(best, max(c, g))
    return best
