"""Registry of supported architectures: one module per architecture, looked up by name.

An architecture module provides ``ARCH`` (the GGUF ``general.architecture``), ``HF_MODEL_TYPES``,
``config_from_gguf``, ``config_from_hf``, ``gguf_metadata``, ``hf_to_gguf_tensors`` and ``Model``.
Shared naming and config mapping live in ``ktlab.model.arch_common``, the model itself in
``ktlab.model.moe_decoder``; an architecture file states its features. Adding a family means
adding one file and one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES: dict[str, str] = {
    "qwen3moe": "ktlab.model.qwen3_moe",
    "qwen2moe": "ktlab.model.qwen2_moe",
    "olmoe": "ktlab.model.olmoe",
    "llama": "ktlab.model.llama_moe",
    "glm4moe": "ktlab.model.glm4_moe",
    "deepseek2": "ktlab.model.deepseek2",
    "gpt-oss": "ktlab.model.gpt_oss",
}


def supported_architectures() -> list[str]:
    """GGUF architecture names ktlab can load."""
    return sorted(_MODULES)


def architecture(name: str) -> ModuleType:
    """The module implementing GGUF architecture ``name``."""
    if name not in _MODULES:
        raise ValueError(f"unsupported architecture {name!r} (supported: {', '.join(supported_architectures())})")
    return importlib.import_module(_MODULES[name])


def architecture_for_hf(model_type: str) -> ModuleType:
    """The module implementing a Hugging Face ``config.json`` ``model_type``."""
    for name in _MODULES:
        module = architecture(name)
        if model_type in module.HF_MODEL_TYPES:
            return module
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}")
