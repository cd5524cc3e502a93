"""Model loading: GGUF files and Hugging Face directories, by path or by bundled name."""

from __future__ import annotations

from pathlib import Path

import torch

from ktlab.errors import ModelFormatError
from ktlab.model.gguf import GGUFFile
from ktlab.model.registry import architecture
from ktlab.model.safetensors import HFDirectory
from ktlab.model.tokenizer import Tokenizer

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
BUNDLED = {"tiny": MODELS_DIR / "tiny-qwen3moe-q8_0.gguf"}


def resolve_model_path(model: str | Path) -> Path:
    """A bundled name ("tiny") or a path to a GGUF file / Hugging Face directory."""
    path = BUNDLED.get(str(model), Path(model))
    if not path.exists():
        hint = f" (bundled names: {', '.join(BUNDLED)})" if str(model) not in BUNDLED else ""
        raise ModelFormatError(f"{path}: no such model file or directory{hint}")
    return path


def open_weights(model: str | Path) -> GGUFFile | HFDirectory:
    """Open a model's weights without loading them."""
    path = resolve_model_path(model)
    return HFDirectory(path) if path.is_dir() else GGUFFile(path)


def load_model(model: str | Path = "tiny", dtype: torch.dtype = torch.float32, **kwargs):
    """(Model, Tokenizer) for a bundled name, a GGUF file or a Hugging Face directory."""
    weights = open_weights(model)
    cfg = weights.config
    tokenizer = weights.tokenizer()
    return architecture(cfg.arch).Model(cfg, weights, dtype=dtype, **kwargs), tokenizer


__all__ = ["GGUFFile", "HFDirectory", "Tokenizer", "load_model", "open_weights", "resolve_model_path", "BUNDLED"]
