"""Q8_0 kernels against independent references (gguf's quantizer and dequantizer, numpy)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import activation_test_rows, reference_int8_blocks

from ktlab import kernels

Q8_0 = gguf.GGMLQuantizationType.Q8_0
ROOT = Path(__file__).resolve().parents[1]

# Named tolerances.
# Any path vs the float64 product of gguf-dequantized weights and the unquantized x: the
# activation is quantized to int8 per block of 32 (relative rounding error ~ 1/254 per value),
# which for random data gives NMSE ~ 3e-5 (pooled over many rows; per row there is also a hard
# bound, see activation_error_bound).
NMSE_Q8_0 = 1e-4
# SIMD path vs its scalar twin: the int32 block dots are exact; only the fp32 summation order
# differs, so a few ulps of the row's magnitude.
REL_SIMD_VS_SCALAR = 2e-6

SHAPES = [(1, 32), (7, 32), (33, 64), (5, 96), (129, 96), (17, 2048), (300, 2048), (1000, 256)]


def nmse(y: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.sum((y.astype(np.float64) - ref) ** 2) / max(np.sum(ref**2), 1e-300))


def random_q8_0(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q8_0 bytes [n, k/32*34] from gguf's own quantizer, and a random fp32 x[k]."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3.0, size=(n, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, Q8_0)
    x = rng.standard_normal(k).astype(np.float32)
    return raw, x


# ---- (1) quantizer: byte for byte with gguf -------------------------------------------------


@pytest.mark.parametrize("k", [32, 64, 96, 2048])
def test_quantize_q8_0_matches_gguf_bytes(k: int) -> None:
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((16, k)) * rng.uniform(1e-3, 1e3, size=(16, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
    x[1, :32] = np.arange(32, dtype=np.float32) - 16.0  # exact halves after scaling: ties
    x[2, 5] = -7.5e4  # a lone outlier
    ours = kernels.quantize_q8_0(x)
    ref = gguf.quants.quantize(x, Q8_0)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (16, k // 32 * 34)
    np.testing.assert_array_equal(ours, ref)
    for row in range(3):  # the 1-D boundary function, row by row
        np.testing.assert_array_equal(kernels._kernels.quantize_q8_0(x[row]), ref[row])


# ---- (2) every path vs a float64 numpy reference ---------------------------------------------


def activation_error_bound(w_deq: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hard per-row bound on |y - w_deq @ x| for the Q8_0 activation scheme.

    Each x value moves by at most half a step, d_b / 2 = amax_b / 254, when quantized; the fp32
    scaling and summation add a relative ~K/32 ulps of sum |w||x|.
    """
    half_step = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1) / 254.0, 32)
    return np.abs(w_deq) @ half_step * 1.001 + 1e-5 * (np.abs(w_deq) @ np.abs(x))


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_activation_quantizer_is_the_same_bits_on_every_path(isa: str) -> None:
    """Every path's activation quantizer gives numpy's bytes, ties (x * (1/d) exactly k + 0.5)
    and all-zero blocks included: a token's int8 blocks never depend on the path."""
    for x in activation_test_rows(32):
        d, q = kernels._kernels.quantize_q8_act(x, isa)
        d_ref, q_ref = reference_int8_blocks(x, 32)
        np.testing.assert_array_equal(d.view(np.uint32), d_ref.view(np.uint32))
        np.testing.assert_array_equal(q, q_ref)


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_q8_0_gemv_vs_numpy_reference(isa: str, n: int, k: int) -> None:
    rng = np.random.default_rng(1000 * n + k)
    raw, x = random_q8_0(rng, n, k)
    w_deq = gguf.quants.dequantize(raw, Q8_0).astype(np.float64)
    ref = w_deq @ x.astype(np.float64)
    y = kernels.q8_0_gemv(raw, x, isa=isa)
    assert y.dtype == np.float32 and y.shape == (n,)
    err = np.abs(y - ref)
    bound = activation_error_bound(w_deq, x.astype(np.float64))
    assert np.all(err <= bound), f"{isa} N={n} K={k}: max err/bound {np.max(err / bound):.2f}"


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_q8_0_gemv_nmse(isa: str) -> None:
    """NMSE over all test shapes pooled (per-shape NMSE of a handful of rows is too noisy)."""
    ys, refs = [], []
    for n, k in SHAPES:
        rng = np.random.default_rng(1000 * n + k)
        raw, x = random_q8_0(rng, n, k)
        ref = gguf.quants.dequantize(raw, Q8_0).astype(np.float64) @ x.astype(np.float64)
        scale = np.sqrt(np.mean(ref**2))  # weigh every shape equally
        ys.append(kernels.q8_0_gemv(raw, x, isa=isa) / scale)
        refs.append(ref / scale)
    assert nmse(np.concatenate(ys), np.concatenate(refs)) < NMSE_Q8_0


# ---- (3) every SIMD path vs its scalar twin ------------------------------------------------


@pytest.mark.parametrize("isa", [i for i in kernels.available_isas() if i != "scalar"])
@pytest.mark.parametrize(("n", "k"), [*SHAPES, (6144 // 8, 2048)])
def test_simd_matches_scalar_twin(isa: str, n: int, k: int) -> None:
    rng = np.random.default_rng(7 * n + k)
    raw, x = random_q8_0(rng, n, k)
    scalar = kernels.q8_0_gemv(raw, x, isa="scalar", threads=1)
    simd = kernels.q8_0_gemv(raw, x, isa=isa, threads=1)
    # per-row: a few ulps of the sum of |terms| (cancellation makes plain relative error useless)
    bound = np.abs(gguf.quants.dequantize(raw, Q8_0)) @ np.abs(x)
    err = np.abs(simd.astype(np.float64) - scalar)
    assert np.all(err <= REL_SIMD_VS_SCALAR * bound + 1e-30), f"{isa}: max err/bound {np.max(err / bound):.2e}"


def test_extreme_quants_including_minus_128() -> None:
    """Raw bytes may hold -128 (ggml never writes it, a file could): sign tricks stay exact."""
    rng = np.random.default_rng(3)
    n, k = 40, 128
    raw = rng.integers(0, 256, size=(n, k // 32 * 34), dtype=np.uint8)
    blocks = raw.reshape(n, k // 32, 34)
    blocks[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # sane scales
    blocks[:, 0, 2:] = 0x80  # a block of -128
    x = rng.standard_normal(k).astype(np.float32)
    x[:32] = 1.0  # quantizes to +127 everywhere: extreme products
    ref = gguf.quants.dequantize(raw, Q8_0).astype(np.float64) @ x.astype(np.float64)
    scalar = kernels.q8_0_gemv(raw, x, isa="scalar")
    for isa in kernels.available_isas():
        y = kernels.q8_0_gemv(raw, x, isa=isa)
        assert nmse(y, ref) < NMSE_Q8_0, isa
        np.testing.assert_allclose(y, scalar, rtol=1e-5, atol=1e-5 * np.abs(scalar).max(), err_msg=isa)


# ---- (4) determinism across thread counts -------------------------------------------------


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_deterministic_across_threads(isa: str) -> None:
    rng = np.random.default_rng(11)
    raw, x = random_q8_0(rng, 1000, 512)  # 16 tasks of 64 rows, a 40-row tail
    y1 = kernels.q8_0_gemv(raw, x, isa=isa, threads=1)
    y2 = kernels.q8_0_gemv(raw, x, isa=isa, threads=2)
    y3 = kernels.q8_0_gemv(raw, x, isa=isa, threads=3)  # more threads than this CI box has cores
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, y3)
    np.testing.assert_array_equal(y1, kernels.q8_0_gemv(raw, x, isa=isa, threads=2))


# ---- (4b) many activation rows at once (dense layers of a batch) ---------------------------


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize(("n", "k", "m"), [(200, 96, 3), (130, 2048, 9), (64, 160, 70), (1000, 512, 130)])
def test_matmul_rows_equal_lone_gemv_bit_for_bit(isa: str, n: int, k: int, m: int) -> None:
    """Row j of a batched matmul is exactly the GEMV of row j alone (tokens in groups of four,
    remainders, several token tasks), on every path and thread count; and it is a real matmul
    (vs numpy on the dequantized weights and quantized activations)."""
    rng = np.random.default_rng(n + k + m)
    raw, _ = random_q8_0(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    lone = np.stack([kernels.q8_0_gemv(raw, row, isa=isa, threads=1) for row in x])
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(kernels.q8_0_matmul(raw, x, isa=isa, threads=threads), lone)
    w_deq = gguf.quants.dequantize(raw, Q8_0).astype(np.float64)
    for row, y in zip(x.astype(np.float64), lone, strict=True):
        assert np.all(np.abs(y - w_deq @ row) <= activation_error_bound(w_deq, row))


@pytest.mark.parametrize("isa", kernels.available_isas())
@pytest.mark.parametrize(("n", "k", "m"), [(64, 96, 5), (208, 2048, 11), (40, 160, 70)])
def test_q8_matrix_rows_are_batch_independent(isa: str, n: int, k: int, m: int) -> None:
    """The model's dense matrices (repacked to Q8_0x16 where the path has that kernel; 40 rows
    is no multiple of 16 and stays raw): a token's row is the same bits whatever comes with it,
    and within the activation-quantization bound of the float64 product."""
    rng = np.random.default_rng(n * k + m)
    raw, _ = random_q8_0(rng, n, k)
    raw.setflags(write=False)
    matrix = kernels.QMatrix(raw, isa=isa)
    assert matrix.packed == (n % 16 == 0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    batched = matrix(x)
    for j in (0, m // 2, m - 1):
        np.testing.assert_array_equal(batched[j], matrix(x[j]))
    np.testing.assert_array_equal(batched[: m // 3], matrix(x[: m // 3]))
    w_deq = gguf.quants.dequantize(raw, Q8_0).astype(np.float64)
    for row, y in zip(x.astype(np.float64), batched, strict=True):
        assert np.all(np.abs(y - w_deq @ row) <= activation_error_bound(w_deq, row))
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        kernels._kernels.dense_gemm("q8_0", raw[:8], True, x, np.empty((m, 8), dtype=np.float32), isa, 0)


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_q8_0x16_every_token_count_gives_each_token_its_lone_row(isa: str) -> None:
    """The packed dense kernels tile tokens (one or two a pass over a group, fours by half
    groups on AVX2; up to eight on AVX-512): for every count 1..9 each token's row is its lone
    row bit for bit, and it stays within float rounding of the scalar twin on the same layout."""
    rng = np.random.default_rng(21)
    raw, _ = random_q8_0(rng, 48, 320)
    matrix, twin = kernels.QMatrix(raw, isa=isa), kernels.QMatrix(raw, isa="scalar")
    assert matrix.packed and twin.packed
    x = rng.standard_normal((9, 320)).astype(np.float32)
    lone = np.stack([matrix(row) for row in x])
    for m in range(1, 10):
        np.testing.assert_array_equal(matrix(x[:m]), lone[:m])
    ref = twin(x)
    np.testing.assert_allclose(lone, ref, rtol=0, atol=REL_SIMD_VS_SCALAR * 8 * np.abs(ref).max())


def test_out_buffer_and_readonly_weights() -> None:
    rng = np.random.default_rng(5)
    raw, x = random_q8_0(rng, 10, 64)
    raw.setflags(write=False)  # like a read-only memmap of a GGUF file
    out = np.full(10, np.nan, dtype=np.float32)
    y = kernels.q8_0_gemv(raw, x.astype(np.float64), out=out)
    assert y is out and np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, kernels.q8_0_gemv(raw, x))
    assert kernels.q8_0_gemv(raw[:0], x).shape == (0,)


# ---- (5) ISA selection --------------------------------------------------------------------


def test_isa_names_and_best() -> None:
    avail = kernels.available_isas()
    assert avail[0] == "scalar" and set(avail) <= set(kernels.ISA_NAMES)
    assert kernels.best_isa() == avail[-1]
    assert kernels.resolve_isa("scalar") == "scalar"
    feats = kernels.cpu_features()
    assert all(isinstance(v, bool) for v in feats.values())
    if "avx2" in avail:
        assert feats["avx2"] and feats["fma"]
    if "amx" in avail:
        assert feats["amx_int8"] and feats["amx_permitted"]


def test_unknown_isa_raises() -> None:
    with pytest.raises(ValueError, match="sse9"):
        kernels.resolve_isa("sse9")
    raw, x = random_q8_0(np.random.default_rng(0), 4, 32)
    with pytest.raises(ValueError, match="not a known ISA"):
        kernels.q8_0_gemv(raw, x, isa="neon")


def test_unavailable_isa_raises_here_if_any() -> None:
    missing = [i for i in kernels.ISA_NAMES if i not in kernels.available_isas()]
    if not missing:
        pytest.skip("this CPU has every path; covered by the KTLAB_ISA_DISABLE subprocess test")
    raw, x = random_q8_0(np.random.default_rng(0), 4, 32)
    for isa in missing:
        with pytest.raises(ValueError, match=isa):
            kernels.q8_0_gemv(raw, x, isa=isa)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KTLAB_ISA")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_forcing_disabled_amx_raises_with_its_name() -> None:
    """KTLAB_ISA_DISABLE=amx makes AMX absent even on a CPU that has it; forcing it then fails."""
    code = """
        import numpy as np
        from ktlab import kernels
        assert "amx" not in kernels.available_isas(), kernels.available_isas()
        raw = np.zeros((2, 34), dtype=np.uint8)
        try:
            kernels.q8_0_gemv(raw, np.ones(32, dtype=np.float32), isa="amx")
        except ValueError as e:
            print("ERR", e)
        try:
            kernels.selected_isa()
        except ValueError as e:
            print("ENV", e)
    """
    proc = run_python(code, KTLAB_ISA_DISABLE="amx", KTLAB_ISA="amx")
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert "amx" in lines["ERR"] and "not available" in lines["ERR"]
    assert "KTLAB_ISA" in lines["ENV"] and "amx" in lines["ENV"]


@pytest.mark.parametrize("isa", kernels.available_isas())
def test_ktlab_isa_env_is_respected(isa: str) -> None:
    proc = run_python("from ktlab import kernels; print(kernels.selected_isa())", KTLAB_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == isa


def test_ktlab_isa_env_unknown_raises() -> None:
    proc = run_python(
        """
        from ktlab import kernels
        try:
            kernels.selected_isa()
        except ValueError as e:
            print(e)
        """,
        KTLAB_ISA="avx1024",
    )
    assert proc.returncode == 0, proc.stderr
    assert "avx1024" in proc.stdout and "not a known ISA" in proc.stdout


def test_no_avx2_falls_back_to_scalar_with_warning() -> None:
    code = """
        import warnings
        from ktlab import kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(kernels.selected_isa(), kernels.available_isas())
        print(any("AVX2" in str(w.message) for w in caught))
    """
    proc = run_python(code, KTLAB_ISA_DISABLE="avx2,avx512,amx")
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first == "scalar ['scalar']" and second == "True"


# ---- (6) bad input is a ValueError, never a crash -------------------------------------------


def test_bad_shapes_raise_value_error() -> None:
    raw, x = random_q8_0(np.random.default_rng(0), 8, 64)
    with pytest.raises(ValueError, match="expected 68"):
        kernels.q8_0_gemv(raw[:, :-1].copy(), x)  # one byte short per row
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.q8_0_gemv(raw, x[:48])
    with pytest.raises(ValueError, match="expected 34"):
        kernels.q8_0_gemv(raw, x[:32])  # K=32 but rows hold 2 blocks
    with pytest.raises(ValueError, match="uint8"):
        kernels.q8_0_gemv(raw.astype(np.int16), x)
    with pytest.raises(ValueError, match="uint8"):
        kernels.q8_0_gemv(raw.reshape(-1), x)
    with pytest.raises(ValueError, match="1-D float"):
        kernels.q8_0_gemv(raw, x[None, :])
    with pytest.raises(ValueError, match="out"):
        kernels.q8_0_gemv(raw, x, out=np.empty(7, dtype=np.float32))
    with pytest.raises(ValueError, match="float32"):
        kernels.q8_0_gemv(raw, x, out=np.empty(8, dtype=np.float64))
    with pytest.raises(ValueError, match="threads"):
        kernels.q8_0_gemv(raw, x, threads=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize_q8_0(np.ones(33, dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels._kernels.quantize_q8_0(np.ones(0, dtype=np.float32))
    with pytest.raises(ValueError):  # the raw boundary validates too
        kernels._kernels.dense_gemm("q8_0", raw, False, x[None, :32], np.empty((1, 8), dtype=np.float32), None, 0)
    with pytest.raises(ValueError, match="out is"):
        kernels._kernels.dense_gemm("q8_0", raw, False, x[None], np.empty((1, 9), dtype=np.float32), None, 0)
    with pytest.raises(ValueError, match="shape"):
        kernels.q8_0_matmul(raw, np.stack([x, x]), out=np.empty((3, 8), dtype=np.float32))


def test_non_contiguous_inputs_are_handled() -> None:
    raw, x = random_q8_0(np.random.default_rng(9), 16, 96)
    expect = kernels.q8_0_gemv(raw, x)
    np.testing.assert_array_equal(kernels.q8_0_gemv(np.asfortranarray(raw), x), expect)
    x2 = np.repeat(x, 2)[::2]
    np.testing.assert_array_equal(kernels.q8_0_gemv(raw, x2), expect)
