"""The GPU as an expert cache: which experts stay resident in VRAM, under a budget.

Each layer has ``capacity[l]`` expert slots. A step is one token, or one batched model step of
several tokens (a serving step: decode tokens of many sequences and prefill chunks): the
router's selected experts ``S`` [L, m] (m = tokens x k, every token's choices side by side; an
expert may appear several times in a row) are looked up *together* (``hits`` are the selected
experts resident before the step, per (token, slot); a miss runs on the CPU or is fetched, as
the scheduler decides), then the policy picks the resident set for the next step from the old
residents and ``S``: it may admit some of ``S`` (each admission is one PCIe transfer) and evict
others. The budget is never exceeded. Statistics count steps, not tokens: an expert chosen by
several tokens of one step was used once in that step (at its heaviest routing weight).

Policies (all vectorised over layers, one call per step):

- ``lru``: demand caching, every miss admitted; evicts the least recently used (within a step,
  the lower routing weight counts as older);
- ``lfu``: demand caching; evicts the least frequently used (counts over the whole history,
  ties by recency);
- ``value``: value-driven (ours, see docs/scheduling.md). Each expert's value is the
  probability that the next step selects it, predicted online from its recency (steps since
  last use, bucketed) and its decayed frequency (bucketed), by a table of observed outcomes
  shared by all layers and learned as the trace goes; times the CPU-vs-GPU time one use saves.
  It keeps the highest-value experts, and admits a non-resident only when its value beats the
  resident it would replace by ``margin`` (the transfer cost per expected saving), so that
  transfers that do not pay are not made;
- ``belady``: the offline optimum for hits (needs the whole trace): keeps the experts whose
  next use is soonest, and bypasses (does not admit) experts used later than every resident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lfu", "value", "belady")
NEVER = 1 << 40


@dataclass
class StepResult:
    """What one step did: ``hits`` [L, k] (selected and resident before the step),
    ``admitted`` / ``evicted`` [L, E] (residency changes made after it)."""

    hits: np.ndarray
    admitted: np.ndarray
    evicted: np.ndarray


def _keep_top(candidates: np.ndarray, key: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Mask of the ``capacity[l]`` candidates with the largest key in each layer."""
    masked = np.where(candidates, key, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(key.shape[1])[None, :].repeat(key.shape[0], 0), axis=1)
    return candidates & (rank < capacity[:, None])


class CachePolicy:
    """Base: residency state [L, E] and the bookkeeping all policies share."""

    name = "base"

    def __init__(self, num_layers: int, num_experts: int, capacity, initial: np.ndarray | None = None) -> None:
        cap = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (num_layers,)).copy()
        if np.any(cap < 0) or np.any(cap > num_experts):
            raise ValueError(f"cache capacity per layer must be in [0, {num_experts}], got {capacity!r}")
        self.L, self.E, self.capacity = num_layers, num_experts, cap
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)
        if initial is not None:
            if np.any(initial.sum(axis=1) > cap):
                raise ValueError("initial residency exceeds the cache capacity")
            self.resident = initial.astype(bool).copy()
        self.t = 0
        self._rows = np.arange(num_layers)[:, None]

    def step(self, ids: np.ndarray, weights: np.ndarray | None = None, forced: np.ndarray | None = None,
             admit: bool = True) -> StepResult:
        """Look up ``ids`` [L, m] (one token: m = k; a batched step of n tokens: m = n x k),
        then update residency. ``weights`` [L, m] (routing weights) break ties (None: equal);
        ``forced`` [L, E]: experts that must be resident after the step (the scheduler fetched
        them), at most ``capacity`` per layer. ``admit`` False: no demand admissions (only
        ``forced`` experts come in: with a prefetcher, copies are made before use instead)."""
        ids = np.asarray(ids, dtype=np.int64)
        if weights is None:
            weights = np.ones(ids.shape, dtype=np.float32)
        hits = self.resident[self._rows, ids]
        selected = np.zeros_like(self.resident)
        selected[self._rows, ids] = True
        candidates, key = self._keys(ids, np.asarray(weights, dtype=np.float64), selected)
        if not admit:
            candidates = candidates & self.resident
        if forced is not None:
            candidates = candidates | forced
            key = np.where(forced, np.inf, key)
        new = _keep_top(candidates, key, self.capacity)
        assert np.all(new.sum(axis=1) <= self.capacity), "cache budget exceeded"
        result = StepResult(hits, new & ~self.resident, self.resident & ~new)
        self.resident = new
        self.t += 1
        return result

    def _keys(self, ids: np.ndarray, weights: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Update the policy's statistics with this step; return (candidates, key) [L, E]:
        the next resident set is the ``capacity`` candidates with the largest keys."""
        raise NotImplementedError

    def retention(self) -> np.ndarray:
        """[L, E] how much each expert is worth keeping now, in the policy's own order (higher:
        keep); what a prefetch evicts by."""
        raise NotImplementedError

    def prefetch_worth(self, layer: int, experts: list[int], precision: float) -> dict[int, float] | None:
        """What a prefetch of each of ``experts`` (predicted for ``layer``, right with ``precision``)
        is worth against a victim's :meth:`retention`; None: any prefetch beats any victim."""
        return None

    def prefetch(self, layer: int, experts, protect=(),
                 worth: dict[int, float] | None = None) -> tuple[list[int], list[int]]:
        """Make ``experts`` (in order) of ``layer`` resident within a step, before that layer's
        lookup (a prefetch: :mod:`ktlab.sched.prefetch`). Each takes a free slot, or evicts the
        resident with the lowest :meth:`retention` that is not in ``protect`` (and, when ``worth``
        is given, whose retention is below the expert's worth; else it is skipped). The budget is
        never exceeded. Returns (admitted ids, evicted ids)."""
        resident, keep = self.resident[layer], self.retention()[layer]
        guarded = np.zeros(self.E, dtype=bool)
        guarded[np.asarray(list(protect), dtype=np.int64)] = True
        admitted, evicted = [], []
        for e in experts:
            e = int(e)
            if resident[e]:
                continue
            if resident.sum() >= self.capacity[layer]:
                spare = np.flatnonzero(resident & ~guarded)
                if worth is not None:
                    spare = spare[keep[spare] < worth[e]]
                if not len(spare):
                    continue
                victim = int(spare[np.argmin(keep[spare])])
                resident[victim] = False
                evicted.append(victim)
            resident[e] = True
            guarded[e] = True  # a prefetched expert is not the next one's victim
            admitted.append(e)
        return admitted, evicted

    def _weight_rank(self, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """[L, E] in (0, 1]: a selected expert's routing weight rank (1 = heaviest), 0 elsewhere;
        an expert selected several times in the step (by several tokens) takes its best rank."""
        out = np.zeros((self.L, self.E))
        rank = np.argsort(np.argsort(-weights, axis=1, kind="stable"), axis=1)
        rows = np.broadcast_to(self._rows, ids.shape)
        np.maximum.at(out, (rows, ids), 1.0 - rank / (ids.shape[1] + 1))  # = plain assignment without repeats
        return out


class LRU(CachePolicy):
    """Least recently used, demand caching."""

    name = "lru"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stamp = np.zeros((self.L, self.E))

    def _keys(self, ids, weights, selected):
        self.stamp = np.where(selected, self.t + 1 + self._weight_rank(ids, weights), self.stamp)
        return self.resident | selected, self.stamp

    def retention(self) -> np.ndarray:
        """Recency."""
        return self.stamp


class LFU(CachePolicy):
    """Least frequently used (whole-history counts, ties by recency), demand caching."""

    name = "lfu"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count = np.zeros((self.L, self.E))
        self.stamp = np.zeros((self.L, self.E))

    def _keys(self, ids, weights, selected):
        self.count += selected
        self.stamp = np.where(selected, self.t + 1 + self._weight_rank(ids, weights), self.stamp)
        key = self.retention()
        key = np.where(selected, 1e12 + key, key)  # demand caching: this step's experts go in first
        return self.resident | selected, key

    def retention(self) -> np.ndarray:
        """Use count, recency breaking ties (< 1)."""
        return self.count + self.stamp / (self.t + 3)


# Recency buckets: steps since last use 1..8 each, then 9-16, 17-32, 33-64, 65-128, >128, never.
_AGE_EDGES = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33, 65, 129, NEVER])
_FREQ_OCTAVES = 10  # uses-per-step rates from 2^-10 to 1
_FREQ_PER_OCTAVE = 1
_FREQ_BUCKETS = _FREQ_OCTAVES * _FREQ_PER_OCTAVE


class ValueDriven(CachePolicy):
    """Value-driven residency: predicted next-step use x time saved, with an admission margin.

    ``half_life`` (steps) sets the decay of the frequency estimate; ``margin`` is in units of
    probability (0: pure hit-rate maximisation; the simulator sets it to transfer cost /
    (saving per hit x expected residency)); ``saving`` [L] scales values per layer.
    """

    name = "value"

    def __init__(self, *args, half_life: float = 64.0, margin: float = 0.0, saving=None, prior_weight: float = 4.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if half_life <= 0 or margin < 0:
            raise ValueError(f"ValueDriven needs half_life > 0 and margin >= 0, got {half_life}, {margin}")
        self.decay = 0.5 ** (1.0 / half_life)
        self.margin = margin
        self.saving = np.ones(self.L) if saving is None else np.broadcast_to(np.asarray(saving, float), (self.L,))
        self.last = np.full((self.L, self.E), -NEVER, dtype=np.int64)
        self.freq = np.zeros((self.L, self.E))  # decayed use count
        n_buckets = len(_AGE_EDGES) * _FREQ_BUCKETS
        self.seen = np.zeros(n_buckets)
        self.used = np.zeros(n_buckets)
        self.prior_weight = prior_weight
        self._bucket = self._buckets()

    def _buckets(self) -> np.ndarray:
        """[L, E] table cell of every expert for the *next* step."""
        age = np.minimum(self.t + 1 - self.last, NEVER - 1)
        age_b = np.searchsorted(_AGE_EDGES, age, side="right") - 1
        # uses per step, bias-corrected while fewer steps than the decay window have been seen
        rate = self.freq * (1.0 - self.decay) / (1.0 - self.decay ** (self.t + 1))
        octave = np.log2(np.maximum(rate, 1e-9)) + _FREQ_OCTAVES
        freq_b = np.clip(np.floor(octave * _FREQ_PER_OCTAVE), 0, _FREQ_BUCKETS - 1)
        return age_b * _FREQ_BUCKETS + freq_b.astype(np.int64)

    def predicted(self) -> np.ndarray:
        """[L, E] predicted probability that each expert is selected in the next step."""
        seen = self.seen.sum()
        prior = self.used.sum() / seen if seen else 1.0 / self.E  # the selected share of cells: k / E
        p = (self.used + self.prior_weight * prior) / (self.seen + self.prior_weight)
        return p[self._bucket]

    def _keys(self, ids, weights, selected):
        # learn: the bucket every expert was in before this step, and whether it was selected
        n = len(self.seen)
        self.seen += np.bincount(self._bucket.ravel(), minlength=n)
        self.used += np.bincount(self._bucket.ravel(), weights=selected.ravel().astype(float), minlength=n)
        self.freq = self.freq * self.decay + selected
        self.last = np.where(selected, self.t, self.last)
        self._bucket = self._buckets()  # self.t is still this step: buckets for the next one
        value = self.predicted() * self.saving[:, None]
        value = value + 1e-6 * self._weight_rank(ids, weights)  # ties: heavier routing weight
        value = np.where(self.resident, value, value - self.margin * self.saving[:, None])
        return self.resident | selected, value

    def retention(self) -> np.ndarray:
        """Predicted use in the step under way x the time a use saves (the value)."""
        return self.predicted() * self.saving[:, None]

    def prefetch_worth(self, layer: int, experts: list[int], precision: float) -> dict[int, float]:
        """Resident now, a predicted expert is used in this step as often as predictions come true and
        in the next as its value says; a victim only in the next."""
        p = self.predicted()[layer]
        return {e: (precision + p[e]) * float(self.saving[layer]) for e in experts}


class Belady(CachePolicy):
    """Belady's offline optimum (with bypass): keeps the experts used again soonest.

    ``future`` is the whole trace [steps, L, k] the policy will be stepped through.
    """

    name = "belady"

    def __init__(self, *args, future: np.ndarray, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.next_use = next_uses(np.asarray(future), self.E)

    def _keys(self, ids, weights, selected):
        nxt = self.next_use[self.t] if self.t < len(self.next_use) else np.full((self.L, self.E), NEVER)
        key = -nxt.astype(np.float64) + 0.5 * self._weight_rank(ids, weights)
        return self.resident | (selected & (nxt < NEVER)), key  # bypass: never admit the unused

    def retention(self) -> np.ndarray:
        """Sooner next use (after the step under way) first."""
        if self.t >= len(self.next_use):
            return np.full((self.L, self.E), -float(NEVER))
        return -self.next_use[self.t].astype(np.float64)


def next_uses(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """[steps, L, E] int64: the first step after t at which each expert is selected (NEVER if none)."""
    steps, L, _ = trace.shape
    out = np.full((steps, L, num_experts), NEVER, dtype=np.int64)
    rows = np.arange(L)[:, None]
    nxt = np.full((L, num_experts), NEVER, dtype=np.int64)
    for t in range(steps - 1, -1, -1):
        out[t] = nxt
        nxt = nxt.copy()
        nxt[rows, trace[t].astype(np.int64)] = t
    return out


def value_margin(cost, horizon: float) -> float:
    """The value policy's admission margin: one copy's time over the saving of ``horizon``
    uses (an admission must be expected to pay for its transfer)."""
    return cost.t_pcie() / max(cost.saving(1) * horizon, 1e-12)


def make_policy(name: str, num_layers: int, num_experts: int, capacity, trace: np.ndarray | None = None,
                **params) -> CachePolicy:
    """A policy by name (one of :data:`POLICIES`); ``belady`` needs the ``trace`` it will see."""
    if name == "lru":
        return LRU(num_layers, num_experts, capacity, **params)
    if name == "lfu":
        return LFU(num_layers, num_experts, capacity, **params)
    if name == "value":
        return ValueDriven(num_layers, num_experts, capacity, **params)
    if name == "belady":
        if trace is None:
            raise ValueError("the belady policy is offline: it needs the whole trace (trace=...)")
        return Belady(num_layers, num_experts, capacity, future=trace, **params)
    raise ValueError(f"unknown cache policy {name!r}; one of {', '.join(POLICIES)}")


def hit_rate(trace: np.ndarray, policy: str, capacity, num_experts: int, weights: np.ndarray | None = None,
             **params) -> float:
    """Share of the trace's (token, layer, slot) lookups that hit, replaying it through ``policy``."""
    steps, L, k = trace.shape
    cache = make_policy(policy, L, num_experts, capacity, trace=trace, **params)
    hits = 0
    for t in range(steps):
        hits += int(cache.step(trace[t], None if weights is None else weights[t]).hits.sum())
    return hits / (steps * L * k)
