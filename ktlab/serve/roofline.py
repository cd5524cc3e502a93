"""The bandwidth-bound ideal of decode steps: what a step must read, and how fast that could go.

A decode step of B sequences reads, once, every expert its tokens select (the distinct ones per
layer: with random routing E * (1 - (1 - k/E)^B), far fewer than B * k) plus the dense weights
as stored. At the machine's read bandwidth that takes bytes / bandwidth seconds: the ideal.
The engine counts those bytes per step (:class:`StepBytes`, a route observer) so the server's
metrics and ``ktlab bench-serve`` put the ideal beside the measured speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the bench client imports this module and needs no torch
    import torch


def versus_ideal(tokens: float, nbytes: float, seconds: float, bandwidth_gbs: float) -> dict[str, float]:
    """Decode steps that made ``tokens`` tokens in ``seconds`` and had to read ``nbytes`` of
    weights, against reading them at ``bandwidth_gbs``: measured_tps, ideal_tps (tokens / (bytes
    / bandwidth)) and share_of_ideal (0 where nothing was measured)."""
    ideal_s = nbytes / (bandwidth_gbs * 1e9)
    return {
        "measured_tps": tokens / seconds if seconds > 0 else 0.0,
        "ideal_tps": tokens / ideal_s if ideal_s > 0 else 0.0,
        "share_of_ideal": ideal_s / seconds if seconds > 0 else 0.0,
    }


class StepBytes:
    """Counts the weight bytes of the model's last forward call: the distinct experts selected
    in each layer (it watches the router) times their stored size, plus the dense weights."""

    def __init__(self, model) -> None:
        self.dense_bytes = model.dense_weight_bytes()
        self.expert_bytes = model.expert_bytes()
        self._distinct = np.zeros(model.cfg.num_layers, dtype=np.int64)
        model.add_route_observer(self)

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Route observer: remember how many distinct experts this layer's tokens chose."""
        self._distinct[layer] = len(np.unique(ids.numpy()))

    def take(self) -> int:
        """Bytes the last call had to read (and forget its expert counts)."""
        total = self.dense_bytes + int(self._distinct.sum()) * self.expert_bytes
        self._distinct[:] = 0
        return total
