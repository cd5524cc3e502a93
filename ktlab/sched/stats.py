"""Activation statistics and routing traces (pure numpy; the model feeds it through an observer).

A trace is an int16 array [tokens, layers, k] of selected expert ids, in token order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingRecorder:
    """Collects routing decisions from ``Model.add_route_observer`` into a trace.

    Works for prefill (many tokens per call) and decode (one per call) alike: rows of each
    layer are appended in order, so row i of every layer is the same token.
    """

    num_layers: int
    top_k: int
    _rows: list[list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        self._rows = [[] for _ in range(self.num_layers)]

    def __call__(self, layer: int, ids, weights) -> None:
        """The observer: ``ids`` [T, k] (torch or numpy) for ``layer``."""
        self._rows[layer].append(np.asarray(ids, dtype=np.int16).reshape(-1, self.top_k))

    def trace(self) -> np.ndarray:
        """[tokens, layers, k] int16."""
        per_layer = [np.concatenate(r) if r else np.zeros((0, self.top_k), np.int16) for r in self._rows]
        n = min(len(r) for r in per_layer)
        return np.stack([r[:n] for r in per_layer], axis=1)


def activation_counts(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, experts] number of times each expert was selected."""
    tokens, layers, k = trace.shape
    counts = np.zeros((layers, num_experts), dtype=np.int64)
    for layer in range(layers):
        counts[layer] = np.bincount(trace[:, layer].ravel().astype(np.int64), minlength=num_experts)
    return counts


def reuse_rate(trace: np.ndarray, window: int = 1) -> np.ndarray:
    """Per layer: mean fraction of a token's experts already selected within the previous ``window`` tokens."""
    tokens, layers, k = trace.shape
    if tokens <= window:
        return np.zeros(layers)
    rates = np.zeros(layers)
    for layer in range(layers):
        sel = trace[:, layer]
        hits = 0
        for t in range(window, tokens):
            recent = sel[t - window : t].ravel()
            hits += np.isin(sel[t], recent).sum()
        rates[layer] = hits / ((tokens - window) * k)
    return rates


def top_share(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per layer: share of all activations taken by the most-used ``fraction`` of experts."""
    n = max(1, int(round(counts.shape[1] * fraction)))
    ordered = -np.sort(-counts, axis=1)
    return ordered[:, :n].sum(axis=1) / np.maximum(counts.sum(axis=1), 1)
