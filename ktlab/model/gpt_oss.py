"""gpt-oss-20b / gpt-oss-120b (GGUF arch ``gpt-oss``; HF ``gpt_oss``): how the family maps to ktlab's decoder.

Differences from Qwen3-MoE: no q/k norm; biases on q, k, v and the output projection; a learned
attention-sink logit per head in every softmax; every other layer (the even ones) attends only to
the last ``sliding_window`` (128) positions; the router has a bias and takes the softmax of its top-k
logits (the same weights as softmax, top-k and renormalisation); each expert has biases on gate, up
and down and the clamped SwiGLU ``(clip(u, -7, 7) + 1) * g' * sigmoid(1.702 g')``, ``g' = min(g, 7)``;
YaRN RoPE (factor 32 over 4096 positions) with the ramp's ends not rounded (``truncate`` false).
Released experts are MXFP4, which the C++ engine runs as stored (``cpp/mxfp4.h``).

Hugging Face stores gate and up interleaved (``gate_up_proj`` [E, H, 2I], gate the even columns) and
the projections transposed ([in, out]); llama.cpp's files split them as ``ffn_gate_exps`` /
``ffn_up_exps`` and name the norm before the MLP ``post_attention_norm``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ktlab.config import ModelConfig
from ktlab.model.arch_common import config_from_gguf as _config_from_gguf
from ktlab.model.arch_common import expected_tensor_shapes as _expected_tensor_shapes
from ktlab.model.arch_common import gguf_metadata as _gguf_metadata
from ktlab.model.arch_common import hf_common_config, is_expert_tensor, need, renamed
from ktlab.model.arch_common import hf_to_gguf_tensors as _hf_to_gguf_tensors
from ktlab.model.moe_decoder import MoEDecoder

ARCH = "gpt-oss"
HF_MODEL_TYPES = ("gpt_oss",)
FEATURES = {"qk_norm": "none", "attn_bias": True, "attn_sinks": True, "router_logit_bias": True,
            "expert_bias": True}
#: llama.cpp hard-codes gpt-oss's activation (its files carry no key for it).
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
#: llama.cpp names the norm before the MLP of a gpt-oss block ``post_attention_norm``.
TENSOR_RENAMES = {"ffn_norm.weight": "post_attention_norm.weight"}


class Model(MoEDecoder):
    """The MoE decoder reading gpt-oss's tensor names."""

    tensor_renames = TENSOR_RENAMES


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs under gpt-oss's GGUF names (the output projection's bias too)."""
    shapes = _expected_tensor_shapes(cfg)
    shapes.update({f"blk.{i}.attn_output.bias": (cfg.hidden_size,) for i in range(cfg.num_layers)})
    return renamed(shapes, TENSOR_RENAMES)


def hf_to_gguf_tensors(state: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Hugging Face weights under gpt-oss's GGUF names: the router, the interleaved gate/up and the
    transposed expert matrices brought to the shared layout, then the biases and sinks."""
    common = dict(state)
    extra: dict[str, np.ndarray] = {}
    for i in range(cfg.num_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        gate_up = np.asarray(need(state, hf + "mlp.experts.gate_up_proj"))  # [E, H, 2I]
        gate_up_bias = np.asarray(need(state, hf + "mlp.experts.gate_up_proj_bias"))  # [E, 2I]
        common[hf + "mlp.gate.weight"] = need(state, hf + "mlp.router.weight")
        common[hf + "mlp.experts.gate_up_proj"] = np.concatenate(
            [gate_up[..., ::2].transpose(0, 2, 1), gate_up[..., 1::2].transpose(0, 2, 1)], axis=1)
        common[hf + "mlp.experts.down_proj"] = np.asarray(need(state, hf + "mlp.experts.down_proj")).transpose(0, 2, 1)
        extra.update({
            gg + "attn_output.bias": np.asarray(need(state, hf + "self_attn.o_proj.bias")),
            gg + "attn_sinks.weight": np.asarray(need(state, hf + "self_attn.sinks")),
            gg + "ffn_gate_inp.bias": np.asarray(need(state, hf + "mlp.router.bias")),
            gg + "ffn_gate_exps.bias": gate_up_bias[:, ::2],
            gg + "ffn_up_exps.bias": gate_up_bias[:, 1::2],
            gg + "ffn_down_exps.bias": np.asarray(need(state, hf + "mlp.experts.down_proj_bias")),
        })
    out = _hf_to_gguf_tensors(common, cfg)
    out.update({name: np.ascontiguousarray(value) for name, value in extra.items()})
    return renamed(out, TENSOR_RENAMES)


def config_from_gguf(get: Callable[[str], Any], vocab_size: int) -> ModelConfig:
    """Build the config from GGUF metadata (llama.cpp's keys; ``attention.sliding_window``)."""
    return _config_from_gguf(ARCH, get, vocab_size, key_defaults={"rope.freq_base": 150_000.0},
                             sliding_window=int(get(f"{ARCH}.attention.sliding_window")),
                             swiglu_alpha=SWIGLU_ALPHA, swiglu_limit=SWIGLU_LIMIT, rope_yarn_truncate=False,
                             **FEATURES)


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a Hugging Face ``config.json`` dict."""
    if not config.get("attention_bias", True):
        raise ValueError("gpt-oss without attention biases (attention_bias false) is not supported")
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(layers)]
    if list(types) != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]:
        raise ValueError("gpt-oss with layer_types other than sliding/full alternating from layer 0 is not supported")
    if (float(config.get("swiglu_alpha", SWIGLU_ALPHA)), float(config.get("swiglu_limit", SWIGLU_LIMIT))) != (
            SWIGLU_ALPHA, SWIGLU_LIMIT):
        raise ValueError("gpt-oss with swiglu_alpha/swiglu_limit other than 1.702/7.0 is not supported "
                         "(llama.cpp's files cannot say so)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("truncate", True):
        raise ValueError("gpt-oss with YaRN truncate true is not supported (llama.cpp's files assume false)")
    return ModelConfig(
        arch=ARCH,
        **hf_common_config(config),
        moe_intermediate_size=int(config["intermediate_size"]),
        intermediate_size=int(config["intermediate_size"]),
        norm_topk_prob=True,  # the softmax of the top-k logits
        sliding_window=int(config.get("sliding_window") or 0),
        swiglu_alpha=SWIGLU_ALPHA,
        swiglu_limit=SWIGLU_LIMIT,
        **FEATURES,
    )


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """GGUF key/values of ``cfg`` as llama.cpp reads a gpt-oss."""
    meta = _gguf_metadata(cfg)
    meta[f"{ARCH}.attention.sliding_window"] = cfg.sliding_window
    return meta


__all__ = ["ARCH", "HF_MODEL_TYPES", "Model", "config_from_gguf", "config_from_hf", "expected_tensor_shapes",
           "gguf_metadata", "hf_to_gguf_tensors", "is_expert_tensor"]
