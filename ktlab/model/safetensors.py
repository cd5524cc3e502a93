"""Load the same architectures from a Hugging Face directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from ktlab.config import ModelConfig
from ktlab.errors import ModelFormatError
from ktlab.model.registry import architecture_for_hf
from ktlab.model.tokenizer import Tokenizer


class HFDirectory:
    """A Hugging Face model directory, exposed under GGUF tensor names (experts stacked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelFormatError(f"{self.path}: no config.json (not a Hugging Face model directory)")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{config_path}: unreadable config ({exc})") from None
        try:
            self.module = architecture_for_hf(str(self.hf_config.get("model_type")))
            self.config: ModelConfig = self.module.config_from_hf(self.hf_config)
        except KeyError as exc:
            raise ModelFormatError(f"{config_path}: missing field {exc.args[0]}") from None
        except (ValueError, TypeError) as exc:
            raise ModelFormatError(f"{config_path}: {exc}") from None
        self.arch = self.config.arch
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise ModelFormatError(f"{self.path}: no *.safetensors files")

    @cached_property
    def _tensors(self) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        state: dict[str, np.ndarray] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        state[key] = f.get_tensor(key).float().numpy()
            except Exception as exc:
                raise ModelFormatError(f"{file}: unreadable safetensors ({exc})") from None
        try:
            return self.module.hf_to_gguf_tensors(state, self.config)
        except ValueError as exc:
            raise ModelFormatError(f"{self.path}: {exc}") from None

    def has_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` (GGUF naming) exists."""
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        """float32 tensor by GGUF name."""
        if name not in self._tensors:
            raise ModelFormatError(f"{self.path}: missing tensor {name}")
        return self._tensors[name]

    def tokenizer(self) -> Tokenizer:
        """The directory's tokenizer.json (+ chat template from tokenizer_config.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        tok_path = self.path / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelFormatError(f"{self.path}: no tokenizer.json")
        backend = HFTokenizer.from_file(str(tok_path))
        cfg_path = self.path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        eos_token = tok_cfg.get("eos_token")
        eos = backend.token_to_id(eos_token) if isinstance(eos_token, str) else self.hf_config.get("eos_token_id")
        if eos is None:
            raise ModelFormatError(f"{self.path}: cannot find the end-of-sequence token")
        special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return Tokenizer(backend, int(eos), None, tok_cfg.get("chat_template"), special)
