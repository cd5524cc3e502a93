"""OLMoE (allenai/OLMoE-1B-7B): how the family maps to ktlab's MoE decoder.

Differences from Qwen3-MoE: q/k RMSNorm over the whole projection (weights [nh*hd] and
[nkv*hd], not per head), top-k weights not renormalised, head size hidden / heads. NeoX RoPE,
no biases, no shared expert, every layer MoE. HF's ``intermediate_size`` is the expert width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import (
    expected_tensor_shapes,
    hf_common_config,
    hf_to_gguf_tensors,
    is_expert_tensor,
)
from ktlab.model.arch_common import gguf_metadata as _gguf_metadata
from ktlab.model.moe_decoder import MoEDecoder as Model

ARCH = "olmoe"
HF_MODEL_TYPES = ("olmoe",)
FEATURES = {"qk_norm": "full"}


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata (llama.cpp's converter writes the expert width as
    ``feed_forward_length`` only; ktlab writes both)."""
    return _config_from_gguf(ARCH, get, vocab_size, norm_topk_prob=False, experts_sized_by_ffn=True, **FEATURES)


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """GGUF key/values of ``cfg``: llama.cpp sizes OLMoE's experts by ``feed_forward_length``
    (and, in its tensor checks, its q/k norms by the hidden size: it loads only files with as
    many KV heads as heads, as the released OLMoE models have)."""
    return _gguf_metadata(cfg, experts_sized_by_ffn=True)


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    if config.get("clip_qkv") is not None:
        raise ValueError("OLMoE with clip_qkv is not supported")
    if config.get("attention_bias"):
        raise ValueError("OLMoE with attention_bias is not supported")
    return ModelConfig(
        arch=ARCH,
        **hf_common_config(config),
        moe_intermediate_size=int(config["intermediate_size"]),
        intermediate_size=int(config["intermediate_size"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        **FEATURES,
    )


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
