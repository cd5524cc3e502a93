"""llama.cpp's mixed presets Q4_K_M, Q5_K_M and MXFP4_MOE: which GGML type each tensor gets.

A "mostly Q4_K" file is not all Q4_K: ``llama-quantize`` gives the output projection Q6_K and
half of the layers' ``attn_v`` and ``ffn_down`` Q6_K (``llama_tensor_get_type`` in llama.cpp's
``src/llama-quant.cpp``). :func:`mixed_qtype` reproduces that choice for the tensors ktlab's
architectures have, so synthetic files have the byte mix of the files people actually run.

Followed from llama.cpp (``ftype`` Q4_K_M or Q5_K_M, no imatrix, no overrides):

- base type Q4_K (Q5_K_M: Q5_K) for every quantized matrix, ``token_embd.weight`` included
  (unless the embeddings are tied to the output, then it gets the output's type);
- ``output.weight``: Q6_K;
- ``attn_v`` (also ``attn_qkv``, ``attn_kv_b``) and ``ffn_down`` (also ``ffn_down_exps``):
  Q6_K on the layers where :func:`use_more_bits` is true. llama.cpp counts the attn_v tensors
  in layer order and takes the layer from the name for ``ffn_down`` of MoE models; with one
  attn_v per layer (as here) both are the layer index;
- models with exactly 8 experts (Mixtral-like): ``attn_v`` and ``attn_k`` Q8_0 and
  ``attn_output`` Q5_K. Nothing extra for other expert counts (Qwen3-30B-A3B has 128);
- not quantized: norms (``*_norm.weight``) and the router ``ffn_gate_inp.weight`` (F32 here).

Not covered: llama.cpp's Falcon and LLaMA-70B special cases (architectures ktlab does not
have). MXFP4_MOE (gpt-oss): the routed experts MXFP4, every other matrix Q8_0. Rows that do not
fit the chosen block size fall back through
:func:`ktlab.model.quantize.fallback_qtype` where the writer stores the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

__all__ = ["QUANT_MIXES", "QuantMix", "mixed_qtype", "use_more_bits"]

Q = GGMLQuantizationType


@dataclass(frozen=True)
class QuantMix:
    """A llama.cpp mixed preset: its name, base type and ``general.file_type``."""

    name: str
    base: GGMLQuantizationType
    file_type: LlamaFileType
    #: Where set, the routed experts take ``base`` and every other matrix this type (MXFP4_MOE).
    others: GGMLQuantizationType | None = None


QUANT_MIXES: dict[str, QuantMix] = {
    m.name: m
    for m in (
        QuantMix("Q4_K_M", Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
        QuantMix("Q5_K_M", Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
        # gpt-oss as released and converted: MXFP4 experts, the rest Q8_0 (llama.cpp's MXFP4_MOE).
        QuantMix("MXFP4_MOE", Q.MXFP4, LlamaFileType.MOSTLY_MXFP4_MOE, others=Q.Q8_0),
    )
}

_LAYER = re.compile(r"^blk\.(\d+)\.")
_ATTN_V_LIKE = ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third between.

    ``i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`` with C integer division.
    """
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def _layer(tensor_name: str, n_layers: int) -> int:
    match = _LAYER.match(tensor_name)
    if match is None:
        raise ValueError(f"cannot tell the layer of tensor {tensor_name!r} (expected blk.N.*)")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise ValueError(f"tensor {tensor_name!r} is in layer {layer}, but the model has {n_layers} layers")
    return layer


def mixed_qtype(
    preset: str, tensor_name: str, n_layers: int, *, n_experts: int = 0, tied_embeddings: bool = False
) -> GGMLQuantizationType:
    """The type llama.cpp's ``preset`` (``Q4_K_M`` or ``Q5_K_M``) gives tensor ``tensor_name``.

    ``n_layers`` is the model's layer count, ``n_experts`` its routed experts per layer (0 for
    a dense model), ``tied_embeddings`` whether ``token_embd`` doubles as the output. Norms and
    the router come back F32 (not quantized). The caller still applies the row-size fallback.
    Raises ValueError for an unknown preset, a non-positive layer count, or an ``attn_v`` /
    ``ffn_down`` name without a layer in range.
    """
    mix = QUANT_MIXES.get(preset.upper())
    if mix is None:
        raise ValueError(f"unknown quant mix {preset!r}; choose one of {', '.join(QUANT_MIXES)}")
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    name = tensor_name
    if name.endswith("_norm.weight") or "ffn_gate_inp.weight" in name:
        return Q.F32
    if mix.others is not None:
        return mix.base if name.endswith("_exps.weight") else mix.others
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        return Q.Q6_K
    eight_experts = n_experts == 8
    if any(part in name for part in _ATTN_V_LIKE):
        if eight_experts:
            return Q.Q8_0
        return Q.Q6_K if use_more_bits(_layer(name, n_layers), n_layers) else mix.base
    if "attn_k.weight" in name and eight_experts:
        return Q.Q8_0
    if "attn_output.weight" in name and eight_experts:
        return Q.Q5_K
    if "ffn_down" in name:
        return Q.Q6_K if use_more_bits(_layer(name, n_layers), n_layers) else mix.base
    return mix.base
