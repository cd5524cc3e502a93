"""Every supported tensor type written to GGUF and read back through our loader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import nmse

from ktlab.model import GGUFFile
from ktlab.model.arch_common import expected_tensor_shapes
from ktlab.model.gguf_write import TensorSpec, write_gguf
from ktlab.model.quantize import quantize

Q = gguf.GGMLQuantizationType
# Round-trip error of the stored values vs the float originals, per storage type.
NMSE_BY_TYPE = {Q.F32: 0.0, Q.F16: 1e-6, Q.BF16: 1e-4, Q.Q8_0: 1e-4, Q.Q6_K: 2e-3, Q.Q4_K: 2e-2}


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, tokenizer_data):
    """A tiny qwen3moe GGUF whose matrices use every supported type."""
    from ktlab.config import ModelConfig

    cfg = ModelConfig(arch="qwen3moe", vocab_size=len(tokenizer_data.tokens), hidden_size=256, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=128, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=256, context_length=128)
    rng = np.random.default_rng(0)
    types = iter([Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K, Q.Q4_K])
    arrays, specs = {}, []
    for name, shape in expected_tensor_shapes(cfg).items():
        arrays[name] = rng.standard_normal(shape).astype(np.float32)
        qtype = Q.F32 if len(shape) == 1 or "gate_inp" in name else next(types, Q.Q8_0)
        specs.append(TensorSpec(name, shape, qtype, lambda a=arrays[name]: a))
    path = write_gguf(tmp_path_factory.mktemp("io") / "mixed.gguf", cfg, specs, tokenizer_data)
    return GGUFFile(path), arrays, {s.name: s.qtype for s in specs}


def test_every_type_reads_back(mixed_file):
    f, arrays, qtypes = mixed_file
    assert set(qtypes.values()) == set(NMSE_BY_TYPE)
    for name, qtype in qtypes.items():
        info = f.tensor_info(name)
        assert info.qtype == qtype and info.shape == arrays[name].shape
        got = f.tensor(name)
        # exactly what gguf's reference dequantizer makes of the bytes we quantized
        stored = quantize(arrays[name], qtype)
        expect = gguf.quants.dequantize(stored, qtype).reshape(arrays[name].shape)
        np.testing.assert_array_equal(got, expect)
        assert nmse(got, arrays[name]) <= NMSE_BY_TYPE[qtype], (name, qtype)


def test_raw_blocks_are_the_stored_bytes(mixed_file):
    f, arrays, qtypes = mixed_file
    name = next(n for n, q in qtypes.items() if q == Q.Q8_0 and len(arrays[n].shape) == 3)
    raw = f.raw(name)
    assert raw.data.dtype == np.uint8
    np.testing.assert_array_equal(raw.data.reshape(-1), quantize(arrays[name], Q.Q8_0).reshape(-1))


def test_config_and_byte_summary(mixed_file):
    f, arrays, _ = mixed_file
    cfg = f.config
    assert (cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size) == (256, 4, 256)
    summary = f.byte_summary()
    assert summary["expert_bytes"] == sum(f.tensor_info(n).nbytes for n in arrays if "_exps" in n)
    assert sum(summary["params_by_type"].values()) == sum(a.size for a in arrays.values())
