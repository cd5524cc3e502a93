"""LoRA adapters on a model's attention projections, in torch, saved in PEFT's format.

``LoraLinear`` wraps one of the model's ``Linear`` (its frozen base runs as before: torch on a
device model, the C++ block kernels on a CPU model) and adds ``scale * (x A^T) B^T``; A starts
Kaiming-uniform, B at zero (PEFT's init: a fresh adapter changes nothing). Adapters save as
``adapter_config.json`` + ``adapter_model.safetensors`` under Hugging Face's module names
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``), which ``peft`` loads onto
the transformers model of the same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ktlab.model.layers import AttentionWeights, Linear

if TYPE_CHECKING:
    from ktlab.train.experts import ExpertLora

#: Projections an adapter may target: ktlab attribute -> Hugging Face module name.
TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoraLinear:
    """``base(x) + scale * (x A^T) B^T`` with trainable A [r, in] and B [out, r]."""

    def __init__(self, base: Linear, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        out_features, in_features = base.weight.shape
        self.base, self.rank, self.alpha = base, rank, alpha
        self.weight, self.bias, self.qmat = base.weight, base.bias, base.qmat  # what code reading a Linear sees
        self.A = torch.empty(rank, in_features, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = torch.zeros(out_features, rank, dtype=torch.float32)
        self.A.requires_grad_()
        self.B.requires_grad_()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.float() @ self.A.T) @ self.B.T * self.scale
        return self.base(x) + delta.to(x.dtype)

    def parameters(self) -> list[torch.Tensor]:
        return [self.A, self.B]


def attach_lora(model, rank: int, alpha: float, targets: tuple[str, ...] = tuple(TARGETS),
                seed: int = 0) -> dict[str, LoraLinear]:
    """Wrap the ``targets`` projections of every layer; returns the adapters by PEFT module name.
    Fused q/k/v matrices are dropped (each projection then runs on its own, with its adapter)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    generator = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoraLinear] = {}
    for layer in model.layers:
        attn = layer.attn
        if not isinstance(attn, AttentionWeights):
            raise ValueError(f"LoRA on {type(attn).__name__} (latent attention) is not supported yet")
        attn.qkv = None
        for target in targets:
            adapter = LoraLinear(getattr(attn, target), rank, alpha, generator)
            setattr(attn, target, adapter)
            adapters[f"base_model.model.model.layers.{layer.index}.self_attn.{TARGETS[target]}"] = adapter
    return adapters


#: The key prefix of layer N's expert adapters (ktlab's own keys: PEFT has no module for stacked experts).
EXPERT_PREFIX = "base_model.model.model.layers.{}.mlp.experts"


def attach_expert_lora(model, weights, rank: int, alpha: float, seed: int = 0) -> dict[str, ExpertLora]:
    """LoRA on every expert's gate, up and down in every MoE layer: the layer's experts then run in torch
    around the frozen block products (``LoraExperts``), for training and for inference."""
    from ktlab.train.experts import ExpertLora, FrozenExperts, LoraExperts

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg, generator = model.cfg, torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for moe, index in zip(model.moe_blocks(), cfg.moe_layer_ids, strict=True):
        frozen = FrozenExperts.of_layer(moe, weights, index)
        lora = ExpertLora(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, rank, alpha, generator)
        moe.autograd_experts = moe.backends["cpu"] = LoraExperts(frozen, lora)
        adapters[EXPERT_PREFIX.format(index)] = lora
    return adapters


def lora_parameters(adapters: dict) -> list[torch.Tensor]:
    """The trainable tensors, in a fixed order (for the optimizer and checkpoints)."""
    return [p for name in sorted(adapters) for p in adapters[name].parameters()]


def save_adapter(adapters: dict, out_dir: str | Path, base_model: str,
                 targets: tuple[str, ...] = tuple(TARGETS)) -> Path:
    """PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` in ``out_dir``; expert adapters
    (``ExpertLora``) go in the same file under ``EXPERT_PREFIX`` keys, stacked [E, ...], with
    ``ktlab_expert_lora`` in the config (PEFT loads the attention part)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(adapters.values()))
    experts = [name for name, a in adapters.items() if not isinstance(a, LoraLinear)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(TARGETS[t] for t in targets), "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True}
    if experts:  # only then: a pure attention adapter stays a plain PEFT config
        config["ktlab_expert_lora"] = True
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, adapter in adapters.items():
        if isinstance(adapter, LoraLinear):
            tensors[f"{name}.lora_A.weight"] = adapter.A.detach().contiguous()
            tensors[f"{name}.lora_B.weight"] = adapter.B.detach().contiguous()
            continue
        for proj in ("gate", "up", "down"):
            tensors[f"{name}.{proj}_proj.lora_A.weight"] = adapter.A[proj].detach().contiguous()
            tensors[f"{name}.{proj}_proj.lora_B.weight"] = adapter.B[proj].detach().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    return out


def load_adapter(model, adapter_dir: str | Path, weights=None) -> dict:
    """Apply a saved adapter (ours or any PEFT LoRA of these projections) to ``model`` without merging;
    one with expert adapters needs the model's ``weights`` (``open_weights``: their stored blocks)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a LoRA adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}): {exc}") \
            from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    by_module = {v: k for k, v in TARGETS.items()}
    targets = tuple(by_module[m] for m in config.get("target_modules", []) if m in by_module)
    adapters: dict = dict(attach_lora(model, int(config["r"]), float(config["lora_alpha"]), targets))
    if config.get("ktlab_expert_lora"):
        if weights is None:
            raise ValueError(f"{path}: the adapter has expert adapters: load it with the model's weights")
        for name, lora in attach_expert_lora(model, weights, int(config["r"]), float(config["lora_alpha"])).items():
            for proj in ("gate", "up", "down"):
                _copy_in(path, tensors, f"{name}.{proj}_proj", lora.A[proj], lora.B[proj])
            adapters[name] = lora
    for name, adapter in adapters.items():
        if isinstance(adapter, LoraLinear):
            _copy_in(path, tensors, name, adapter.A, adapter.B)
    return adapters


def _copy_in(path: Path, tensors: dict, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    stored_a, stored_b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
    if stored_a is None or stored_b is None or stored_a.shape != a.shape or stored_b.shape != b.shape:
        raise ValueError(f"{path}: adapter weights for {name} are missing or of the wrong shape")
    with torch.no_grad():
        a.copy_(stored_a.float())
        b.copy_(stored_b.float())
