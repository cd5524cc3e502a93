"""Write GGUF files (bundled tiny model, synthetic models, test fixtures).

Tensors are given under their GGUF names (the canonical names inside ktlab) as float arrays in
numpy (row-major, last axis = the row that is quantized) or produced lazily by a callable, so a
multi-gigabyte synthetic model streams to disk one tensor at a time. The storage type is one
GGML type for every matrix (``WRITABLE_QTYPES``) or one of llama.cpp's mixes Q4_K_M / Q5_K_M / MXFP4_MOE
(``ktlab.model.mixes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from ktlab.config import ModelConfig
from ktlab.model.mixes import QUANT_MIXES, mixed_qtype
from ktlab.model.quantize import fallback_qtype, quantize
from ktlab.model.registry import architecture

QTYPES = {t.name: t for t in gguf.GGMLQuantizationType}
WRITABLE_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
# What a writer's ``quant`` may be: one type for all matrices, or a llama.cpp mix.
QUANT_CHOICES = (*WRITABLE_QTYPES, *QUANT_MIXES)


@dataclass(frozen=True)
class GGUFTokenizerData:
    """What a GGUF needs to rebuild its tokenizer and chat template: byte-level BPE (``model``
    "gpt2": merges and a pre-tokenizer name) or SentencePiece BPE ("llama": a score per piece)."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str
    eos_id: int
    bos_id: int | None = None
    padding_id: int | None = None
    chat_template: str | None = None
    model: str = "gpt2"
    scores: list[float] | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its GGUF name, float shape, storage type and a producer of its values."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]


def parse_qtype(name: str) -> gguf.GGMLQuantizationType:
    """GGML type from its name, restricted to the types ktlab can write."""
    if name.upper() not in WRITABLE_QTYPES:
        raise ValueError(f"cannot write quant type {name!r}; choose one of {', '.join(WRITABLE_QTYPES)}")
    return QTYPES[name.upper()]


def check_quant(quant: str) -> str:
    """``quant`` upper-cased if it is one of QUANT_CHOICES (a writable type or a mix), else ValueError."""
    if quant.upper() not in QUANT_CHOICES:
        raise ValueError(f"unknown quant type {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    return quant.upper()


def storage_qtype(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms, biases (gpt-oss's per-expert ones are 2-D) and the router stay F32; matrices take
    ``wanted`` if their rows fit its blocks."""
    if len(shape) < 2 or name.endswith(("ffn_gate_inp.weight", ".bias")):
        return gguf.GGMLQuantizationType.F32
    return fallback_qtype(shape[-1], wanted)


def tensor_qtype(quant: str, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> gguf.GGMLQuantizationType:
    """Storage type of tensor ``name`` when writing ``cfg`` as ``quant`` (one of QUANT_CHOICES).

    A single type goes to every matrix whose rows fit it (``storage_qtype``); a mix (Q4_K_M,
    Q5_K_M) picks per tensor as llama.cpp does (``mixed_qtype``), then the same rules apply.
    """
    mix = QUANT_MIXES.get(quant.upper())
    if mix is None:
        return storage_qtype(name, shape, parse_qtype(quant))
    wanted = mixed_qtype(
        mix.name, name, cfg.num_layers, n_experts=cfg.num_experts, tied_embeddings=cfg.tie_word_embeddings
    )
    return storage_qtype(name, shape, wanted)


def quant_file_type(quant: str) -> gguf.LlamaFileType | None:
    """``general.file_type`` of a mix; None for a single type (the writer derives it from the tensors)."""
    mix = QUANT_MIXES.get(quant.upper())
    return None if mix is None else mix.file_type


def _encode(spec: TensorSpec) -> np.ndarray:
    data = np.ascontiguousarray(spec.produce(), dtype=np.float32)
    if tuple(data.shape) != spec.shape:
        raise ValueError(f"tensor {spec.name}: produced shape {data.shape}, declared {spec.shape}")
    if spec.qtype == gguf.GGMLQuantizationType.F32:
        return data
    return quantize(data, spec.qtype)


def write_gguf(
    path: str | Path,
    cfg: ModelConfig,
    specs: Iterable[TensorSpec],
    tokenizer: GGUFTokenizerData,
    name: str = "ktlab model",
    progress: bool = False,
    file_type: gguf.LlamaFileType | None = None,
) -> Path:
    """Stream a GGUF: metadata of ``cfg`` and ``tokenizer``, then each tensor in order.

    ``file_type`` (``general.file_type``) defaults to the one of the dominant matrix type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    writer.add_name(name)
    writer.add_file_type(_file_type(specs) if file_type is None else file_type)
    for key, value in architecture(cfg.arch).gguf_metadata(cfg).items():
        _add_value(writer, key, value)
    _add_tokenizer(writer, tokenizer)
    for spec in specs:
        nbytes = _nbytes(spec.shape, spec.qtype)
        # Float shape + raw_dtype: gguf derives nothing from the dtype but the "not bytes" fact.
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), nbytes, raw_dtype=spec.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in tqdm(specs, desc=f"writing {path.name}", unit="tensor", disable=not progress):
        writer.write_tensor_data(_encode(spec))
    writer.close()
    return path


def write_gguf_from_arrays(
    path: str | Path,
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    tokenizer: GGUFTokenizerData,
    qtype: str = "Q8_0",
    name: str = "ktlab model",
) -> Path:
    """Write in-memory float tensors (GGUF names) as ``qtype`` (a type or mix of QUANT_CHOICES)."""
    qtype = check_quant(qtype)
    specs = [
        TensorSpec(k, tuple(v.shape), tensor_qtype(qtype, k, tuple(v.shape), cfg), (lambda v=v: v))
        for k, v in tensors.items()
    ]
    return write_gguf(path, cfg, specs, tokenizer, name=name, file_type=quant_file_type(qtype))


def write_gguf_from_hf_state(
    path: str | Path,
    cfg: ModelConfig,
    state: Mapping[str, np.ndarray],
    tokenizer: GGUFTokenizerData,
    qtype: str = "Q8_0",
    name: str = "ktlab model",
) -> Path:
    """Write a Hugging Face state dict (fused or per-expert layout) as GGUF."""
    tensors = architecture(cfg.arch).hf_to_gguf_tensors(state, cfg)
    return write_gguf_from_arrays(path, cfg, tensors, tokenizer, qtype=qtype, name=name)


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block_size * type_size


_FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    gguf.GGMLQuantizationType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    gguf.GGMLQuantizationType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    gguf.GGMLQuantizationType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}


def _file_type(specs: list[TensorSpec]) -> gguf.LlamaFileType:
    """The llama.cpp file type: the storage type of most matrix parameters."""
    weight: dict[gguf.GGMLQuantizationType, int] = {}
    for spec in specs:
        if len(spec.shape) >= 2:
            weight[spec.qtype] = weight.get(spec.qtype, 0) + int(np.prod(spec.shape))
    dominant = max(weight, key=weight.__getitem__) if weight else gguf.GGMLQuantizationType.F32
    return _FILE_TYPES[dominant]


def _add_value(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise TypeError(f"unsupported metadata value for {key}: {value!r}")


def _add_tokenizer(writer: gguf.GGUFWriter, tok: GGUFTokenizerData) -> None:
    writer.add_tokenizer_model(tok.model)
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.token_types)
    if tok.model == "llama":
        if tok.scores is None or len(tok.scores) != len(tok.tokens):
            raise ValueError("a SentencePiece (llama) vocabulary needs one score per token")
        writer.add_token_scores(tok.scores)
    else:
        writer.add_token_merges(tok.merges)
    writer.add_eos_token_id(tok.eos_id)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.padding_id is not None:
        writer.add_pad_token_id(tok.padding_id)
    writer.add_add_bos_token(tok.model == "llama" and tok.bos_id is not None)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
