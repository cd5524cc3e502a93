"""Merge a LoRA adapter into a GGUF: the adapted projections become W + scale * B A, re-quantized to
their stored types; every other tensor and all metadata are copied byte for byte. The result is an
ordinary GGUF (ktlab and llama.cpp load it; no adapter needed)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ktlab.model import open_weights
from ktlab.model.arch_common import norm_rope_rows, stored_name
from ktlab.model.quantize import quantize
from ktlab.model.registry import architecture
from ktlab.train.experts import ExpertLora
from ktlab.train.lora import ADAPTER_WEIGHTS, TARGETS, load_adapter

#: ktlab's attention attribute -> the GGUF tensor suffix it is loaded from.
_GGUF_NAMES = {"wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight"}


def merged_deltas(model_path: str | Path, adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the float32 update scale * B A, in the file's row order (q/k rows stored
    for llama.cpp's adjacent-pair RoPE are permuted back)."""
    from ktlab.model import load_model

    model, _ = load_model(model_path, device="cpu")
    adapters = load_adapter(model, adapter_dir, open_weights(model_path))
    cfg = model.cfg
    module = architecture(cfg.arch)
    deltas = {}
    for name, adapter in adapters.items():
        layer, proj = int(name.split(".")[4]), name.rsplit(".", 1)[1]
        if isinstance(adapter, ExpertLora):  # every expert's B A, stacked as the file stores them
            for kind in ("gate", "up", "down"):
                delta = torch.bmm(adapter.B[kind].detach(), adapter.A[kind].detach()).numpy() * adapter.scale
                deltas[f"blk.{layer}.ffn_{kind}_exps.weight"] = delta.astype(np.float32)
            continue
        target = {v: k for k, v in TARGETS.items()}[proj]
        delta = (adapter.B.detach() @ adapter.A.detach()).numpy() * adapter.scale
        if cfg.rope_style == "norm" and target in ("wq", "wk"):  # the model holds them in NeoX order
            heads = cfg.num_heads if target == "wq" else cfg.num_kv_heads
            delta = delta[np.argsort(norm_rope_rows(heads, cfg.head_dim))]
        tensor = stored_name(f"blk.{layer}.{_GGUF_NAMES[target]}", getattr(module.Model, "tensor_renames", {}))
        deltas[tensor] = delta.astype(np.float32)
    return deltas


def merge_adapter(model_path: str | Path, adapter_dir: str | Path, out_path: str | Path,
                  progress: bool = True) -> Path:
    """Write ``out_path``: the GGUF ``model_path`` with ``adapter_dir`` merged into its weights."""
    source = open_weights(model_path)
    if not hasattr(source, "raw"):
        raise ValueError(f"{model_path}: merging writes a GGUF: give a GGUF file")
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (not an adapter directory)")
    deltas = merged_deltas(model_path, adapter_dir)
    reader = gguf.GGUFReader(str(source.path))
    out_path = Path(out_path)
    writer = gguf.GGUFWriter(str(out_path), source.arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    datas = []
    for t in reader.tensors:
        data = t.data
        if t.name in deltas:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
            rows = source.tensor(t.name) + deltas[t.name]
            data = rows.astype(np.float32) if qtype == gguf.GGMLQuantizationType.F32 else quantize(rows, qtype)
            data = data.reshape(t.data.shape)
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
        datas.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tqdm(datas, desc=f"writing {out_path.name}", unit="tensor", disable=not progress):
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return out_path
