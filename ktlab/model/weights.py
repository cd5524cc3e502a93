"""The interface every weight loader (GGUF, safetensors) offers to the models."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class WeightSource(Protocol):
    """Tensors by GGUF name: dequantized for torch, raw for the CPU kernels."""

    def has_tensor(self, name: str) -> bool:
        """Whether ``name`` exists."""
        ...

    def tensor(self, name: str) -> np.ndarray:
        """float32 array of the tensor."""
        ...
