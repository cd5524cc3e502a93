"""Gradients through frozen quantized experts (ktlab.train.experts) against torch autograd on the
same experts dequantized (gguf), for SwiGLU and gpt-oss's biased clamped form."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ktlab.kernels import CpuExperts
from ktlab.model.layers import ExpertMlp, TorchExperts
from ktlab.model.quantize import quantize
from ktlab.train.experts import FrozenExperts

# NMSE of the engine's gradients (int8-rounded activations, as its forward) vs float autograd.
GRAD_NMSE = 2e-3


class Raw:
    def __init__(self, w: np.ndarray, qtype) -> None:
        self.qtype, self.shape, self.data = qtype, w.shape, quantize(w, qtype)

    def dequantized(self) -> torch.Tensor:
        flat = gguf.quants.dequantize(np.ascontiguousarray(self.data), self.qtype)
        return torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(self.shape))


def nmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a - ref) ** 2).sum() / (ref**2).sum())


@pytest.mark.parametrize("qtype,gpt_oss", [(gguf.GGMLQuantizationType.Q8_0, False),
                                            (gguf.GGMLQuantizationType.Q4_K, False),
                                            (gguf.GGMLQuantizationType.MXFP4, True)])
def test_input_and_routing_weight_gradients_match_autograd_on_dequantized_weights(qtype, gpt_oss):
    E, H, inter, T, k = 6, 256, 256, 10, 2
    rng = np.random.default_rng(0)
    gate, up = (Raw(rng.standard_normal((E, inter, H)).astype(np.float32) / 16, qtype) for _ in range(2))
    down = Raw(rng.standard_normal((E, H, inter)).astype(np.float32) / 16, qtype)
    mlp = ExpertMlp()
    if gpt_oss:
        mlp = ExpertMlp(7.0, 1.702, *(torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                                      for s in ((E, inter), (E, inter), (E, H))))
    engine = CpuExperts(gate, up, down)
    if gpt_oss:
        mlp.attach(engine)
    frozen = FrozenExperts(engine, gate, up, down, mlp)
    reference = TorchExperts(gate.dequantized(), up.dequantized(), down.dequantized(), mlp)
    x0 = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]))
    w0 = torch.from_numpy(rng.random((T, k)).astype(np.float32))
    upstream = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))

    def grads(run):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = run(x, ids, w)
        (y * upstream).sum().backward()
        return y.detach(), x.grad, w.grad

    ours = grads(frozen)
    ref = grads(lambda x, i, w: reference.forward(x, i, w, np.arange(E)))
    for a, b in zip(ours, ref, strict=True):
        assert nmse(a, b) < GRAD_NMSE, nmse(a, b)
    assert ours[1].abs().max() > 0.1 and ours[2].abs().max() > 0.1  # real gradients flowed


def test_expert_lora_gradients_match_autograd_on_dequantized_weights():
    """LoRA on every expert's gate, up and down (LoraExperts around the frozen block products): the
    gradients of x, the routing weights and every A and B equal float autograd on the dequantized
    experts with the same adapters (named tolerance: int8 activations in the block products)."""
    from ktlab.train.experts import ExpertLora, LoraExperts

    E, H, inter, T, k, r = 4, 128, 64, 9, 2, 4
    rng = np.random.default_rng(1)
    q8 = gguf.GGMLQuantizationType.Q8_0
    gate, up = (Raw(rng.standard_normal((E, inter, H)).astype(np.float32) / 8, q8) for _ in range(2))
    down = Raw(rng.standard_normal((E, H, inter)).astype(np.float32) / 8, q8)
    engine = CpuExperts(gate, up, down)
    lora = ExpertLora(E, H, inter, r, 8.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            lora.B[name].copy_(torch.randn(lora.B[name].shape) * 0.1)  # a trained adapter, not a fresh one
    ours = LoraExperts(FrozenExperts(engine, gate, up, down), lora)
    dense = {"gate": gate.dequantized(), "up": up.dequantized(), "down": down.dequantized()}

    def reference(x, ids, w):
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            xe = x[tok]
            g = xe @ dense["gate"][e].T + lora.delta("gate", e, xe)
            u = xe @ dense["up"][e].T + lora.delta("up", e, xe)
            h = torch.nn.functional.silu(g) * u
            y = h @ dense["down"][e].T + lora.delta("down", e, h)
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out

    x0 = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]))
    w0 = torch.from_numpy(rng.random((T, k)).astype(np.float32))
    upstream = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))

    def grads(run):
        for p in lora.parameters():
            p.grad = None
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        (run(x, ids, w) * upstream).sum().backward()
        return [x.grad, w.grad, *(p.grad.clone() for p in lora.parameters())]

    for a, b in zip(grads(ours), grads(reference), strict=True):
        assert nmse(a, b) < GRAD_NMSE, nmse(a, b)
