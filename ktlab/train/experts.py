"""Gradients through frozen quantized experts: a torch ``autograd.Function`` over the C++ engine.

Forward is the engine's fused layer call (the stored blocks, as inference runs them). Backward
recomputes, per expert with tokens, the gate and up products on the engine's own kernels
(``CpuExperts.expert_gate_up``: the forward's values), takes the
activation's gradient in torch (SwiGLU, or gpt-oss's clamped form with its biases: the layer's
``ExpertMlp``), and returns the input gradient through the transposed products of the stored rows
(``ktlab.kernels.quant_matmul_t``: a row dequantized at a time, never a whole matrix) and the routing
weights' gradient (each slot's expert output against the output gradient). The weights stay frozen;
nothing is dequantized whole.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ktlab.kernels import CpuExperts, quant_matmul_t
from ktlab.model.layers import SWIGLU, ExpertMlp


class FrozenExperts:
    """One layer's experts for training: the engine for forward, the raw rows for backward."""

    def __init__(self, engine: CpuExperts, gate, up, down, mlp: ExpertMlp = SWIGLU) -> None:
        self.engine, self.mlp = engine, mlp
        self.seconds = 0.0  # time spent in forward and backward (for "where the time goes")
        self.fmt_gu, self.fmt_down = _format(gate), _format(down)
        E = engine.n_experts
        self.gate, self.up, self.down = (np.ascontiguousarray(t.data).reshape(E, int(t.shape[1]), -1).view(np.uint8)
                                         for t in (gate, up, down))

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum, differentiable in ``x`` and ``weights``."""
        return _FrozenExpertsFn.apply(x, weights, ids, self)

    def backward(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                 dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dx [T, H], dweights [T, k]) of the layer's output gradient ``dy`` [T, H]."""
        t0 = time.perf_counter()
        dx = np.zeros_like(x)
        dw = np.zeros_like(weights)
        down_bias = self.mlp.down_bias
        for e in np.unique(ids).tolist():
            tok, slot = np.nonzero(ids == e)  # a token picks an expert once: tok has no repeats
            xe = x[tok]
            g, u = (torch.from_numpy(t).requires_grad_() for t in self.engine.expert_gate_up(e, xe))
            with torch.enable_grad():  # backward runs with grad mode off
                h = self.mlp.hidden(g, u, e)
            # dz = dy . W_down: the routing weight's gradient is dz . h (+ dy . bias) = dy . expert output,
            # without recomputing the output; the hidden state's is w * dz
            dz = quant_matmul_t(self.down[e], dy[tok], self.fmt_down)
            dw[tok, slot] = np.einsum("ti,ti->t", dz, h.detach().numpy())
            if down_bias is not None:
                dw[tok, slot] += dy[tok] @ down_bias[e].float().numpy()
            dh = dz * weights[tok, slot][:, None]
            dg, du = torch.autograd.grad(h, (g, u), torch.from_numpy(dh))
            dx[tok] += quant_matmul_t(self.gate[e], dg.numpy(), self.fmt_gu) + \
                quant_matmul_t(self.up[e], du.numpy(), self.fmt_gu)
        self.seconds += time.perf_counter() - t0
        return dx, dw


class _FrozenExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, experts: FrozenExperts):
        t0 = time.perf_counter()
        xs = x.detach().float().contiguous()
        ws = weights.detach().float().contiguous()
        out = experts.engine.forward(xs, ids, ws)
        experts.seconds += time.perf_counter() - t0
        ctx.save_for_backward(xs, ws, ids)
        ctx.experts = experts
        return torch.from_numpy(out).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xs, ws, ids = ctx.saved_tensors
        dx, dw = ctx.experts.backward(xs.numpy(), ids.numpy(), ws.numpy(), dy.float().contiguous().numpy())
        return torch.from_numpy(dx).to(dy.dtype), torch.from_numpy(dw).to(dy.dtype), None, None


def _format(t) -> str:
    """The MoE kernel format name of a raw tensor's GGML type."""
    from ktlab.kernels import _FORMAT_OF_QTYPE

    qtype = int(t.qtype)
    if qtype not in _FORMAT_OF_QTYPE:
        raise ValueError(f"experts of GGML type {qtype} cannot be fine-tuned (Q8_0, K-quants, MXFP4, BF16)")
    return _FORMAT_OF_QTYPE[qtype]
