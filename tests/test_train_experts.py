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
