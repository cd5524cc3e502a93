"""Tests for ktlab.model.quantize: K-quant reference quantizers checked via gguf's dequantizers."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ktlab.model.quantize import (
    fallback_qtype,
    quantize,
    quantize_q4_k,
    quantize_q5_k,
    quantize_q6_k,
    row_size_ok,
)

Q4_K = GGMLQuantizationType.Q4_K
Q5_K = GGMLQuantizationType.Q5_K
Q6_K = GGMLQuantizationType.Q6_K
K_QUANTS = (Q4_K, Q5_K, Q6_K)
DIRECT = {Q4_K: quantize_q4_k, Q5_K: quantize_q5_k, Q6_K: quantize_q6_k}

# Relative squared error sum((y - x)^2) / sum(x^2) after a round trip. Measured with this
# quantizer: Q4_K ~5.1e-3 (normal) / ~9e-3 (Student-t, 3 dof); Q5_K ~1.3e-3 / ~2.3e-3;
# Q6_K ~3.2e-4 / ~7e-4.
NMSE = {Q4_K: 1.5e-2, Q5_K: 4e-3, Q6_K: 1.2e-3}
# Re-quantizing a dequantized tensor reproduces it exactly for Gaussian data with Q4_K and Q6_K;
# with heavy tails a few blocks settle on a neighbouring scale. Q5_K moves the super-block scale
# of some blocks even for Gaussian data (so does ggml's C reference: its bytes equal ours here).
# Measured NMSE(y, requant(y)): Q4_K <= 2.3e-5, Q5_K <= 6.6e-5, Q6_K <= 2.5e-6, i.e. far below
# the quantization error itself; blocks changed at seed 11 with Student-t data: Q4_K 2%,
# Q5_K 27% (6% with Gaussian data), Q6_K 16%.
REQUANT_EXACT = (Q4_K, Q6_K)
REQUANT_NMSE = {Q4_K: 1e-4, Q5_K: 2e-4, Q6_K: 1e-5}
REQUANT_CHANGED_BLOCKS = {Q4_K: 0.25, Q5_K: 0.4, Q6_K: 0.25}
# |dequantized| may exceed the block's max |x| by about half a quantization step: the grid
# spans at most ~2 * max|x| in 15 steps (Q4_K), in 31 steps (Q5_K) or max|x| in ~32 steps (Q6_K).
OVERSHOOT = {Q4_K: 1 + 1 / 8, Q5_K: 1 + 1 / 16, Q6_K: 1 + 1 / 16}
# When the fp16 super-block scales are subnormal they are only accurate to half an fp16 ulp
# (2**-25), multiplied by the largest integer factor applied to them in the block.
FP16_HALF_ULP = 2.0**-25
ABS_SLACK = {
    Q4_K: FP16_HALF_ULP * (63 * 15 + 63),
    Q5_K: FP16_HALF_ULP * (63 * 31 + 63),
    Q6_K: FP16_HALF_ULP * 128 * 32,
}
BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}


def _roundtrip(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return gguf_quants.dequantize(quantize(x, qtype), qtype)


def _nmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((y.astype(np.float64) - x) ** 2) / np.sum(x.astype(np.float64) ** 2))


def _sample(dist: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_t(3, shape).astype(np.float32)


# ------------------------------------------------------------------------------- (a) round trip


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(4, 256), (3, 2048), (768, 512)], ids=str)
@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_roundtrip_error(qtype: GGMLQuantizationType, shape: tuple[int, int], dist: str) -> None:
    x = _sample(dist, shape, seed=shape[0] * shape[1])
    q = quantize(x, qtype)
    assert q.dtype == np.uint8
    assert q.shape == (shape[0], shape[1] // 256 * BLOCK_BYTES[qtype])
    y = gguf_quants.dequantize(q, qtype)
    assert y.shape == x.shape
    assert np.isfinite(y).all()
    assert _nmse(x, y) < NMSE[qtype]


def test_q6_k_is_much_tighter_than_q4_k() -> None:
    x = _sample("normal", (64, 1024), seed=7)
    assert _nmse(x, _roundtrip(x, Q6_K)) < _nmse(x, _roundtrip(x, Q4_K)) / 8


def test_q5_k_sits_between_q4_k_and_q6_k() -> None:
    # one more bit per value: about 4x less squared error on each side (measured 3.9x and 4.1x)
    x = _sample("normal", (64, 1024), seed=7)
    q4, q5, q6 = (_nmse(x, _roundtrip(x, q)) for q in (Q4_K, Q5_K, Q6_K))
    assert q5 < q4 / 3
    assert q6 < q5 / 3


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_direct_entry_points_match_dispatch_and_keep_leading_dims(qtype: GGMLQuantizationType) -> None:
    x = _sample("normal", (2, 3, 512), seed=3)
    direct = DIRECT[qtype]
    assert np.array_equal(direct(x), quantize(x, qtype))
    assert direct(x).shape == (2, 3, 2 * BLOCK_BYTES[qtype])
    assert direct(x[0, 0]).shape == (2 * BLOCK_BYTES[qtype],)
    # rows are independent: quantizing a slice gives the same bytes
    assert np.array_equal(direct(x[1]), direct(x)[1])


def test_float64_input_is_cast_to_float32() -> None:
    x = _sample("normal", (2, 256), seed=5)
    for qtype in K_QUANTS:
        assert np.array_equal(quantize(x.astype(np.float64), qtype), quantize(x, qtype))


def _k_block_on_grid(nmax: int, offset: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A super-block already on a Q4_K / Q5_K grid and its levels [256] in [0, nmax].

    x = (L - offset) * 63 * 2**-10: every 32-value sub-block holds both 0 and nmax, so ggml's fit
    recovers L exactly, with d = 2**-10 and dmin = offset * 2**-10 (both exact in fp16), every
    6-bit scale 63 and every 6-bit min 63 (0 when offset is 0).
    """
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, nmax + 1, size=(8, 32))
    levels[:, :2] = [0, nmax]
    levels = rng.permuted(levels, axis=1).reshape(256)
    return ((levels - offset) * (63 * 2.0**-10)).astype(np.float32).reshape(1, 256), levels


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K], ids=lambda q: q.name)
@pytest.mark.parametrize("offset", [0, 8])
def test_q4_k_q5_k_byte_layout(qtype: GGMLQuantizationType, offset: int) -> None:
    """Every byte of a block, written out from ggml's block_q4_K / block_q5_K field by field."""
    nmax = 15 if qtype == Q4_K else 31
    x, levels = _k_block_on_grid(nmax, offset, seed=offset + nmax)
    # scales[0:4]: low 6 bits scale j, top 2 bits scale j+4's high bits; scales[4:8] the same for
    # the mins; scales[8:12]: low nibble scale j+4, high nibble min j+4 (low 4 bits each).
    scales = [0xFF] * 4 + ([0xFF] * 4 if offset else [0x00] * 4) + ([0xFF] * 4 if offset else [0x0F] * 4)
    qh, qs = [0] * 32, [0] * 128
    for j in range(4):
        for l in range(32):
            lo, hi = int(levels[64 * j + l]), int(levels[64 * j + 32 + l])
            qs[32 * j + l] = (lo & 0x0F) | ((hi & 0x0F) << 4)
            qh[l] |= ((lo >> 4) << (2 * j)) | ((hi >> 4) << (2 * j + 1))
    expected = (
        np.float16(2.0**-10).tobytes()
        + np.float16(offset * 2.0**-10).tobytes()
        + bytes(scales)
        + (bytes(qh) if qtype == Q5_K else b"")
        + bytes(qs)
    )
    got = quantize(x, qtype)
    assert got.shape == (1, BLOCK_BYTES[qtype])
    assert got.tobytes() == expected
    if qtype == Q5_K:
        assert any(qh) and any(b != 0xFF for b in qh)  # the fifth bits really vary
    np.testing.assert_array_equal(gguf_quants.dequantize(got, qtype), x)


# ------------------------------------------------------------------------------ (b) idempotence


@pytest.mark.parametrize("qtype", REQUANT_EXACT, ids=lambda q: q.name)
def test_requantizing_dequantized_gaussian_is_exact(qtype: GGMLQuantizationType) -> None:
    y = _roundtrip(_sample("normal", (32, 1024), seed=11), qtype)
    assert np.array_equal(_roundtrip(y, qtype), y)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("dist", ["normal", "student_t3"])
def test_requantizing_dequantized_is_stable(qtype: GGMLQuantizationType, dist: str) -> None:
    y = _roundtrip(_sample(dist, (32, 1024), seed=11), qtype)
    y2 = _roundtrip(y, qtype)
    assert _nmse(y, y2) < REQUANT_NMSE[qtype]
    changed_blocks = (y2 != y).reshape(-1, 256).any(axis=-1)
    assert changed_blocks.mean() < REQUANT_CHANGED_BLOCKS[qtype]


# ----------------------------------------------------------------------------- (c) special cases


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_all_zero_blocks(qtype: GGMLQuantizationType) -> None:
    x = np.zeros((3, 512), dtype=np.float32)
    q = quantize(x, qtype)
    assert not q.any()  # ggml writes all-zero blocks
    y = gguf_quants.dequantize(q, qtype)
    assert np.isfinite(y).all() and not y.any()


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("value", [1.0, -0.37, 1e-3, 250.0])
def test_constant_blocks(qtype: GGMLQuantizationType, value: float) -> None:
    x = np.full((2, 256), value, dtype=np.float32)
    y = _roundtrip(x, qtype)
    # only the fp16 rounding of the block scale remains (subnormal fp16 for the 1e-3 case)
    np.testing.assert_allclose(y, x, rtol=2e-3, atol=ABS_SLACK[qtype])


def test_zero_block_next_to_nonzero_block() -> None:
    x = np.zeros((1, 512), dtype=np.float32)
    x[0, 256:] = _sample("normal", (256,), seed=2)
    for qtype in K_QUANTS:
        y = _roundtrip(x, qtype)
        assert not y[0, :256].any()
        assert _nmse(x[0, 256:], y[0, 256:]) < NMSE[qtype]


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_single_large_outlier(qtype: GGMLQuantizationType, sign: float) -> None:
    x = _sample("normal", (1, 256), seed=9)
    x[0, 77] = sign * 1000 * np.abs(x).max()
    y = _roundtrip(x, qtype)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0, 77], x[0, 77], rtol=1e-2)
    # everything else is swamped by the outlier's scale but must stay below it in magnitude
    assert np.abs(np.delete(y, 77)).max() < abs(x[0, 77]) / 2


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("value", [1e-45, 1.2e-38, 1e-20, 1e-10])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_tiny_blocks_become_zero_without_warnings(qtype: GGMLQuantizationType, value: float) -> None:
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, ::3] = value
    x[0, 1::7] = -value / 2
    y = _roundtrip(x, qtype)
    assert np.isfinite(y).all() and np.abs(y).max() <= ABS_SLACK[qtype]


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_non_finite_input_rejected(qtype: GGMLQuantizationType) -> None:
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        quantize(x, qtype)


@pytest.mark.parametrize("qtype", [Q4_K, Q5_K], ids=lambda q: q.name)
def test_input_too_large_for_fp16_scales_rejected(qtype: GGMLQuantizationType) -> None:
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 0] = -1e8
    with pytest.raises(ValueError, match=rf"{qtype.name} super-block (scale|min) overflows fp16"):
        quantize(x, qtype)


# ------------------------------------------------------------------ (d) types delegated to gguf


@pytest.mark.parametrize(
    "qtype",
    [
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
    ],
    ids=lambda q: q.name,
)
def test_delegated_types_match_gguf(qtype: GGMLQuantizationType) -> None:
    x = _sample("student_t3", (5, 96), seed=13)
    ours = quantize(x, qtype)
    ref = gguf_quants.quantize(x, qtype)
    assert ours.dtype == ref.dtype
    assert ours.shape == ref.shape
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize(
    "qtype",
    [GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, *K_QUANTS],
    ids=lambda q: q.name,
)
def test_gguf_writer_roundtrip(tmp_path, qtype: GGMLQuantizationType) -> None:
    x = _sample("normal", (3, 512), seed=17)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype
    assert list(tensor.shape) == [512, 3]  # GGUF stores ne0 (the row length) first
    y = gguf_quants.dequantize(np.asarray(tensor.data), qtype).reshape(x.shape)
    np.testing.assert_array_equal(y, _roundtrip(x, qtype))


# ------------------------------------------------------------------------------------ (e) errors


@pytest.mark.parametrize(
    "qtype",
    [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q3_K, GGMLQuantizationType.IQ4_XS, 12345],
    ids=str,
)
def test_unsupported_type(qtype) -> None:
    with pytest.raises(ValueError, match="unsupported quant type"):
        quantize(np.zeros((1, 256), dtype=np.float32), qtype)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(2, 100), (4, 288), (128,), (256, 128)], ids=str)
def test_bad_row_length(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"{qtype.name} needs the last dimension to be a multiple of 256"):
        quantize(x, qtype)
    with pytest.raises(ValueError, match="multiple of 256"):
        DIRECT[qtype](x)


def test_bad_row_length_for_q8_0_and_scalar() -> None:
    with pytest.raises(ValueError, match="Q8_0 needs the last dimension to be a multiple of 32"):
        quantize(np.zeros((3, 48), dtype=np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="0-d"):
        quantize(np.float32(1.0), Q4_K)


def test_row_size_ok_and_fallback() -> None:
    Q8_0, F16 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16
    assert row_size_ok(2048, Q4_K) and not row_size_ok(2080, Q4_K)
    assert row_size_ok(96, Q8_0) and not row_size_ok(100, Q8_0)
    assert row_size_ok(7, F16) and row_size_ok(7, GGMLQuantizationType.BF16)
    assert not row_size_ok(0, Q4_K)
    assert fallback_qtype(2048, Q4_K) == Q4_K
    assert fallback_qtype(768, Q5_K) == Q5_K and fallback_qtype(2080, Q5_K) == Q8_0
    assert fallback_qtype(2048 + 32, Q6_K) == Q8_0
    assert fallback_qtype(100, Q4_K) == F16
    assert fallback_qtype(100, GGMLQuantizationType.F32) == GGMLQuantizationType.F32
    for n_cols in (256, 288, 100, 1):
        assert row_size_ok(n_cols, fallback_qtype(n_cols, Q4_K))
        assert GGML_QUANT_SIZES[fallback_qtype(n_cols, Q4_K)][0] <= 256
    with pytest.raises(ValueError, match="unsupported quant type"):
        fallback_qtype(256, GGMLQuantizationType.Q2_K)


# ----------------------------------------------------------------------- (f) no wild values


_block_values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(256)), elements=_block_values),
    scale=st.sampled_from([1.0, 1e-3, 1e-6]),
)
def test_dequantized_values_stay_within_block_range(x: np.ndarray, scale: float) -> None:
    x = (x * np.float32(scale)).astype(np.float32)
    maxabs = np.abs(x).max(axis=-1, keepdims=True)
    for qtype in K_QUANTS:
        y = _roundtrip(x, qtype)
        assert np.isfinite(y).all()
        assert (np.abs(y) <= OVERSHOOT[qtype] * maxabs + ABS_SLACK[qtype]).all()
