"""GLM-4.5 / GLM-4.5-Air (GGUF arch ``glm4moe``; HF ``glm4_moe``): how the family maps to ktlab's decoder.

Differences from Qwen3-MoE: leading dense layers (``first_k_dense_replace``: an MLP of width
``intermediate_size``); sigmoid router scores with a per-expert correction bias for the choice,
group-limited top-k (``n_group`` / ``topk_group``), the chosen scores renormalised and scaled by
``routed_scaling_factor``; ``n_shared_experts`` shared experts of the expert width, ungated;
biases on q, k and v; RoPE on the first half of each head (``partial_rotary_factor``); q/k norms
per head only where ``use_qk_norm``. The multi-token-prediction layers of the released files
(``nextn_predict_layers``) are not run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import expected_tensor_shapes as _expected_tensor_shapes
from ktlab.model.arch_common import gguf_metadata as _gguf_metadata
from ktlab.model.arch_common import hf_common_config, is_expert_tensor, renamed
from ktlab.model.arch_common import hf_to_gguf_tensors as _hf_to_gguf_tensors
from ktlab.model.moe_decoder import MoEDecoder

ARCH = "glm4moe"
HF_MODEL_TYPES = ("glm4_moe",)
FEATURES = {"attn_bias": True, "router": "sigmoid", "router_bias": True, "qk_norm": "none"}
#: llama.cpp names the norm before the MLP of a GLM-4.5 block ``post_attention_norm``.
TENSOR_RENAMES = {"ffn_norm.weight": "post_attention_norm.weight"}


class Model(MoEDecoder):
    """The MoE decoder reading GLM-4.5's tensor names."""

    tensor_renames = TENSOR_RENAMES


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs under GLM-4.5's GGUF names, with its numpy shape."""
    return renamed(_expected_tensor_shapes(cfg), TENSOR_RENAMES)


def hf_to_gguf_tensors(state: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Hugging Face weights under GLM-4.5's GGUF names."""
    return renamed(_hf_to_gguf_tensors(state, cfg), TENSOR_RENAMES)


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata (llama.cpp's keys: ``leading_dense_block_count``,
    ``expert_shared_count``, ``expert_weights_scale``, ``rope.dimension_count`` ...). A file
    whose blocks have q/k norms says so by having the tensors (``attn_q_norm``)."""
    qk_norm = "head" if _has_qk_norm(get) else "none"
    return _config_from_gguf(ARCH, get, vocab_size, **{**FEATURES, "qk_norm": qk_norm})


def _has_qk_norm(get: Callable[[str], Any]) -> bool:
    try:
        return bool(get(f"{ARCH}.attention.qk_norm"))  # written by ktlab; llama.cpp looks at the tensors
    except KeyError:
        return False


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    if not config.get("attention_bias", False):
        raise ValueError("GLM-4.5 without q/k/v biases (attention_bias false) is not supported")
    common = hf_common_config({**config, "num_experts": config["n_routed_experts"]})
    rope = config.get("rope_parameters") or {}
    factor = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
    return ModelConfig(
        arch=ARCH,
        **common,
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        intermediate_size=int(config["intermediate_size"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        shared_expert_size=int(config.get("n_shared_experts", 0)) * int(config["moe_intermediate_size"]),
        first_dense_layers=int(config.get("first_k_dense_replace", 0)),
        router_groups=int(config.get("n_group", 1)),
        router_topk_groups=int(config.get("topk_group", 1)),
        routed_scale=float(config.get("routed_scaling_factor", 1.0)),
        rope_dim=int(common["head_dim"] * factor) if factor < 1 else 0,
        **{**FEATURES, "qk_norm": "head" if config.get("use_qk_norm") else "none"},
    )


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """GGUF key/values of ``cfg`` as llama.cpp reads a GLM-4.5 (shared experts counted)."""
    meta = _gguf_metadata(cfg, shared_experts_counted=True)
    if cfg.qk_norm == "head":
        meta[f"{ARCH}.attention.qk_norm"] = True
    return meta


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
