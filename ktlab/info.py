"""``ktlab info``: what a model is and what must fit where (expert bytes vs the rest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ktlab.model import open_weights
from ktlab.model.gguf import GGUFFile
from ktlab.serve.kv import page_bytes


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _decode_path(d: dict[str, Any]) -> str:
    differences = d["layout_differences"]
    if not differences:
        return "one C++ call (Qwen3 layout; Q8_0 / K-quant files with all experts on the CPU)"
    return "layer by layer on the same kernels (" + ", ".join(differences) + ")"


def _kv(c: dict[str, Any]) -> str:
    if not c["kv_lora_rank"]:
        return f"{c['num_kv_heads']} KV heads (GQA)"
    q = f"q latent {c['q_lora_rank']}, " if c["q_lora_rank"] else ""
    return (f"latent (MLA): {q}kv latent {c['kv_lora_rank']}, {c['rope_dim']} RoPE dims, "
            f"values x {c['v_head_dim'] or c['head_dim']}")


def _yarn(c: dict[str, Any]) -> str:
    if c["rope_scaling"] == "none":
        return ""
    return f", YaRN x{c['rope_factor']:g} of {c['rope_original_context']}"


def _router(c: dict[str, Any]) -> str:
    text = c["router"] + (" + correction bias" if c["router_bias"] else "")
    text += " of biased logits" if c["router_logit_bias"] else ""
    if c["router_groups"] > 1:
        text += f", best {c['router_topk_groups']} of {c['router_groups']} groups"
    return text + (f", scaled x{c['routed_scale']:g}" if c["routed_scale"] != 1.0 else "")


def _gpt_oss_features(c: dict[str, Any]) -> str:
    parts = ["attention sinks"] if c["attn_sinks"] else []
    if c["sliding_window"]:
        parts.append(f"{c['sliding_window']}-position window on {c['sliding_window_pattern'] - 1} of every "
                     f"{c['sliding_window_pattern']} layers")
    if c["expert_bias"]:
        parts.append("expert biases")
    if c["swiglu_limit"]:
        parts.append(f"SwiGLU clamped at {c['swiglu_limit']:g}")
    return "".join(", " + p for p in parts)


def _shared(c: dict[str, Any]) -> str:
    if not c["shared_expert_size"]:
        return "none"
    return f"width {c['shared_expert_size']}" + (" (sigmoid-gated)" if c["shared_expert_gate"] else "")


def describe(model: str | Path) -> dict[str, Any]:
    """A JSON-able description of a model: config, quant mix, byte split."""
    weights = open_weights(model)
    cfg = weights.config
    info: dict[str, Any] = {"path": str(weights.path), "architecture": cfg.arch, "config": cfg.to_dict()}
    info["layout_differences"] = cfg.layout_differences()
    # a one-position page of float32 cache rows (latent attention: one row serves keys and values)
    info["kv_bytes_per_position"] = page_bytes(1, cfg.num_layers, cfg.cache_heads, cfg.cache_head_dim, "float32",
                                               cfg.mla)
    if isinstance(weights, GGUFFile):
        summary = weights.byte_summary()
        info["name"] = weights.get("general.name") if weights.has("general.name") else None
        info["file_bytes"] = weights.path.stat().st_size
        info.update(summary)
        info["bytes_per_expert"] = summary["expert_bytes"] // (cfg.num_moe_layers * cfg.num_experts)
    active = cfg.num_moe_layers * cfg.num_experts_per_tok * cfg.expert_params
    info["expert_params_total"] = cfg.num_moe_layers * cfg.num_experts * cfg.expert_params
    info["expert_params_active_per_token"] = active
    return info


def format_description(d: dict[str, Any]) -> str:
    """Human-readable text of ``describe``'s result."""
    c = d["config"]
    lines = [
        f"model          {d.get('name') or ''}  ({d['path']})",
        f"architecture   {d['architecture']}: {c['num_layers']} layers, hidden {c['hidden_size']}, "
        f"vocab {c['vocab_size']}, context {c['context_length']}",
        f"attention      {c['num_heads']} heads x {c['head_dim']}, {_kv(c)}, rope theta {c['rope_theta']:g}"
        f"{_yarn(c)}",
        f"kv cache       {d['kv_bytes_per_position'] / 1024:.1f} KiB per position (float32)",
        f"decode step    {_decode_path(d)}",
        f"layers         {c['num_layers'] - c['first_dense_layers']} MoE, {c['first_dense_layers']} dense"
        f"{' (first, MLP width ' + str(c['intermediate_size']) + ')' if c['first_dense_layers'] else ''}",
        f"experts        {c['num_experts']} per layer, top-{c['num_experts_per_tok']}, expert width "
        f"{c['moe_intermediate_size']}, renormalised top-k: {c['norm_topk_prob']}, router: {_router(c)}",
        f"features       q/k norm: {c['qk_norm']}, q/k/v biases: {c['attn_bias']}, shared expert: {_shared(c)}, "
        f"rope: {c['rope_style']}{'' if not c['rope_dim'] else ' on ' + str(c['rope_dim']) + ' dims'}"
        f"{_gpt_oss_features(c)}",
        f"expert params  {d['expert_params_total'] / 1e6:.1f} M total, "
        f"{d['expert_params_active_per_token'] / 1e6:.2f} M active per token",
    ]
    if "expert_bytes" in d:
        total = d["expert_bytes"] + d["other_bytes"]
        mix = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sorted(d["params_by_type"].items(), key=lambda kv: -kv[1]))
        lines += [
            f"quant mix      {mix} parameters",
            f"bytes          routed experts {_gib(d['expert_bytes'])} ({100 * d['expert_bytes'] / total:.1f}%) "
            f"| rest {_gib(d['other_bytes'])} (attention, embeddings, norms, router"
            f"{', shared expert ' + _gib(d['shared_expert_bytes']) if d['shared_expert_bytes'] else ''}: GPU first)",
            f"one expert     {_gib(d['bytes_per_expert'])} (one layer's {c['num_experts']} experts: "
            f"{_gib(d['bytes_per_expert'] * c['num_experts'])})",
            f"file           {_gib(d['file_bytes'])}",
        ]
    return "\n".join(lines)
