"""Transposed products (training's input gradients through frozen quantized weights): ggml's
dequantizers in C++ against gguf's, and dy @ W on every path against the scalar twin and numpy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ktlab import kernels
from ktlab.model.quantize import quantize

Q = gguf.GGMLQuantizationType
FORMATS = {"q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "mxfp4": Q.MXFP4, "bf16": Q.BF16}
ISAS = kernels.available_isas()


def raw_rows(fmt: str, rows: int, cols: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(quantize(w, FORMATS[fmt]).reshape(rows, -1).view(np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_rows_are_ggmls(fmt):
    raw = raw_rows(fmt, 8, 512, seed=1)
    ours = kernels.dequantize_rows(raw, fmt)
    ref = gguf.quants.dequantize(raw, FORMATS[fmt]).reshape(8, 512)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_transposed_product_is_the_same_bits_everywhere_and_equals_numpy(fmt):
    """dy @ W: every path and thread count the same bits as the scalar twin (one fused multiply-add
    chain per element, rows in order); close to float64 numpy on the dequantized rows."""
    cols = 768 if fmt in ("q4_k", "q5_k", "q6_k") else 1440  # 1440: a last chunk of 32 columns (scalar tail)
    raw = raw_rows(fmt, 48, cols, seed=2)
    dy = np.random.default_rng(3).standard_normal((5, 48)).astype(np.float32)
    twin = kernels.quant_matmul_t(raw, dy, fmt, "scalar", threads=1)
    w = kernels.dequantize_rows(raw, fmt).astype(np.float64)
    np.testing.assert_allclose(twin, dy.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
    for isa in ISAS:
        for threads in (1, 2):
            np.testing.assert_array_equal(kernels.quant_matmul_t(raw, dy, fmt, isa, threads=threads), twin)


def test_transposed_product_rejects_bad_shapes():
    raw = raw_rows("q8_0", 4, 64, seed=4)
    with pytest.raises(ValueError, match="dy rows have 3 values, W has 4 rows"):
        kernels.quant_matmul_t(raw, np.zeros((2, 3), np.float32), "q8_0")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_two_part_transposed_product_sums_both_on_every_path(fmt):
    """dy1 @ W1 + dy2 @ W2 in one pass (backward's gate and up): every path the scalar twin's bits, and
    the sum of the two products up to float rounding."""
    w1, w2 = raw_rows(fmt, 32, 512, seed=5), raw_rows(fmt, 32, 512, seed=6)
    rng = np.random.default_rng(7)
    dy1, dy2 = (rng.standard_normal((3, 32)).astype(np.float32) for _ in range(2))
    twin = kernels.quant_matmul_t2(w1, dy1, w2, dy2, fmt, "scalar", threads=1)
    apart = kernels.quant_matmul_t(w1, dy1, fmt, "scalar") + kernels.quant_matmul_t(w2, dy2, fmt, "scalar")
    np.testing.assert_allclose(twin, apart, rtol=1e-5, atol=1e-5)
    for isa in ISAS:
        np.testing.assert_array_equal(kernels.quant_matmul_t2(w1, dy1, w2, dy2, fmt, isa, threads=2), twin)
