"""K-quant kernels (Q4_K, Q5_K, Q6_K): repacked 16-row layouts on every ISA path against the raw-row
scalar twin, ggml's dequantizer (through ``gguf``), and themselves alone vs batched."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from conftest import activation_test_rows, reference_int8_blocks

from ktlab import _kernels, kernels
from ktlab.model.quantize import quantize

Q = gguf.GGMLQuantizationType
FORMATS = {"q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
# Normalised squared error of the kernel's x @ W^T against float64 x @ dequant(W)^T: only the int8
# rounding of the activations (one scale per 256 values) separates them.
NMSE_INT8_ACTIVATIONS = 1e-4
# The same for a whole expert layer: its inputs and silu(gate) * up are both rounded to int8.
NMSE_MOE_LAYER = 1e-3
ISAS = kernels.available_isas()


def quantized(fmt: str, rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF rows [rows, bytes], their dequantized float64 values [rows, cols])."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = quantize(w, FORMATS[fmt])
    return raw, gguf.quants.dequantize(raw, FORMATS[fmt]).reshape(rows, cols).astype(np.float64)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((a - ref) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("m", [7, 40])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_path_and_layout_gives_the_scalar_twins_bits(fmt: str, m: int) -> None:
    """Packed (Q*_Kx16) and raw rows, scalar, AVX2 and AVX-512: the same integer sums and the same
    float operations in the same order, so the same bits; and close to the dequantized product.
    40 tokens take every path's unpack-first kernels (from 4 to 32 tokens, by path and format)."""
    raw, w = quantized(fmt, 48, 768, seed=len(fmt))
    x = np.random.default_rng(3).standard_normal((m, 768)).astype(np.float32)
    twin = kernels.quant_matmul(raw, x, fmt, "scalar")
    assert nmse(twin, x.astype(np.float64) @ w.T) < NMSE_INT8_ACTIVATIONS
    packed = _kernels.repack_dense(fmt, raw)
    assert packed.shape == (48, 768 // 256 * _kernels.PACKED_BLOCK_BYTES[fmt])
    for isa in ISAS:
        np.testing.assert_array_equal(kernels.quant_matmul(raw, x, fmt, isa), twin)
        np.testing.assert_array_equal(kernels.quant_matmul(packed, x, fmt, isa, packed=True), twin)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_token_count_gives_each_token_its_lone_row(fmt: str, isa: str) -> None:
    """Tokens come in tiles of up to two (AVX2), three or four (AVX-512) per pass over a group: for
    every count 1..9 each token's row is its lone row bit for bit; 40 rows (no multiple of 16) stay raw."""
    raw, _ = quantized(fmt, 64, 512, seed=11)
    matrix = kernels.QMatrix(raw, fmt, isa)
    assert matrix.packed
    x = np.random.default_rng(5).standard_normal((9, 512)).astype(np.float32)
    lone = np.stack([matrix(row) for row in x])
    for m in range(1, 10):
        np.testing.assert_array_equal(matrix(x[:m]), lone[:m])
    odd = kernels.QMatrix(raw[:40], fmt, isa)
    assert not odd.packed
    np.testing.assert_array_equal(odd(x), lone[:, :40])


@pytest.mark.parametrize("isa", ISAS)
def test_super_block_activation_quantizer_is_the_same_bits_on_every_path(isa: str) -> None:
    """The K-quants' activations (256 int8 a scale, and each 16's sum): numpy's bytes on every
    path, ties and zero blocks included."""
    for x in activation_test_rows(256):
        d, q, bsums = _kernels.quantize_q8_K(x, isa)
        d_ref, q_ref = reference_int8_blocks(x, 256)
        np.testing.assert_array_equal(d.view(np.uint32), d_ref.view(np.uint32))
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(bsums, q_ref.reshape(-1, 16, 16).astype(np.int64).sum(-1))
    with pytest.raises(ValueError, match="multiple of 256"):
        _kernels.quantize_q8_K(np.ones(128, dtype=np.float32), isa)


def test_packed_layout_validation() -> None:
    raw, _ = quantized("q4_k", 16, 256, seed=1)
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        _kernels.repack_dense("q4_k", raw[:8])
    with pytest.raises(ValueError, match="unknown weight format"):
        _kernels.repack_dense("q3_k", raw)
    x = np.ones((1, 256), dtype=np.float32)
    with pytest.raises(ValueError, match="expected 148"):  # raw rows handed over as packed
        kernels.quant_matmul(raw, x, "q4_k", packed=True)
    with pytest.raises(ValueError, match="multiple of 256"):
        kernels.quant_matmul(raw, x[:, :128], "q4_k")
    with pytest.raises(ValueError, match="QMatrix format"):
        kernels.QMatrix(raw, "iq4_xs")


@pytest.mark.parametrize(("gate_fmt", "down_fmt"), [("q4_k", "q6_k"), ("q5_k", "q5_k"), ("q6_k", "q4_k")])
def test_moe_layer_on_every_path_matches_the_scalar_twin_and_the_float_reference(gate_fmt: str, down_fmt: str) -> None:
    """A Q4_K_M-style expert layer (gate/up one K-quant, down another): every path the same bits as
    the scalar path, a token's output the same alone and batched, and near the float64 layer."""
    E, H, inter, T, k = 6, 512, 256, 11, 2
    gate = [quantized(gate_fmt, inter, H, seed=10 + e) for e in range(E)]
    up = [quantized(gate_fmt, inter, H, seed=20 + e) for e in range(E)]
    down = [quantized(down_fmt, H, inter, seed=30 + e) for e in range(E)]

    class Raw:
        def __init__(self, parts, fmt, shape):
            self.qtype, self.shape = int(FORMATS[fmt]), shape
            self.data = np.stack([p[0] for p in parts])

    weights = (Raw(gate, gate_fmt, (E, inter, H)), Raw(up, gate_fmt, (E, inter, H)), Raw(down, down_fmt, (E, H, inter)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    twin = kernels.CpuExperts(*weights, isa="scalar").forward(x, ids, w)

    def silu(v):
        return v / (1 + np.exp(-v))

    ref = np.zeros((T, H))
    for t in range(T):
        for e, weight in zip(ids[t], w[t], strict=True):
            h = silu(gate[e][1] @ x[t]) * (up[e][1] @ x[t])
            ref[t] += weight * (down[e][1] @ h)
    assert nmse(twin, ref) < NMSE_MOE_LAYER
    for isa in ISAS:
        experts = kernels.CpuExperts(*weights, isa=isa)
        together = experts.forward(x, ids, w)
        np.testing.assert_array_equal(together, twin)
        np.testing.assert_array_equal(experts.forward(x[4:5], ids[4:5], w[4:5])[0], together[4])
