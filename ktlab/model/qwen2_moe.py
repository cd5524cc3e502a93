"""Qwen1.5-MoE / Qwen2-MoE (e.g. Qwen2-57B-A14B): how the family maps to ktlab's MoE decoder.

Differences from Qwen3-MoE: biases on q, k and v; no q/k norm; a shared expert of width
``shared_expert_intermediate_size`` beside the routed ones, its output scaled per token by
sigmoid(x . g); top-k weights not renormalised (``norm_topk_prob``); head size hidden / heads.
Configs with dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1) or sliding-window
attention are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import (
    expected_tensor_shapes,
    gguf_metadata,
    hf_common_config,
    hf_to_gguf_tensors,
    is_expert_tensor,
)
from ktlab.model.moe_decoder import MoEDecoder as Model

ARCH = "qwen2moe"
HF_MODEL_TYPES = ("qwen2_moe",)
FEATURES = {"qk_norm": "none", "attn_bias": True, "shared_expert_gate": True}


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata; ``get(key)`` raises KeyError for a missing key."""
    cfg = _config_from_gguf(ARCH, get, vocab_size, norm_topk_prob=False,
                            key_defaults={"rope.freq_base": 1_000_000.0}, **FEATURES)
    if cfg.shared_expert_size == 0:
        raise KeyError(f"{ARCH}.expert_shared_feed_forward_length")
    return cfg


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        raise ValueError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported yet")
    if config.get("use_sliding_window"):
        raise ValueError("Qwen2-MoE with sliding-window attention is not supported")
    if not config.get("qkv_bias", True):
        raise ValueError("Qwen2-MoE without q/k/v biases (qkv_bias false) is not supported")
    return ModelConfig(
        arch=ARCH,
        **hf_common_config(config),
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        intermediate_size=int(config.get("intermediate_size", 0)),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        shared_expert_size=int(config["shared_expert_intermediate_size"]),
        **FEATURES,
    )


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
