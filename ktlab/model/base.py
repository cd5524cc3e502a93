"""The model contract: what serving, the hybrid runtime, the scheduler, the lab and export may use of a
loaded model, whatever its family. Everything else about a model is its own business.

A family is one file (``ktlab.model.qwen3_moe``, ``olmoe``, ``qwen2_moe``, ``llama_moe``,
``glm4_moe``, ``deepseek2``) that maps its GGUF and Hugging Face configs to a :class:`~ktlab.config.ModelConfig`
whose features (``qk_norm``, ``attn_bias``, ``shared_expert_size``, ``first_dense_layers``,
``router`` ...) say how its layers differ, and names its ``Model`` class: today
:class:`ktlab.model.moe_decoder.MoEDecoder`, or a subclass naming tensors as the family's files do.

Per-layer expert tables above the model have ``cfg.num_moe_layers`` rows: MoE layer i is block
``cfg.moe_layer_ids[i]`` (dense layers, when a family has them, come first).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ktlab.config import ModelConfig
from ktlab.model.layers import KVCache, MoEBlock, PagedKV, Placement, RouteObserver, SeqSlice


class MoEModel(Protocol):
    """A loaded MoE decoder as the layers above the model see it."""

    cfg: ModelConfig
    dtype: torch.dtype
    #: "cpu" (routed experts in the C++ engine) or "torch" (the float reference).
    experts: str
    #: Experts per token whose output joins one layer late (0: the exact model).
    deferral: int
    placement: Placement

    def moe_blocks(self) -> list[MoEBlock]:
        """The routed-expert block of every MoE layer, in layer order: where the hybrid runtime
        installs its backends and placement."""
        ...

    def expert_bytes(self) -> int:
        """Stored bytes of one routed expert (gate, up and down)."""
        ...

    def dense_weight_bytes(self) -> int:
        """Bytes every step reads besides the routed experts (shared experts included)."""
        ...

    def weight_regions(self, selected: list[np.ndarray]) -> list[np.ndarray]:
        """The bytes a decode step reads with these experts selected per layer (paired reads)."""
        ...

    def new_cache(self, max_len: int) -> KVCache:
        """A KV cache for one sequence (``forward``)."""
        ...

    def new_paged_kv(self, num_pages: int, page_size: int) -> PagedKV:
        """A pool of KV pages for ``forward_batch``."""
        ...

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits of ``tokens`` appended to one sequence."""
        ...

    def forward_batch(self, tokens: torch.Tensor, seqs: list[SeqSlice], kv: PagedKV,
                      threads: int | None = None) -> torch.Tensor:
        """Logits of the last token of each sequence of a batched step (continuous batching)."""
        ...

    def add_route_observer(self, observer: RouteObserver) -> None:
        """See every routing decision: ``observer(layer, ids [T, k], weights [T, k])``."""
        ...

    def remove_route_observer(self, observer: RouteObserver) -> None:
        """Undo ``add_route_observer``."""
        ...
