"""Numpy reference quantizers for GGUF tensors.

``gguf.quants.quantize`` covers F32/F16/BF16/Q8_0/MXFP4 but not the K-quants, so this module ports
ggml's reference quantizers ``quantize_row_q4_K_ref`` and ``quantize_row_q5_K_ref`` (both with
``make_qkx2_quants``) and ``quantize_row_q6_K_ref`` (with ``make_qx_quants``) to vectorised
numpy. The bytes are laid out exactly like ggml's ``block_q4_K`` / ``block_q5_K`` /
``block_q6_K`` so that ``gguf.quants.dequantize`` (and llama.cpp) decode them.

Arithmetic is float32 with the C code's operation order (sums are accumulated sequentially,
rounding is round-half-to-even like ggml's ``nearest_int``): on the inputs checked it matched
the C reference (compiled without FMA contraction) byte for byte; builds that fuse
multiply-adds may break rare near-ties differently.
Non-finite inputs are rejected, as are blocks whose fp16 super-block scales would overflow
(|x| beyond roughly 4e6 for Q4_K and Q5_K, 2.6e8 for Q6_K).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

__all__ = ["quantize", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "row_size_ok", "fallback_qtype"]

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
_CHUNK_BLOCKS = 8192

_GGUF_DELEGATED = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.MXFP4,
    }
)
_K_QUANTS = frozenset({GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K})
SUPPORTED_QTYPES = _GGUF_DELEGATED | _K_QUANTS

_F32 = np.float32


def _check_supported(qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Normalise ``qtype`` and raise ValueError when this module cannot produce it."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unsupported quant type {qtype!r}") from None
    if qtype not in SUPPORTED_QTYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise ValueError(f"unsupported quant type {qtype.name} (supported: {names})")
    return qtype


def _check_shape(x: np.ndarray, qtype: GGMLQuantizationType) -> None:
    """Raise ValueError unless the last axis of ``x`` is a whole number of ``qtype`` blocks."""
    block = GGML_QUANT_SIZES[qtype][0]
    if x.ndim == 0:
        raise ValueError(f"cannot quantize a 0-d array to {qtype.name}")
    if x.shape[-1] % block != 0:
        raise ValueError(
            f"{qtype.name} needs the last dimension to be a multiple of {block}, got shape {x.shape}"
        )


def _quantize_k(x: np.ndarray, qtype: GGMLQuantizationType, encode) -> np.ndarray:
    """Validate ``x`` and quantize it super-block by super-block with ``encode``.

    ``encode`` maps float32 [n, 256] to ``qtype``'s bytes uint8 [n, type_size]; the result is
    uint8 [..., K // 256 * type_size] with ``x``'s leading dimensions.
    """
    x = np.asarray(x)
    _check_shape(x, qtype)
    blocks = x.astype(_F32, copy=False).reshape(-1, QK_K)
    if not np.isfinite(blocks).all():
        raise ValueError(f"{qtype.name} quantization needs finite values (found NaN or Inf)")
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    out = np.empty((blocks.shape[0], block_bytes), dtype=np.uint8)
    # Like ggml's float32 code, huge inputs may overflow the search's weighted sums to inf; that
    # only disables some candidates, so the warning is noise. fp16 scale overflow is checked below.
    with np.errstate(over="ignore"):
        # Chunks of super-blocks bound the temporaries to a few tens of MiB.
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start : start + _CHUNK_BLOCKS] = encode(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * block_bytes)


def _to_fp16_and_back(v: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Round to fp16 (nearest-even like GGML_FP32_TO_FP16); return (fp16, as f32).

    Raises ValueError when a value overflows fp16, i.e. the input is too large for the format.
    """
    h = v.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"{what} overflows fp16: input magnitude too large for this quant type")
    return h, h.astype(_F32)


# -------------------------------------------------------------------------------------- Q4_K, Q5_K


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 left to right in float32, matching the sequential loops in ggml."""
    total = a[0].copy()
    for row in a[1:]:
        total += row
    return total


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised ``make_qkx2_quants`` (squared error) over the columns of ``x`` [m, n].

    Fits each column as ``x ~ scale * L - the_min`` with ``L`` in [0, nmax]; returns
    ``(scale [n], the_min [n], L [m, n] as float32)``. Unlike ggml, columns whose range is below
    GROUP_MAX_EPS are treated as constant (ggml's 1/range overflows float32 there; both give
    blocks whose fp16 scales underflow to zero).
    """
    mn = np.minimum(x.min(axis=0), _F32(0))
    mx = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = (mx - mn) < GROUP_MAX_EPS
    mx = np.where(flat, mn + _F32(1), mx)

    iscale = _F32(nmax) / (mx - mn)
    scale = _F32(1) / iscale
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
    best = _seqsum(w * np.square(scale * L + mn - x))

    for step in range(nstep + 1):
        # As in ggml, later candidates are placed relative to the best min found so far.
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (mx - mn)
        La = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
        wl = w * La
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * La)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        D = np.where(ok, D, _F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, _F32(1)), this_scale)
        this_min = np.where(pos, _F32(0), this_min)
        err = _seqsum(w * np.square(this_scale * La + this_min - x))
        better = ok & (err < best)
        L = np.where(better, La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)

    scale = np.where(flat, _F32(0), scale)
    L = np.where(flat, _F32(0), L)
    return scale, -mn, L


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into ggml's 12-byte layout."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return np.concatenate(
        [
            lo_s | ((hi_s >> 4) << 6),
            lo_m | ((hi_m >> 4) << 6),
            (hi_s & 0x0F) | ((hi_m & 0x0F) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)


def _inverse_or_zero(num: np.float32, v: np.ndarray) -> np.ndarray:
    """``num / v`` where ``v`` >= GROUP_MAX_EPS, else 0.

    ggml tests ``v > 0``; below the epsilon the fp16 super-block scale is zero anyway, and the
    guard keeps ``num / v`` from overflowing to inf (and inf * 0 to NaN).
    """
    ok = v >= GROUP_MAX_EPS
    return np.where(ok, num / np.where(ok, v, _F32(1)), _F32(0))


def _qkx2_superblocks(
    x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The part ``quantize_row_q4_K_ref`` and ``quantize_row_q5_K_ref`` share, on float32 [n, 256].

    Fits each 32-value sub-block with ``make_qkx2_quants(32, nmax, ..., rmin, rdelta, nstep)``,
    stores the 8 scales and 8 mins as 6-bit multiples of the fp16 super-block ``d`` / ``dmin``
    and re-quantizes against them. Returns ``(head, L)``: the block header uint8 [n, 16]
    (d, dmin, 12 packed scale bytes) and the levels uint8 [n, 256] in [0, nmax].
    """
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    sub_t = np.ascontiguousarray(sub.T)  # element-major: reductions are cheap sequential row adds
    av_x = np.sqrt(_seqsum(sub_t * sub_t) / _F32(32))
    weights = av_x + np.abs(sub_t)
    scales, mins, L = _make_qkx2_quants(sub_t, weights, nmax, rmin, rdelta, nstep)
    L = L.T
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    max_scale = np.maximum(scales.max(axis=-1), _F32(0))
    max_min = np.maximum(mins.max(axis=-1), _F32(0))
    inv_scale = _inverse_or_zero(_F32(63), max_scale)
    inv_min = _inverse_or_zero(_F32(63), max_min)
    # ggml stores nearest_int into uint8 then clamps to 63; the fitted values are >= 0 in practice,
    # clipping at 0 only guards against a negative least-squares scale wrapping around.
    ls = np.clip(np.rint(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    d16, d = _to_fp16_and_back(max_scale / _F32(63), f"{what} super-block scale")
    dmin16, dmin = _to_fp16_and_back(max_min / _F32(63), f"{what} super-block min")

    # Re-quantize against the 6-bit scales actually stored; keep the search result where d == 0.
    d_sub = (d[:, None] * ls.astype(_F32)).reshape(nb * 8, 1)
    dm_sub = (dmin[:, None] * lm.astype(_F32)).reshape(nb * 8, 1)
    nz = d_sub != 0
    requant = np.clip(np.rint((sub + dm_sub) / np.where(nz, d_sub, _F32(1))), 0, nmax)
    L = np.where(nz, requant, L).astype(np.uint8).reshape(nb, QK_K)

    head = np.concatenate(
        [d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), _pack_scale_min_k4(ls, lm)],
        axis=-1,
    )
    return head, L


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """Levels uint8 [n, 256] (< 16) to ggml's K-quant nibbles [n, 128].

    Byte ``32 * j + l`` holds value ``64 * j + l`` in its low nibble and ``64 * j + 32 + l``
    in its high nibble.
    """
    L = L.reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """Quantize float32 [n, 256] to Q4_K bytes [n, 144] (``quantize_row_q4_K_ref``)."""
    head, L = _qkx2_superblocks(x, 15, -1.0, 0.1, 20, "Q4_K")
    return np.concatenate([head, _pack_nibbles(L)], axis=-1)


# Bit of qh[l] that holds the fifth bit of value 64 * j + 32 * h + l: 2 * j + h.
_Q5_K_QH_SHIFTS = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    """Quantize float32 [n, 256] to Q5_K bytes [n, 176] (``quantize_row_q5_K_ref``).

    Layout: d, dmin, scales[12] as in Q4_K, then qh[32] (fifth bits: value ``64 * j + l``
    at bit ``2 * j`` of ``qh[l]``, value ``64 * j + 32 + l`` at bit ``2 * j + 1``), then the
    low four bits as Q4_K's nibbles qs[128].
    """
    head, L = _qkx2_superblocks(x, 31, -0.5, 0.1, 15, "Q5_K")
    hi = (L >> 4).reshape(-1, 8, 32)
    qh = np.bitwise_or.reduce(hi << _Q5_K_QH_SHIFTS, axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _pack_nibbles(L & 0x0F)], axis=-1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Quantize float [..., K] (K % 256 == 0) to Q4_K bytes uint8 [..., K // 256 * 144]."""
    return _quantize_k(x, GGMLQuantizationType.Q4_K, _q4_k_blocks)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """Quantize float [..., K] (K % 256 == 0) to Q5_K bytes uint8 [..., K // 256 * 176]."""
    return _quantize_k(x, GGMLQuantizationType.Q5_K, _q5_k_blocks)


# --------------------------------------------------------------------------------------------- Q6_K


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` over the columns of ``x``.

    Fits each column of ``x`` [m, n] as ``x ~ scale * (L - nmax)`` with x^2 weights; returns
    ``(scale [n], L [m, n] float32 in [0, 2 * nmax - 1])``. All-zero columns give scale 0, L 0.
    """
    idx = np.abs(x).argmax(axis=0)
    mx = np.take_along_axis(x, idx[None, :], axis=0)[0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, _F32(1), mx)
    w = x * x
    wx = w * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return l, _seqsum(wx * l), _seqsum(w * l * l)

    L, sumlx, suml2 = fit(-_F32(nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(-(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(better, suml2, _F32(1))
        L = np.where(better, l, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)

    scale = np.where(zero, _F32(0), scale)
    L = np.where(zero, _F32(0), L + _F32(nmax))
    return scale, L


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """Quantize float32 [n, 256] to Q6_K bytes [n, 210] (``quantize_row_q6_K_ref``)."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_quants_rmse1(np.ascontiguousarray(sub.T), 32)
    L = L.T
    scales = scales.reshape(nb, 16)

    idx = np.abs(scales).argmax(axis=-1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=-1)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = _F32(-128) / np.where(zero, _F32(1), max_scale)
    d16, d = _to_fp16_and_back(np.where(zero, _F32(0), _F32(1) / iscale), "Q6_K super-block scale")
    sc = np.clip(np.rint(iscale[:, None] * scales), -128, 127).astype(np.int8)
    sc[zero] = 0

    # Re-quantize against the stored int8 scales; keep the search result where d == 0.
    d_sub = (d[:, None] * sc.astype(_F32)).reshape(nb * 16, 1)
    nz = d_sub != 0
    requant = np.clip(np.rint(sub / np.where(nz, d_sub, _F32(1))), -32, 31) + _F32(32)
    L = np.where(nz, requant, L).astype(np.uint8).reshape(nb, 2, 4, 32)
    L[zero] = 0

    lo = L & 0x0F
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(nb, 128)
    hi = L >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)

    return np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=-1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Quantize float [..., K] (K % 256 == 0) to Q6_K bytes uint8 [..., K // 256 * 210]."""
    return _quantize_k(x, GGMLQuantizationType.Q6_K, _q6_k_blocks)


# ------------------------------------------------------------------------------------------ dispatch

_K_QUANT_ENCODERS = {
    GGMLQuantizationType.Q4_K: _q4_k_blocks,
    GGMLQuantizationType.Q5_K: _q5_k_blocks,
    GGMLQuantizationType.Q6_K: _q6_k_blocks,
}


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize ``x`` (float, shape [..., K]) to ``qtype``; input is cast to float32 first.

    Returns what ``gguf.quants.quantize`` returns for that type: a float32 array for F32, a
    float16 array for F16, and uint8 bytes of shape [..., K // block_size * type_size] for
    BF16, Q8_0, Q4_K, Q5_K and Q6_K. In every case write it with
    ``GGUFWriter.add_tensor(name, out, raw_dtype=qtype)``; the writer recovers the logical
    shape from uint8 byte rows. For F32 input that is already float32 the input itself is
    returned (no copy), as gguf does.

    Raises ValueError for unsupported types and when K is not a multiple of the block size.
    """
    qtype = _check_supported(qtype)
    x = np.asarray(x)
    _check_shape(x, qtype)
    if qtype in _K_QUANT_ENCODERS:
        return _quantize_k(x, qtype, _K_QUANT_ENCODERS[qtype])
    return gguf_quants.quantize(x.astype(_F32, copy=False), qtype)


def row_size_ok(n_cols: int, qtype: GGMLQuantizationType) -> bool:
    """True when a row of ``n_cols`` values is a whole number of ``qtype`` blocks."""
    return n_cols > 0 and n_cols % GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0] == 0


def fallback_qtype(n_cols: int, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """``qtype`` if rows of ``n_cols`` fit its blocks, else Q8_0 if 32 divides them, else F16."""
    qtype = _check_supported(qtype)
    if row_size_ok(n_cols, qtype):
        return qtype
    if row_size_ok(n_cols, GGMLQuantizationType.Q8_0):
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16
