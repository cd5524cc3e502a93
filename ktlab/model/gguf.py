"""Read GGUF models through the ``gguf`` package: metadata -> ModelConfig, tensors -> arrays.

Quantized blocks stay raw (``RawTensor``) for the CPU kernels and are dequantized on request for
torch. Every problem (missing, truncated or corrupt file, wrong architecture, unsupported quant
type, missing tensor or key) raises ``ModelFormatError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ktlab.config import ModelConfig
from ktlab.errors import ModelFormatError
from ktlab.model.arch_common import is_shared_expert_tensor
from ktlab.model.registry import architecture, supported_architectures
from ktlab.model.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
#: Types the C++ kernels run (experts must be one of these).
KERNEL_QTYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4})
#: Legacy blocks llama.cpp's mixes fall back to where a row is no whole K-quant super-block (DeepSeek's
#: attn_k_b, for one): read and dequantized once at load, for the tensors outside the experts.
DEQUANTIZED_QTYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.IQ4_NL})
SUPPORTED_QTYPES = KERNEL_QTYPES | DEQUANTIZED_QTYPES


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


class _Corrupt(Exception):
    """A problem found while parsing; the message names the field (the file is added later)."""


# Keys are at most 65535 bytes by the GGUF spec (tensor names at most 64 in ggml).
_MAX_NAME_BYTES = 65535
# Fewest bytes one metadata entry / tensor info record / array element of a type can take.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MIN_STRING_BYTES, _MIN_ARRAY_BYTES = 8, 12
# A count or length asking for more than this (1 TiB in one array or tensor) is corrupt.
_IMPLAUSIBLE_BYTES = 2**40
_ARRAY = int(gguf.GGUFValueType.ARRAY)
_ITEMSIZES: dict[Any, int] = {}


class _CheckedReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that never reads past the end of the file and checks counts first.

    The stock reader slices its memory map unchecked: a truncated file fails later with an
    IndexError from an empty slice, and a corrupt array length makes it loop (appending empty
    arrays) as many times as the length says, i.e. hang and eat memory. Here every read is checked
    against the file size, every count against the bytes left, and ``_where`` names the field
    being parsed for the error message.
    """

    def __init__(self, path: Path) -> None:
        self._size = path.stat().st_size
        self._section, self._where, self._depth = "header", "header", 0
        try:
            super().__init__(str(path), "r")
        except _Corrupt:
            raise
        except Exception as exc:  # the gguf package raises many kinds on corrupt input
            raise _Corrupt(f"not a readable GGUF file ({self._where}: {_describe(exc)})") from None

    def _need(self, what: str, offset: int, nbytes: int, at_least: bool = False) -> None:
        """Raise unless ``nbytes`` bytes from ``offset`` lie inside the file."""
        if offset + nbytes <= self._size:
            return
        if nbytes > _IMPLAUSIBLE_BYTES:  # no file is that big: a corrupt count or length, not a cut
            raise _Corrupt(f"corrupt {what}: would need {nbytes} bytes, the file has {self._size}")
        least = "at least " if at_least else ""
        raise _Corrupt(f"truncated: {what} needs {least}bytes up to {offset + nbytes}, file has {self._size}")

    def _get(self, offset, dtype, count=1, override_order=None):
        itemsize = _ITEMSIZES.get(dtype) or _ITEMSIZES.setdefault(dtype, np.dtype(dtype).itemsize)
        if offset + itemsize * int(count) > self._size:
            self._need(self._where, int(offset), itemsize * int(count))
        return super()._get(offset, dtype, count, override_order)

    def _get_str(self, offset):
        slen = self._get(offset, np.uint64)
        if self._depth:  # a string value: the stock reading
            return slen, self._get(offset + 8, np.uint8, slen[0])
        length = int(slen[0])  # a key or a tensor name
        if length > _MAX_NAME_BYTES:
            raise _Corrupt(f"corrupt {self._where}: name length {length} exceeds {_MAX_NAME_BYTES} bytes")
        data = self._get(offset + 8, np.uint8, length)
        name = _printable(bytes(data))
        self._where = f"metadata field {name}" if self._section == "metadata" else f"tensor info of {name}"
        return slen, data

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == _ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            what = f"{self._where} (array of {count} elements)"
            self._need(what, orig_offs + 12, count * _least(item_type), at_least=True)
        if self._depth:  # an array element
            return super()._get_field_parts(orig_offs, raw_type)
        self._depth = 1
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._depth = 0

    def _build_fields(self, offs, count):
        self._section, self._where = "metadata", "metadata (first key)"
        count = int(count)
        self._need(f"metadata of {count} entries (GGUF.kv_count)", offs, count * _MIN_KV_BYTES, at_least=True)
        return super()._build_fields(offs, count)

    def _push_field(self, field, skip_sum=False):
        out = super()._push_field(field, skip_sum)
        if self._section == "metadata":
            self._where = f"metadata entry after {_printable(field.name.encode())}"
        return out

    def _build_tensor_info(self, offs, count):
        self._section, self._where = "tensor info", "tensor info (first tensor)"
        count = int(count)
        what = f"tensor info of {count} tensors (GGUF.tensor_count)"
        self._need(what, offs, count * _MIN_TENSOR_INFO_BYTES, at_least=True)
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs):
        field = super()._get_tensor_info_field(orig_offs)
        self._where = f"tensor info after {_printable(field.name.encode())}"
        return field

    def _build_tensors(self, start_offs, fields):
        """Check every tensor's type, shape and extent before the stock reader maps them."""
        self._section = "tensor data"
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = _printable(bytes(name_data))
            self._where = f"tensor {name}"
            type_id = int(raw_dtype[0])
            try:
                qtype = Q(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _Corrupt(f"tensor {name} has unknown type id {type_id}") from None
            shape = [int(d) for d in dims]
            if shape and shape[0] % block:
                raise _Corrupt(f"tensor {name}: rows of {shape[0]} values are not whole {qtype.name} blocks")
            nbytes = math.prod(shape) // block * type_size
            self._need(f"tensor {name}", int(start_offs) + int(offset[0]), nbytes)
        super()._build_tensors(start_offs, fields)


def _printable(raw: bytes, limit: int = 100) -> str:
    """A name from the file made safe for a one-line message (corrupt names hold any byte)."""
    text = "".join(c if c.isprintable() else "?" for c in raw.decode("utf-8", errors="replace"))
    return text if len(text) <= limit else text[:limit] + "..."


def _least(item_type: int) -> int:
    """Fewest bytes an array element of GGUF value type ``item_type`` takes (1 if unknown)."""
    try:
        vtype = gguf.GGUFValueType(item_type)
    except ValueError:
        return 1
    if vtype == gguf.GGUFValueType.STRING:
        return _MIN_STRING_BYTES
    if vtype == gguf.GGUFValueType.ARRAY:
        return _MIN_ARRAY_BYTES
    scalar = gguf.GGUFReader.gguf_scalar_to_np.get(vtype)
    return np.dtype(scalar).itemsize if scalar is not None else 1


class GGUFFile:
    """An opened GGUF model file (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such model file")
        size = self.path.stat().st_size
        if size == 0:
            raise ModelFormatError(f"{self.path}: empty file, not a GGUF model")
        try:
            self._reader = _CheckedReader(self.path)
        except _Corrupt as exc:
            raise ModelFormatError(f"{self.path}: {exc}") from None
        except Exception as exc:  # e.g. OSError from mmap
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({_describe(exc)})") from None
        self.arch = self.require("general.architecture")
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
        # GGUF has no tie flag: as in llama.cpp, a file without output.weight ties the head
        # to the token embedding.
        cfg = dataclasses.replace(cfg, tie_word_embeddings="output.weight" not in self._tensors)
        if cfg.num_layers > len(self._tensors):  # a corrupt count would make the shape list huge
            raise ModelFormatError(
                f"{self.path}: {self.arch}.block_count is {cfg.num_layers}, more than the "
                f"{len(self._tensors)} tensors in the file"
            )
        self._check_shapes(cfg, module.expected_tensor_shapes(cfg))
        return cfg

    def _check_shapes(self, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        module = architecture(self.arch)
        for name, shape in shapes.items():
            per_expert = name.replace("_exps.weight", ".0.weight")
            if name not in self._tensors and module.is_expert_tensor(name) and per_expert in self._tensors:
                raise ModelFormatError(f"{self.path}: experts are stored one tensor each ({per_expert}: an old "
                                       f"llama.cpp conversion), ktlab reads them stacked ({name}): re-convert "
                                       "the model with a current llama.cpp (convert_hf_to_gguf.py)")
            info = self.tensor_info(name)
            if info.shape != shape:
                raise ModelFormatError(f"{self.path}: tensor {name} has shape {info.shape}, expected {shape}")
            if module.is_expert_tensor(name) and info.qtype not in KERNEL_QTYPES:
                kernels = ", ".join(sorted(q.name for q in KERNEL_QTYPES))
                raise ModelFormatError(f"{self.path}: tensor {name} uses quant type {info.qtype.name}, which the "
                                       f"expert kernels do not run (they run {kernels})")

    # -- tensors ----------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        """Names of all tensors in file order."""
        return list(self._tensors)

    def has_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` is in the file (a half of a merged gate/up counts)."""
        return name in self._tensors or _merged_gate_up(name, self._tensors) is not None

    def tensor_info(self, name: str) -> RawTensor:
        """The tensor as stored (no copy); unsupported quant types are reported here. Files that
        store the experts' gate and up as one ``ffn_gate_up_exps`` [E, 2I, H] (gate first, as
        llama.cpp's newer converters do) serve ``ffn_gate_exps`` / ``ffn_up_exps`` as views of it."""
        t = self._tensors.get(name)
        if t is None:
            merged = _merged_gate_up(name, self._tensors)
            if merged is None:
                raise ModelFormatError(f"{self.path}: missing tensor {name}")
            whole, half = self.tensor_info(merged), int(name.split(".")[2] == "ffn_up_exps")
            rows = whole.shape[1] // 2
            part = whole.data[:, half * rows:(half + 1) * rows]
            return RawTensor(name, whole.qtype, (whole.shape[0], rows, *whole.shape[2:]), part)
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
        """The tokenizer and chat template stored in the file: byte-level BPE (``gpt2``) or
        SentencePiece BPE (``llama``)."""
        model = self.require("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ModelFormatError(f"{self.path}: tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level "
                                   "BPE), 'llama' (SentencePiece)")
        tokens = self.require("tokenizer.ggml.tokens")
        types = self.get("tokenizer.ggml.token_type") if self.has("tokenizer.ggml.token_type") else None
        template = self.get("tokenizer.chat_template") if self.has("tokenizer.chat_template") else None
        bos = self.get("tokenizer.ggml.bos_token_id") if self.has("tokenizer.ggml.bos_token_id") else None
        bos = None if bos is None else int(bos)
        eos = int(self.require("tokenizer.ggml.eos_token_id"))
        try:
            if model == "llama":
                add_bos = bool(self.get("tokenizer.ggml.add_bos_token")) if self.has("tokenizer.ggml.add_bos_token") \
                    else True
                return Tokenizer.from_spm_vocab(tokens, self.require("tokenizer.ggml.scores"), types, eos, bos,
                                                template, add_bos=add_bos)
            pre = self.get("tokenizer.ggml.pre") if self.has("tokenizer.ggml.pre") else "gpt2"
            return Tokenizer.from_vocab(tokens, self.require("tokenizer.ggml.merges"), types, pre, eos_id=eos,
                                        bos_id=bos, chat_template=template)
        except ValueError as exc:
            raise ModelFormatError(f"{self.path}: tokenizer: {exc}") from None
        except Exception as exc:  # the tokenizers library rejects corrupt vocabularies in its own ways
            raise ModelFormatError(f"{self.path}: tokenizer: {_describe(exc)}") from None

    # -- summary ----------------------------------------------------------------------------
    def byte_summary(self) -> dict[str, Any]:
        """Bytes of routed experts vs the rest (of which shared experts: always active, so dense
        weights for placement), and the quant mix (parameters per type)."""
        module = architecture(self.arch)
        expert_bytes = other_bytes = shared_bytes = 0
        mix: dict[str, int] = {}
        for name in self._tensors:
            info = self.tensor_info(name)
            if module.is_expert_tensor(name):
                expert_bytes += info.nbytes
            else:
                other_bytes += info.nbytes
                shared_bytes += info.nbytes if is_shared_expert_tensor(name) else 0
            mix[info.qtype.name] = mix.get(info.qtype.name, 0) + int(np.prod(info.shape))
        return {"expert_bytes": expert_bytes, "other_bytes": other_bytes, "shared_expert_bytes": shared_bytes,
                "params_by_type": mix}


def _merged_gate_up(name: str, tensors: Mapping[str, Any]) -> str | None:
    """The merged ``blk.N.ffn_gate_up_exps.*`` holding ``name`` (an expert gate or up tensor) where the
    file has it instead, else None."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in ("ffn_gate_exps", "ffn_up_exps"):
        return None
    merged = f"blk.{parts[1]}.ffn_gate_up_exps.{parts[3]}"
    return merged if merged in tensors else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = "".join(c if c.isprintable() else "?" for c in text)  # messages may quote corrupt bytes
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
