"""What the llama.cpp-style MoE families share: GGUF metadata keys, tensor names and shapes, and the
Hugging Face -> GGUF renaming. An architecture file states only how it differs (its features:
``ModelConfig.qk_norm``, ``attn_bias``, shared expert; its defaults) and calls these.

GGUF tensors per layer ``blk.N.``: attn_norm [H], attn_q [nh*hd, H], attn_k/attn_v [nkv*hd, H]
(+ ``.bias`` with ``attn_bias``), attn_output [H, nh*hd], attn_q_norm/attn_k_norm ([hd] per head
or [nh*hd] / [nkv*hd] over the whole projection), ffn_norm [H], ffn_gate_inp [E, H],
ffn_gate_exps/ffn_up_exps [E, I, H], ffn_down_exps [E, H, I]; a shared expert adds
ffn_gate_shexp/ffn_up_shexp [S, H], ffn_down_shexp [H, S] and its gate ffn_gate_inp_shexp [H]
(numpy order: last axis = row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ktlab.config import ModelConfig

#: GGUF metadata key (after the "ARCH." prefix) -> ModelConfig field.
GGUF_KEYS: dict[str, str] = {
    "block_count": "num_layers",
    "context_length": "context_length",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_heads",
    "attention.head_count_kv": "num_kv_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_size",
    "leading_dense_block_count": "first_dense_layers",
    "rope.dimension_count": "rope_dim",
    "expert_weights_scale": "routed_scale",
    "expert_group_count": "router_groups",
    "expert_group_used_count": "router_topk_groups",
    "rope.scaling.factor": "rope_factor",
    "rope.scaling.original_context_length": "rope_original_context",
}
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scale", "rope_factor")
#: llama.cpp's expert_gating_func values.
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}
# Keys a file may leave out, with the value llama.cpp assumes (head_dim: hidden / heads); ktlab
# writes those of _WRITTEN_IF_SET only where the value differs from it.
_GGUF_DEFAULTS: dict[str, Any] = {
    "feed_forward_length": 0,
    "rope.freq_base": 10_000.0,
    "attention.key_length": None,
    "expert_shared_feed_forward_length": 0,
    "leading_dense_block_count": 0,
    "rope.dimension_count": 0,
    "expert_weights_scale": 1.0,
    "expert_group_count": 1,
    "expert_group_used_count": 1,
    "rope.scaling.factor": 1.0,
    "rope.scaling.original_context_length": 0,
}
_WRITTEN_IF_SET = ("expert_shared_feed_forward_length", "leading_dense_block_count", "rope.dimension_count",
                   "expert_weights_scale", "expert_group_count", "expert_group_used_count", "rope.scaling.factor",
                   "rope.scaling.original_context_length")

#: Per-layer tensor names: HF suffix (after "model.layers.N.") -> GGUF suffix (after "blk.N.").
HF_LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_MLA = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_HF_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_HF_BIASES = {f"self_attn.{c}_proj.bias": f"attn_{c}.bias" for c in "qkv"}
_HF_SHARED = {f"mlp.shared_expert.{c}_proj.weight": f"ffn_{c}_shexp.weight" for c in ("gate", "up", "down")}
_HF_SHARED_PLURAL = {f"mlp.shared_experts.{c}_proj.weight": f"ffn_{c}_shexp.weight" for c in ("gate", "up", "down")}
_HF_DENSE = {f"mlp.{c}_proj.weight": f"ffn_{c}.weight" for c in ("gate", "up", "down")}
_HF_MOE = {"mlp.gate.weight": "ffn_gate_inp.weight"}
HF_GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
EXPERT_KINDS = ("gate", "up", "down")


def config_from_gguf(arch: str, get: Callable[[str], Any], vocab_size: int, *, norm_topk_prob: bool = True,
                     key_defaults: Mapping[str, Any] | None = None, experts_sized_by_ffn: bool = False,
                     **features: Any) -> ModelConfig:
    """The config from GGUF metadata (``get(key)`` raises KeyError for a missing key), with the
    architecture's fixed ``features`` (ModelConfig fields such as ``qk_norm``). ``norm_topk_prob``
    and ``key_defaults`` (key without the prefix -> value) are what the family assumes where a
    file leaves a key out. ``experts_sized_by_ffn``: llama.cpp's files of this family give the
    expert width as ``feed_forward_length`` (OLMoE, Mixtral), read where the expert key is absent."""
    defaults = {**_GGUF_DEFAULTS, **(key_defaults or {})}
    if experts_sized_by_ffn:
        plain_get = get

        def get(key: str) -> Any:
            try:
                return plain_get(key)
            except KeyError:
                if key != f"{arch}.expert_feed_forward_length":
                    raise
                return plain_get(f"{arch}.feed_forward_length")

    values: dict[str, Any] = {"arch": arch, "vocab_size": vocab_size}
    for key, field in GGUF_KEYS.items():
        try:
            values[field] = get(f"{arch}.{key}")
        except KeyError:
            if key not in defaults:
                raise
            values[field] = defaults[key]
    if values["head_dim"] is None:
        values["head_dim"] = int(values["hidden_size"]) // int(values["num_heads"])
    for field in GGUF_KEYS.values():
        values[field] = float(values[field]) if field in _FLOAT_FIELDS else int(values[field])
    if not values["shared_expert_size"]:  # llama.cpp's GLM / DeepSeek files count shared experts instead
        with contextlib.suppress(KeyError):
            values["shared_expert_size"] = int(get(f"{arch}.expert_shared_count")) * values["moe_intermediate_size"]
    try:
        scaling = str(get(f"{arch}.rope.scaling.type"))
    except KeyError:
        scaling = "none"
    if scaling not in ("none", "yarn"):
        raise ValueError(f"{arch}.rope.scaling.type {scaling!r} is not supported (none, yarn)")
    values["rope_scaling"] = scaling
    if values["rope_dim"] == values["head_dim"]:
        values["rope_dim"] = 0  # all of a head: the default
    try:
        values["norm_topk_prob"] = bool(get(f"{arch}.expert_weights_norm"))
    except KeyError:
        values["norm_topk_prob"] = norm_topk_prob
    try:
        gating = int(get(f"{arch}.expert_gating_func"))
    except KeyError:
        gating = None
    if gating is not None:
        if gating not in GATING_FUNCS:
            raise ValueError(f"{arch}.expert_gating_func {gating} is not one of {GATING_FUNCS}")
        features = {**features, "router": GATING_FUNCS[gating]}
    return ModelConfig(**values, **features)


def gguf_metadata(cfg: ModelConfig, experts_sized_by_ffn: bool = False,
                  shared_experts_counted: bool = False) -> dict[str, Any]:
    """GGUF key/values (with the arch prefix) that describe ``cfg``; enough for llama.cpp
    (``experts_sized_by_ffn``: ``feed_forward_length`` holds the expert width, as llama.cpp
    reads it for OLMoE and Mixtral; ``shared_experts_counted``: shared experts as
    ``expert_shared_count`` of the expert width, as it reads them for GLM-4.5 and DeepSeek)."""
    meta = {f"{cfg.arch}.{key}": getattr(cfg, field) for key, field in GGUF_KEYS.items()}
    if experts_sized_by_ffn:
        meta[f"{cfg.arch}.feed_forward_length"] = cfg.moe_intermediate_size
    for key in _WRITTEN_IF_SET:  # written where they say something
        if meta[f"{cfg.arch}.{key}"] == _GGUF_DEFAULTS[key]:
            del meta[f"{cfg.arch}.{key}"]
    if shared_experts_counted:
        meta.pop(f"{cfg.arch}.expert_shared_feed_forward_length", None)
        if cfg.shared_expert_size:
            meta[f"{cfg.arch}.expert_shared_count"] = cfg.shared_expert_size // cfg.moe_intermediate_size
    if cfg.rope_scaling != "none":
        meta[f"{cfg.arch}.rope.scaling.type"] = cfg.rope_scaling
    if cfg.router != "softmax":
        meta[f"{cfg.arch}.expert_gating_func"] = {v: k for k, v in GATING_FUNCS.items()}[cfg.router]
    meta[f"{cfg.arch}.attention.value_length"] = cfg.head_dim
    meta[f"{cfg.arch}.expert_weights_norm"] = cfg.norm_topk_prob
    floats = ("epsilon", "freq_base", "weights_scale", "scaling.factor")
    return {k: (float(v) if k.endswith(floats) else v) for k, v in meta.items()}


def hf_common_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every family's ``config.json`` spells the same way."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
        num_experts=int(config["num_experts"] if "num_experts" in config else config["num_local_experts"]),
        num_experts_per_tok=int(config["num_experts_per_tok"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
        context_length=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        **hf_rope_scaling(rope),
    )


def hf_rope_scaling(rope: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE-scaling fields of a ``rope_parameters`` / ``rope_scaling`` dict; other
    scalings than YaRN are refused."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return {}
    if kind != "yarn":
        raise ValueError(f"RoPE scaling {kind!r} is not supported (only yarn)")
    if rope.get("attention_factor") not in (None, 1, 1.0):
        raise ValueError(f"YaRN with attention_factor={rope['attention_factor']} is not supported yet")
    if rope.get("beta_fast", 32) != 32 or rope.get("beta_slow", 1) != 1:
        raise ValueError("YaRN with beta_fast/beta_slow other than 32/1 is not supported")
    return {"rope_scaling": "yarn", "rope_factor": float(rope["factor"]),
            "rope_original_context": int(rope["original_max_position_embeddings"]),
            "rope_mscale": float(rope.get("mscale") or 0.0),
            "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
            "rope_yarn_truncate": bool(rope.get("truncate", True))}


def hf_to_gguf_tensors(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Rename a Hugging Face state dict to GGUF names, stacking experts; the features of ``cfg``
    say which optional tensors (q/k norms, biases, shared expert) must be there.

    Reads both expert layouts: fused in-memory (``mlp.experts.gate_up_proj`` [E, 2I, H],
    ``mlp.experts.down_proj`` [E, H, I]) and per-expert checkpoints
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``).
    """
    out: dict[str, np.ndarray] = {}
    for hf, gg in HF_GLOBAL_NAMES.items():
        if hf in state and not (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            out[gg] = np.asarray(state[hf])
    names = dict(HF_LAYER_NAMES)
    if cfg.qk_norm != "none":
        names.update(_HF_QK_NORM)
    if cfg.attn_bias:
        names.update(_HF_BIASES)
    if cfg.mla:  # the latent attention's tensors (the q path the config has) instead of q, k, v, o
        for proj in "qkvo":
            names.pop(f"self_attn.{proj}_proj.weight")
        q_path = ({"self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"}
                  if cfg.q_lora_rank else {"self_attn.q_proj.weight"})
        names.update({k: v for k, v in _HF_MLA.items() if k in q_path or not k.startswith("self_attn.q_")})
    moe_names = dict(_HF_MOE)
    if cfg.router_bias:
        moe_names["mlp.gate.e_score_correction_bias"] = "exp_probs_b.bias"
    for i in range(cfg.num_layers):
        hf_prefix, gg_prefix = f"model.layers.{i}.", f"blk.{i}."
        layer_names = dict(names)
        if i < cfg.first_dense_layers:
            layer_names.update(_HF_DENSE)
        else:
            layer_names.update(moe_names)
            if cfg.shared_expert_size:
                plural = hf_prefix + "mlp.shared_experts.gate_proj.weight" in state
                layer_names.update(_HF_SHARED_PLURAL if plural else _HF_SHARED)
        if cfg.mla:  # the latent's expansion split as llama.cpp stores it
            kv_b = need(state, hf_prefix + "self_attn.kv_b_proj.weight")
            out.update({gg_prefix + k: v for k, v in split_kv_b(kv_b, cfg).items()})
        for hf, gg in layer_names.items():
            out[gg_prefix + gg] = np.asarray(need(state, hf_prefix + hf))
        if i < cfg.first_dense_layers:
            continue
        if cfg.shared_expert_gate:  # HF: Linear(H, 1), weight [1, H]; GGUF: a vector [H]
            gate = np.asarray(need(state, hf_prefix + "mlp.shared_expert_gate.weight"))
            out[gg_prefix + "ffn_gate_inp_shexp.weight"] = gate.reshape(-1)
        gate, up, down = _hf_experts(state, hf_prefix, cfg)
        out[gg_prefix + "ffn_gate_exps.weight"] = gate
        out[gg_prefix + "ffn_up_exps.weight"] = up
        out[gg_prefix + "ffn_down_exps.weight"] = down
    return out


def split_kv_b(kv_b: np.ndarray, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A latent attention's expansion [nh * (nope + v), kv_lora] as llama.cpp stores it: per head
    the key part transposed, ``attn_k_b.weight`` [nh, kv_lora, nope], and ``attn_v_b.weight``
    [nh, v, kv_lora]."""
    nope = cfg.head_dim - cfg.rope_dim
    per_head = np.asarray(kv_b).reshape(cfg.num_heads, nope + cfg.v_dim, cfg.kv_lora_rank)
    return {"attn_k_b.weight": np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)),
            "attn_v_b.weight": np.ascontiguousarray(per_head[:, nope:])}


def _hf_experts(state: Mapping[str, np.ndarray], prefix: str, cfg: ModelConfig) -> tuple[np.ndarray, ...]:
    """Stacked gate [E, I, H], up [E, I, H], down [E, H, I] of one layer, from either HF layout."""
    fused = prefix + "mlp.experts.gate_up_proj"
    if fused in state:
        gate_up = np.asarray(state[fused])
        inter = cfg.moe_intermediate_size
        return gate_up[:, :inter], gate_up[:, inter:], np.asarray(need(state, prefix + "mlp.experts.down_proj"))
    return tuple(np.stack([np.asarray(need(state, f"{prefix}mlp.experts.{e}.{kind}_proj.weight"))
                           for e in range(cfg.num_experts)]) for kind in EXPERT_KINDS)


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its numpy shape (``output.weight`` optional when tied)."""
    H, E, I, S = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_size
    D = cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, H), "output_norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, H)
    q_norm, k_norm = {"head": ((cfg.head_dim,), (cfg.head_dim,)), "full": ((cfg.q_dim,), (cfg.kv_dim,)),
                      "none": (None, None)}[cfg.qk_norm]
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (H,), p + "ffn_norm.weight": (H,)})
        if cfg.mla:
            shapes.update(_latent_attention_shapes(p, cfg))
        else:
            shapes.update({
                p + "attn_q.weight": (cfg.q_dim, H),
                p + "attn_k.weight": (cfg.kv_dim, H),
                p + "attn_v.weight": (cfg.kv_dim, H),
                p + "attn_output.weight": (H, cfg.q_dim),
            })
        if q_norm is not None:
            shapes[p + "attn_q_norm.weight"], shapes[p + "attn_k_norm.weight"] = q_norm, k_norm
        if cfg.attn_bias:
            shapes.update({p + "attn_q.bias": (cfg.q_dim,), p + "attn_k.bias": (cfg.kv_dim,),
                           p + "attn_v.bias": (cfg.kv_dim,)})
        if cfg.attn_sinks:
            shapes[p + "attn_sinks.weight"] = (cfg.num_heads,)
        if i < cfg.first_dense_layers:
            shapes.update({p + "ffn_gate.weight": (D, H), p + "ffn_up.weight": (D, H), p + "ffn_down.weight": (H, D)})
            continue
        shapes.update({
            p + "ffn_gate_inp.weight": (E, H),
            p + "ffn_gate_exps.weight": (E, I, H),
            p + "ffn_up_exps.weight": (E, I, H),
            p + "ffn_down_exps.weight": (E, H, I),
        })
        if cfg.router_bias:
            shapes[p + "exp_probs_b.bias"] = (E,)
        if cfg.router_logit_bias:
            shapes[p + "ffn_gate_inp.bias"] = (E,)
        if cfg.expert_bias:
            shapes.update({p + "ffn_gate_exps.bias": (E, I), p + "ffn_up_exps.bias": (E, I),
                           p + "ffn_down_exps.bias": (E, H)})
        if S:
            shapes.update({p + "ffn_gate_shexp.weight": (S, H), p + "ffn_up_shexp.weight": (S, H),
                           p + "ffn_down_shexp.weight": (H, S)})
        if cfg.shared_expert_gate:
            shapes[p + "ffn_gate_inp_shexp.weight"] = (H,)
    return shapes


def norm_rope_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order that turns a q or k projection stored for llama.cpp's NORM RoPE (rotation pairs
    adjacent: its converter permutes Hugging Face's rows so) back into Hugging Face's NeoX order
    (pairs half a head apart): ``w_neox = w_norm[rows]``."""
    return np.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def hf_rows_for_norm_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A Hugging Face q or k projection [n_heads*hd, ...] in llama.cpp's NORM-RoPE row order (what
    its converter writes): the inverse of :func:`norm_rope_rows`."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def renamed(tensors: Mapping[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """``tensors`` (GGUF name -> anything) with per-layer suffixes renamed as a family's files name
    them (``renames``: canonical suffix after ``blk.N.`` -> the family's)."""
    return {stored_name(name, renames): value for name, value in tensors.items()}


def stored_name(name: str, renames: Mapping[str, str]) -> str:
    """The name under which a family's files store the canonical tensor ``name``."""
    if not name.startswith("blk."):
        return name
    block, index, suffix = name.split(".", 2)
    return f"{block}.{index}.{renames.get(suffix, suffix)}"


def _latent_attention_shapes(p: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    H, nh, lora, nope = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.head_dim - cfg.rope_dim
    shapes: dict[str, tuple[int, ...]] = {
        p + "attn_kv_a_mqa.weight": (lora + cfg.rope_dim, H),
        p + "attn_kv_a_norm.weight": (lora,),
        p + "attn_k_b.weight": (nh, lora, nope),
        p + "attn_v_b.weight": (nh, cfg.v_dim, lora),
        p + "attn_output.weight": (H, nh * cfg.v_dim),
    }
    if cfg.q_lora_rank:
        shapes.update({p + "attn_q_a.weight": (cfg.q_lora_rank, H), p + "attn_q_a_norm.weight": (cfg.q_lora_rank,),
                       p + "attn_q_b.weight": (cfg.q_dim, cfg.q_lora_rank)})
    else:
        shapes[p + "attn_q.weight"] = (cfg.q_dim, H)
    return shapes


def is_expert_tensor(name: str) -> bool:
    """True for the stacked routed-expert tensors (what hybrid inference places)."""
    return "_exps." in name


def is_shared_expert_tensor(name: str) -> bool:
    """True for a shared expert's matrices and gate (always active: dense weights for placement)."""
    return "_shexp." in name


def need(state: Mapping[str, Any], name: str) -> Any:
    """``state[name]``, or ValueError naming the missing weight."""
    if name not in state:
        raise ValueError(f"missing weight {name!r}")
    return state[name]
