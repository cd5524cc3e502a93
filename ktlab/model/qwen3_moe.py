"""Qwen3-MoE: how the family maps to ktlab's MoE decoder (config from GGUF and Hugging Face).

Shapes (Qwen3-30B-A3B): hidden H=2048, heads 32 x head_dim 128, 4 KV heads, 48 layers,
128 experts of inter I=768, top-8 with renormalised top-k weights. Features: q/k RMSNorm per
head, NeoX-style RoPE, no biases, no shared expert, every layer MoE (ModelConfig's defaults).
Tensor names: ``ktlab.model.arch_common``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ktlab.config import ModelConfig
from ktlab.model.arch_common import (
    config_from_gguf as _config_from_gguf,
)
from ktlab.model.arch_common import (
    expected_tensor_shapes,
    gguf_metadata,
    hf_common_config,
    hf_to_gguf_tensors,
    is_expert_tensor,
)
from ktlab.model.moe_decoder import MoEDecoder as Model

ARCH = "qwen3moe"
HF_MODEL_TYPES = ("qwen3_moe",)
FEATURES: dict[str, Any] = {}  # ModelConfig's defaults are Qwen3-MoE's


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata; ``get(key)`` raises KeyError for a missing key."""
    return _config_from_gguf(ARCH, get, vocab_size, key_defaults={"rope.freq_base": 1_000_000.0}, **FEATURES)


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    return ModelConfig(
        arch=ARCH,
        **hf_common_config(config),
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        intermediate_size=int(config.get("intermediate_size", 0)),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        **FEATURES,
    )


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
