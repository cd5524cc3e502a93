"""Frozen, validated configuration objects shared across ktlab.

Every public config validates on construction and raises ``ValueError`` with a message that
names the field, the value and what was expected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _ints_at_least(obj: Any, names: tuple[str, ...], low: int, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        _require(
            isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"{type(obj).__name__}.{name} must be {what}{' or None' if allow_none else ''}, got {value!r}",
        )


def check_positive_ints(obj: Any, names: tuple[str, ...], allow_none: bool = False) -> None:
    """The one positive-integer check of config objects: ``ValueError`` naming ``obj``'s class, the
    field and the value when one of ``names`` is not an int >= 1 (or None, when ``allow_none``)."""
    _ints_at_least(obj, names, 1, allow_none)


_positive_ints = check_positive_ints


#: Kinds of q/k normalisation (ModelConfig.qk_norm).
QK_NORMS = ("head", "full", "none")
#: How q/k rows are stored for RoPE (ModelConfig.rope_style): "neox" pairs half a head apart
#: (Hugging Face's order), "norm" adjacent pairs (llama.cpp's files of the llama family).
ROPE_STYLES = ("neox", "norm")
#: How router logits become expert scores (ModelConfig.router).
ROUTERS = ("softmax", "sigmoid")
#: RoPE frequency scalings (ModelConfig.rope_scaling).
ROPE_SCALINGS = ("none", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes, hyper-parameters and architecture features of a Mixture-of-Experts decoder.

    ``moe_intermediate_size`` is the hidden width of one expert; ``intermediate_size`` that of a
    dense MLP (unused by all-MoE models, kept so files round-trip).

    The features say how a family differs from Qwen3-MoE (their defaults): ``qk_norm`` is
    ``"head"`` (RMSNorm of each head's q and k, Qwen3), ``"full"`` (of the whole q and k
    projections, OLMoE) or ``"none"``; ``attn_bias`` adds biases to q, k and v (Qwen2-MoE);
    ``shared_expert_size`` > 0 is the width of an always-active shared expert (Qwen2-MoE), whose
    output ``shared_expert_gate`` scales by sigmoid(x . g) per token; ``rope_style`` "norm" says
    the GGUF stores q/k rows for llama.cpp's adjacent-pair RoPE (Mixtral), reordered at load;
    ``rope_dim`` > 0 rotates only that many leading dims of a head (GLM-4.5: half).
    ``first_dense_layers`` leading layers have a dense MLP of width ``intermediate_size`` instead of
    experts (GLM-4.5, DeepSeek); the routed-expert layers are ``moe_layer_ids``, and everything
    that counts experts per layer (traces, caches, placements) counts these ``num_moe_layers``.
    Routing: ``router`` "softmax" or "sigmoid" scores; ``router_bias``: a per-expert bias added
    to the scores for the choice only; the choice restricted to the ``router_topk_groups`` best of
    ``router_groups`` expert groups (a group scored by its two best); the chosen scores
    renormalised where ``norm_topk_prob`` and multiplied by ``routed_scale``.
    ``rope_scaling`` "yarn" stretches RoPE ``rope_factor`` times beyond the
    ``rope_original_context`` positions the model was trained on (YaRN: ``ktlab.model.rope_freqs``);
    ``rope_mscale`` / ``rope_mscale_all_dim`` (DeepSeek) set YaRN's temperatures apart.
    ``kv_lora_rank`` > 0: multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values
    come from a ``kv_lora_rank`` latent plus one shared RoPE key of ``rope_dim``; a query head is
    ``head_dim`` = nope + ``rope_dim`` wide (through a ``q_lora_rank`` latent where > 0), a value
    head ``v_head_dim``.
    gpt-oss: ``router_logit_bias`` adds a learned bias to the router logits (before the softmax
    top-k); ``attn_sinks``: a learned per-head logit that joins every softmax's denominator (and
    takes no value); ``sliding_window`` > 0: in layers where ``i % sliding_window_pattern <
    sliding_window_pattern - 1`` (llama.cpp's rule; gpt-oss: 2, the even layers) a query sees only
    the last ``sliding_window`` positions (itself included); ``expert_bias``: biases on each expert's
    gate, up and down; ``swiglu_limit`` > 0: the clamped SwiGLU (min(g, limit) and u clipped to
    +-limit, ``(u + 1) * g * sigmoid(swiglu_alpha * g)``); ``rope_yarn_truncate`` false: YaRN's
    ramp ends not rounded to whole dims (Hugging Face's ``truncate``).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    context_length: int = 4096
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    qk_norm: str = "head"
    attn_bias: bool = False
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    rope_style: str = "neox"
    rope_dim: int = 0
    first_dense_layers: int = 0
    router: str = "softmax"
    router_bias: bool = False
    router_groups: int = 1
    router_topk_groups: int = 1
    routed_scale: float = 1.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_original_context: int = 0
    rope_mscale: float = 0.0
    rope_mscale_all_dim: float = 0.0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    v_head_dim: int = 0
    router_logit_bias: bool = False
    attn_sinks: bool = False
    sliding_window: int = 0
    sliding_window_pattern: int = 2
    expert_bias: bool = False
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    rope_yarn_truncate: bool = True

    def __post_init__(self) -> None:
        _require(isinstance(self.arch, str) and self.arch != "", "ModelConfig.arch must be a non-empty string")
        _positive_ints(
            self,
            (
                "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "context_length",
            ),
        )
        _ints_at_least(self, ("intermediate_size", "shared_expert_size"), 0)
        _require(
            self.num_experts_per_tok <= self.num_experts,
            f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
            f"num_experts ({self.num_experts})",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
            f"({self.num_kv_heads})",
        )
        _require(self.head_dim % 2 == 0, f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rms_norm_eps > 0, f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        _require(self.qk_norm in QK_NORMS,
                 f"ModelConfig.qk_norm must be one of {', '.join(QK_NORMS)}, got {self.qk_norm!r}")
        _require(self.rope_style in ROPE_STYLES,
                 f"ModelConfig.rope_style must be one of {', '.join(ROPE_STYLES)}, got {self.rope_style!r}")
        _ints_at_least(self, ("rope_dim", "first_dense_layers"), 0)
        _positive_ints(self, ("router_groups", "router_topk_groups"))
        _require(self.rope_dim % 2 == 0 and self.rope_dim <= self.head_dim,
                 f"ModelConfig.rope_dim must be even and at most head_dim ({self.head_dim}), got {self.rope_dim}")
        _require(self.first_dense_layers < self.num_layers,
                 f"ModelConfig.first_dense_layers ({self.first_dense_layers}) leaves no MoE layer of {self.num_layers}")
        _require(self.first_dense_layers == 0 or self.intermediate_size > 0,
                 "ModelConfig.intermediate_size must be > 0 for the dense layers (first_dense_layers > 0)")
        _require(self.router in ROUTERS, f"ModelConfig.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        _require(self.num_experts % self.router_groups == 0 and self.router_topk_groups <= self.router_groups,
                 f"ModelConfig.router_groups ({self.router_groups}) must divide num_experts ({self.num_experts}) "
                 f"and router_topk_groups ({self.router_topk_groups}) be at most it")
        _require(self.rope_scaling in ROPE_SCALINGS,
                 f"ModelConfig.rope_scaling must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        _ints_at_least(self, ("rope_original_context", "q_lora_rank", "kv_lora_rank", "v_head_dim"), 0)
        _require(self.kv_lora_rank == 0 or (0 < self.rope_dim < self.head_dim and self.num_kv_heads == self.num_heads),
                 "ModelConfig: latent attention (kv_lora_rank > 0) needs 0 < rope_dim < head_dim and "
                 "num_kv_heads == num_heads")
        _require(self.rope_scaling == "none" or (self.rope_factor >= 1 and self.rope_original_context > 0),
                 f"ModelConfig: YaRN needs rope_factor >= 1 and rope_original_context > 0, got {self.rope_factor}, "
                 f"{self.rope_original_context}")
        _require(self.routed_scale > 0, f"ModelConfig.routed_scale must be > 0, got {self.routed_scale}")
        _ints_at_least(self, ("sliding_window",), 0)
        _positive_ints(self, ("sliding_window_pattern",))
        _require(self.swiglu_limit >= 0, f"ModelConfig.swiglu_limit must be >= 0, got {self.swiglu_limit}")
        _require(not self.shared_expert_gate or self.shared_expert_size > 0,
                 "ModelConfig.shared_expert_gate needs a shared expert (shared_expert_size > 0)")

    # Derived sizes (parameters, not bytes: quantization decides bytes).
    @property
    def expert_params(self) -> int:
        """Parameters of one expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def q_dim(self) -> int:
        """Width of the query projection output."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection output."""
        return self.num_kv_heads * self.head_dim

    @property
    def qwen3_layout(self) -> bool:
        """Whether the layers are Qwen3-MoE's exactly (per-head q/k norm, no biases, no shared
        expert): the fused C++ decode kernels are written for that layout."""
        return self.cpp_attention_block and self.shared_expert_size == 0 and self.first_dense_layers == 0

    @property
    def cpp_attention_block(self) -> bool:
        """Whether a layer's attention half and router are what the fused C++ decode block computes
        (per-head q/k norm, no biases, RoPE on whole heads, softmax top-k, no latent attention)."""
        return (self.qk_norm == "head" and not self.attn_bias and self.rotary_dim == self.head_dim
                and self.softmax_routing and not self.mla and not self.attn_sinks and not self.sliding_window
                and not self.expert_mlp_differs)

    @property
    def expert_mlp_differs(self) -> bool:
        """Whether an expert is more than SwiGLU without biases (gpt-oss: biases, clamped SwiGLU)."""
        return self.expert_bias or self.swiglu_limit > 0

    def layer_window(self, layer: int) -> int:
        """Positions block ``layer`` attends to (its query's own included); 0: all."""
        n = self.sliding_window_pattern
        return self.sliding_window if self.sliding_window and layer % n < n - 1 else 0

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention (DeepSeek)."""
        return self.kv_lora_rank > 0

    @property
    def cache_heads(self) -> int:
        """KV heads the cache holds a row for per position (latent attention: one, the latent)."""
        return 1 if self.mla else self.num_kv_heads

    @property
    def cache_head_dim(self) -> int:
        """Width of a cached key (and value) row: a head, or the latent plus the RoPE key."""
        return self.kv_lora_rank + self.rope_dim if self.mla else self.head_dim

    @property
    def v_dim(self) -> int:
        """Width of a value head (the KV pool's value rows)."""
        return self.v_head_dim or self.head_dim

    def layout_differences(self) -> list[str]:
        """Why the layers are not Qwen3-MoE's exactly (empty when ``qwen3_layout``): what keeps a
        decode step off the one fused C++ call."""
        reasons = {
            f"q/k norm {self.qk_norm}": self.qk_norm != "head",
            "q/k/v biases": self.attn_bias,
            "shared experts": self.shared_expert_size > 0,
            "dense layers": self.first_dense_layers > 0,
            "partial RoPE": self.rotary_dim != self.head_dim and not self.mla,
            f"{self.router} routing" + self._routing_extras(): not self.softmax_routing,
            "latent attention": self.mla,
            "attention sinks": self.attn_sinks,
            "sliding-window layers": self.sliding_window > 0,
            "expert biases / clamped SwiGLU": self.expert_mlp_differs,
        }
        return [reason for reason, applies in reasons.items() if applies]

    def _routing_extras(self) -> str:
        extras = {"groups": self.router_groups > 1, "score bias": self.router_bias,
                  "scale": self.routed_scale != 1.0, "logit bias": self.router_logit_bias}
        named = [name for name, applies in extras.items() if applies]
        return " with " + "/".join(named) if named else ""

    @property
    def softmax_routing(self) -> bool:
        """Whether experts are chosen as Qwen3 does (softmax, top-k over all, no bias or scale):
        the C++ router's rule."""
        return (self.router == "softmax" and not self.router_bias and self.router_groups == 1
                and self.routed_scale == 1.0 and not self.router_logit_bias)

    @property
    def rotary_dim(self) -> int:
        """Dims of a head that RoPE rotates."""
        return self.rope_dim or self.head_dim

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts (the rows of every per-layer expert table)."""
        return self.num_layers - self.first_dense_layers

    @property
    def moe_layer_ids(self) -> range:
        """Block index (``blk.N``) of each MoE layer, in order."""
        return range(self.first_dense_layers, self.num_layers)

    @property
    def shared_expert_params(self) -> int:
        """Parameters of a layer's shared expert (0 without one)."""
        return 3 * self.hidden_size * self.shared_expert_size

    @property
    def attention_params(self) -> int:
        """Parameters of one layer's q, k, v and output projections (latent attention: its q path,
        the kv latent and its expansion)."""
        H = self.hidden_size
        if self.mla:
            q = self.q_lora_rank * (H + self.q_dim) if self.q_lora_rank else self.q_dim * H
            kv = (self.kv_lora_rank + self.rope_dim) * H
            expand = self.kv_lora_rank * self.num_heads * (self.head_dim - self.rope_dim + self.v_dim)
            return q + kv + expand + H * self.num_heads * self.v_dim
        return (self.q_dim + 2 * self.kv_dim) * H + H * self.q_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (for JSON/TOML)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring unknown keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
