"""The fused MoE layer (ktlab.kernels.CpuExperts): every ISA path against its scalar twin and
against a float64 numpy reference built from gguf's dequantizer of the same bytes; determinism
across thread counts; dispatch; submit/sync; validation errors."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from ktlab import kernels
from ktlab.model.quantize import quantize

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
ISAS = kernels.available_isas()
SIMD_ISAS = [isa for isa in ISAS if isa != "scalar"]

# Named tolerances (NMSE = sum (y - ref)^2 / sum ref^2, pooled over the whole output).
# vs the float64 reference on the dequantized weights and unquantized activations: what is
# left is the activation quantization (x before gate/up, h before down). int8 with one fp32
# scale per 32 (Q8_0) measured ~1.5e-4 here; per 256 (K-quants: a coarser step) ~4e-4;
# bf16 rounding ~1e-5.
NMSE_Q8_0 = 5e-4
NMSE_Q4_K = 1.5e-3
NMSE_Q6_K = 1.5e-3
NMSE_BF16 = 5e-5
NMSE_REF = {Q.Q8_0: NMSE_Q8_0, Q.Q4_K: NMSE_Q4_K, Q.Q6_K: NMSE_Q6_K, Q.BF16: NMSE_BF16}
# SIMD vs scalar twin: the integer dots are exact, only fp32 summation order differs (a few
# ulps); that can flip the rounding of a few h values when they are re-quantized for the down
# projection (one int8 / bf16 step of one input of one row). bf16 h values sit closer to
# their rounding boundaries relative to the step, so flips are more common: measured up to
# ~1.6e-7 for BF16, <= 3e-9 for the int8 formats.
NMSE_VS_SCALAR_INT8 = 1e-7
NMSE_VS_SCALAR_BF16 = 1e-6
NMSE_VS_SCALAR = {Q.Q8_0: NMSE_VS_SCALAR_INT8, Q.Q4_K: NMSE_VS_SCALAR_INT8, Q.Q6_K: NMSE_VS_SCALAR_INT8,
                  Q.BF16: NMSE_VS_SCALAR_BF16}

FORMATS = [Q.Q8_0, Q.BF16, Q.Q4_K, Q.Q6_K]
# (T, k, E, H, I, owned mask?)
CASES = [
    (1, 1, 8, 256, 256, False),
    (3, 3, 64, 256, 256, True),
    (17, 8, 8, 512, 256, True),
    (130, 8, 8, 256, 256, False),  # ~130 tokens per expert: the AMX tile kernels run
]
Q8_0_EXTRA = [(17, 3, 8, 256, 64, False), (130, 3, 64, 512, 64, True)]  # I = 64: not K-quant sized


@dataclass(frozen=True)
class Raw:
    """The RawTensor-like triple CpuExperts takes."""

    qtype: Q
    shape: tuple[int, ...]
    data: np.ndarray


def nmse(y: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.sum((y.astype(np.float64) - ref) ** 2) / max(np.sum(ref**2), 1e-300))


@functools.cache
def weights(qtype: Q, n_experts: int, hidden: int, inter: int) -> tuple[Raw, Raw, Raw]:
    rng = np.random.default_rng(n_experts * 1000 + hidden + inter + int(qtype))

    def raw(shape: tuple[int, int, int]) -> Raw:
        w = (rng.standard_normal(shape) * rng.uniform(0.02, 0.1, size=(*shape[:2], 1))).astype(np.float32)
        return Raw(qtype, shape, quantize(w, qtype))

    return raw((n_experts, inter, hidden)), raw((n_experts, inter, hidden)), raw((n_experts, hidden, inter))


def make_inputs(seed: int, t: int, k: int, e: int, h: int, with_owned: bool):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, h)) * rng.uniform(0.5, 2.0, size=(t, 1))).astype(np.float32)
    ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32)
    owned = rng.random(e) < 0.6 if with_owned else None
    return x, ids, w, owned


def dequantized(r: Raw) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(r.data, r.qtype), dtype=np.float64).reshape(r.shape)


def reference(raws: tuple[Raw, Raw, Raw], x, ids, w, owned) -> np.ndarray:
    """float64: sum over owned slots of w * down(silu(gate x) * up x)."""
    gate, up, down = (dequantized(r) for r in raws)
    out = np.zeros((x.shape[0], down.shape[1]))
    x64 = x.astype(np.float64)
    for e in range(gate.shape[0]):
        if owned is not None and not owned[e]:
            continue
        tok, slot = np.nonzero(ids == e)
        if tok.size == 0:
            continue
        g = x64[tok] @ gate[e].T
        h = g / (1.0 + np.exp(-g)) * (x64[tok] @ up[e].T)
        np.add.at(out, tok, w[tok, slot, None] * (h @ down[e].T))
    return out


def experts(raws: tuple[Raw, Raw, Raw], isa: str | None, threads: int | None = None) -> kernels.CpuExperts:
    return kernels.CpuExperts(*raws, isa=isa, threads=threads)


def all_cases():
    for qtype in FORMATS:
        for case in CASES + (Q8_0_EXTRA if qtype == Q.Q8_0 else []):
            yield pytest.param(qtype, case, id=f"{qtype.name}-T{case[0]}-k{case[1]}-E{case[2]}-H{case[3]}-I{case[4]}"
                               + ("-owned" if case[5] else ""))


# ---- every path vs its scalar twin and vs the float64 reference -----------------------------


@pytest.mark.parametrize(("qtype", "case"), list(all_cases()))
def test_paths_vs_scalar_and_reference(qtype: Q, case: tuple) -> None:
    t, k, e, h, i, with_owned = case
    raws = weights(qtype, e, h, i)
    x, ids, w, owned = make_inputs(t * 31 + k, t, k, e, h, with_owned)
    ref = reference(raws, x, ids, w, owned)
    scalar = experts(raws, "scalar").forward(x, ids, w, owned)
    assert scalar.dtype == np.float32 and scalar.shape == (t, h)
    assert nmse(scalar, ref) < NMSE_REF[qtype], f"scalar vs float64 reference: {nmse(scalar, ref):.3g}"
    if owned is not None:  # tokens with no owned expert get exact zeros
        none_owned = ~owned[ids].any(axis=1)
        assert np.all(scalar[none_owned] == 0.0)
    for isa in SIMD_ISAS:
        y = experts(raws, isa).forward(x, ids, w, owned)
        assert nmse(y, scalar) < NMSE_VS_SCALAR[qtype], f"{isa} vs scalar: {nmse(y, scalar):.3g}"
        assert nmse(y, ref) < NMSE_REF[qtype], f"{isa} vs float64 reference: {nmse(y, ref):.3g}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_deterministic_across_thread_counts(qtype: Q) -> None:
    raws = weights(qtype, 8, 256, 256)
    for t, k in [(3, 3), (130, 8)]:
        x, ids, w, owned = make_inputs(7 + t, t, k, 8, 256, False)
        for isa in ISAS:
            outs = [experts(raws, isa, threads=n).forward(x, ids, w, owned) for n in (1, 2, 3)]
            for y in outs[1:]:
                np.testing.assert_array_equal(y, outs[0], err_msg=f"{isa}: thread count changed the result")


def test_mixed_down_format_and_chunking() -> None:
    """A Q6_K down under Q4_K gate/up (as in Q4_K_M files), and T over one internal chunk."""
    rng = np.random.default_rng(5)
    e, h, i = 8, 256, 256
    g = (rng.standard_normal((e, i, h)) * 0.05).astype(np.float32)
    u = (rng.standard_normal((e, i, h)) * 0.05).astype(np.float32)
    d = (rng.standard_normal((e, h, i)) * 0.05).astype(np.float32)
    raws = (Raw(Q.Q4_K, g.shape, quantize(g, Q.Q4_K)), Raw(Q.Q4_K, u.shape, quantize(u, Q.Q4_K)),
            Raw(Q.Q6_K, d.shape, quantize(d, Q.Q6_K)))
    ce = experts(raws, kernels.best_isa())
    assert ce.qtype == Q.Q4_K and ce.down_qtype == Q.Q6_K
    t = 1100  # > MoeLayer::kChunkTokens (1024)
    x, ids, w, _ = make_inputs(9, t, 2, e, h, False)
    y = ce.forward(x, ids, w)
    assert nmse(y, reference(raws, x, ids, w, None)) < NMSE_Q4_K


def test_f16_and_f32_weights_run_as_bf16() -> None:
    rng = np.random.default_rng(6)
    e, h, i = 4, 64, 96
    ws = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in [(e, i, h), (e, i, h), (e, h, i)]]
    x, ids, w, _ = make_inputs(1, 5, 2, e, h, False)
    ref = reference(tuple(Raw(Q.F32, a.shape, a) for a in ws), x, ids, w, None)
    for qt, dtype in [(Q.F16, np.float16), (Q.F32, np.float32)]:
        ce = kernels.CpuExperts(*(Raw(qt, a.shape, a.astype(dtype)) for a in ws))
        assert ce.qtype == qt and ce.bytes == sum(a.size for a in ws) * 2  # held as bf16
        assert nmse(ce.forward(x, ids, w), ref) < 4 * NMSE_BF16


def test_properties_and_torch_inputs() -> None:
    raws = weights(Q.Q8_0, 8, 256, 256)
    ce = experts(raws, None, threads=2)
    assert ce.isa == kernels.selected_isa() and ce.threads == 2 and ce.qtype == Q.Q8_0
    assert ce.n_experts == 8 and ce.hidden == 256 and ce.inter == 256
    assert ce.bytes == sum(r.data.nbytes for r in raws) and ce.expert_bytes * 8 == ce.bytes
    assert experts(raws, None).threads == kernels.default_threads()
    x, ids, w, owned = make_inputs(3, 4, 2, 8, 256, True)
    y = ce.forward(x, ids, w, owned)
    np.testing.assert_array_equal(ce.forward(np.asfortranarray(x), ids.astype(np.int64), w, owned.astype(int)), y)
    assert ce.forward(x[:0], ids[:0], w[:0]).shape == (0, 256)
    torch = pytest.importorskip("torch")
    yt = ce.forward(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w), torch.from_numpy(owned))
    np.testing.assert_array_equal(yt, y)
    xb = torch.from_numpy(x).bfloat16()  # bf16 hidden states: widened to float32 (a copy)
    np.testing.assert_array_equal(ce.forward(xb, ids, w), ce.forward(xb.float().numpy(), ids, w))


def test_forward_add_is_h_plus_forward() -> None:
    ce = experts(weights(Q.Q8_0, 8, 256, 256), None, threads=2)
    x, ids, w, _ = make_inputs(5, 4, 2, 8, 256, False)
    h = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    want = h + ce.forward(x, ids, w)
    got = h.copy()
    ce.forward_add(x, ids.astype(np.int64), w, got)
    np.testing.assert_array_equal(got, want)  # the same kernel and the same float add
    bad = ids.astype(np.int64)
    bad[2, 1] = 8  # the 9th expert of 8
    with pytest.raises(ValueError, match="expert id 8 out of range"):
        ce.forward_add(x, bad, w, h.copy())
    with pytest.raises(ValueError, match="must be"):
        ce.forward_add(x, ids.astype(np.int64), w, h[:3].copy())


# ---- submit / sync ---------------------------------------------------------------------------


def test_submit_returns_at_once_and_python_runs_meanwhile() -> None:
    raws = weights(Q.Q8_0, 8, 256, 256)
    ce = experts(raws, "scalar", threads=1)
    x, ids, w, _ = make_inputs(11, 256, 8, 8, 256, False)
    start = time.perf_counter()
    expected = ce.forward(x, ids, w)
    call_s = time.perf_counter() - start

    start = time.perf_counter()
    ce.submit(x, ids, w)
    submit_s = time.perf_counter() - start
    counter = 0
    while time.perf_counter() - start < call_s / 2:  # Python work while the call runs
        counter += 1
    out = ce.sync()
    assert submit_s < call_s / 4, f"submit took {submit_s:.3f} s of a {call_s:.3f} s call"
    assert counter > 1000
    np.testing.assert_array_equal(out, expected)

    # a Python thread also progresses during a blocking forward() (the GIL is released)
    stop, ticks = threading.Event(), [0]

    def spin() -> None:
        while not stop.is_set():
            ticks[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.01)
    before = ticks[0]
    np.testing.assert_array_equal(ce.forward(x, ids, w), expected)
    during = ticks[0] - before
    stop.set()
    th.join()
    assert during > 1000


def test_submit_with_out_buffer_and_sync_errors() -> None:
    raws = weights(Q.Q8_0, 8, 256, 256)
    ce = experts(raws, kernels.best_isa())
    x, ids, w, owned = make_inputs(12, 9, 3, 8, 256, True)
    out = np.full((9, 256), np.nan, dtype=np.float32)
    ce.submit(x, ids, w, owned, out=out)
    with pytest.raises(RuntimeError, match="pending"):
        ce.submit(x, ids, w)
    with pytest.raises(RuntimeError, match="pending"):
        ce.forward(x, ids, w)
    assert ce.sync() is out
    np.testing.assert_array_equal(out, ce.forward(x, ids, w, owned))
    with pytest.raises(RuntimeError, match="without a pending"):
        ce.sync()
    ce.submit(x[:0], ids[:0], w[:0])
    assert ce.sync().shape == (0, 256)


# ---- validation ----------------------------------------------------------------------------


def test_bad_calls_raise_value_error() -> None:
    raws = weights(Q.Q8_0, 8, 256, 256)
    ce = experts(raws, kernels.best_isa())
    x, ids, w, owned = make_inputs(13, 4, 2, 8, 256, True)
    bad = [
        (x[:, :128], ids, w, None),                    # wrong H
        (x[0], ids, w, None),                          # 1-D x
        (x.astype(np.int32), ids, w, None),            # integer x
        (x, ids[:3], w, None),                         # T mismatch
        (x, ids.astype(np.float32), w, None),          # float ids
        (x, ids, w[:, :1], None),                      # weights shape
        (x, ids, w.astype(np.int64), None),            # integer weights
        (x, np.where(ids == ids[0, 0], 8, ids), w, None),   # id == E
        (x, np.where(ids == ids[0, 0], -1, ids), w, None),  # negative id
        (x, ids, w, owned[:7]),                        # owned of the wrong length
        (x, ids, w, owned.astype(np.float32)),         # float mask
    ]
    for args in bad:
        with pytest.raises(ValueError):
            ce.forward(*args)
        with pytest.raises(ValueError):
            ce.submit(*args)
    with pytest.raises(ValueError, match="out"):
        ce.submit(x, ids, w, out=np.empty((4, 256), dtype=np.float64))
    with pytest.raises(RuntimeError):
        ce.sync()  # nothing was submitted by the failed calls


def test_bad_weights_raise_value_error() -> None:
    g, u, d = weights(Q.Q8_0, 8, 256, 256)
    with pytest.raises(ValueError, match="same weight type"):
        kernels.CpuExperts(g, Raw(Q.BF16, u.shape, np.zeros((8, 256, 512), np.uint8)), d)
    with pytest.raises(ValueError, match="expected gate and up"):
        kernels.CpuExperts(g, u, weights(Q.Q8_0, 8, 256, 64)[2])
    with pytest.raises(ValueError, match="bytes"):
        kernels.CpuExperts(g, u, Raw(d.qtype, d.shape, d.data[:4]))
    with pytest.raises(ValueError, match="not supported"):
        kernels.CpuExperts(Raw(Q.Q4_0, g.shape, g.data), Raw(Q.Q4_0, u.shape, u.data), d)
    with pytest.raises(ValueError, match="blocks"):
        kernels.CpuExperts(*weights(Q.Q8_0, 8, 256, 64)[:2], Raw(Q.Q4_K, (8, 256, 64), np.zeros(1, np.uint8)))
    with pytest.raises(ValueError):
        kernels.CpuExperts(g, u, d, threads=0)
    with pytest.raises(ValueError, match="not a known ISA"):
        kernels.CpuExperts(g, u, d, isa="avx1024")


# ---- dispatch ----------------------------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KTLAB_ISA")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=ROOT)


DISPATCH_CODE = """
    import numpy as np
    from ktlab import kernels
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 64, 64)).astype(np.float32)
    d = rng.standard_normal((4, 64, 64)).astype(np.float32)
    try:
        ce = kernels.CpuExperts.from_float(g, g, d, 8)  # Q8_0
        y = ce.forward(rng.standard_normal((20, 64)), rng.integers(0, 4, (20, 2)), np.ones((20, 2)))
        print("ISA", ce.isa, bool(np.isfinite(y).all()))
    except ValueError as exc:
        print("ERR", exc)
"""


@pytest.mark.parametrize("isa", kernels.ISA_NAMES)
def test_forcing_each_path(isa: str) -> None:
    proc = run_python(DISPATCH_CODE, KTLAB_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    if isa in ISAS:
        assert proc.stdout.strip() == f"ISA {isa} True"
    else:
        assert proc.stdout.startswith("ERR") and isa in proc.stdout and "not available" in proc.stdout
    if isa != "scalar":  # the same path, disabled: a clear error, never a crash
        proc = run_python(DISPATCH_CODE, KTLAB_ISA=isa, KTLAB_ISA_DISABLE=isa)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("ERR") and "KTLAB_ISA_DISABLE" in proc.stdout, proc.stdout


def test_best_path_is_picked_and_no_avx2_means_scalar() -> None:
    proc = run_python(DISPATCH_CODE)
    assert proc.stdout.strip() == f"ISA {kernels.best_isa()} True", proc.stderr
    proc = run_python(DISPATCH_CODE, KTLAB_ISA_DISABLE="amx,avx512")
    assert proc.stdout.strip() == ("ISA avx2 True" if "avx2" in ISAS else "ISA scalar True"), proc.stderr
    proc = run_python(DISPATCH_CODE, KTLAB_ISA_DISABLE="avx2,avx512,amx")
    assert proc.stdout.strip() == "ISA scalar True" and "scalar path" in proc.stderr
