"""A step's modeled timeline over its layers, and the prefetcher that copies the next layer's
predicted experts while the current layer computes (pure numpy; no torch here).

:class:`StepTimeline` is the clock both the trace simulator (:func:`ktlab.sched.simulate.simulate`)
and the live runtime (:class:`ktlab.runtime.hybrid.HybridPlacement`) advance layer by layer: each
layer's dense part, then its selected experts as the greedy scheduler plans them (hits on the GPU,
misses on the CPU or fetched; deferral as :func:`~ktlab.sched.scheduler.deferred_makespan` models it),
with the PCIe link's queue carried from layer to layer and the copies still in flight.

:class:`Prefetcher`: once layer l's dense part has run, its hidden state predicts which experts
layer l+1 will select (layer l+1's router applied to it: ``ktlab record`` stores these
predictions, :class:`ktlab.model.lookahead.RouterLookahead` makes them live). The prefetcher
queues copies of the predicted experts that are not resident on the link, behind layer l's own
fetches, as many as start before layer l+1's experts do (the copy time layer l's experts and
layer l+1's dense part hide; the last may land a little late); each takes a free slot of layer
l+1 or evicts the resident the cache policy values least (:meth:`ktlab.sched.cache.CachePolicy.prefetch`)
among those not predicted. With the value policy a prefetch must also be worth its victim: the
predicted expert's expected uses, in this step (the predictions' precision so far, learned as the
run goes) and in the next (its value), against the victim's in the next (its value). The
scheduler of layer l+1 sees copies still in flight (``ready``) and may run such an expert on the
CPU instead of waiting. A prefetching cache makes no demand admissions (a copy made before the
use serves it; one made after a CPU run only serves later uses); the scheduler may still fetch.
An oracle prefetcher (predictions = the trace's own next routing) with Belady's cache is the
offline bound of prefetching.
"""

from __future__ import annotations

import numpy as np

from ktlab.sched.cache import CachePolicy
from ktlab.sched.cost import ExpertCost
from ktlab.sched.scheduler import LayerPlan, deferred_makespan, schedule_layer

PREFETCH_SUFFIX = "+prefetch"


def needs_predictions(policy: str) -> bool:
    """Whether ``policy`` prefetches from recorded predictions (``belady+prefetch``, the oracle,
    prefetches the trace's own routing)."""
    base, prefetching = split_policy(policy)
    return prefetching and base != "belady"


def split_policy(name: str) -> tuple[str, bool]:
    """``"value+prefetch"`` -> ("value", True); ``"lru"`` -> ("lru", False)."""
    if name.endswith(PREFETCH_SUFFIX):
        return name[: -len(PREFETCH_SUFFIX)], True
    return name, False


class StepTimeline:
    """The modeled clock of one step (``tokens`` tokens) over its layers, in seconds from its start.

    ``link``: when the PCIe link is free (absolute); ``ready``: when each prefetched (layer, expert)
    copy lands (absolute); ``expert_start``: when the current layer's experts began (its dense part
    done: what a prediction made from its hidden state is issued at)."""

    def __init__(self, cost: ExpertCost, tokens: int = 1, deferral: int = 0) -> None:
        self.cost, self.tokens, self.deferral = cost, tokens, deferral
        self.clock = self.link = self.carry = self.expert_start = 0.0
        self.ready: dict[tuple[int, int], float] = {}

    @property
    def dense_s(self) -> float:
        """One layer's dense part for this step's tokens."""
        return self.cost.t_dense(self.tokens)

    def run_layer(self, layer: int, experts: np.ndarray, counts: np.ndarray, resident: np.ndarray,
                  max_fetch: int | None) -> LayerPlan:
        """Advance over one layer: its dense part, then its experts as planned."""
        dense = self.dense_s
        self.clock += dense
        self.expert_start = self.clock
        ready = None
        if self.ready:
            ready = np.array([self.ready.get((layer, int(e)), 0.0) - self.clock for e in experts])
        plan = schedule_layer(experts, counts, resident, self.cost, max_fetch=max_fetch,
                              link_free=self.link - self.clock, ready=ready)
        self.link = self.clock + plan.link_free
        span, self.carry = deferred_makespan(plan, self.deferral, self.carry, dense, self.cost)
        self.clock += span
        return plan

    def finish(self) -> float:
        """The step's time: the last layer's deferred work included."""
        self.clock += self.carry
        self.carry = 0.0
        return self.clock


class Prefetcher:
    """Copies of the next layer's predicted experts, issued on a :class:`StepTimeline` into a cache
    (see the module docstring). ``copies``: prefetches issued; ``useful``: those the layer then
    selected."""

    def __init__(self, cache: CachePolicy, cost: ExpertCost) -> None:
        self.cache, self.cost = cache, cost
        self.copies = self.useful = 0
        self._issued: dict[int, list[int]] = {}  # layer -> experts prefetched for it in this step

    @property
    def precision(self) -> float:
        """Share of prefetched experts the layer then selected (a prior of 1/2 before any)."""
        return (self.useful + 1) / (self.copies + 2)

    def issue(self, timeline: StepTimeline, layer: int, predicted: np.ndarray) -> tuple[list[int], list[int]]:
        """Prefetch ``predicted`` experts of ``layer`` (the next one, ids heaviest first, repeats
        allowed) while the previous layer computes; returns (admitted, evicted) ids."""
        tp = self.cost.t_pcie()
        start = max(timeline.link, timeline.expert_start)
        deadline = timeline.clock + timeline.dense_s  # when ``layer``'s experts start
        # copies issued while the previous layer computes (the last may land a little late: the
        # scheduler then waits for it or runs the expert on the CPU)
        room = int(np.ceil(max(0.0, deadline - start) / tp)) if tp > 0 else len(predicted)
        order = list(dict.fromkeys(int(e) for e in np.asarray(predicted).ravel() if e >= 0))
        wanted = [e for e in order if not self.cache.resident[layer, e]]
        worth = self.cache.prefetch_worth(layer, wanted, self.precision)
        if worth is not None:
            wanted = sorted(wanted, key=lambda e: -worth[e])
        wanted = wanted[:room]
        if not wanted:
            return [], []
        admitted, evicted = self.cache.prefetch(layer, wanted, protect=order, worth=worth)
        for i, e in enumerate(admitted):
            timeline.ready[(layer, e)] = start + (i + 1) * tp
        timeline.link = start + len(admitted) * tp
        self.copies += len(admitted)
        self._issued[layer] = admitted
        return admitted, evicted

    def observe(self, layer: int, selected: np.ndarray) -> None:
        """``layer``'s selected experts: count the prefetches for it that were used."""
        issued = self._issued.pop(layer, None)
        if issued:
            self.useful += int(np.isin(issued, np.asarray(selected)).sum())
