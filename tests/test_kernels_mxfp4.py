"""MXFP4 (gpt-oss's expert format): the repacked 16-row kernels of every ISA path against the raw-row
scalar twin and ggml's dequantizer (through ``gguf``); the expert layer with gpt-oss's biases and
clamped SwiGLU against a float64 numpy reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ktlab import _kernels, kernels
from ktlab.model.quantize import quantize

MXFP4 = gguf.GGMLQuantizationType.MXFP4
# Normalised squared error against float64 x @ dequant(W)^T: only the int8 rounding of the
# activations (one scale per 32 values) separates them.
NMSE_INT8_ACTIVATIONS = 1e-4
# A whole expert layer: its inputs and the activation are both rounded to int8.
NMSE_MOE_LAYER = 1e-3
ISAS = kernels.available_isas()


def quantized(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF MXFP4 rows [rows, bytes], their dequantized float64 values [rows, cols])."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = quantize(w, MXFP4)
    return raw, gguf.quants.dequantize(raw, MXFP4).reshape(rows, cols).astype(np.float64)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((a - ref) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("m", [1, 5, 13])
def test_every_path_and_layout_gives_the_scalar_twins_bits(m: int) -> None:
    """Raw rows and MXFP4x16 on scalar, AVX2 and AVX-512: the same exact integer sums and the same
    fused multiply-adds in the same order, so the same bits; and close to the dequantized product."""
    raw, w = quantized(48, 1440, seed=m)  # 45 blocks, as 2880 (gpt-oss) is 90
    x = np.random.default_rng(3).standard_normal((m, w.shape[1])).astype(np.float32)
    twin = kernels.quant_matmul(raw, x, "mxfp4", "scalar")
    assert nmse(twin, x.astype(np.float64) @ w.T) < NMSE_INT8_ACTIVATIONS
    packed = _kernels.repack_dense("mxfp4", raw)
    assert packed.shape == (48, w.shape[1] // 32 * _kernels.PACKED_BLOCK_BYTES["mxfp4"])
    for isa in ISAS:
        np.testing.assert_array_equal(kernels.quant_matmul(raw, x, "mxfp4", isa), twin)
        np.testing.assert_array_equal(kernels.quant_matmul(packed, x, "mxfp4", isa, packed=True), twin)


def test_scales_span_the_e8m0_range_with_subnormals() -> None:
    """Blocks of tiny and huge magnitudes (E8M0 exponents 0 and 1 give subnormal half-scales, as
    ggml's ggml_e8m0_to_fp32_half): the kernel equals the dequantized product on each."""
    raw, w = quantized(16, 128, seed=4)
    raw = raw.reshape(16, 4, 17).copy()
    raw[:, :, 0] = np.array([0, 1, 127, 200], dtype=np.uint8)  # one exponent per block
    raw = raw.reshape(16, -1)
    w = gguf.quants.dequantize(raw, MXFP4).reshape(16, 128).astype(np.float64)
    x = np.ones((1, 128), dtype=np.float32)
    x[0, 32:64] = 1e-30  # keeps the second block's product in range next to the others
    for isa in ISAS:
        got = kernels.quant_matmul(raw, x, "mxfp4", isa)
        np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_every_token_count_gives_each_token_its_lone_row(isa: str) -> None:
    """Token tiles of up to four (AVX2) or eight (AVX-512): each token's row is its lone row bit for bit."""
    raw, _ = quantized(64, 256, seed=11)
    matrix = kernels.QMatrix(raw, "mxfp4", isa)
    assert matrix.packed
    x = np.random.default_rng(5).standard_normal((11, 256)).astype(np.float32)
    lone = np.stack([matrix(row) for row in x])
    for m in range(1, 12):
        np.testing.assert_array_equal(matrix(x[:m]), lone[:m])


def test_gpt_oss_expert_layer_matches_the_float_reference_on_every_path() -> None:
    """MXFP4 gate/up/down with gate, up and down biases and the clamped SwiGLU (alpha 1.702, limit 7):
    every path the same bits as the scalar path, near float64 numpy; without set_mlp the layer is
    plain SwiGLU again."""
    E, H, inter, T, k = 5, 256, 192, 9, 2
    gate = [quantized(inter, H, seed=10 + e) for e in range(E)]
    up = [quantized(inter, H, seed=20 + e) for e in range(E)]
    down = [quantized(H, inter, seed=30 + e) for e in range(E)]

    class Raw:
        def __init__(self, parts, shape):
            self.qtype, self.shape, self.data = int(MXFP4), shape, np.stack([p[0] for p in parts])

    weights = (Raw(gate, (E, inter, H)), Raw(up, (E, inter, H)), Raw(down, (E, H, inter)))
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((T, H)) * 0.3).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    bg, bu = (rng.standard_normal((E, inter)).astype(np.float32) for _ in range(2))
    bd = rng.standard_normal((E, H)).astype(np.float32)

    def layer(isa):
        experts = kernels.CpuExperts(*weights, isa=isa)
        experts.set_mlp(clamped=True, alpha=1.702, limit=7.0, gate_bias=bg, up_bias=bu, down_bias=bd)
        return experts

    twin = layer("scalar").forward(x, ids, w)
    ref = np.zeros((T, H))
    for t in range(T):
        for e, weight in zip(ids[t], w[t], strict=True):
            g = np.minimum(gate[e][1] @ x[t] + bg[e], 7.0)
            u = np.clip(up[e][1] @ x[t] + bu[e], -7.0, 7.0)
            h = (u + 1) * g / (1 + np.exp(-1.702 * g))
            ref[t] += weight * (down[e][1] @ h + bd[e])
    assert np.abs(ref).max() > 7  # the clamp is reached
    assert nmse(twin, ref) < NMSE_MOE_LAYER
    for isa in ISAS:
        np.testing.assert_array_equal(layer(isa).forward(x, ids, w), twin)
    plain = kernels.CpuExperts(*weights, isa="scalar").forward(x, ids, w)
    assert nmse(plain, ref) > 0.1  # the biases and the clamp change the layer


def test_bias_shapes_are_checked() -> None:
    raw = quantized(32, 64, seed=1)[0]

    class Raw:
        def __init__(self, data, shape):
            self.qtype, self.shape, self.data = int(MXFP4), shape, data

    down = quantize(np.zeros((2 * 64, 32), dtype=np.float32), MXFP4)
    experts = kernels.CpuExperts(Raw(np.stack([raw, raw]), (2, 32, 64)), Raw(np.stack([raw, raw]), (2, 32, 64)),
                                 Raw(down, (2, 64, 32)))
    with pytest.raises(ValueError, match=r"gate bias must be \[2, 32\]"):
        experts.set_mlp(gate_bias=np.zeros((2, 31), dtype=np.float32))
