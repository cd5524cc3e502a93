"""Expert backends the MoE block can hand its experts to.

``CpuExpertBackend`` wraps the C++ engine (``ktlab.kernels.CpuExperts``) behind the
``ExpertBackend`` interface of ``ktlab.model.layers``; ``build_cpu_experts`` makes one per layer
from a weight source (raw GGUF blocks, or float weights quantized once at load).
"""

from __future__ import annotations

import numpy as np
import torch

from ktlab.kernels import CpuExperts

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


class CpuExpertBackend:
    """Runs the experts it is asked for through the fused C++ kernel (blocking call)."""

    def __init__(self, experts: CpuExperts) -> None:
        self.experts = experts
        self._owned = np.zeros(experts.n_experts, dtype=bool)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
        """See ``ktlab.model.layers.ExpertBackend``."""
        owned = None
        if len(experts) < self.experts.n_experts:
            owned = self._owned
            owned[:] = False
            owned[experts] = True
        out = self.experts.forward(x.float(), ids, weights.float(), owned)
        return torch.from_numpy(out).to(x.dtype)


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
