"""DeepSeek-V2 / V2-Lite / V3 / R1 and Kimi-K2 (GGUF arch ``deepseek2``; HF ``deepseek_v2``,
``deepseek_v3``, ``kimi_k2``): how the family maps to ktlab's decoder.

Differences from Qwen3-MoE: multi-head latent attention (``ModelConfig.kv_lora_rank``: keys and
values from a normed latent plus one shared RoPE key; queries through a ``q_lora_rank`` latent on
V2/V3, straight on V2-Lite), its RoPE dims in adjacent pairs (reordered at load), YaRN with
DeepSeek's temperatures; leading dense layers; shared experts; V3/R1/Kimi routing by sigmoid
scores with a correction bias, group-limited top-k, renormalised and scaled; V2 by softmax top-k,
scaled, not renormalised (greedy, or group-limited with each group scored by its best expert).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import expected_tensor_shapes, hf_common_config, hf_to_gguf_tensors, is_expert_tensor
from ktlab.model.arch_common import gguf_metadata as _gguf_metadata
from ktlab.model.moe_decoder import MoEDecoder as Model

ARCH = "deepseek2"
HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
FEATURES = {"qk_norm": "none", "rope_style": "norm"}


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from llama.cpp's deepseek2 metadata (every head its own keys: the file's
    single KV head is the cached latent): the MLA head sizes in
    ``attention.key_length_mla`` / ``value_length_mla`` (older files: ``key_length`` /
    ``value_length``), the latent ranks, shared experts counted, YaRN's log multiplier."""
    def get_mla(key: str) -> Any:
        if key == f"{ARCH}.attention.head_count_kv":  # llama.cpp caches the latent as one KV head
            return get(f"{ARCH}.attention.head_count")
        if key == f"{ARCH}.attention.key_length":
            try:
                return get(f"{ARCH}.attention.key_length_mla")
            except KeyError:
                return get(key)
        return get(key)

    def optional(key: str, default: Any) -> Any:
        try:
            return get(f"{ARCH}.{key}")
        except KeyError:
            return default

    v_dim = optional("attention.value_length_mla", None) or optional("attention.value_length", 0)
    mscale = float(optional("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
    sigmoid = int(optional("expert_gating_func", 1)) == 2  # V3's router: its correction bias comes with it
    return _config_from_gguf(ARCH, get_mla, vocab_size, norm_topk_prob=False, **FEATURES, router_bias=sigmoid,
                             q_lora_rank=int(optional("attention.q_lora_rank", 0)),
                             kv_lora_rank=int(get(f"{ARCH}.attention.kv_lora_rank")), v_head_dim=int(v_dim),
                             rope_mscale=mscale, rope_mscale_all_dim=mscale)


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """GGUF key/values of ``cfg`` as llama.cpp's converter writes a DeepSeek (MLA head sizes under
    the ``_mla`` keys, the latent sizes under key/value_length, shared experts counted)."""
    meta = _gguf_metadata(cfg, shared_experts_counted=True)
    meta.update({
        f"{ARCH}.attention.head_count_kv": 1,  # llama.cpp's MLA cache: the latent, one head
        f"{ARCH}.attention.key_length": cfg.kv_lora_rank + cfg.rope_dim,
        f"{ARCH}.attention.value_length": cfg.kv_lora_rank,
        f"{ARCH}.attention.key_length_mla": cfg.head_dim,
        f"{ARCH}.attention.value_length_mla": cfg.v_dim,
        f"{ARCH}.attention.kv_lora_rank": cfg.kv_lora_rank,
        f"{ARCH}.rope.dimension_count": cfg.rope_dim,
        f"{ARCH}.expert_gating_func": 2 if cfg.router == "sigmoid" else 1,
    })
    if cfg.q_lora_rank:
        meta[f"{ARCH}.attention.q_lora_rank"] = cfg.q_lora_rank
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        meta[f"{ARCH}.rope.scaling.yarn_log_multiplier"] = 0.1 * cfg.rope_mscale_all_dim
    return meta


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict (V3 / Kimi-K2 or V2)."""
    v3 = config.get("model_type") != "deepseek_v2"
    v2_groups = not v3 and config.get("topk_method", "greedy") == "group_limited_greedy"
    if not v3 and config.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"DeepSeek-V2 routing {config.get('topk_method')!r} is not supported")
    if v3 and not config.get("rope_interleave", True):
        raise ValueError("DeepSeek-V3 with rope_interleave false is not supported")
    nope, rope = int(config["qk_nope_head_dim"]), int(config["qk_rope_head_dim"])
    common = hf_common_config({**config, "num_experts": config["n_routed_experts"], "head_dim": nope + rope})
    routing = (dict(router="sigmoid", router_bias=True, norm_topk_prob=bool(config.get("norm_topk_prob", True)))
               if v3 else dict(norm_topk_prob=False))
    if v3 or v2_groups:
        routing.update(router_groups=int(config.get("n_group") or 1),
                       router_topk_groups=int(config.get("topk_group") or 1))
    return ModelConfig(
        arch=ARCH,
        **common,
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        intermediate_size=int(config["intermediate_size"]),
        shared_expert_size=int(config.get("n_shared_experts") or 0) * int(config["moe_intermediate_size"]),
        first_dense_layers=int(config.get("first_k_dense_replace", 0)),
        routed_scale=float(config.get("routed_scaling_factor", 1.0)),
        rope_dim=rope,
        q_lora_rank=int(config.get("q_lora_rank") or 0),
        kv_lora_rank=int(config["kv_lora_rank"]),
        v_head_dim=int(config["v_head_dim"]),
        **routing,
        **FEATURES,
    )


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
