"""Static expert placements: which experts of which layers live on the GPU.

A placement is a boolean mask ``gpu[L, E]`` (True: resident in VRAM) under a budget of
``budget`` expert slots in total. The strategies are KTransformers' four (``uniform``,
``frequency``, ``front-loading``, ``random``) plus a hot/cold ``threshold`` on activation
frequency, and :class:`Redistributor` re-places from the statistics gathered so far every N
tokens (runtime redistribution). Pure numpy: no torch here.

Budgets are counted in experts (all experts of a model have the same size); see
:func:`budget_from_fraction` and :func:`budget_from_bytes` to get one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("uniform", "frequency", "front-loading", "random", "threshold")


@dataclass(frozen=True)
class ExpertPlacement:
    """Where every expert lives: ``gpu[L, E]`` True for VRAM-resident experts.

    ``strategy`` names how it was made, ``counts`` (optional, [L, E]) the activation counts it
    was made from (exported with it, e.g. for KTransformers' ``--init-expert-location``).
    """

    gpu: np.ndarray
    strategy: str = "custom"
    counts: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        gpu = np.asarray(self.gpu)
        if gpu.ndim != 2 or gpu.dtype != bool:
            raise ValueError(f"ExpertPlacement.gpu must be a bool array [layers, experts], got {gpu.dtype} {gpu.shape}")
        if self.counts is not None and np.shape(self.counts) != gpu.shape:
            raise ValueError(f"ExpertPlacement.counts shape {np.shape(self.counts)} != gpu shape {gpu.shape}")

    @property
    def num_layers(self) -> int:
        """Layers L."""
        return self.gpu.shape[0]

    @property
    def num_experts(self) -> int:
        """Experts per layer E."""
        return self.gpu.shape[1]

    @property
    def num_gpu_experts(self) -> int:
        """Experts resident on the GPU, over all layers."""
        return int(self.gpu.sum())

    def gpu_experts(self, layer: int) -> np.ndarray:
        """Sorted expert ids of ``layer`` on the GPU."""
        return np.flatnonzero(self.gpu[layer])

    def hit_rate(self, counts: np.ndarray) -> float:
        """Share of the activations in ``counts`` [L, E] that this placement serves from the GPU."""
        total = counts.sum()
        return float((counts * self.gpu).sum() / total) if total else 0.0


def budget_from_fraction(fraction: float, num_layers: int, num_experts: int) -> int:
    """Expert slots for ``fraction`` (0..1) of all ``num_layers * num_experts`` experts."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"budget fraction must be in [0, 1], got {fraction}")
    return int(round(fraction * num_layers * num_experts))


def budget_from_bytes(vram_bytes: float, expert_bytes: int, num_layers: int, num_experts: int) -> int:
    """Expert slots that fit in ``vram_bytes`` (capped at every expert of the model)."""
    if vram_bytes < 0 or expert_bytes <= 0:
        raise ValueError(f"need vram_bytes >= 0 and expert_bytes > 0, got {vram_bytes}, {expert_bytes}")
    return int(min(vram_bytes // expert_bytes, num_layers * num_experts))


def _check_budget(budget: int, num_layers: int, num_experts: int) -> None:
    if not (isinstance(budget, (int, np.integer)) and 0 <= budget <= num_layers * num_experts):
        raise ValueError(f"budget must be an integer in [0, {num_layers * num_experts}] experts, got {budget!r}")


def even_split(budget: int, num_layers: int, num_experts: int) -> np.ndarray:
    """Per-layer slots as equal as possible (earlier layers take the remainder)."""
    per = np.full(num_layers, budget // num_layers)
    per[: budget % num_layers] += 1
    return np.minimum(per, num_experts)


def _top_by_layer(scores: np.ndarray, per_layer: np.ndarray) -> np.ndarray:
    """Mask with the ``per_layer[l]`` highest-scoring experts of each layer (ties: lower id)."""
    gpu = np.zeros(scores.shape, dtype=bool)
    for layer, n in enumerate(per_layer):
        order = np.lexsort((np.arange(scores.shape[1]), -scores[layer]))
        gpu[layer, order[: int(n)]] = True
    return gpu


def uniform(budget: int, counts: np.ndarray) -> ExpertPlacement:
    """The same number of GPU experts in every layer, chosen without the counts: a neutral baseline
    (KTransformers' uniform allocation). Each layer's ids are evenly spaced from a start rotated by
    the golden ratio from layer to layer, so no id range (such as the lowest ids) is favoured."""
    L, E = counts.shape
    _check_budget(budget, L, E)
    gpu = np.zeros((L, E), dtype=bool)
    for layer, n in enumerate(even_split(budget, L, E)):
        start = int(layer * 0.6180339887 * E) % E
        gpu[layer, (start + np.arange(int(n)) * E // max(int(n), 1)) % E] = True
    return ExpertPlacement(gpu, "uniform", counts)


def frequency(budget: int, counts: np.ndarray) -> ExpertPlacement:
    """The ``budget`` most used experts of the whole model (layers get what their counts earn).

    Counts are compared as shares of each layer's activations, so every layer's tokens weigh
    the same even when traces cover layers unevenly.
    """
    L, E = counts.shape
    _check_budget(budget, L, E)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    flat = np.lexsort((np.arange(L * E), -share.ravel()))[:budget]
    gpu = np.zeros(L * E, dtype=bool)
    gpu[flat] = True
    return ExpertPlacement(gpu.reshape(L, E), "frequency", counts)


def front_loading(budget: int, counts: np.ndarray) -> ExpertPlacement:
    """Whole layers from the first on (most used experts first in the last, partial layer)."""
    L, E = counts.shape
    _check_budget(budget, L, E)
    per = np.zeros(L, dtype=int)
    full, rest = divmod(budget, E)
    per[:full] = E
    if full < L:
        per[full] = rest
    return ExpertPlacement(_top_by_layer(counts, per), "front-loading", counts)


def random(budget: int, counts: np.ndarray, seed: int = 0) -> ExpertPlacement:
    """``budget`` experts drawn uniformly at random (seeded) from the whole model."""
    L, E = counts.shape
    _check_budget(budget, L, E)
    gpu = np.zeros(L * E, dtype=bool)
    gpu[np.random.default_rng(seed).choice(L * E, size=budget, replace=False)] = True
    return ExpertPlacement(gpu.reshape(L, E), "random", counts, {"seed": seed})


def threshold(budget: int, counts: np.ndarray, t: float) -> ExpertPlacement:
    """Hot/cold split: experts whose activation frequency (share of their layer's
    activations) exceeds ``t`` go to the GPU, the hottest first while the budget lasts."""
    L, E = counts.shape
    _check_budget(budget, L, E)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold t must be a frequency in [0, 1], got {t}")
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    hot = share.ravel() > t
    order = np.lexsort((np.arange(L * E), -share.ravel()))
    chosen = order[hot[order]][:budget]
    gpu = np.zeros(L * E, dtype=bool)
    gpu[chosen] = True
    return ExpertPlacement(gpu.reshape(L, E), "threshold", counts, {"t": t})


def make_placement(strategy: str, budget: int, counts: np.ndarray, **params) -> ExpertPlacement:
    """The placement ``strategy`` (one of :data:`STRATEGIES`) at ``budget`` experts from ``counts``."""
    builders: dict[str, Callable[..., ExpertPlacement]] = {
        "uniform": uniform, "frequency": frequency, "front-loading": front_loading, "random": random,
        "threshold": threshold,
    }
    if strategy not in builders:
        raise ValueError(f"unknown placement strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    if strategy == "threshold" and "t" not in params:
        raise ValueError("the threshold strategy needs t= (an activation frequency in [0, 1])")
    return builders[strategy](budget, np.asarray(counts), **params)


@dataclass
class Redistributor:
    """Runtime redistribution: every ``every`` tokens, re-place from the counts seen so far.

    Feed it each token's routing with :meth:`observe`; :attr:`placement` is the current one.
    Starts from ``initial`` (or the strategy applied to empty counts: ties -> lowest ids).
    """

    strategy: str
    budget: int
    num_layers: int
    num_experts: int
    every: int = 128
    initial: ExpertPlacement | None = None
    params: dict = field(default_factory=dict)
    counts: np.ndarray = field(init=False)
    placement: ExpertPlacement = field(init=False)
    tokens: int = field(init=False, default=0)
    changes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"Redistributor.every must be >= 1 token, got {self.every}")
        self.counts = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        self.placement = self.initial or make_placement(self.strategy, self.budget, self.counts, **self.params)

    def observe(self, token_experts: np.ndarray) -> bool:
        """Count one token's experts [L, k]; returns True when this token triggered a re-placement."""
        np.add.at(self.counts, (np.arange(self.num_layers)[:, None], token_experts), 1)
        self.tokens += 1
        if self.tokens % self.every:
            return False
        new = make_placement(self.strategy, self.budget, self.counts, **self.params)
        self.changes += int((new.gpu != self.placement.gpu).sum() // 2)
        self.placement = new
        return True
