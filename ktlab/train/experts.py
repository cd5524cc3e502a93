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

from ktlab.kernels import CpuExperts, quant_matmul_t, quant_matmul_t2
from ktlab.model.layers import SWIGLU, ExpertMlp, torch_threads


class FrozenExperts:
    """One layer's experts for training: the engine for forward, the raw rows for backward."""

    def __init__(self, engine: CpuExperts, gate, up, down, mlp: ExpertMlp = SWIGLU) -> None:
        self.engine, self.mlp = engine, mlp
        self.seconds = 0.0  # time spent in forward and backward (for "where the time goes")
        self.fmt_gu, self.fmt_down = _format(gate), _format(down)
        E = engine.n_experts
        self.gate, self.up, self.down = (np.ascontiguousarray(t.data).reshape(E, int(t.shape[1]), -1).view(np.uint8)
                                         for t in (gate, up, down))

    @classmethod
    def of_layer(cls, moe, weights, block: int) -> FrozenExperts:
        """Those of MoE block ``moe`` (GGUF block ``block``): its C++ engine, the stored rows of
        ``weights`` (``open_weights``), its MLP form."""
        raw = [weights.raw(f"blk.{block}.ffn_{kind}_exps.weight") for kind in ("gate", "up", "down")]
        return cls(moe.backends["cpu"].experts, *raw, moe.mlp)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum, differentiable in ``x`` and ``weights``."""
        return _FrozenExpertsFn.apply(x, weights, ids, self)

    def backward(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                 dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dx [T, H], dweights [T, k]) of the layer's output gradient ``dy`` [T, H]."""
        t0 = time.perf_counter()
        with torch_threads(1):  # tiny torch ops between kernel calls: no OpenMP workers spin on the pool's cores
            dx, dw = self._backward(x, ids, weights, dy)
        self.seconds += time.perf_counter() - t0
        return dx, dw

    def _backward(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                  dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx = np.zeros_like(x)
        dw = np.zeros_like(weights)
        down_bias = self.mlp.down_bias
        plain = self.mlp is SWIGLU  # silu(g) * u: its derivative in closed form, no autograd per expert
        for e in np.unique(ids).tolist():
            tok, slot = np.nonzero(ids == e)  # a token picks an expert once: tok has no repeats
            g, u = self.engine.expert_gate_up(e, x[tok])
            if plain:
                with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g: sig -> 0, as it should
                    sig = 1.0 / (1.0 + np.exp(-g))
                h = g * sig * u
            else:
                g, u = torch.from_numpy(g).requires_grad_(), torch.from_numpy(u).requires_grad_()
                with torch.enable_grad():  # backward runs with grad mode off
                    h_t = self.mlp.hidden(g, u, e)
                h = h_t.detach().numpy()
            # dz = dy . W_down: the routing weight's gradient is dz . h (+ dy . bias) = dy . expert output,
            # without recomputing the output; the hidden state's is w * dz
            dz = quant_matmul_t(self.down[e], dy[tok], self.fmt_down)
            dw[tok, slot] = np.einsum("ti,ti->t", dz, h)
            if down_bias is not None:
                dw[tok, slot] += dy[tok] @ down_bias[e].float().numpy()
            dh = dz * weights[tok, slot][:, None]
            if plain:
                dg, du = dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig
            else:
                dg, du = (t.numpy() for t in torch.autograd.grad(h_t, (g, u), torch.from_numpy(dh)))
            dx[tok] += quant_matmul_t2(self.gate[e], dg, self.up[e], du, self.fmt_gu)
        return dx, dw


class _FrozenExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, experts: FrozenExperts):
        t0 = time.perf_counter()
        xs = x.detach().float().contiguous()
        ws = weights.detach().float().contiguous()
        with torch_threads(1):  # the engine's pool gets the cores (idle OpenMP workers spin otherwise)
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


class _FrozenLinearFn(torch.autograd.Function):
    """``y = x W^T`` for a frozen block-format W: forward on the block kernels, backward through the
    transposed product (no gradient for W)."""

    @staticmethod
    def forward(ctx, x, forward_fn, backward_fn):
        ctx.backward_fn = backward_fn
        return torch.from_numpy(forward_fn(x.detach().float().contiguous().numpy())).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        return torch.from_numpy(ctx.backward_fn(dy.float().contiguous().numpy())).to(dy.dtype), None, None


class ExpertLora:
    """LoRA adapters on every expert's gate, up and down of one layer: A [E, r, in] (Kaiming-uniform,
    like PEFT), B [E, out, r] (zeros), ``scale`` = alpha / r."""

    def __init__(self, n_experts: int, hidden: int, inter: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        import math

        self.rank, self.alpha = rank, alpha
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        self.A, self.B = {}, {}
        for name, (out_features, in_features) in shapes.items():
            a = torch.empty(n_experts, rank, in_features)
            for e in range(n_experts):
                torch.nn.init.kaiming_uniform_(a[e], a=math.sqrt(5), generator=generator)
            self.A[name] = a.requires_grad_()
            self.B[name] = torch.zeros(n_experts, out_features, rank).requires_grad_()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term for expert ``e``'s ``name`` projection of rows x."""
        return (x @ self.A[name][e].T) @ self.B[name][e].T * self.scale

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in ("gate", "up", "down") for t in (self.A[name], self.B[name])]


class LoraExperts:
    """One layer's experts with ``ExpertLora`` on them, in torch around the frozen block products:
    for each expert with tokens, gate/up as block-kernel products of the stored rows (their input
    gradient through the transposed products) plus the adapters, the layer's activation, down
    likewise. Differentiable in x, the routing weights and the adapters; also an ``ExpertBackend``
    for inference with the adapter."""

    def __init__(self, frozen: FrozenExperts, lora: ExpertLora) -> None:
        self.frozen, self.lora = frozen, lora

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        f, out = self.frozen, torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok]
            g = _frozen(xe, f.gate[e], f.fmt_gu) + self.lora.delta("gate", e, xe)
            u = _frozen(xe, f.up[e], f.fmt_gu) + self.lora.delta("up", e, xe)
            h = f.mlp.hidden(g, u, e)
            y = f.mlp.output(_frozen(h, f.down[e], f.fmt_down) + self.lora.delta("down", e, h), e)
            out = out.index_add(0, tok, y * weights[tok, slot, None].to(y.dtype))
        f.seconds += time.perf_counter() - t0
        return out

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """``ExpertBackend.forward`` (every expert of the layer: this backend owns them all)."""
        with torch.no_grad():
            return self(x, ids, weights)


def _frozen(x: torch.Tensor, w: np.ndarray, fmt: str) -> torch.Tensor:
    """x @ W^T for the stored rows ``w``, differentiable in x."""
    return _FrozenLinearFn.apply(x, lambda v: _block_rows(w, fmt, v), lambda d: quant_matmul_t(w, d, fmt))


def _block_rows(w: np.ndarray, fmt: str, x: np.ndarray) -> np.ndarray:
    """x @ W^T on stored rows: the block kernels, BF16 rows dequantized."""
    from ktlab.kernels import dequantize_rows, quant_matmul

    if fmt == "bf16":
        return x @ dequantize_rows(w, fmt).T
    return quant_matmul(w, x, fmt)
