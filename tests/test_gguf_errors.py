"""Bad GGUF input never crashes: one ModelFormatError line naming the file and the field.

Every case starts from a copy of the ``gguf_q8`` fixture (a tiny Qwen3-MoE) and truncates it,
flips bytes in it, or rewrites it with ``gguf.GGUFWriter`` minus a key / with a foreign type.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ktlab.errors import ModelFormatError
from ktlab.model import load_model
from ktlab.model.gguf import GGUFFile

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
LEGACY_NMSE = 0.1  # a tiny model's logits with four 4-5-bit projections vs the Q8_0 file


# ----------------------------------------------------------------------------------------- helpers


def layout(path: Path) -> dict[str, int]:
    """Byte offsets of interesting places in a valid GGUF (read with the stock reader)."""
    r = gguf.GGUFReader(str(path))

    def value_at(key: str) -> int:  # where the value of ``key`` starts (after key + type)
        return r.fields[key].offset + 8 + len(key.encode()) + 4

    first_tensor, last_tensor = r.tensors[0], r.tensors[-1]
    last_type = last_tensor.field.offset + 8 + len(last_tensor.name.encode()) + 4 + 8 * len(last_tensor.shape)
    return {
        "size": path.stat().st_size,
        "kv_start": 24,
        "tokens_value": value_at("tokenizer.ggml.tokens"),  # u32 item type, u64 count, strings
        "token_type_value": value_at("tokenizer.ggml.token_type"),
        "template_value": value_at("tokenizer.chat_template"),  # u64 length, bytes
        "expert_count_value": value_at("qwen3moe.expert_count"),
        "tensor_info": first_tensor.field.offset,
        "first_tensor_name_len": len(first_tensor.name.encode()),
        "last_tensor_type": last_type,  # u32 type id, then u64 offset into the data
        "data": r.data_offset,
    }


def patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    """A copy of ``src`` with ``data`` written at ``offset``."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


def truncated(src: Path, dst: Path, size: int) -> Path:
    """A copy of ``src`` cut to ``size`` bytes."""
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def u64(v: int) -> bytes:
    return int(v).to_bytes(8, "little")


def u32(v: int) -> bytes:
    return int(v).to_bytes(4, "little")


def rewrite(src: Path, dst: Path, arch: str | None = None, drop: tuple[str, ...] = (),
            tensor_override: Callable[[str, np.ndarray], tuple[np.ndarray, Q] | None] | None = None,
            split: Callable[[str, np.ndarray, Q], list[tuple[str, np.ndarray]] | None] | None = None) -> Path:
    """Copy a GGUF with gguf.GGUFWriter: optionally another architecture, minus keys, other tensor
    data, or a tensor written as several (``split``: name, stored data, type -> [(name, data)])."""
    r = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch or str(r.fields["general.architecture"].contents()))
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    if "general.architecture" in drop:
        for kv in writer.kv_data:
            kv.pop("general.architecture", None)
    for t in r.tensors:
        data, qtype = np.asarray(t.data), Q(int(t.tensor_type))
        if tensor_override is not None:
            new = tensor_override(t.name, gguf.quants.dequantize(data, qtype))
            if new is not None:
                data, qtype = new
        parts = split(t.name, data, qtype) if split is not None else None
        for name, part in parts or [(t.name, data)]:
            writer.add_tensor(name, part, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def open_all(path: Path) -> None:
    """Everything a user can make ktlab read from a file: metadata, config, tokenizer, tensors."""
    f = GGUFFile(path)
    _ = f.metadata
    _ = f.config
    f.tokenizer()
    for name in f.tensor_names:
        f.tensor(name)


def format_error(path: Path, action: Callable[[Path], object] = open_all) -> str:
    """The ModelFormatError that ``action(path)`` must raise: one line "PATH: what"; returns "what"."""
    with pytest.raises(ModelFormatError) as info:
        action(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


@pytest.fixture()
def q8(gguf_q8, tmp_path) -> Path:
    """A private copy of the fixture file."""
    return Path(shutil.copyfile(gguf_q8, tmp_path / "model.gguf"))


def test_fixture_is_valid(q8):
    open_all(q8)  # the baseline every corruption starts from


def test_checked_reader_reads_what_gguf_reads(q8):
    """The bounds-checked reader inside GGUFFile sees exactly what the stock gguf reader sees."""
    ours, stock = GGUFFile(q8)._reader, gguf.GGUFReader(str(q8))
    assert list(ours.fields) == list(stock.fields)
    for key in stock.fields:
        assert ours.fields[key].contents() == stock.fields[key].contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in stock.tensors]
    for a, b in zip(ours.tensors, stock.tensors, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


# ---------------------------------------------------------------------------------- (a) truncation


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "where, cut",
    [
        ("magic", lambda L: 2),
        ("header counts", lambda L: 10),
        ("first key", lambda L: L["kv_start"] + 5),
        ("token strings", lambda L: L["tokens_value"] + 12 + 40),
        ("token types", lambda L: L["token_type_value"] + 12 + 6),
        ("chat template", lambda L: L["template_value"] + 20),
        ("tensor info", lambda L: L["tensor_info"] + 8 + L["first_tensor_name_len"] + 2),
        ("tensor data", lambda L: L["data"] + 100),
        ("one byte short", lambda L: L["size"] - 1),
    ],
)
def test_truncated(q8, tmp_path, where, cut):
    bad = truncated(q8, tmp_path / "cut.gguf", cut(layout(q8)))
    message = format_error(bad)
    assert "truncated" in message, message


def test_truncated_message_names_the_field(q8, tmp_path):
    L = layout(q8)
    assert "tokenizer.ggml.tokens" in format_error(truncated(q8, tmp_path / "a.gguf", L["tokens_value"] + 30))
    assert "tokenizer.chat_template" in format_error(truncated(q8, tmp_path / "b.gguf", L["template_value"] + 20))
    last = gguf.GGUFReader(str(q8)).tensors[-1].name
    assert f"tensor {last}" in format_error(truncated(q8, tmp_path / "c.gguf", L["size"] - 1))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "empty file" in format_error(empty)
    missing = tmp_path / "nope.gguf"
    assert "no such model file" in format_error(missing)
    assert "no such model file" in format_error(tmp_path, GGUFFile)  # a directory is no GGUF file
    with pytest.raises(ModelFormatError, match="no such model file or directory"):
        load_model(tmp_path / "nope.gguf")


# -------------------------------------------------------------------------------- (b) flipped bytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "what, offset, data, needle",
    [
        ("magic", lambda L: 0, b"GGUX", "magic"),
        ("magic byte order", lambda L: 0, b"FUGG", "magic"),
        ("version 127", lambda L: 4, u32(127), "version"),
        ("version 0", lambda L: 4, u32(0), "version"),
        ("tensor count huge", lambda L: 8, u64(2**62), "GGUF.tensor_count"),
        ("tensor count + 1", lambda L: 8, None, ""),
        ("kv count huge", lambda L: 16, u64(2**63 + 5), "GGUF.kv_count"),
        ("kv count - 1", lambda L: 16, None, ""),
        ("kv count + 1", lambda L: 16, None, ""),
        ("key length huge", lambda L: L["kv_start"], u64(2**40), "name length"),
        ("key length + 3", lambda L: L["kv_start"], None, ""),
        ("string value length huge", lambda L: L["template_value"], u64(2**60), "tokenizer.chat_template"),
        ("string array count huge", lambda L: L["tokens_value"] + 4, u64(2**61), "tokenizer.ggml.tokens"),
        ("int array count huge", lambda L: L["token_type_value"] + 4, u64(2**40), "tokenizer.ggml.token_type"),
        ("int array count 2^30", lambda L: L["token_type_value"] + 4, u64(2**30), "truncated: metadata field"),
        ("int array count x 1000", lambda L: L["token_type_value"] + 4, None, ""),
        ("value type unknown", lambda L: L["expert_count_value"] - 4, u32(99), "qwen3moe.expert_count"),
        ("tensor type unknown", lambda L: L["last_tensor_type"], u32(200), "unknown type id 200"),
        ("tensor offset huge", lambda L: L["last_tensor_type"] + 4, u64(2**50), "truncated: tensor blk."),
        ("tensor offset + 1", lambda L: L["last_tensor_type"] + 4, None, "truncated: tensor blk."),
    ],
)
def test_flipped_bytes(q8, tmp_path, what, offset, data, needle):
    L = layout(q8)
    at = offset(L)
    if data is None:  # relative edits of a count or length field
        current = int.from_bytes(q8.read_bytes()[at:at + 8], "little")
        delta = {"tensor offset + 1": 1, "tensor count + 1": 1, "kv count - 1": -1, "kv count + 1": 1,
                 "key length + 3": 3}
        data = u64(current * 1000 if "x 1000" in what else current + delta[what])
    bad = patched(q8, tmp_path / "bad.gguf", at, data)
    message = format_error(bad)
    assert needle in message, message


@pytest.mark.timeout(120)
def test_random_byte_flips_in_metadata_never_crash(q8, tmp_path):
    """Fuzz the header, metadata and tensor info: a clean ModelFormatError or a file that still works."""
    L = layout(q8)
    original = q8.read_bytes()
    rng = np.random.default_rng(1234)
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"error": 0, "ok": 0}
    for _ in range(150):
        data = bytearray(original)
        for pos in rng.integers(0, L["data"], size=int(rng.integers(1, 4))):
            data[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(data))
        try:
            open_all(bad)
            outcomes["ok"] += 1
        except ModelFormatError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_tensor_type_switched_to_q4_0(q8, tmp_path):
    """The stored type id says Q4_0 (smaller than the Q8_0 bytes there): unsupported, named."""
    r = gguf.GGUFReader(str(q8))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up_exps.weight")
    type_at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape)
    bad = patched(q8, tmp_path / "q40.gguf", type_at, u32(int(Q.Q4_0)))
    message = format_error(bad)
    assert "blk.0.ffn_up_exps.weight" in message and "Q4_0" in message, message


# ------------------------------------------------------------------------ (c)-(e) valid but unusable


def test_wrong_architecture(q8, tmp_path):
    bad = rewrite(q8, tmp_path / "gemma.gguf", arch="gemma")
    message = format_error(bad, GGUFFile)
    assert "general.architecture" in message and "'gemma'" in message, message

    tiny = tmp_path / "tiny-gemma.gguf"
    w = gguf.GGUFWriter(str(tiny), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = format_error(tiny, GGUFFile)
    assert "general.architecture" in message and "'gemma'" in message, message


def test_dense_llama_is_refused_in_one_line(q8, tmp_path):
    """A llama file without experts (a dense Llama) is a supported arch but not an MoE: one line saying so."""
    bad = rewrite(q8, tmp_path / "llama.gguf", arch="llama")
    message = format_error(bad, lambda p: GGUFFile(p).config)
    assert "dense model" in message, message


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0])
def test_unsupported_quant_type(q8, tmp_path, qtype):
    name = "blk.1.ffn_gate_exps.weight"

    def override(tensor_name: str, values: np.ndarray):
        return (gguf.quants.quantize(values, qtype), qtype) if tensor_name == name else None

    bad = rewrite(q8, tmp_path / f"{qtype.name}.gguf", tensor_override=override)
    assert gguf.GGUFReader(str(bad)).tensors  # the file itself is valid GGUF
    message = format_error(bad, lambda p: GGUFFile(p).config)
    assert name in message and qtype.name in message, message
    with pytest.raises(ModelFormatError, match=qtype.name):
        load_model(bad)


@pytest.mark.parametrize("key", ["qwen3moe.expert_count", "qwen3moe.embedding_length",
                                 "general.architecture", "tokenizer.ggml.tokens"])
def test_missing_metadata_key(q8, tmp_path, key):
    bad = rewrite(q8, tmp_path / "missing.gguf", drop=(key,))
    message = format_error(bad)
    assert key in message and "missing" in message, message


def test_missing_tensor(q8, tmp_path):
    r = gguf.GGUFReader(str(q8))
    dst = tmp_path / "no-router.gguf"
    w = gguf.GGUFWriter(str(dst), "qwen3moe")
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            vtype = field.types[0]
            w.add_key_value(key, field.contents(), vtype,
                            sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != "blk.1.ffn_gate_inp.weight":
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=Q(int(t.tensor_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "missing tensor blk.1.ffn_gate_inp.weight" in format_error(dst)


# ---------------------------------------------------------------------------------------- (g) CLI


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["truncated", "magic", "missing"])
def test_cli_info_one_line_error(q8, tmp_path, case):
    if case == "truncated":
        bad = truncated(q8, tmp_path / "cut.gguf", layout(q8)["data"] + 100)
    elif case == "magic":
        bad = patched(q8, tmp_path / "magic.gguf", 0, b"XXXX")
    else:
        bad = tmp_path / "absent.gguf"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ktlab.cli", "info", str(bad)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ktlab info: error:") and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_legacy_blocks_outside_the_experts_are_dequantized(q8, tmp_path):
    """llama.cpp's mixes fall back to Q4_0 / Q4_1 / Q5_0 / Q5_1 / IQ4_NL where a row is no whole
    K-quant super-block: such tensors outside the experts load (dequantized once). The model then
    computes what the same file with those tensors stored as their float values (gguf's own
    dequantizer) computes, and stays near the Q8_0 file (named tolerance: 4-5-bit projections)."""
    from conftest import nmse

    types = {"blk.0.attn_q.weight": Q.Q5_0, "blk.0.attn_k.weight": Q.Q4_0, "blk.1.attn_v.weight": Q.Q5_1,
             "blk.1.attn_output.weight": Q.Q4_1}

    def legacy(tensor_name: str, values: np.ndarray):
        qtype = types.get(tensor_name)
        return None if qtype is None else (gguf.quants.quantize(values, qtype), qtype)

    def as_float(tensor_name: str, values: np.ndarray):
        qtype = types.get(tensor_name)
        if qtype is None:
            return None
        return gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype).astype(np.float32), Q.F32

    mixed = rewrite(q8, tmp_path / "legacy.gguf", tensor_override=legacy)
    floats = rewrite(q8, tmp_path / "legacy-as-f32.gguf", tensor_override=as_float)
    assert {GGUFFile(mixed).tensor_info(n).qtype for n in types} == set(types.values())
    prompt = torch.tensor([5, 17, 42, 99, 7, 3])
    q8_logits, ours, reference = (m.forward(prompt, m.new_cache(6)).numpy()
                                  for m in (load_model(p)[0] for p in (q8, mixed, floats)))
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert 0 < nmse(ours, q8_logits) < LEGACY_NMSE


def test_experts_stored_one_tensor_each_name_the_old_layout(q8, tmp_path):
    """Old llama.cpp conversions (Mixtral GGUFs of 2023) store each expert as its own tensor
    (blk.N.ffn_gate.E.weight): one line says so and what to do, not just "missing tensor"."""
    def per_expert(name: str, data: np.ndarray, qtype: Q) -> list[tuple[str, np.ndarray]] | None:
        if "_exps." not in name:
            return None
        return [(name.replace("_exps.weight", f".{e}.weight"), np.ascontiguousarray(data[e]))
                for e in range(data.shape[0])]

    old = rewrite(q8, tmp_path / "per-expert.gguf", split=per_expert)
    message = format_error(old, lambda p: GGUFFile(p).config)
    assert "one tensor each" in message and "blk.0.ffn_gate.0.weight" in message and "re-convert" in message
