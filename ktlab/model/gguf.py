"""Read GGUF models through the ``gguf`` package: metadata -> ModelConfig, tensors -> arrays.

Quantized blocks stay raw (``RawTensor``) for the CPU kernels and are dequantized on request for
torch. Every problem (missing, truncated or corrupt file, wrong architecture, unsupported quant
type, missing tensor or key) raises ``ModelFormatError`` naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ktlab.config import ModelConfig
from ktlab.errors import ModelFormatError
from ktlab.model.registry import architecture, supported_architectures
from ktlab.model.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
SUPPORTED_QTYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q6_K})


@dataclass(frozen=True)
class RawTensor:
    """A tensor exactly as stored: ``data`` is the on-disk array (uint8 bytes for block formats).

    ``shape`` is the logical numpy shape (last axis = row of the matrix).
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of storage."""
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """float32 array of ``shape``."""
        return np.asarray(gguf.quants.dequantize(self.data, self.qtype), dtype=np.float32).reshape(self.shape)


class GGUFFile:
    """An opened GGUF model file (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such model file")
        size = self.path.stat().st_size
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as exc:  # the gguf package raises many kinds on corrupt input
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({_describe(exc)})") from None
        self.arch = self.get("general.architecture")
        if self.arch not in supported_architectures():
            raise ModelFormatError(
                f"{self.path}: general.architecture is {self.arch!r}, supported: "
                f"{', '.join(supported_architectures())}"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelFormatError(
                    f"{self.path}: truncated: tensor {t.name} needs bytes up to {end}, file has {size}"
                )

    # -- metadata ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether metadata ``key`` is present."""
        return key in self._reader.fields

    def get(self, key: str) -> Any:
        """Metadata value of ``key`` (KeyError if absent, ModelFormatError if unreadable)."""
        field = self._reader.fields.get(key)
        if field is None:
            raise KeyError(key)
        try:
            return field.contents()
        except Exception as exc:
            raise ModelFormatError(f"{self.path}: metadata field {key} is corrupt ({_describe(exc)})") from None

    def require(self, key: str) -> Any:
        """Metadata value of ``key``; a missing key is a ModelFormatError naming it."""
        try:
            return self.get(key)
        except KeyError:
            raise ModelFormatError(f"{self.path}: missing metadata field {key}") from None

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """All metadata except the (long) tokenizer arrays."""
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
        return {k: self.get(k) for k in self._reader.fields if not k.startswith("GGUF.") and k not in skip}

    @cached_property
    def config(self) -> ModelConfig:
        """The validated model configuration."""
        module = architecture(self.arch)
        embed = self.tensor_info("token_embd.weight")
        try:
            cfg = module.config_from_gguf(self.get, vocab_size=int(embed.shape[0]))
        except KeyError as exc:
            raise ModelFormatError(f"{self.path}: missing metadata field {exc.args[0]}") from None
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: invalid model metadata: {exc}") from None
        self._check_shapes(cfg, module.expected_tensor_shapes(cfg))
        return cfg

    def _check_shapes(self, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            info = self.tensor_info(name)
            if info.shape != shape:
                raise ModelFormatError(f"{self.path}: tensor {name} has shape {info.shape}, expected {shape}")
        if cfg.tie_word_embeddings is False and "output.weight" not in self._tensors:
            raise ModelFormatError(f"{self.path}: missing tensor output.weight")

    # -- tensors ----------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Names of all tensors in file order."""
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` is in the file."""
        return name in self._tensors

    def tensor_info(self, name: str) -> RawTensor:
        """The tensor as stored (no copy); unsupported quant types are reported here."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: missing tensor {name}")
        try:
            qtype = Q(int(t.tensor_type))
        except ValueError:
            raise ModelFormatError(f"{self.path}: tensor {name} has unknown type id {int(t.tensor_type)}") from None
        if qtype not in SUPPORTED_QTYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_QTYPES))
            raise ModelFormatError(
                f"{self.path}: tensor {name} uses unsupported quant type {qtype.name} (supported: {supported})"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return RawTensor(name, qtype, shape, t.data)

    def raw(self, name: str) -> RawTensor:
        """Alias of ``tensor_info`` for the kernels: the block data as stored."""
        return self.tensor_info(name)

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32."""
        info = self.tensor_info(name)
        try:
            return info.dequantize()
        except Exception as exc:
            raise ModelFormatError(f"{self.path}: tensor {name} could not be decoded ({_describe(exc)})") from None

    # -- tokenizer --------------------------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        """The byte-level BPE tokenizer and chat template stored in the file."""
        model = self.require("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelFormatError(f"{self.path}: tokenizer.ggml.model is {model!r}, only 'gpt2' (BPE) is supported")
        tokens = self.require("tokenizer.ggml.tokens")
        merges = self.require("tokenizer.ggml.merges")
        types = self.get("tokenizer.ggml.token_type") if self.has("tokenizer.ggml.token_type") else None
        pre = self.get("tokenizer.ggml.pre") if self.has("tokenizer.ggml.pre") else "gpt2"
        template = self.get("tokenizer.chat_template") if self.has("tokenizer.chat_template") else None
        bos = self.get("tokenizer.ggml.bos_token_id") if self.has("tokenizer.ggml.bos_token_id") else None
        try:
            return Tokenizer.from_vocab(
                tokens, merges, types, pre, eos_id=int(self.require("tokenizer.ggml.eos_token_id")),
                bos_id=None if bos is None else int(bos), chat_template=template,
            )
        except ValueError as exc:
            raise ModelFormatError(f"{self.path}: tokenizer: {exc}") from None

    # -- summary ----------------------------------------------------------------------------
    def byte_summary(self) -> dict[str, Any]:
        """Bytes of routed experts vs the rest, and the quant mix (parameters per type)."""
        module = architecture(self.arch)
        expert_bytes = other_bytes = 0
        mix: dict[str, int] = {}
        for name in self._tensors:
            info = self.tensor_info(name)
            if module.is_expert_tensor(name):
                expert_bytes += info.nbytes
            else:
                other_bytes += info.nbytes
            mix[info.qtype.name] = mix.get(info.qtype.name, 0) + int(np.prod(info.shape))
        return {"expert_bytes": expert_bytes, "other_bytes": other_bytes, "params_by_type": mix}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
