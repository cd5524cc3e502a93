"""Python face of the CPU kernels in ``cpp/`` (built as :mod:`ktlab._kernels`).

ISA paths, best first: ``amx > avx512 > avx2 > scalar``. The best one available on this CPU
runs unless ``KTLAB_ISA=scalar|avx2|avx512|amx`` forces one (read once, at first use);
forcing a path this CPU lacks raises ``ValueError`` naming the path and the CPU's features.
``KTLAB_ISA_DISABLE=amx,avx512`` (read once) makes ktlab treat those paths as absent.

Q8_0 GEMV: ``y = W @ x`` with ``W`` as raw Q8_0 rows exactly as a GGUF file stores them
(``[N, K/32*34]`` uint8) and ``x`` fp32, quantized on the fly to int8 blocks of 32 with an
fp32 scale; block dot products are exact int32, scaled and summed in fp32.

MoE layer: :class:`CpuExperts` holds one layer's expert weights (Q8_0, Q4_K, Q5_K, Q6_K or BF16,
read in place from the GGUF bytes; F16/F32 are converted to BF16 at load) and runs the fused
forward ``out = sum_slots w * down(silu(gate x) * up x)`` over the experts it owns, either
blocking (:meth:`CpuExperts.forward`) or on a background thread (:meth:`CpuExperts.submit`
then :meth:`CpuExperts.sync`, the GIL released meanwhile). Activations are quantized on the
fly: int8 blocks of 32 with an fp32 scale for Q8_0, int8 blocks of 256 with an fp32 scale and
16-value sums for the K-quants, bf16 for BF16. Results do not depend on the thread count.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ktlab import _kernels

__all__ = [
    "CpuExperts",
    "DecodeLayerWeights",
    "DecodeModel",
    "QMatrix",
    "ISA_NAMES",
    "Q8_0_BLOCK_BYTES",
    "Q8_0_BLOCK_VALUES",
    "available_isas",
    "best_isa",
    "cpu_features",
    "decode_attention_block",
    "default_threads",
    "f32_matmul",
    "paged_decode_attention",
    "q8_0_gemv",
    "q8_0_matmul",
    "quant_matmul",
    "qk_norm_rope",
    "quantize_q8_0",
    "read_regions",
    "resolve_isa",
    "rms_norm_rows",
    "route_topk",
    "selected_isa",
]

#: Every ISA path ktlab knows, worst to best.
ISA_NAMES: tuple[str, ...] = tuple(_kernels.ISA_NAMES)
#: Bytes in one Q8_0 block (fp16 scale + 32 int8 quants), as in ggml.
Q8_0_BLOCK_BYTES: int = _kernels.Q8_0_BLOCK_BYTES
#: Values in one Q8_0 block.
Q8_0_BLOCK_VALUES: int = _kernels.Q8_0_BLOCK_VALUES


def cpu_features() -> dict[str, bool]:
    """The CPU features the dispatcher looks at (``avx2``, ``avx512vnni``, ``amx_int8``, ...)."""
    return _kernels.cpu_features()


def available_isas() -> list[str]:
    """ISA paths usable on this CPU, worst to best (always starts with ``"scalar"``)."""
    return _kernels.available_isas()


def best_isa() -> str:
    """The best ISA path this CPU can run, ignoring ``KTLAB_ISA``."""
    return _kernels.best_isa()


def resolve_isa(name: str | None = None) -> str:
    """The path a kernel call with ``isa=name`` runs on.

    ``None`` means ``KTLAB_ISA`` when set, else :func:`best_isa`. Raises ``ValueError`` for
    an unknown name or a path this CPU lacks (the message names both and the CPU features).
    """
    return _kernels.resolve_isa(name)


def selected_isa() -> str:
    """The path kernels use by default: ``KTLAB_ISA`` when set, else the best available.

    Warns (``RuntimeWarning``) when the CPU lacks AVX2 and the slow scalar path is all there is.
    """
    isa = _kernels.resolve_isa(None)
    if isa == "scalar" and _kernels.forced_isa() is None:
        warnings.warn(
            "this CPU has no AVX2 (or the OS does not enable it): ktlab's CPU kernels run on the slow scalar path",
            RuntimeWarning,
            stacklevel=2,
        )
    return isa


def default_threads() -> int:
    """Default kernel thread count: the physical cores this process may run on."""
    return _kernels.default_num_threads()


def quant_matmul(
    w: np.ndarray,
    x: np.ndarray,
    fmt: str = "q8_0",
    isa: str | None = None,
    threads: int | None = None,
    out: np.ndarray | None = None,
    packed: bool = False,
) -> np.ndarray:
    """``y = x @ W^T`` with ``W`` in a block format: ``x`` [K] -> [N] (a GEMV) or [M, K] -> [M, N].

    Row j of a 2-D result is bit-identical to the GEMV of ``x[j]`` alone, whatever M and the
    thread count: a token's output never depends on the tokens batched with it.

    Args:
        w: uint8 ``[N, row bytes]``: raw rows of ``fmt`` as a GGUF file stores them (a read-only
            memmap is fine; it is not copied when C-contiguous), or their repacked layout when
            ``packed`` (:class:`QMatrix` makes it).
        x: ``[K]`` or ``[M, K]`` activations (cast to float32), ``K`` whole blocks of ``fmt``.
        fmt: ``"q8_0"``, ``"q4_k"``, ``"q5_k"`` or ``"q6_k"``.
        isa: path to run (``"scalar"``, ``"avx2"``, ``"avx512"``, ``"amx"``); ``None`` uses
            :func:`selected_isa`.
        threads: kernel threads; ``None`` uses :func:`default_threads`.
        out: optional float32 C-contiguous output buffer of the result's shape.
        packed: ``w`` holds the repacked layout for the path's packed kernel; rows are still
            independent of M (Q8_0: not bit-equal to the raw GEMV; K-quants: the same bits).

    Returns:
        float32 ``[N]`` or ``[M, N]`` (``out`` when given).

    Raises:
        ValueError: wrong dtype, rank or byte count, an unknown format, or an unknown/unavailable ``isa``.
    """
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2:
        raise ValueError(f"w must be a 2-D uint8 array of {fmt} rows [N, row bytes], got {_describe(w)}")
    x = np.asarray(x)
    if x.ndim not in (1, 2) or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a 1-D [K] or 2-D [M, K] float array, got {_describe(x)}")
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    w = np.ascontiguousarray(w)
    shape = (*x.shape[:-1], w.shape[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif (out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}, got {_describe(out)}")
    if isa is None:
        isa = selected_isa()
    if threads is None:
        threads = 0
    elif threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for the default), got {threads}")
    _kernels.dense_gemm(fmt, w, bool(packed), x2, out.reshape(x2.shape[0], w.shape[0]), isa, int(threads))
    return out


def q8_0_matmul(
    w_raw: np.ndarray,
    x: np.ndarray,
    isa: str | None = None,
    threads: int | None = None,
    out: np.ndarray | None = None,
    packed: bool = False,
) -> np.ndarray:
    """:func:`quant_matmul` of Q8_0 rows (``[N, K/32*34]`` uint8)."""
    return quant_matmul(w_raw, x, "q8_0", isa, threads, out, packed)


class QMatrix:
    """A dense matrix ``W`` [N, K] in a block format (raw GGUF rows of Q8_0, Q4_K, Q5_K or Q6_K)
    bound to one ISA path and thread count.

    Calling it computes ``x @ W^T`` for ``x`` [K] or [M, K]. Where the path has a packed kernel
    for the format and N is a multiple of 16, the rows are repacked once, at the first call
    (Q8_0x16, Q4_Kx16, ...: 16 rows' 4-byte chunks side by side, so one weight load feeds several
    tokens and no row needs a horizontal sum); else the raw rows go through the row kernels.
    Either way a token's output row never depends on how many tokens come with it.
    """

    def __init__(self, raw: np.ndarray, fmt: str = "q8_0", isa: str | None = None,
                 threads: int | None = None) -> None:
        if fmt not in _kernels.DENSE_FORMATS:
            raise ValueError(f"QMatrix format must be one of {', '.join(_kernels.DENSE_FORMATS)}, got {fmt!r}")
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
            raise ValueError(f"QMatrix needs raw {fmt} rows as a 2-D uint8 array, got {_describe(raw)}")
        values, block_bytes = _kernels.MOE_BLOCKS[fmt]
        if raw.shape[1] % block_bytes or raw.shape[1] == 0:
            raise ValueError(f"QMatrix rows of {raw.shape[1]} bytes are not whole {fmt} blocks of {block_bytes}")
        self.raw, self.fmt = raw, fmt
        self.cols = raw.shape[1] // block_bytes * values
        self.isa = isa or selected_isa()
        self.threads = threads
        self.packed = bool(_kernels.has_packed_dense(fmt, self.isa)) and raw.shape[0] % 16 == 0
        self._data: np.ndarray | None = None

    @property
    def rows(self) -> int:
        """N, the output features."""
        return int(self.raw.shape[0])

    @property
    def data(self) -> np.ndarray:
        """The bytes the kernel reads: the repacked layout when ``packed`` (made on first use), else raw."""
        if self._data is None:
            raw = np.ascontiguousarray(self.raw)
            self._data = _kernels.repack_dense(self.fmt, raw) if self.packed else raw
        return self._data

    @property
    def spec(self) -> tuple[str, np.ndarray, bool]:
        """(format, bytes the kernel reads, packed): how the C++ decode step takes a matrix."""
        return self.fmt, self.data, self.packed

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` [K] -> [N] or [M, K] -> [M, N] (float32)."""
        return quant_matmul(self.data, x, self.fmt, self.isa, self.threads, out, packed=self.packed)


def quant_matmul_t(w: np.ndarray, dy: np.ndarray, fmt: str, isa: str | None = None,
                   threads: int | None = None) -> np.ndarray:
    """``dx = dy @ W`` for W ``[N, K]`` given as raw rows of ``fmt`` (uint8 ``[N, row bytes]``): the input
    gradient of ``y = x @ W^T`` through a frozen quantized matrix (fine-tuning). ``dy`` ``[M, N]``
    -> float32 ``[M, K]``; every row of W dequantized once a call, never the whole matrix at once;
    the same bits on every path and thread count. Formats: those of the MoE kernels."""
    return _matmul_t_sum([(w, dy)], fmt, isa, threads)


def quant_matmul_t2(w1: np.ndarray, dy1: np.ndarray, w2: np.ndarray, dy2: np.ndarray, fmt: str,
                    isa: str | None = None, threads: int | None = None) -> np.ndarray:
    """``dy1 @ W1 + dy2 @ W2`` for two stored matrices of one shape and format, in one pass (an
    expert's gate and up in backward); see :func:`quant_matmul_t`."""
    return _matmul_t_sum([(w1, dy1), (w2, dy2)], fmt, isa, threads)


def _matmul_t_sum(pairs: list[tuple[np.ndarray, np.ndarray]], fmt: str, isa: str | None,
                  threads: int | None) -> np.ndarray:
    ws, dys = [], []
    for w, dy in pairs:
        if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2:
            raise ValueError(f"w must be a 2-D uint8 array of {fmt} rows [N, row bytes], got {_describe(w)}")
        dy = np.ascontiguousarray(dy, dtype=np.float32)
        if dy.ndim != 2:
            raise ValueError(f"dy must be [M, N], got {_describe(dy)}")
        ws.append(np.ascontiguousarray(w))
        dys.append(dy)
    out = np.empty((dys[0].shape[0], _row_values(ws[0], fmt)), dtype=np.float32)
    _kernels.matmul_t(fmt, ws, dys, out, resolve_isa(isa), threads or 0)
    return out


def dequantize_rows(w: np.ndarray, fmt: str) -> np.ndarray:
    """float32 ``[N, K]`` of N raw rows of ``fmt`` (ggml's dequantizers, in C++)."""
    w = np.ascontiguousarray(w)
    out = np.empty((w.shape[0], _row_values(w, fmt)), dtype=np.float32)
    _kernels.dequantize_rows(fmt, w, out)
    return out


def _row_values(w: np.ndarray, fmt: str) -> int:
    """Values in each raw row of ``w`` (uint8 [N, row bytes]) of MoE format ``fmt`` (an unknown
    format: the kernels name it)."""
    values, nbytes = _kernels.MOE_BLOCKS.get(fmt, (1, 1))
    return w.shape[1] // nbytes * values


def f32_matmul(w: np.ndarray, x: np.ndarray, isa: str | None = None, threads: int | None = None) -> np.ndarray:
    """``x`` [M, K] @ ``w`` [N, K]^T in float32 with each row of the result computed the same way
    whatever M (a token's router logits never depend on its batch)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, w.shape[1])
    out = np.empty((x2.shape[0], w.shape[0]), dtype=np.float32)
    _kernels.f32_matmul(w, x2, out, isa or selected_isa(), 0 if threads is None else int(threads))
    return out.reshape(*np.shape(x)[:-1], w.shape[0])


def decode_attention_block(
    x: np.ndarray, attn_norm: np.ndarray, qkv: Sequence[QMatrix], q_norm: np.ndarray, k_norm: np.ndarray,
    wo: QMatrix, ffn_norm: np.ndarray, router: np.ndarray, nh: int, nkv: int, eps: float, cos: np.ndarray,
    sin: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, slots: np.ndarray, tables: np.ndarray,
    lens: np.ndarray, page: int, top_k: int, norm_topk: bool, isa: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The attention half of a decoder layer for a decode step (one new token per sequence) in
    one call: the kernels :mod:`ktlab.model.layers` calls one by one (RMSNorm, the q/k/v
    matmul, q/k norms + RoPE, the pool write, paged attention, the output projection, the
    residual add, the FFN norm, the router's top-k), in the same order, so the same bits.

    Args:
        x: float32 [B, H], the layer's input. qkv: 1 to 3 matrices whose rows stack to q, k and
            v (one fused matrix, or q, k, v apiece where their formats differ); wo: the output
            projection.
        k_pool, v_pool: one layer of the page pool [nkv, P * page, hd], written at ``slots`` [B].
        tables, lens: as for :func:`paged_decode_attention` (the new token included).
        isa: attention and router (the matmuls use their matrices' path; every kernel their thread
            count, which changes no result).

    Returns:
        h [B, H] (x + attention), hn [B, H] (RMSNorm of h, the experts' input), ids int64 and
        weights float32 [B, top_k].
    """
    B, H = x.shape
    h = np.empty((B, H), dtype=np.float32)
    hn = np.empty((B, H), dtype=np.float32)
    ids = np.empty((B, top_k), dtype=np.int64)
    weights = np.empty((B, top_k), dtype=np.float32)
    mats = [*qkv, wo]
    if len({(m.isa, m.threads) for m in mats}) > 1:
        raise ValueError("qkv and wo must share one ISA path and thread count")
    _kernels.decode_attention_block(
        np.ascontiguousarray(x, dtype=np.float32), attn_norm, [m.spec for m in qkv], q_norm, k_norm, wo.spec,
        ffn_norm, router, int(nh), int(nkv), float(eps), cos, sin, k_pool, v_pool,
        np.ascontiguousarray(slots, dtype=np.int64), np.ascontiguousarray(tables, dtype=np.int32),
        np.ascontiguousarray(lens, dtype=np.int32), int(page), float(q_norm.shape[0]) ** -0.5, int(top_k),
        bool(norm_topk), h, hn, ids, weights, wo.isa, isa or selected_isa(), int(wo.threads or 0))
    return h, hn, ids, weights


def read_regions(regions: Sequence[np.ndarray], threads: int | None = None) -> float:
    """Seconds to read every byte of ``regions`` (1-D uint8 C-contiguous arrays: views of weights
    where they live) once on the kernel pool, in 1 MiB tasks as the kernels stream."""
    _, seconds = _kernels.read_regions(list(regions), 0 if threads is None else int(threads))
    return float(seconds)


def rms_norm_rows(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None,
                  threads: int | None = None) -> np.ndarray:
    """RMSNorm over the last axis of float32 ``x`` (any leading shape) with weight ``w``, each
    row computed on its own (batch-independent). ``out`` may be ``x`` (in place)."""
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
    o2 = np.empty_like(x2) if out is None else out.reshape(x2.shape)
    _kernels.rms_norm_rows(x2, np.ascontiguousarray(w, dtype=np.float32), float(eps), o2,
                           0 if threads is None else int(threads))
    return o2.reshape(np.shape(x))


def qk_norm_rope(qkv: np.ndarray, nh: int, nkv: int, q_norm: np.ndarray, k_norm: np.ndarray, cos: np.ndarray,
                 sin: np.ndarray, eps: float, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3 attention inputs from the fused projection ``qkv`` [T, (nh + 2 nkv) * hd] (q heads,
    then k heads, then v): q [T, nh, hd] and k [T, nkv, hd] after each head's RMSNorm
    (``q_norm``/``k_norm`` [hd]) and NeoX rotary embedding at the tokens' ``cos``/``sin`` [T, hd]."""
    hd = int(np.shape(q_norm)[0])
    T = qkv.shape[0]
    q = np.empty((T, nh, hd), dtype=np.float32)
    k = np.empty((T, nkv, hd), dtype=np.float32)
    f32 = [np.ascontiguousarray(a, dtype=np.float32) for a in (qkv, q_norm, k_norm, cos, sin)]
    _kernels.qk_norm_rope(f32[0], int(nh), int(nkv), *f32[1:], float(eps), q, k, 0 if threads is None else int(threads))
    return q, k


def route_topk(logits: np.ndarray, top_k: int, norm_topk: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router selection per row of ``logits`` [T, E]: softmax, the ``top_k`` best experts in
    descending order (ties: lower id first), weights renormalized to sum 1 when ``norm_topk``.
    Returns ids int64 [T, top_k] and weights float32 [T, top_k]."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    ids = np.empty((logits.shape[0], top_k), dtype=np.int64)
    weights = np.empty((logits.shape[0], top_k), dtype=np.float32)
    _kernels.route_topk(logits, int(top_k), bool(norm_topk), ids, weights)
    return ids, weights


def paged_decode_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    tables: np.ndarray,
    lens: np.ndarray,
    page: int,
    scale: float,
    isa: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """One query per sequence over its own KV pages, read in place (no gathering copy).

    Args:
        q: float32 ``[B, nh, hd]``, one query position per sequence.
        k, v: float32 ``[nkv, P * page, hd]``: one layer of the page pool (row = page * page + offset).
        tables: ``[B, max_pages]`` page ids of each sequence, in position order.
        lens: ``[B]`` positions each sequence attends to (its length, new token included).
        page: positions per page. scale: the score scale (1 / sqrt(hd)).
        isa, threads: as for :func:`q8_0_matmul`.

    Returns:
        float32 ``[B, nh, hd]``: softmax(scale * q k^T) v per sequence and head (GQA: query head
        h reads KV head h // (nh / nkv)).
    """
    out = np.empty_like(q)
    _kernels.paged_decode_attention(q, k, v, np.ascontiguousarray(tables, dtype=np.int32),
                                    np.ascontiguousarray(lens, dtype=np.int32), int(page), float(scale), out,
                                    isa or selected_isa(), 0 if threads is None else int(threads))
    return out


def q8_0_gemv(
    w_raw: np.ndarray,
    x: np.ndarray,
    isa: str | None = None,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y[N] = W[N, K] @ x[K]`` with ``W`` in Q8_0 (:func:`q8_0_matmul` of a 1-D ``x``)."""
    if np.ndim(x) != 1:
        raise ValueError(f"x must be a 1-D float array [K], got {_describe(np.asarray(x))}")
    return q8_0_matmul(w_raw, x, isa, threads, out)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Quantize fp32 values ``[..., K]`` (``K`` a multiple of 32) to raw Q8_0 bytes.

    Returns uint8 ``[..., K/32*34]``, byte-identical to ggml's ``quantize_row_q8_0`` and to
    ``gguf.quants.quantize(x, GGMLQuantizationType.Q8_0)``.
    """
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float array [..., K], got {_describe(x)}")
    k = x.shape[-1]
    if k == 0 or k % Q8_0_BLOCK_VALUES:
        raise ValueError(f"the last axis has {k} values; Q8_0 needs a positive multiple of 32")
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return np.empty((*x.shape[:-1], k // Q8_0_BLOCK_VALUES * Q8_0_BLOCK_BYTES), dtype=np.uint8)
    raw = _kernels.quantize_q8_0(flat)  # blocks never straddle rows, so one flat pass is per-row
    return raw.reshape(*x.shape[:-1], k // Q8_0_BLOCK_VALUES * Q8_0_BLOCK_BYTES)


# ---- MoE layer ---------------------------------------------------------------------------------

# GGML type ids (gguf.GGMLQuantizationType values) -> the kernel's weight format.
_QTYPE_F32, _QTYPE_F16, _QTYPE_Q8_0, _QTYPE_Q4_K, _QTYPE_Q5_K, _QTYPE_Q6_K, _QTYPE_BF16 = 0, 1, 8, 12, 13, 14, 30
_QTYPE_MXFP4 = 39
_FORMAT_OF_QTYPE = {_QTYPE_Q8_0: "q8_0", _QTYPE_Q4_K: "q4_k", _QTYPE_Q5_K: "q5_k", _QTYPE_Q6_K: "q6_k",
                    _QTYPE_BF16: "bf16", _QTYPE_MXFP4: "mxfp4"}
_CONVERTED_TO_BF16 = {_QTYPE_F32: np.float32, _QTYPE_F16: np.float16}


class RawTensorLike(Protocol):
    """What :class:`CpuExperts` needs of a weight tensor (``ktlab.model.gguf.RawTensor`` fits)."""

    qtype: Any  # gguf.GGMLQuantizationType or its int value
    shape: tuple[int, ...]  # logical shape, [E, rows, cols]
    data: np.ndarray  # the stored bytes (or F16/F32 values)


def _fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN (as ggml)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded


def _weight_bytes(t: RawTensorLike, what: str) -> tuple[str, int, tuple[int, int, int], np.ndarray]:
    """(format, qtype, [E, rows, cols], flat uint8 bytes) of one expert tensor."""
    try:
        qtype = int(t.qtype)
        shape = tuple(int(d) for d in t.shape)
        data = t.data
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{what} must have .qtype, .shape and .data (like ktlab.model.gguf.RawTensor)") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{what} must have a logical shape [E, rows, cols], got {shape}")
    data = _as_numpy(data, what)
    if qtype in _CONVERTED_TO_BF16:  # F16/F32: converted to BF16 once, here (documented loss)
        dtype = _CONVERTED_TO_BF16[qtype]
        values = data.view(dtype) if data.dtype == np.uint8 else data.astype(dtype, copy=False)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"{what}: {values.size} values stored, shape {shape} needs {int(np.prod(shape))}")
        return "bf16", qtype, shape, _fp32_to_bf16_bits(values.astype(np.float32)).view(np.uint8).reshape(-1)
    if qtype not in _FORMAT_OF_QTYPE:
        raise ValueError(f"{what}: weight type {qtype} is not supported "
                         "(Q8_0, Q4_K, Q5_K, Q6_K, MXFP4, BF16, F16, F32)")
    fmt = _FORMAT_OF_QTYPE[qtype]
    values, block_bytes = _kernels.MOE_BLOCKS[fmt]
    if shape[2] % values:
        raise ValueError(f"{what}: rows of {shape[2]} values are not whole {fmt} blocks of {values}")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    expected = shape[0] * shape[1] * (shape[2] // values) * block_bytes
    if raw.size != expected:
        raise ValueError(f"{what}: {raw.size} bytes stored, {fmt} {shape} needs {expected}")
    return fmt, qtype, shape, raw


def _as_numpy(a: Any, what: str) -> np.ndarray:
    """A numpy view of an ndarray or a CPU torch tensor (bf16 tensors are widened to float32)."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        if a.device.type != "cpu":
            raise ValueError(f"{what} must be on the CPU, got a tensor on {a.device}")
        a = a.detach()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    try:
        return np.asarray(a)
    except Exception:
        raise ValueError(f"{what} must be a numpy array or a CPU torch tensor, got {type(a).__name__}") from None


class CpuExperts:
    """One MoE layer's experts on the CPU: the fused forward in ``cpp/moe_layer.cpp``.

    ``out[t] = sum over slots s with ids[t, s] owned of weights[t, s] * down_e(silu(gate_e x_t)
    * up_e x_t)``, ``e = ids[t, s]``. Tokens are grouped by expert so each expert's weights
    are read once per call; any T works (1 for decode, thousands for prefill). One call at a
    time per instance: :meth:`forward`, or :meth:`submit` then :meth:`sync`.

    Weights are read in place (a GGUF memmap is fine; no copy unless F16/F32, which are
    converted to BF16 here, losing F16's 3 extra mantissa bits / F32's 16).
    """

    def __init__(
        self,
        gate: RawTensorLike,
        up: RawTensorLike,
        down: RawTensorLike,
        *,
        isa: str | None = None,
        threads: int | None = None,
    ) -> None:
        """Build from three raw tensors: gate and up ``[E, I, H]``, down ``[E, H, I]``.

        Args:
            gate, up, down: objects with ``qtype``, logical ``shape`` and stored ``data``
                (``ktlab.model.gguf.GGUFFile.raw(name)``). gate and up share a type.
            isa: ISA path; ``None``: :func:`selected_isa` (``KTLAB_ISA`` or the best).
            threads: worker threads (the caller of :meth:`forward` counts as one); ``None``:
                :func:`default_threads`.

        Raises:
            ValueError: unsupported types, inconsistent shapes or byte counts, bad ``isa``.
        """
        fmt_g, qt_g, shape_g, raw_g = _weight_bytes(gate, "gate")
        fmt_u, qt_u, shape_u, raw_u = _weight_bytes(up, "up")
        fmt_d, qt_d, shape_d, raw_d = _weight_bytes(down, "down")
        if fmt_g != fmt_u:
            raise ValueError(f"gate and up must have the same weight type, got {fmt_g} and {fmt_u}")
        n_experts, inter, hidden = shape_g
        if shape_u != shape_g or shape_d != (n_experts, hidden, inter):
            raise ValueError(
                f"expected gate and up [E, I, H] and down [E, H, I], got {shape_g}, {shape_u}, {shape_d}"
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        isa = selected_isa() if isa is None else resolve_isa(isa)
        self._handle = _kernels.MoeLayerHandle(
            n_experts, hidden, inter, fmt_g, raw_g, raw_u, fmt_d, raw_d, isa, threads or 0
        )
        self._isa = isa
        self._qtypes = (qt_g, qt_u, qt_d)
        self._formats = (fmt_g, fmt_d)
        self._bytes = int(raw_g.nbytes + raw_u.nbytes + raw_d.nbytes)
        self._pending: tuple[np.ndarray, bool] | None = None

    @classmethod
    def from_float(
        cls,
        gate: np.ndarray,
        up: np.ndarray,
        down: np.ndarray,
        qtype: Any,
        *,
        down_qtype: Any = None,
        isa: str | None = None,
        threads: int | None = None,
    ) -> CpuExperts:
        """Quantize float weights (gate, up ``[E, I, H]``, down ``[E, H, I]``) with
        ``ktlab.model.quantize`` (``down_qtype`` defaults to ``qtype``) and build from them."""
        from ktlab.model.quantize import quantize  # heavy-ish import, only needed here

        class _Raw:
            def __init__(self, w: np.ndarray, qt: Any) -> None:
                w = np.asarray(w, dtype=np.float32)
                self.qtype, self.shape, self.data = qt, w.shape, quantize(w, qt)

        down_qtype = qtype if down_qtype is None else down_qtype
        return cls(_Raw(gate, qtype), _Raw(up, qtype), _Raw(down, down_qtype), isa=isa, threads=threads)

    def set_mlp(self, *, clamped: bool = False, alpha: float = 1.702, limit: float = 7.0,
                gate_bias: np.ndarray | None = None, up_bias: np.ndarray | None = None,
                down_bias: np.ndarray | None = None) -> None:
        """The expert MLP around the products where it is not plain SwiGLU (gpt-oss): per-expert
        biases (gate and up ``[E, I]`` added before the activation, down ``[E, H]`` to its output)
        and, when ``clamped``, ``(clip(u, -limit, limit) + 1) * g' * sigmoid(alpha g')`` with
        ``g' = min(g, limit)`` instead of ``silu(g) * u``."""
        def rows(b: np.ndarray | None) -> np.ndarray | None:
            return None if b is None else np.ascontiguousarray(_as_numpy(b, "bias"), dtype=np.float32)

        self._handle.set_mlp(bool(clamped), float(alpha), float(limit), rows(gate_bias), rows(up_bias),
                             rows(down_bias))

    def expert_gate_up(self, expert: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expert ``expert``'s gate and up products [m, I] of rows ``x`` [m, H], as :meth:`forward`
        computes them (the layer's own kernels and activation rounding; no biases)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        g = np.empty((x.shape[0], self.inter), dtype=np.float32)
        u = np.empty_like(g)
        self._handle.expert_gate_up(int(expert), x, g, u)
        return g, u

    # -- properties -------------------------------------------------------------------------
    @property
    def qtype(self) -> int:
        """GGML type id of gate/up as given (F16/F32 included, though they run as BF16)."""
        return self._qtypes[0]

    @property
    def down_qtype(self) -> int:
        """GGML type id of the down projection."""
        return self._qtypes[2]

    @property
    def isa(self) -> str:
        """The ISA path this layer runs on."""
        return self._isa

    @property
    def threads(self) -> int:
        """Threads a call uses (the calling or background thread included)."""
        return int(self._handle.threads)

    @property
    def n_experts(self) -> int:
        return int(self._handle.n_experts)

    @property
    def hidden(self) -> int:
        return int(self._handle.hidden)

    @property
    def inter(self) -> int:
        return int(self._handle.inter)

    @property
    def bytes(self) -> int:
        """Weight bytes held (all experts, gate + up + down, as the kernels read them)."""
        return self._bytes

    @property
    def expert_bytes(self) -> int:
        """Weight bytes of one expert (gate + up + down)."""
        return self._bytes // self.n_experts

    # -- calls ------------------------------------------------------------------------------
    def forward(self, x: Any, ids: Any, weights: Any, owned: Any = None) -> np.ndarray:
        """The layer's output ``[T, H]`` float32 for hidden ``x [T, H]``.

        Args:
            x: ``[T, H]`` float (numpy or CPU torch; cast to float32, copied if not contiguous).
            ids: ``[T, k]`` integer expert ids in ``[0, E)``.
            weights: ``[T, k]`` float routing weights.
            owned: ``[E]`` bool mask of the experts this call computes (``None``: all); slots
                of other experts contribute nothing (tokens with none owned get zeros).

        Raises:
            ValueError: wrong shapes or dtypes, ids out of range, ``owned`` of the wrong length.
            RuntimeError: a submitted call is still pending.
        """
        if self._pending is not None:
            raise RuntimeError("a submitted call is pending: sync() it first")
        args = self._prepare(x, ids, weights, owned, None)
        self._handle.forward(*args)
        return args[-1]

    def expert_regions(self, experts: Sequence[int]) -> list[np.ndarray]:
        """The stored bytes of ``experts`` (gate, up and down of each) as 1-D uint8 views, for
        :func:`read_regions`."""
        return [np.asarray(r) for r in self._handle.expert_regions([int(e) for e in experts])]

    def forward_add(self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, h: np.ndarray) -> None:
        """``h += forward(x, ids, weights)`` in one call: float32 C-contiguous ``x``, ``h`` [T, H],
        int64 ``ids`` and float32 ``weights`` [T, k] (what :func:`decode_attention_block`
        returns). The same bits as ``h + forward(...)``; for the decode hot path."""
        self._handle.forward_add(x, ids, weights, np.empty_like(h), h)

    def submit(self, x: Any, ids: Any, weights: Any, owned: Any = None, out: np.ndarray | None = None) -> None:
        """Start :meth:`forward` on the background thread and return at once.

        The work runs on the kernel pool (never on the calling thread), so Python and torch
        go on meanwhile; :meth:`sync` returns the result. ``out``: optional float32 ``[T, H]``
        C-contiguous buffer to write into. Validation errors raise here; errors inside the
        call raise from :meth:`sync`.
        """
        if self._pending is not None:
            raise RuntimeError("a submitted call is pending: sync() it before submitting another")
        args = self._prepare(x, ids, weights, owned, out)
        if args[0].shape[0] == 0:
            self._pending = (args[-1], False)
            return
        self._handle.submit(*args)
        self._pending = (args[-1], True)

    @property
    def pending(self) -> bool:
        """Whether a :meth:`submit` awaits its :meth:`sync`."""
        return self._pending is not None

    def sync(self) -> np.ndarray:
        """Wait for the submitted call and return its output ``[T, H]`` (re-raises its error).

        Raises:
            RuntimeError: nothing was submitted.
        """
        if self._pending is None:
            raise RuntimeError("sync() without a pending submit()")
        out, running = self._pending
        self._pending = None
        if running:
            self._handle.sync()
        return out

    def _prepare(
        self, x: Any, ids: Any, weights: Any, owned: Any, out: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        hidden, n_experts = self.hidden, self.n_experts
        x = _as_numpy(x, "x")
        ids = _as_numpy(ids, "ids")
        weights = _as_numpy(weights, "weights")
        if x.ndim != 2 or x.shape[1] != hidden or not (np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"x must be a float array [T, H={hidden}], got {_describe(x)}")
        n_tokens = x.shape[0]
        if ids.ndim != 2 or ids.shape[0] != n_tokens or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array [T={n_tokens}, k>=1], got {_describe(ids)}")
        if weights.shape != ids.shape or not np.issubdtype(weights.dtype, np.floating):
            raise ValueError(f"weights must be a float array of the shape of ids {ids.shape}, got {_describe(weights)}")
        if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
            bad = ids[(ids < 0) | (ids >= n_experts)].flat[0]
            raise ValueError(f"expert id {bad} out of range [0, {n_experts})")
        if owned is not None:
            owned = _as_numpy(owned, "owned")
            if owned.shape != (n_experts,) or not (owned.dtype == np.bool_ or np.issubdtype(owned.dtype, np.integer)):
                raise ValueError(f"owned must be a bool mask [E={n_experts}], got {_describe(owned)}")
            owned = np.ascontiguousarray(owned != 0, dtype=np.uint8)
        if out is None:
            out = np.empty((n_tokens, hidden), dtype=np.float32)
        elif (
            not isinstance(out, np.ndarray)
            or out.dtype != np.float32
            or out.shape != (n_tokens, hidden)
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise ValueError(
                f"out must be a writeable C-contiguous float32 array [{n_tokens}, {hidden}], got {_describe(out)}"
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        return x, ids, weights, owned, out


@dataclass(frozen=True)
class DecodeLayerWeights:
    """One decoder layer as :class:`DecodeModel` runs it: the attention half's weights (as for
    :func:`decode_attention_block`; float32 C-contiguous arrays) and the layer's experts."""

    attn_norm: np.ndarray
    qkv: Sequence[QMatrix]  # 1 to 3 matrices whose rows stack to q, k and v
    q_norm: np.ndarray
    k_norm: np.ndarray
    wo: QMatrix
    ffn_norm: np.ndarray
    router: np.ndarray
    experts: CpuExperts


class DecodeModel:
    """A whole decode step (one new token per sequence) of a model whose every layer runs on
    the CPU, in one call: each layer's :func:`decode_attention_block` and its experts' output
    added as :meth:`CpuExperts.forward_add` does, then the final RMSNorm and the LM head. The
    same kernels in the same order as calling them layer by layer, so the same bits, with the
    GIL released once per step (a server's event loop shares the GIL with the engine thread:
    each reacquisition can wait behind it).

    Every matrix must share one ISA path and thread count.
    """

    def __init__(self, layers: Sequence[DecodeLayerWeights], norm: np.ndarray, lm_head: QMatrix, nh: int, nkv: int,
                 eps: float, top_k: int, norm_topk: bool, isa: str | None = None) -> None:
        mats = [m for layer in layers for m in (*layer.qkv, layer.wo)] + [lm_head]
        if len({(m.isa, m.threads) for m in mats}) > 1 or any(layer.experts.isa != lm_head.isa for layer in layers):
            raise ValueError("every matrix and expert layer of a DecodeModel must share one ISA path and thread count")
        specs = [(layer.attn_norm, [m.spec for m in layer.qkv], layer.q_norm, layer.k_norm, layer.wo.spec,
                  layer.ffn_norm, layer.router, layer.experts._handle) for layer in layers]
        self.top_k, self.head_dim = int(top_k), int(layers[0].q_norm.shape[0]) if layers else 0
        self._handle = _kernels.DecodeModelHandle(specs, norm, lm_head.spec, int(nh), int(nkv), float(eps),
                                                  self.top_k, bool(norm_topk), lm_head.isa, isa or selected_isa(),
                                                  int(lm_head.threads or 0))

    def step(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_pools: np.ndarray, v_pools: np.ndarray,
             slots: np.ndarray, tables: np.ndarray, lens: np.ndarray,
             page: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits [B, vocab] of a decode step, and each layer's routing: ids int64 and weights
        float32 [L, B, top_k]. ``x`` [B, H]: the tokens' embeddings (left untouched); k_pools,
        v_pools: the whole page pool [L, nkv, rows, hd], written at ``slots`` [B]; tables,
        lens: as for :func:`paged_decode_attention` (the new token included)."""
        h = self._handle
        B = x.shape[0]
        ids = np.empty((h.n_layers, B, self.top_k), dtype=np.int64)
        weights = np.empty((h.n_layers, B, self.top_k), dtype=np.float32)
        logits = np.empty((B, h.vocab), dtype=np.float32)
        h.step(np.array(x, dtype=np.float32, order="C"), cos, sin, k_pools, v_pools,
               np.ascontiguousarray(slots, dtype=np.int64), np.ascontiguousarray(tables, dtype=np.int32),
               np.ascontiguousarray(lens, dtype=np.int32), int(page), float(self.head_dim) ** -0.5, ids, weights,
               logits)
        return logits, ids, weights


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
