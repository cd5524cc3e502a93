"""Expert backends the MoE block can hand its experts to.

``CpuExpertBackend`` wraps the C++ engine (``ktlab.kernels.CpuExperts``) behind the
``ExpertBackend`` interface of ``ktlab.model.layers``; ``build_cpu_experts`` makes one per layer
from a weight source (raw GGUF blocks, or float weights quantized once at load).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ktlab.kernels import CpuExperts

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


class CpuExpertBackend:
    """Runs the experts it is asked for through the fused C++ kernel: a blocking :meth:`forward`, or
    :meth:`submit` (the kernel pool works while the caller goes on; what the MoE block does when an
    accelerator computes its own experts meanwhile). Hidden states on an accelerator are copied to
    the host and the result back (``.to`` of the input's device)."""

    def __init__(self, experts: CpuExperts) -> None:
        self.experts = experts
        self._owned = np.zeros(experts.n_experts, dtype=bool)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """See ``ktlab.model.layers.ExpertBackend`` (the calling thread works with the pool)."""
        out = self.experts.forward(*self._host_args(x, ids, weights, experts))
        return _like(torch.from_numpy(out), x)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               experts: np.ndarray) -> Callable[[], torch.Tensor]:
        """Start the experts' sum on the kernel pool; returns the call that waits for it and gives
        it as a tensor of ``x``'s dtype and device."""
        self.experts.submit(*self._host_args(x, ids, weights, experts))
        return lambda: _like(torch.from_numpy(self.experts.sync()), x)

    def _host_args(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> tuple:
        owned = None
        if len(experts) < self.experts.n_experts:
            owned = self._owned
            owned[:] = False
            owned[experts] = True
        return _to_host(x), ids.cpu(), weights.float().cpu(), owned


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The host result ``out`` in ``x``'s dtype, on ``x``'s device."""
    return out.to(x.dtype) if x.device.type == "cpu" else out.to(x.device, x.dtype, non_blocking=True)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """x as float32 on the host (through pinned memory from a CUDA device)."""
    if x.device.type == "cuda":  # pragma: no cover - needs a GPU
        staging = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        staging.copy_(x)  # synchronous: the kernel pool reads it next
        return staging
    return x.float()


def build_cpu_experts(weights, layer: int, isa: str | None = None, threads: int | None = None,
                      float_qtype: str = "BF16") -> CpuExperts:
    """The C++ expert engine of one layer: raw blocks of a GGUF as stored, else float
    weights (a Hugging Face directory) quantized once to ``float_qtype``."""
    names = [f"blk.{layer}.{t}" for t in EXPERT_TENSORS]
    if hasattr(weights, "raw"):
        gate, up, down = (weights.raw(n) for n in names)
        return CpuExperts(gate, up, down, isa=isa, threads=threads)
    import gguf

    gate, up, down = (weights.tensor(n) for n in names)
    return CpuExperts.from_float(gate, up, down, gguf.GGMLQuantizationType[float_qtype], isa=isa, threads=threads)
