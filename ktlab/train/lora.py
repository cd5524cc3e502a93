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

import torch

from ktlab.model.layers import AttentionWeights, Linear

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


def lora_parameters(adapters: dict[str, LoraLinear]) -> list[torch.Tensor]:
    """The trainable tensors, in a fixed order (for the optimizer and checkpoints)."""
    return [p for name in sorted(adapters) for p in adapters[name].parameters()]


def save_adapter(adapters: dict[str, LoraLinear], out_dir: str | Path, base_model: str,
                 targets: tuple[str, ...] = tuple(TARGETS)) -> Path:
    """PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` in ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(adapters.values()))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(TARGETS[t] for t in targets), "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, adapter in adapters.items():
        tensors[f"{name}.lora_A.weight"] = adapter.A.detach().contiguous()
        tensors[f"{name}.lora_B.weight"] = adapter.B.detach().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    return out


def load_adapter(model, adapter_dir: str | Path) -> dict[str, LoraLinear]:
    """Apply a saved adapter (ours or any PEFT LoRA of these projections) to ``model`` without merging."""
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
    adapters = attach_lora(model, int(config["r"]), float(config["lora_alpha"]), targets)
    for name, adapter in adapters.items():
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if a is None or b is None or a.shape != adapter.A.shape or b.shape != adapter.B.shape:
            raise ValueError(f"{path}: adapter weights for {name} are missing or of the wrong shape")
        with torch.no_grad():
            adapter.A.copy_(a.float())
            adapter.B.copy_(b.float())
    return adapters
