"""Batch-independent fp32 matmul (routers): vs numpy float64, rows the same bits for any M."""

from __future__ import annotations

import numpy as np
import pytest

from ktlab import kernels


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize(("n", "k", "m"), [(64, 256, 5), (130, 2048, 70), (3, 37, 1)])
def test_f32_matmul_rows_batch_independent_and_correct(isa: str, n: int, k: int, m: int) -> None:
    rng = np.random.default_rng(n + k + m)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kernels.f32_matmul(w, x, isa=isa)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 1e-6 * k * (np.abs(x) @ np.abs(w).T)
    assert np.all(np.abs(y - ref) <= bound + 1e-30)
    for j in range(m):  # tokens computed four at a time or alone: the same bits
        np.testing.assert_array_equal(kernels.f32_matmul(w, x[j : j + 1], isa=isa, threads=1)[0], y[j])


def test_f32_matmul_shape_errors() -> None:
    with pytest.raises(ValueError):
        kernels._kernels.f32_matmul(np.zeros((4, 8), np.float32), np.zeros((2, 9), np.float32),
                                    np.zeros((2, 4), np.float32), None, 0)
    with pytest.raises(ValueError, match="out is"):
        kernels._kernels.f32_matmul(np.zeros((4, 8), np.float32), np.zeros((2, 8), np.float32),
                                    np.zeros((2, 5), np.float32), None, 0)
