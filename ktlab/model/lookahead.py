"""Predict the next layers' experts from the current hidden state (FATE, arXiv 2502.12224; ProMoE).

Before MoE layer l routes, the residual stream ``h`` entering its MoE (after its attention) is
known. Layer l + a's router applied to it, through layer l + a's own pre-MoE norm, names the
experts layer l + a will probably select: FATE reports ~97% for a = 1, because the residual
stream changes little from one layer to the next. :class:`RouterLookahead` adds itself to
every MoE block's ``lookaheads`` hooks and hands each prediction to a sink: ``ktlab record`` stores
them in the trace (:class:`PredictionRecorder`), the live hybrid runtime prefetches from them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ktlab.config import check_positive_ints
from ktlab.model.layers import rms_norm

#: sink(layer, ahead, ids [T, k] int64 numpy, heaviest first): layer ``layer``'s experts as
#: predicted from the hidden state of layer ``layer - ahead``
PredictionSink = Callable[[int, int, np.ndarray], None]


class RouterLookahead:
    """Layer l + a's router (and norm) on layer l's hidden state, for a = 1..``ahead``; see the
    module docstring. :meth:`detach` removes the hooks."""

    def __init__(self, model, ahead: int, sink: PredictionSink) -> None:
        self.ahead = ahead
        check_positive_ints(self, ("ahead",))
        cfg = model.cfg
        self.blocks = model.moe_blocks()
        self.norms = [model.layers[i].ffn_norm for i in cfg.moe_layer_ids]
        self.eps, self.sink = cfg.rms_norm_eps, sink
        for block in self.blocks:
            block.lookaheads.append(self._on_hidden)

    def detach(self) -> None:
        """Remove the hooks from the model."""
        for block in self.blocks:
            if self._on_hidden in block.lookaheads:
                block.lookaheads.remove(self._on_hidden)

    def predict(self, layer: int, h: torch.Tensor, ahead: int) -> np.ndarray:
        """[T, k] experts of MoE layer ``layer + ahead`` predicted from ``h`` [T, H] entering
        layer ``layer``'s MoE (heaviest first)."""
        target = layer + ahead
        ids, weights = self.blocks[target].route(rms_norm(h, self.norms[target], self.eps))
        order = torch.argsort(weights, dim=-1, descending=True, stable=True)
        return ids.gather(1, order).cpu().numpy().astype(np.int64)

    def _on_hidden(self, layer: int, h: torch.Tensor) -> None:
        with torch.inference_mode():
            for a in range(1, self.ahead + 1):
                if layer + a < len(self.blocks):
                    self.sink(layer + a, a, self.predict(layer, h, a))


class PredictionRecorder:
    """A :data:`PredictionSink` that keeps every prediction, in token order, for a trace."""

    def __init__(self, num_layers: int, ahead: int, top_k: int) -> None:
        self.L, self.A, self.k = num_layers, ahead, top_k
        self._rows: list[list[list[np.ndarray]]] = [[[] for _ in range(ahead)] for _ in range(num_layers)]

    def __call__(self, layer: int, ahead: int, ids: np.ndarray) -> None:
        self._rows[layer][ahead - 1].append(np.asarray(ids, dtype=np.int16).reshape(-1, self.k))

    def predicted(self, tokens: int) -> np.ndarray:
        """[tokens, L, A, k] int16 (-1 where no earlier layer predicts)."""
        out = np.full((tokens, self.L, self.A, self.k), -1, dtype=np.int16)
        for layer in range(self.L):
            for a in range(self.A):
                if self._rows[layer][a]:
                    rows = np.concatenate(self._rows[layer][a])[:tokens]
                    out[: len(rows), layer, a] = rows
        return out
