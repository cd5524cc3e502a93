"""Mixtral (GGUF arch ``llama`` with experts; HF ``mixtral``): how the family maps to ktlab's decoder.

Differences from Qwen3-MoE: no q/k norm; llama.cpp's files store q/k rows for its adjacent-pair
("NORM") RoPE, so they are reordered to NeoX order at load (``rope_style="norm"``) and the GGUFs
we write from Hugging Face weights are permuted as llama.cpp's converter does; the expert width
is ``feed_forward_length``; a SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``).
Routing is softmax, top-k, renormalised (as Qwen3). A ``llama`` file without experts (a dense
Llama) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import (
    expected_tensor_shapes,
    hf_common_config,
    hf_rows_for_norm_rope,
    is_expert_tensor,
)
from ktlab.model.arch_common import gguf_metadata as _gguf_metadata
from ktlab.model.arch_common import hf_to_gguf_tensors as _hf_to_gguf_tensors
from ktlab.model.moe_decoder import MoEDecoder as Model

ARCH = "llama"
HF_MODEL_TYPES = ("mixtral",)
FEATURES = {"qk_norm": "none", "rope_style": "norm"}
# Checkpoint names of Mixtral's sparse block -> the names transformers uses in memory.
_LEGACY = {"block_sparse_moe.gate.": "mlp.gate.", "block_sparse_moe.experts.": "mlp.experts."}
_LEGACY_EXPERT = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata; a file without ``llama.expert_count`` is refused."""
    try:
        get(f"{ARCH}.expert_count")
    except KeyError:
        raise ValueError("a llama file without experts (a dense model): ktlab runs MoE models only") from None
    return _config_from_gguf(ARCH, get, vocab_size, experts_sized_by_ffn=True,
                             key_defaults={"rope.freq_base": 10_000.0}, **FEATURES)


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """GGUF key/values of ``cfg`` as llama.cpp reads a Mixtral (experts sized by ``feed_forward_length``)."""
    meta = _gguf_metadata(cfg, experts_sized_by_ffn=True)
    meta[f"{ARCH}.rope.dimension_count"] = cfg.head_dim
    return meta


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    if config.get("sliding_window"):
        raise ValueError("Mixtral with sliding-window attention is not supported")
    return ModelConfig(
        arch=ARCH,
        **hf_common_config(config),
        moe_intermediate_size=int(config["intermediate_size"]),
        intermediate_size=int(config["intermediate_size"]),
        norm_topk_prob=True,
        **FEATURES,
    )


def hf_to_gguf_tensors(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face weights (in-memory or checkpoint names) under GGUF names, q/k rows permuted
    for llama.cpp's NORM RoPE as its converter does."""
    out = _hf_to_gguf_tensors({_modern_name(k): v for k, v in state.items()}, cfg)
    for i in range(cfg.num_layers):
        for name, heads in (("attn_q", cfg.num_heads), ("attn_k", cfg.num_kv_heads)):
            key = f"blk.{i}.{name}.weight"
            out[key] = hf_rows_for_norm_rope(out[key], heads)
    return out


def _modern_name(name: str) -> str:
    for old, new in _LEGACY.items():
        if old in name:
            name = name.replace(old, new)
            if new == "mlp.experts.":
                for w, proj in _LEGACY_EXPERT.items():
                    name = name.replace(w, proj)
    return name


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
