# cython: language_level=3, boundscheck=False, wraparound=False
"""The only Python/C++ boundary of ktlab: thin wrappers over ``cpp/``.

Every argument is validated here (shapes, byte counts, ISA names) before any C++ runs, so bad
input is a ``ValueError``, never a crash. Compute runs with the GIL released. The friendly
Python API is :mod:`ktlab.kernels`; this module is its private engine room.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libcpp.vector cimport vector

import numpy as np


cdef extern from "quant.h" namespace "ktlab":
    cdef struct block_q8_0:
        pass
    cdef struct block_q8_act:
        pass
    cdef struct block_q8_K:
        pass
    void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k) nogil


cdef extern from "isa.h" namespace "ktlab":
    cdef enum class Isa(int):
        scalar
        avx2
        avx512
        amx
    cdef struct CpuFeatures:
        bint avx2, fma, f16c
        bint avx512f, avx512bw, avx512vl, avx512vnni, avx512bf16
        bint amx_tile, amx_int8, amx_bf16, amx_permitted
    const CpuFeatures& c_cpu_features "ktlab::cpu_features"()
    const char* c_isa_name "ktlab::isa_name"(Isa isa)
    bint c_isa_available "ktlab::isa_available"(Isa isa)
    bint c_isa_disabled "ktlab::isa_disabled"(Isa isa)
    Isa c_best_isa "ktlab::best_isa"()
    const char* c_forced_isa_env "ktlab::forced_isa_env"()
    int c_resolve_isa "ktlab::resolve_isa"(const char* name, Isa* out)
    int kResolveOk, kResolveUnknown, kResolveUnavailable
    void c_quantize_q8_act "ktlab::quantize_q8_act"(const float* x, block_q8_act* y, int64_t k, Isa isa) nogil
    void c_quantize_q8_K "ktlab::quantize_q8_K"(const float* x, block_q8_K* y, int64_t k, Isa isa) nogil


cdef extern from "attention.h" namespace "ktlab":
    void c_paged_decode_attention "ktlab::paged_decode_attention"(
        const float* q, const float* k, const float* v, int64_t head_rows, const int32_t* tables, int max_pages,
        const int32_t* lens, int n_seqs, int nh, int nkv, int hd, int page, float scale, float* out, Isa isa,
        int threads) except + nogil


cdef extern from "f32_matmul.h" namespace "ktlab":
    void c_f32_matmul "ktlab::f32_matmul"(const float* w, const float* x, float* y, int64_t n, int64_t k,
                                          int64_t m, Isa isa, int threads) except + nogil


cdef extern from "isa.h" namespace "ktlab":
    cdef enum class WFormat(int):
        q8_0
        q4_k
        q6_k
        bf16
        q5_k
        mxfp4


cdef extern from "matmul_t.h" namespace "ktlab":
    void c_matmul_t_sum "ktlab::matmul_t_sum"(WFormat f, const uint8_t* const* w, const float* const* dy, int parts,
                                              size_t row_bytes, int64_t n, int64_t k, int64_t m, float* dx, Isa isa,
                                              int threads) except + nogil
    void c_dequantize_row_range "ktlab::dequantize_row_range"(WFormat f, const uint8_t* row, int64_t k0, int64_t k1,
                                                              float* out) nogil


cdef extern from "dense.h" namespace "ktlab":
    cdef struct DenseMatrix:
        WFormat fmt
        const uint8_t* data
        int64_t rows
        int64_t cols
        bint packed
    void c_dense_gemm "ktlab::dense_gemm"(const DenseMatrix& w, const float* x, int64_t m, float* y, size_t ldy,
                                          Isa isa, int threads) except + nogil
    bint c_has_packed_dense "ktlab::has_packed_dense"(WFormat fmt, Isa isa)
    void c_repack_dense "ktlab::repack_dense"(WFormat fmt, const uint8_t* raw, uint8_t* out, int64_t rows,
                                              int64_t k) except + nogil


cdef extern from "decode_layer.h" namespace "ktlab":
    cdef struct DecodeAttentionWeights:
        const float* attn_norm
        DenseMatrix qkv[3]
        int n_qkv
        const float* q_norm
        const float* k_norm
        DenseMatrix wo
        const float* ffn_norm
        const float* router
        int n_experts
    cdef struct DecodeAttentionShape:
        int hidden, nh, nkv, hd
        float eps
    void c_decode_attention_block "ktlab::decode_attention_block"(
        const DecodeAttentionWeights& w, const DecodeAttentionShape& s, const float* x, int n_seqs, const float* cos,
        const float* sin, float* k_pool, float* v_pool, int64_t head_rows, const int64_t* slots,
        const int32_t* tables, int max_pages, const int32_t* lens, int page, float scale, int top_k, bint norm_topk,
        float* h_out, float* hn_out, int64_t* ids, float* weights, Isa mm_isa, Isa isa, int threads) except + nogil


cdef extern from "rowops.h" namespace "ktlab":
    void c_rms_norm_rows "ktlab::rms_norm_rows"(const float* x, const float* w, float* out, int64_t rows, int n,
                                                float eps, int threads) except + nogil
    void c_qk_norm_rope "ktlab::qk_norm_rope"(const float* qkv, int64_t stride, int64_t n_tokens, int nh, int nkv,
                                              int hd, const float* q_norm, const float* k_norm, const float* cos,
                                              const float* sin, float eps, float* q_out, float* k_out,
                                              int threads) except + nogil
    void c_route_topk "ktlab::route_topk"(const float* logits, int64_t rows, int n_experts, int top_k,
                                          bint norm_topk, int64_t* ids, float* weights) except + nogil


cdef extern from "threadpool.h" namespace "ktlab":
    int c_default_num_threads "ktlab::default_num_threads"() nogil
    int64_t c_pool_self_check "ktlab::pool_self_check"(int jobs, int n_tasks, int threads, bint ranges) except + nogil


cdef extern from "moe_layer.h" namespace "ktlab":
    cdef cppclass ExpertMatrix:
        WFormat fmt
        const uint8_t* data
        int rows
        int cols
        size_t row_bytes()
        size_t expert_bytes()
    cdef struct ExpertMlp:
        bint clamped
        float alpha
        float limit
        const float* gate_bias
        const float* up_bias
        const float* down_bias
    cdef cppclass MoeLayer:
        MoeLayer(int n_experts, int hidden, int inter, ExpertMatrix gate, ExpertMatrix up,
                 ExpertMatrix down, Isa isa, int threads) except +
        void forward(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned,
                     int64_t n_tokens, int top_k, float* out) except + nogil
        void submit(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned,
                    int64_t n_tokens, int top_k, float* out) except + nogil
        void sync() except + nogil
        bint pending()
        int threads()
        void set_mlp(const ExpertMlp& mlp)
        void expert_gate_up(int e, const float* x, int m, float* g, float* u) except + nogil


cdef extern from "decode_layer.h" namespace "ktlab":
    cdef struct DecodeLayer:
        DecodeAttentionWeights attn
        MoeLayer* experts
    cdef struct DecodeHead:
        const float* norm
        DenseMatrix lm_head
    void c_decode_model_step "ktlab::decode_model_step"(
        const DecodeLayer* layers, int n_layers, const DecodeHead& head, const DecodeAttentionShape& s, float* x,
        int n_seqs, const float* cos, const float* sin, float* k_pools, float* v_pools, int64_t head_rows,
        const int64_t* slots, const int32_t* tables, int max_pages, const int32_t* lens, int page, float scale,
        int top_k, bint norm_topk, int64_t* ids, float* weights, float* logits, Isa mm_isa, Isa isa,
        int threads) except + nogil


cdef extern from "peak.h" namespace "ktlab":
    cdef enum class PeakKind(int):
        fp32
        int8
        bf16
    bint c_peak_supported "ktlab::peak_supported"(Isa isa, PeakKind kind)
    double c_run_peak "ktlab::run_peak"(Isa isa, PeakKind kind, int threads, int64_t iters,
                                        double* seconds) except + nogil
    uint64_t c_read_sum "ktlab::read_sum"(const uint8_t* data, size_t bytes, int threads,
                                          double* seconds) except + nogil
    uint64_t c_read_regions "ktlab::read_regions"(const uint8_t* const* ptrs, const size_t* sizes, int n,
                                                  int threads, double* seconds) except + nogil


#: Every ISA path ktlab knows, worst to best.
ISA_NAMES = ("scalar", "avx2", "avx512", "amx")
#: Weight formats of the MoE kernels, by their index in cpp/isa.h's WFormat.
MOE_FORMATS = ("q8_0", "q4_k", "q6_k", "bf16", "q5_k", "mxfp4")
#: (values, bytes) per weight block of each MoE format.
MOE_BLOCKS = {"q8_0": (32, 34), "q4_k": (256, 144), "q6_k": (256, 210), "bf16": (1, 2), "q5_k": (256, 176),
              "mxfp4": (32, 17)}
#: Bytes of one row's block in each format's repacked layout (cpp/kquant.h, cpp/quant.h, cpp/mxfp4.h).
PACKED_BLOCK_BYTES = {"q8_0": 34, "q4_k": 148, "q6_k": 210, "bf16": 2, "q5_k": 180, "mxfp4": 20}
#: Formats a dense matrix (attention projections, LM head) may have.
DENSE_FORMATS = ("q8_0", "q4_k", "q5_k", "q6_k", "mxfp4")
#: Kinds of compute-peak loops, by their index in cpp/peak.h's PeakKind.
PEAK_KINDS = ("fp32", "int8", "bf16")
#: Bytes and values of one Q8_0 block (ggml layout: fp16 d + 32 int8).
Q8_0_BLOCK_BYTES = 34
Q8_0_BLOCK_VALUES = 32
cdef int INT_MAX = 2147483647


def cpu_features():
    """The CPU features the dispatcher looks at, as ``{name: bool}`` (detected once)."""
    cdef const CpuFeatures* f = &c_cpu_features()
    return {
        "avx2": bool(f.avx2), "fma": bool(f.fma), "f16c": bool(f.f16c),
        "avx512f": bool(f.avx512f), "avx512bw": bool(f.avx512bw), "avx512vl": bool(f.avx512vl),
        "avx512vnni": bool(f.avx512vnni), "avx512bf16": bool(f.avx512bf16),
        "amx_tile": bool(f.amx_tile), "amx_int8": bool(f.amx_int8), "amx_bf16": bool(f.amx_bf16),
        "amx_permitted": bool(f.amx_permitted),
    }


def available_isas():
    """ISA paths usable on this CPU (after ``KTLAB_ISA_DISABLE``), worst to best."""
    return [name for i, name in enumerate(ISA_NAMES) if c_isa_available(<Isa>i)]


def best_isa():
    """The best available path: amx > avx512 > avx2 > scalar."""
    return c_isa_name(c_best_isa()).decode()


def forced_isa():
    """``KTLAB_ISA`` as read at first use (lower-cased), or ``None`` when unset."""
    value = c_forced_isa_env().decode()
    return value or None


def _describe_cpu():
    present = [k for k, v in cpu_features().items() if v]
    return ", ".join(present) if present else "none of the SIMD features ktlab uses"


cdef Isa _resolve(name) except *:
    cdef Isa out = <Isa>0
    cdef int idx
    if name is not None and not isinstance(name, str):
        raise TypeError(f"isa must be a str or None, got {type(name).__name__}")
    source = "isa"
    wanted = name
    if not name or not name.strip():
        wanted = forced_isa()
        source = "KTLAB_ISA"
        name = None
    encoded = (name or "").encode()
    status = c_resolve_isa(encoded, &out)
    if status == kResolveOk:
        return out
    if status == kResolveUnknown:
        raise ValueError(
            f"{source}={wanted!r} is not a known ISA path; choose one of {', '.join(ISA_NAMES)}"
        )
    path = wanted.strip().lower()
    idx = ISA_NAMES.index(path)
    why = " (disabled by KTLAB_ISA_DISABLE)" if c_isa_disabled(<Isa>idx) else ""
    raise ValueError(
        f"{source}={wanted!r}: the {path} path is not available on this CPU{why} "
        f"(available paths: {', '.join(available_isas())}; CPU features: {_describe_cpu()})"
    )


def resolve_isa(name=None):
    """Resolve an ISA path name to the one that will run.

    ``None`` or ``""`` means ``KTLAB_ISA`` when set, else :func:`best_isa`. Raises
    ``ValueError`` naming the path and this CPU's features when the path is unknown or not
    available here.
    """
    return c_isa_name(_resolve(name)).decode()


def pool_self_check(int jobs, int n_tasks, int threads, bint ranges=False):
    """Run ``jobs`` jobs of ``n_tasks`` tasks on the kernel pool (per-thread ranges with stealing
    when ``ranges``, else one task at a time); the count of tasks that did not run exactly once
    before their job returned (0 when the pool's handoff is right)."""
    cdef int64_t wrong
    with nogil:
        wrong = c_pool_self_check(jobs, n_tasks, threads, ranges)
    return wrong


def default_num_threads():
    """Physical cores available to this process (SMT siblings counted once)."""
    return c_default_num_threads()


cdef WFormat _format(str fmt, tuple allowed) except *:
    if fmt not in allowed:
        raise ValueError(f"unknown weight format {fmt!r}; one of {', '.join(allowed)}")
    return <WFormat><int>MOE_FORMATS.index(fmt)


def has_packed_dense(str fmt, str isa=None):
    """True when the path computes dense ``fmt`` matrices on their repacked layout."""
    return c_has_packed_dense(_format(fmt, DENSE_FORMATS), _resolve(isa))


def repack_dense(str fmt, const uint8_t[:, ::1] w_raw):
    """Raw rows [N, row bytes] of ``fmt`` (N a multiple of 16) -> a new array of the format's
    repacked layout (Q8_0x16, Q4_Kx16, Q5_Kx16, Q6_Kx16), [N, packed row bytes]."""
    cdef WFormat f = _format(fmt, DENSE_FORMATS)
    values, nbytes = MOE_BLOCKS[fmt]
    cdef int64_t n = w_raw.shape[0]
    cdef int64_t row_bytes = w_raw.shape[1]
    if n % 16 != 0 or row_bytes % nbytes != 0 or row_bytes == 0:
        raise ValueError(f"a repacked {fmt} matrix needs a multiple of 16 rows of whole {fmt} blocks, "
                         f"got [{n}, {row_bytes}] bytes")
    cdef int64_t k = row_bytes // nbytes * values
    result = np.empty((n, k // values * PACKED_BLOCK_BYTES[fmt]), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = result
    if n:
        with nogil:
            c_repack_dense(f, &w_raw[0, 0], &out[0, 0], n, k)
    return result


cdef DenseMatrix _dense(str fmt, const uint8_t[:, ::1] w, bint packed, int64_t cols, str what) except *:
    """A dense matrix of ``cols`` values a row, its bytes checked, as the C++ struct."""
    cdef WFormat f = _format(fmt, DENSE_FORMATS)
    values, nbytes = MOE_BLOCKS[fmt]
    if cols <= 0 or cols % values:
        raise ValueError(f"{what}: {fmt} rows need a positive multiple of {values} values, got K={cols}")
    cdef int64_t expected = cols // values * (PACKED_BLOCK_BYTES[fmt] if packed else nbytes)
    if w.shape[1] != expected:
        raise ValueError(f"{what}: rows have {w.shape[1]} bytes, expected {expected} "
                         f"({'packed ' if packed else ''}{fmt} rows of K={cols})")
    if packed and w.shape[0] % 16:
        raise ValueError(f"{what}: {w.shape[0]} rows; a packed matrix needs a multiple of 16 rows")
    if w.shape[0] > INT_MAX or cols // values > INT_MAX:
        raise ValueError(f"{what}: [{w.shape[0]}, {cols}] is too large for the kernels (rows and blocks must fit int32)")
    cdef DenseMatrix m
    m.fmt = f
    m.data = &w[0, 0] if w.shape[0] > 0 else NULL
    m.rows = w.shape[0]
    m.cols = cols
    m.packed = packed
    return m


def dense_gemm(str fmt, const uint8_t[:, ::1] w, bint packed, const float[:, ::1] x, float[:, ::1] out,
               str isa=None, int threads=0):
    """``out[M, N] = x[M, K] @ W[N, K]^T`` with W as rows of ``fmt`` (raw GGUF rows, or
    :func:`repack_dense` bytes when ``packed``).

    Each row of ``x`` is quantized once to the format's activation blocks (int8 with an fp32
    scale: blocks of 32 for Q8_0, super-blocks of 256 with 16-value sums for the K-quants);
    block dots are exact int32, scaled and summed in fp32. Row j of ``out`` is bit-identical for
    any M and thread count. ``threads <= 0`` uses :func:`default_num_threads`. Returns ``out``.
    """
    cdef int64_t m = x.shape[0]
    cdef DenseMatrix mat = _dense(fmt, w, packed, x.shape[1], "W")
    if out.shape[0] != m or out.shape[1] != mat.rows:
        raise ValueError(f"out is [{out.shape[0]}, {out.shape[1]}], expected [M={m}, N={mat.rows}]")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    cdef Isa path = _resolve(isa)
    if packed and not c_has_packed_dense(mat.fmt, path):
        raise ValueError(f"the {c_isa_name(path).decode()} path has no packed dense {fmt} kernel")
    if m == 0 or mat.rows == 0:
        return out
    with nogil:
        c_dense_gemm(mat, &x[0, 0], m, &out[0, 0], <size_t>mat.rows, path, threads)
    return out


def matmul_t(str fmt, list ws, list dys, float[:, ::1] out, str isa=None, int threads=0):
    """``out[M, K] = sum over p of dys[p][M, N] @ W_p[N, K]``, each W_p given as N raw rows of ``fmt``
    (``cpp/matmul_t.h``: input gradients of ``y = x @ W^T``; several parts summed in one pass, such as
    an expert's gate and up), the same bits on every path and thread count. 1 to 4 parts of one shape."""
    cdef WFormat f = _format(fmt, MOE_FORMATS)
    values, nbytes = MOE_BLOCKS[fmt]
    cdef int parts = len(ws), p
    if not 1 <= parts <= 4 or len(dys) != parts:
        raise ValueError(f"1 to 4 (W, dy) pairs, got {len(ws)} W and {len(dys)} dy")
    cdef const uint8_t[:, ::1] w = ws[0]
    cdef const float[:, ::1] dy = dys[0]
    cdef int64_t n = w.shape[0], m = dy.shape[0], row_bytes = w.shape[1]
    cdef int64_t k = row_bytes // nbytes * values
    cdef const uint8_t* w_ptr[4]
    cdef const float* dy_ptr[4]
    if row_bytes % nbytes:
        raise ValueError(f"rows of {row_bytes} bytes are not whole {fmt} blocks of {nbytes} bytes")
    for p in range(parts):
        w, dy = ws[p], dys[p]
        if w.shape[0] != n or w.shape[1] != row_bytes:
            raise ValueError(f"every W must be [{n}, {row_bytes}] bytes, got [{w.shape[0]}, {w.shape[1]}]")
        if dy.shape[1] != n:
            raise ValueError(f"dy rows have {dy.shape[1]} values, W has {n} rows")
        if dy.shape[0] != m:
            raise ValueError(f"every dy must have {m} rows, got {dy.shape[0]}")
        if n and m:
            w_ptr[p], dy_ptr[p] = &w[0, 0], &dy[0, 0]
    if out.shape[0] != m or out.shape[1] != k:
        raise ValueError(f"out is [{out.shape[0]}, {out.shape[1]}], expected [M={m}, K={k}]")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    cdef Isa path = _resolve(isa)
    if n and m and k:
        with nogil:
            c_matmul_t_sum(f, w_ptr, dy_ptr, parts, <size_t>row_bytes, n, k, m, &out[0, 0], path, threads)
    return out


def dequantize_rows(str fmt, const uint8_t[:, ::1] w, float[:, ::1] out):
    """``out[N, K]``: the N raw rows of ``fmt`` dequantized as ggml does (``cpp/matmul_t.h``)."""
    cdef WFormat f = _format(fmt, MOE_FORMATS)
    values, nbytes = MOE_BLOCKS[fmt]
    cdef int64_t k = w.shape[1] // nbytes * values, r
    if out.shape[0] != w.shape[0] or out.shape[1] != k:
        raise ValueError(f"out is [{out.shape[0]}, {out.shape[1]}], expected [{w.shape[0]}, {k}]")
    with nogil:
        for r in range(w.shape[0]):
            c_dequantize_row_range(f, &w[r, 0], 0, k, &out[r, 0])
    return out


def f32_matmul(const float[:, ::1] w, const float[:, ::1] x, float[:, ::1] out, str isa=None, int threads=0):
    """``out[M, N] = x[M, K] @ w[N, K]^T`` in fp32, each row computed the same way whatever M
    (batch-independent, unlike BLAS). Returns ``out``."""
    cdef int64_t n = w.shape[0], k = w.shape[1], m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x rows have {x.shape[1]} values, w rows {k}")
    if out.shape[0] != m or out.shape[1] != n:
        raise ValueError(f"out is [{out.shape[0]}, {out.shape[1]}], expected [M={m}, N={n}]")
    if k > INT_MAX or threads < 0:
        raise ValueError(f"K={k} too large or threads={threads} < 0")
    cdef Isa path = _resolve(isa)
    if n and m and k:
        with nogil:
            c_f32_matmul(&w[0, 0], &x[0, 0], &out[0, 0], n, k, m, path, threads)
    elif n and m:
        out[:, :] = 0
    return out


cdef _check_pages(const int32_t[:, ::1] tables, const int32_t[::1] lens, int page, int64_t rows):
    """Every sequence's length fits its table, and every page it reads is in the pool."""
    cdef int max_pages = tables.shape[1]
    cdef int b, i
    for b in range(lens.shape[0]):
        if lens[b] < 1 or lens[b] > max_pages * page:
            raise ValueError(f"sequence {b} attends to {lens[b]} positions; its table holds 1..{max_pages * page}")
        for i in range((lens[b] + page - 1) // page):
            if tables[b, i] < 0 or tables[b, i] >= rows // page:
                raise ValueError(f"sequence {b} names page {tables[b, i]}, outside the pool's {rows // page} pages")


def paged_decode_attention(const float[:, :, ::1] q, const float[:, :, ::1] k, const float[:, :, ::1] v,
                           const int32_t[:, ::1] tables, const int32_t[::1] lens, int page, float scale,
                           float[:, :, ::1] out, str isa=None, int threads=0):
    """One query per sequence over its own KV pages, read in place (see cpp/attention.h).

    q, out [B, nh, hd]; k, v [nkv, P * page, hd] (one layer of the page pool); tables [B,
    max_pages] page ids; lens [B] positions each sequence attends to. Returns ``out``.
    """
    cdef int n_seqs = q.shape[0], nh = q.shape[1], hd = q.shape[2]
    cdef int nkv = k.shape[0]
    cdef int64_t rows = k.shape[1]
    cdef int max_pages = tables.shape[1]
    if nkv <= 0 or nh % nkv != 0:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} KV heads")
    if k.shape[2] != hd or v.shape[0] != nkv or v.shape[1] != rows or v.shape[2] != hd:
        raise ValueError(f"k, v must both be [nkv, rows, hd={hd}], got [{k.shape[0]}, {k.shape[1]}, {k.shape[2]}] "
                         f"and [{v.shape[0]}, {v.shape[1]}, {v.shape[2]}]")
    if page <= 0 or rows % page != 0:
        raise ValueError(f"the pool's {rows} rows per head are not whole pages of {page}")
    if (tables.shape[0] != n_seqs or lens.shape[0] != n_seqs or out.shape[0] != n_seqs or out.shape[1] != nh
            or out.shape[2] != hd):
        raise ValueError("tables, lens and out must have one entry per sequence of q (and out q's shape)")
    _check_pages(tables, lens, page, rows)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    cdef Isa path = _resolve(isa)
    if n_seqs == 0:
        return out
    with nogil:
        c_paged_decode_attention(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], rows, &tables[0, 0], max_pages, &lens[0],
                                 n_seqs, nh, nkv, hd, page, scale, &out[0, 0, 0], path, threads)
    return out


def rms_norm_rows(const float[:, ::1] x, const float[::1] w, float eps, float[:, ::1] out, int threads=0):
    """``out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps)`` per row (see cpp/rowops.h). ``out`` may be ``x``."""
    if w.shape[0] != x.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != x.shape[1]:
        raise ValueError(f"x [{x.shape[0]}, {x.shape[1]}], w [{w.shape[0]}] and out [{out.shape[0]}, "
                         f"{out.shape[1]}] do not match")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    if x.shape[0] and x.shape[1]:
        with nogil:
            c_rms_norm_rows(&x[0, 0], &w[0], &out[0, 0], x.shape[0], <int>x.shape[1], eps, threads)
    return out


def qk_norm_rope(const float[:, ::1] qkv, int nh, int nkv, const float[::1] q_norm, const float[::1] k_norm,
                 const float[:, ::1] cos, const float[:, ::1] sin, float eps, float[:, :, ::1] q_out,
                 float[:, :, ::1] k_out, int threads=0):
    """Qwen3's q/k head RMSNorm and rotary embedding (see cpp/rowops.h): the first nh heads of
    each row of ``qkv`` [T, >= (nh + nkv) * hd] into ``q_out`` [T, nh, hd], the next nkv into
    ``k_out`` [T, nkv, hd]; cos, sin [T, hd]."""
    cdef int64_t T = qkv.shape[0]
    cdef int hd = q_norm.shape[0]
    if nh <= 0 or nkv <= 0 or hd <= 0 or hd % 2 or k_norm.shape[0] != hd:
        raise ValueError(f"need nh, nkv > 0 and q_norm, k_norm of one even head size, got nh={nh}, nkv={nkv}, "
                         f"hd={hd}, k_norm [{k_norm.shape[0]}]")
    if qkv.shape[1] < (nh + nkv) * hd:
        raise ValueError(f"qkv rows hold {qkv.shape[1]} values, fewer than (nh + nkv) * hd = {(nh + nkv) * hd}")
    if cos.shape[0] != T or sin.shape[0] != T or cos.shape[1] != hd or sin.shape[1] != hd:
        raise ValueError(f"cos and sin must be [T={T}, hd={hd}]")
    if (q_out.shape[0] != T or q_out.shape[1] != nh or q_out.shape[2] != hd or k_out.shape[0] != T
            or k_out.shape[1] != nkv or k_out.shape[2] != hd):
        raise ValueError(f"q_out must be [{T}, {nh}, {hd}] and k_out [{T}, {nkv}, {hd}]")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    if T:
        with nogil:
            c_qk_norm_rope(&qkv[0, 0], qkv.shape[1], T, nh, nkv, hd, &q_norm[0], &k_norm[0], &cos[0, 0],
                           &sin[0, 0], eps, &q_out[0, 0, 0], &k_out[0, 0, 0], threads)
    return q_out, k_out


def route_topk(const float[:, ::1] logits, int top_k, bint norm_topk, int64_t[:, ::1] ids, float[:, ::1] weights):
    """Softmax over each row of router ``logits`` [T, E], then its ``top_k`` experts (ids, weights
    [T, top_k], descending; ties: lower id first), renormalized when ``norm_topk``."""
    cdef int64_t T = logits.shape[0]
    cdef int E = logits.shape[1]
    if top_k <= 0 or top_k > E:
        raise ValueError(f"top_k must be in 1..{E} (the number of experts), got {top_k}")
    if ids.shape[0] != T or weights.shape[0] != T or ids.shape[1] != top_k or weights.shape[1] != top_k:
        raise ValueError(f"ids and weights must be [T={T}, top_k={top_k}]")
    if T:
        with nogil:
            c_route_topk(&logits[0, 0], T, E, top_k, norm_topk, &ids[0, 0], &weights[0, 0])
    return ids, weights


cdef DecodeAttentionWeights _attention_weights(
        const float[::1] attn_norm, list qkv, const float[::1] q_norm, const float[::1] k_norm, tuple wo,
        const float[::1] ffn_norm, const float[:, ::1] router, int nh, int nkv, int top_k) except *:
    """One layer's attention-half weights, checked against each other, as the C++ struct. ``qkv``:
    1 to 3 matrices (fmt, bytes, packed) whose rows stack to q, k and v; ``wo`` one such matrix."""
    cdef int H = attn_norm.shape[0], hd = q_norm.shape[0], E = router.shape[0]
    cdef int64_t qkv_dim = (nh + 2 * nkv) * hd, rows = 0
    if nh <= 0 or nkv <= 0 or nh % nkv or hd <= 0 or hd % 2 or k_norm.shape[0] != hd:
        raise ValueError(f"bad head layout: nh={nh}, nkv={nkv}, q_norm [{hd}], k_norm [{k_norm.shape[0]}]")
    if not 1 <= len(qkv) <= 3:
        raise ValueError(f"q, k and v come as 1 to 3 matrices, got {len(qkv)}")
    cdef DecodeAttentionWeights w
    cdef int i
    for i, part in enumerate(qkv):
        w.qkv[i] = _dense(part[0], part[1], part[2], H, "qkv")
        rows += w.qkv[i].rows
    if rows != qkv_dim:
        raise ValueError(f"the q/k/v matrices have {rows} rows, expected (nh + 2 nkv) hd = {qkv_dim}")
    w.n_qkv = len(qkv)
    w.wo = _dense(wo[0], wo[1], wo[2], nh * hd, "wo")
    if w.wo.rows != H:
        raise ValueError(f"wo must be [H={H}, nh*hd={nh * hd}], got {w.wo.rows} rows")
    if ffn_norm.shape[0] != H or router.shape[1] != H or E < 1:
        raise ValueError(f"norms must be [H={H}] and the router [E, H]")
    if top_k < 1 or top_k > E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    w.attn_norm = &attn_norm[0]
    w.q_norm = &q_norm[0]
    w.k_norm = &k_norm[0]
    w.ffn_norm = &ffn_norm[0]
    w.router = &router[0, 0]
    w.n_experts = E
    return w


cdef _check_decode_inputs(int B, int hd, int nkv, const float[:, ::1] cos, const float[:, ::1] sin,
                          int64_t pool_nkv, int64_t rows, int64_t pool_hd, const int64_t[::1] slots,
                          const int32_t[:, ::1] tables, const int32_t[::1] lens, int page):
    """A decode step's per-sequence inputs against the pool (shape [pool_nkv, rows, pool_hd] per layer)."""
    if (cos.shape[0] != B or sin.shape[0] != B or cos.shape[1] != hd or sin.shape[1] != hd or slots.shape[0] != B
            or tables.shape[0] != B or lens.shape[0] != B):
        raise ValueError(f"cos, sin [B={B}, hd], slots, tables and lens must have one row per sequence")
    if pool_nkv != nkv or pool_hd != hd or page <= 0 or rows % page:
        raise ValueError(f"k_pool and v_pool must both be [nkv={nkv}, whole pages of {page}, hd={hd}]")
    cdef int b
    for b in range(B):
        if slots[b] < 0 or slots[b] >= rows:
            raise ValueError(f"sequence {b} writes pool row {slots[b]}, outside the pool's {rows} rows")
    _check_pages(tables, lens, page, rows)


def decode_attention_block(const float[:, ::1] x, const float[::1] attn_norm, list qkv, const float[::1] q_norm,
                           const float[::1] k_norm, tuple wo, const float[::1] ffn_norm, const float[:, ::1] router,
                           int nh, int nkv,
                           float eps, const float[:, ::1] cos, const float[:, ::1] sin, float[:, :, ::1] k_pool,
                           float[:, :, ::1] v_pool, const int64_t[::1] slots, const int32_t[:, ::1] tables,
                           const int32_t[::1] lens, int page, float scale, int top_k, bint norm_topk,
                           float[:, ::1] h_out, float[:, ::1] hn_out, int64_t[:, ::1] ids, float[:, ::1] weights,
                           str mm_isa=None, str isa=None, int threads=0):
    """A decode step's attention half of one layer in one call (see cpp/decode_layer.h): returns
    nothing; fills h_out (x + attention), hn_out (its FFN RMSNorm), ids and weights (the router's
    top_k), and writes the new keys/values into the pool rows ``slots``."""
    cdef int B = x.shape[0], H = x.shape[1], hd = q_norm.shape[0]
    cdef DecodeAttentionWeights w = _attention_weights(attn_norm, qkv, q_norm, k_norm, wo, ffn_norm, router, nh, nkv,
                                                       top_k)
    if attn_norm.shape[0] != H:
        raise ValueError(f"norms must be [H={H}] and the router [E, H]")
    if v_pool.shape[0] != k_pool.shape[0] or v_pool.shape[1] != k_pool.shape[1] or v_pool.shape[2] != k_pool.shape[2]:
        raise ValueError(f"k_pool and v_pool must both be [nkv={nkv}, whole pages of {page}, hd={hd}]")
    _check_decode_inputs(B, hd, nkv, cos, sin, k_pool.shape[0], k_pool.shape[1], k_pool.shape[2], slots, tables,
                         lens, page)
    if (h_out.shape[0] != B or h_out.shape[1] != H or hn_out.shape[0] != B or hn_out.shape[1] != H
            or ids.shape[0] != B or ids.shape[1] != top_k or weights.shape[0] != B or weights.shape[1] != top_k):
        raise ValueError("h_out, hn_out must be [B, H] and ids, weights [B, top_k]")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
    cdef DecodeAttentionShape shape
    shape.hidden, shape.nh, shape.nkv, shape.hd, shape.eps = H, nh, nkv, hd, eps
    cdef Isa mm_path = _resolve(mm_isa)
    cdef Isa path = _resolve(isa)
    if B == 0:
        return
    with nogil:
        c_decode_attention_block(w, shape, &x[0, 0], B, &cos[0, 0], &sin[0, 0], &k_pool[0, 0, 0], &v_pool[0, 0, 0],
                                 k_pool.shape[1], &slots[0], &tables[0, 0], tables.shape[1], &lens[0], page, scale,
                                 top_k, norm_topk, &h_out[0, 0], &hn_out[0, 0], &ids[0, 0], &weights[0, 0], mm_path,
                                 path, threads)


def quantize_q8_0(const float[::1] x):
    """Quantize an fp32 vector (length a multiple of 32) to raw Q8_0 bytes (np.uint8).

    The C++ twin of ggml's ``quantize_row_q8_0``: per block of 32, ``d = amax / 127`` stored
    as fp16, ``q = round(x / d)`` with ties away from zero.
    """
    cdef int64_t k = x.shape[0]
    if k <= 0 or k % Q8_0_BLOCK_VALUES != 0:
        raise ValueError(f"x has {k} values; Q8_0 needs a positive multiple of {Q8_0_BLOCK_VALUES}")
    result = np.empty((k // Q8_0_BLOCK_VALUES) * Q8_0_BLOCK_BYTES, dtype=np.uint8)
    cdef uint8_t[::1] y = result
    with nogil:
        quantize_row_q8_0(&x[0], <block_q8_0*>&y[0], k)
    return result


def quantize_q8_act(const float[::1] x, str isa=None):
    """The kernels' activation quantizer on ``isa``'s path: per block of 32 an fp32 scale
    ``d = amax / 127`` and ``q = roundf(x / d)``. Returns (d float32 [k/32], q int8 [k/32, 32]);
    every path gives the same bits (the SIMD ones are twins of the scalar one)."""
    cdef int64_t k = x.shape[0]
    if k <= 0 or k % Q8_0_BLOCK_VALUES != 0:
        raise ValueError(f"x has {k} values; the activation blocks need a positive multiple of {Q8_0_BLOCK_VALUES}")
    cdef Isa path = _resolve(isa)
    raw = np.empty((k // Q8_0_BLOCK_VALUES, 4 + Q8_0_BLOCK_VALUES), dtype=np.uint8)
    cdef uint8_t[:, ::1] y = raw
    with nogil:
        c_quantize_q8_act(&x[0], <block_q8_act*>&y[0, 0], k, path)
    return raw[:, :4].copy().view(np.float32).reshape(-1), raw[:, 4:].view(np.int8)


def quantize_q8_K(const float[::1] x, str isa=None):
    """The K-quant kernels' activation quantizer on ``isa``'s path: per super-block of 256 an
    fp32 scale ``d = amax / 127``, ``q = roundf(x / d)`` and the sums of each 16 quants. Returns
    (d float32 [k/256], q int8 [k/256, 256], bsums int16 [k/256, 16]); every path gives the same bits."""
    cdef int64_t k = x.shape[0]
    if k <= 0 or k % 256 != 0:
        raise ValueError(f"x has {k} values; the activation super-blocks need a positive multiple of 256")
    cdef Isa path = _resolve(isa)
    raw = np.empty((k // 256, 4 + 256 + 32), dtype=np.uint8)
    cdef uint8_t[:, ::1] y = raw
    with nogil:
        c_quantize_q8_K(&x[0], <block_q8_K*>&y[0, 0], k, path)
    return raw[:, :4].copy().view(np.float32).reshape(-1), raw[:, 4:260].view(np.int8), raw[:, 260:].copy().view(np.int16)


cdef PeakKind _peak_kind(str kind) except *:
    if kind not in PEAK_KINDS:
        raise ValueError(f"unknown peak kind {kind!r}; one of {', '.join(PEAK_KINDS)}")
    cdef int index = PEAK_KINDS.index(kind)
    return <PeakKind>index


def peak_supported(str isa, str kind):
    """Whether this CPU has a ``kind`` peak loop on the ``isa`` path (which must be available)."""
    return bool(c_peak_supported(_resolve(isa), _peak_kind(kind)))


def run_peak(str isa, str kind, int threads, int64_t iters):
    """Run the ``kind`` peak loop ``iters`` times on each of ``threads`` pool threads.

    Returns ``(ops, seconds)``: ops done by all threads (a multiply-add counts 2) and the wall
    time. ``threads <= 0`` uses :func:`default_num_threads`.
    """
    cdef Isa path = _resolve(isa)
    cdef PeakKind k = _peak_kind(kind)
    if not c_peak_supported(path, k):
        raise ValueError(f"the {isa} path has no {kind} peak loop on this CPU")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    cdef double seconds = 0.0
    cdef double ops
    with nogil:
        ops = c_run_peak(path, k, threads, iters, &seconds)
    return ops, seconds


def read_sum(const uint8_t[::1] data, int threads=0):
    """Sum ``data`` (a multiple of 64 bytes) as uint64 words on ``threads`` pool threads.

    Returns ``(sum, seconds)``: the sum modulo 2**64 (so the reads happen) and the wall time.
    """
    cdef size_t n = data.shape[0]
    if n == 0 or n % 64:
        raise ValueError(f"data must be a positive multiple of 64 bytes, got {n}")
    cdef double seconds = 0.0
    cdef uint64_t total
    with nogil:
        total = c_read_sum(&data[0], n, threads, &seconds)
    return total, seconds


def read_regions(arrays, int threads=0):
    """Read every array of ``arrays`` (1-D uint8, C-contiguous: views of weights where they
    live) once on ``threads`` pool threads, in 1 MiB tasks. Returns ``(sum, seconds)``."""
    cdef vector[const uint8_t*] ptrs
    cdef vector[size_t] sizes
    cdef const uint8_t[::1] view
    for a in arrays:
        view = a
        if view.shape[0] > 0:
            ptrs.push_back(&view[0])
            sizes.push_back(view.shape[0])
    cdef double seconds = 0.0
    cdef uint64_t total = 0
    if ptrs.size() == 0:
        return 0, 0.0
    with nogil:
        total = c_read_regions(ptrs.data(), sizes.data(), <int>ptrs.size(), threads, &seconds)
    return total, seconds


cdef ExpertMatrix _matrix(str fmt, const uint8_t[::1] data, int rows, int cols) except *:
    if fmt not in MOE_BLOCKS:
        raise ValueError(f"unknown MoE weight format {fmt!r}; one of {', '.join(MOE_FORMATS)}")
    values, nbytes = MOE_BLOCKS[fmt]
    if rows <= 0 or cols <= 0 or cols % values:
        raise ValueError(f"{fmt} matrices of [{rows}, {cols}]: rows must be whole {values}-value blocks")
    cdef ExpertMatrix m
    cdef int fmt_index = MOE_FORMATS.index(fmt)
    m.fmt = <WFormat>fmt_index
    m.data = &data[0]
    m.rows = rows
    m.cols = cols
    return m


cdef class MoeLayerHandle:
    """One MoE layer's experts in C++ (``cpp/moe_layer.h``). Private: use ``kernels.CpuExperts``.

    The weight arrays are borrowed (kept referenced here). Call arguments must already be
    validated and C-contiguous with the right dtypes (``kernels.CpuExperts`` does that); the
    C++ side still refuses expert ids out of range (``ValueError``).
    """

    cdef MoeLayer* layer
    cdef readonly int n_experts, hidden, inter
    cdef object _weights
    cdef object _pending
    cdef object _biases

    def __cinit__(self, int n_experts, int hidden, int inter, str fmt_gu, const uint8_t[::1] gate,
                  const uint8_t[::1] up, str fmt_down, const uint8_t[::1] down, str isa=None, int threads=0):
        cdef ExpertMatrix g = _matrix(fmt_gu, gate, inter, hidden)
        cdef ExpertMatrix u = _matrix(fmt_gu, up, inter, hidden)
        cdef ExpertMatrix d = _matrix(fmt_down, down, hidden, inter)
        if n_experts <= 0:
            raise ValueError(f"n_experts must be positive, got {n_experts}")
        if gate.shape[0] != <Py_ssize_t>(g.expert_bytes() * n_experts) or \
                up.shape[0] != <Py_ssize_t>(u.expert_bytes() * n_experts) or \
                down.shape[0] != <Py_ssize_t>(d.expert_bytes() * n_experts):
            raise ValueError(
                f"weight byte counts {gate.shape[0]}, {up.shape[0]}, {down.shape[0]} do not match "
                f"E={n_experts} experts of gate/up [{inter}, {hidden}] {fmt_gu} and down [{hidden}, {inter}] {fmt_down}"
            )
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
        cdef Isa path = _resolve(isa)
        self._weights = (gate, up, down)
        self.n_experts, self.hidden, self.inter = n_experts, hidden, inter
        self.layer = new MoeLayer(n_experts, hidden, inter, g, u, d, path, threads)

    def __dealloc__(self):
        if self.layer != NULL:
            with nogil:
                del self.layer  # waits for a pending call
            self.layer = NULL

    @property
    def threads(self):
        return self.layer.threads()

    @property
    def pending(self):
        return bool(self.layer.pending())

    def expert_gate_up(self, int e, const float[:, ::1] x, float[:, ::1] g, float[:, ::1] u):
        """Expert ``e``'s gate and up products ``g``, ``u`` [m, I] of ``x`` [m, H], as forward computes them."""
        cdef int m = <int>x.shape[0]
        if x.shape[1] != self.hidden or g.shape[0] != m or u.shape[0] != m or g.shape[1] != self.inter \
                or u.shape[1] != self.inter:
            raise ValueError(f"expected x [m, {self.hidden}] and g, u [m, {self.inter}]")
        if m == 0:
            return
        if self.layer.pending():
            raise RuntimeError("expert_gate_up while a call is pending")
        with nogil:
            self.layer.expert_gate_up(e, &x[0, 0], m, &g[0, 0], &u[0, 0])

    def set_mlp(self, bint clamped, float alpha, float limit, const float[:, ::1] gate_bias,
                const float[:, ::1] up_bias, const float[:, ::1] down_bias):
        """The expert MLP's form (``cpp/moe_layer.h`` ExpertMlp): clamped SwiGLU and per-expert
        biases gate/up [E, I], down [E, H] (each may be None). The arrays are kept referenced."""
        cdef ExpertMlp mlp
        for name, b, cols in (("gate", gate_bias, self.inter), ("up", up_bias, self.inter),
                              ("down", down_bias, self.hidden)):
            if b is not None and (b.shape[0] != self.n_experts or b.shape[1] != cols):
                raise ValueError(f"{name} bias must be [{self.n_experts}, {cols}], got [{b.shape[0]}, {b.shape[1]}]")
        if self.layer.pending():
            raise RuntimeError("set_mlp while a call is pending")
        mlp.clamped, mlp.alpha, mlp.limit = clamped, alpha, limit
        mlp.gate_bias = &gate_bias[0, 0] if gate_bias is not None else NULL
        mlp.up_bias = &up_bias[0, 0] if up_bias is not None else NULL
        mlp.down_bias = &down_bias[0, 0] if down_bias is not None else NULL
        self._biases = (gate_bias, up_bias, down_bias)
        self.layer.set_mlp(mlp)

    def forward(self, const float[:, ::1] x, const int32_t[:, ::1] ids, const float[:, ::1] weights,
                const uint8_t[::1] owned, float[:, ::1] out):
        """``out = MoE(x)``; shapes as ``CpuExperts.forward`` (``owned`` may be None)."""
        cdef int64_t n = self._check(x, ids, weights, owned, out)
        cdef const uint8_t* owned_p = NULL
        if owned is not None:
            owned_p = &owned[0]
        if n == 0:
            return
        with nogil:
            self.layer.forward(&x[0, 0], &ids[0, 0], &weights[0, 0], owned_p, n, <int>ids.shape[1], &out[0, 0])

    def expert_regions(self, experts):
        """The weight bytes of ``experts`` (ids) as they live here: gate, up and down of each, as
        1-D uint8 views (for :func:`read_regions`)."""
        out = []
        for w in self._weights:
            per = w.shape[0] // self.n_experts
            for e in experts:
                if not 0 <= e < self.n_experts:
                    raise ValueError(f"expert id {e} out of range [0, {self.n_experts})")
                out.append(w[e * per:(e + 1) * per])
        return out

    def forward_add(self, const float[:, ::1] x, const int64_t[:, ::1] ids, const float[:, ::1] weights,
                    float[:, ::1] out, float[:, ::1] h):
        """``h += MoE(x)`` with int64 ``ids`` (as the fused decode block returns them); ``out``: a
        scratch [T, H] that receives MoE(x). The same kernel and the same float add as
        ``h + forward(...)``, without the Python between them."""
        cdef int64_t n = x.shape[0], i, m, t, e
        cdef int k = <int>ids.shape[1], j
        if (x.shape[1] != self.hidden or ids.shape[0] != n or weights.shape[0] != n or weights.shape[1] != k
                or out.shape[0] != n or out.shape[1] != self.hidden or h.shape[0] != n or h.shape[1] != self.hidden):
            raise ValueError(f"x, out and h must be [T, H={self.hidden}] and ids, weights [T, k] of one T")
        if self.layer.pending():
            raise RuntimeError("a submitted call is pending: sync() it first")
        cdef vector[int32_t] ids32 = vector[int32_t](n * k)
        for t in range(n):  # checked before narrowing: an int64 id must not wrap into range
            for j in range(k):
                e = ids[t, j]
                if e < 0 or e >= self.n_experts:
                    raise ValueError(f"expert id {e} out of range [0, {self.n_experts})")
                ids32[t * k + j] = <int32_t>e
        if n == 0:
            return
        m = n * self.hidden
        with nogil:
            self.layer.forward(&x[0, 0], ids32.data(), &weights[0, 0], NULL, n, k, &out[0, 0])
            for i in range(m):
                (&h[0, 0])[i] = (&h[0, 0])[i] + (&out[0, 0])[i]

    def submit(self, x_arr, ids_arr, weights_arr, owned_arr, out_arr):
        """Start ``forward`` on the background thread; the arrays are kept alive until ``sync``."""
        if self.layer.pending():
            raise RuntimeError("a call is already pending: sync() it before submitting another")
        cdef const float[:, ::1] x = x_arr
        cdef const int32_t[:, ::1] ids = ids_arr
        cdef const float[:, ::1] weights = weights_arr
        cdef const uint8_t[::1] owned = owned_arr
        cdef float[:, ::1] out = out_arr
        cdef int64_t n = self._check(x, ids, weights, owned, out)
        cdef const uint8_t* owned_p = NULL
        if owned is not None:
            owned_p = &owned[0]
        cdef int k = <int>ids.shape[1]
        if n == 0:
            raise ValueError("submit needs at least one token (T=0 is handled by kernels.CpuExperts)")
        self._pending = (x_arr, ids_arr, weights_arr, owned_arr, out_arr)
        with nogil:
            self.layer.submit(&x[0, 0], &ids[0, 0], &weights[0, 0], owned_p, n, k, &out[0, 0])

    def sync(self):
        """Wait for the submitted call; re-raise its error. ``RuntimeError`` if none is pending."""
        try:
            with nogil:
                self.layer.sync()
        finally:
            self._pending = None

    cdef int64_t _check(self, const float[:, ::1] x, const int32_t[:, ::1] ids, const float[:, ::1] weights,
                        const uint8_t[::1] owned, float[:, ::1] out) except -1:
        cdef int64_t n = x.shape[0]
        if x.shape[1] != self.hidden or out.shape[0] != n or out.shape[1] != self.hidden:
            raise ValueError(f"x and out must be [T, {self.hidden}], got x ({x.shape[0]}, {x.shape[1]}), out ({out.shape[0]}, {out.shape[1]})")
        if ids.shape[0] != n or weights.shape[0] != n or weights.shape[1] != ids.shape[1] or ids.shape[1] < 1:
            raise ValueError(f"ids and weights must both be [T={n}, k>=1], got ({ids.shape[0]}, {ids.shape[1]}), ({weights.shape[0]}, {weights.shape[1]})")
        if owned is not None and owned.shape[0] != self.n_experts:
            raise ValueError(f"owned must have E={self.n_experts} entries, got {owned.shape[0]}")
        if n > INT_MAX // max(ids.shape[1], 1):
            raise ValueError(f"T={n} tokens is too many for one call")
        return n


cdef class DecodeModelHandle:
    """A whole decode step of a model whose every layer runs on the CPU (cpp/decode_layer.h,
    ``decode_model_step``). Private: use ``kernels.DecodeModel``.

    ``layers``: per layer a tuple (attn_norm, qkv, q_norm, k_norm, wo, ffn_norm, router,
    MoeLayerHandle), qkv a list of 1 to 3 matrices and wo one, each (fmt, bytes, packed); the
    arrays are borrowed (kept referenced here). ``lm_head``: a matrix (fmt, bytes, packed).
    """

    cdef vector[DecodeLayer] layers
    cdef DecodeHead head
    cdef DecodeAttentionShape shape
    cdef readonly int top_k, n_layers, vocab, hidden
    cdef bint norm_topk
    cdef Isa mm_isa, isa
    cdef int threads
    cdef object _keep

    def __cinit__(self, list layers, const float[::1] norm, tuple lm_head, int nh, int nkv, float eps, int top_k,
                  bint norm_topk, str mm_isa=None, str isa=None, int threads=0):
        cdef DecodeLayer layer
        cdef MoeLayerHandle experts
        cdef int H = norm.shape[0]
        if not layers:
            raise ValueError("a decode model needs at least one layer")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = default), got {threads}")
        for i, spec in enumerate(layers):
            if len(spec) != 8 or not isinstance(spec[7], MoeLayerHandle):
                raise ValueError(f"layer {i}: expected 7 attention weights and a MoeLayerHandle")
            layer.attn = _attention_weights(spec[0], spec[1], spec[2], spec[3], spec[4], spec[5], spec[6], nh, nkv,
                                            top_k)
            experts = spec[7]
            if spec[0].shape[0] != H or experts.hidden != H or experts.n_experts != spec[6].shape[0]:
                raise ValueError(f"layer {i}: the norms, router and experts must share H={H} and the router's "
                                 f"E={spec[6].shape[0]}")
            layer.experts = experts.layer
            self.layers.push_back(layer)
        self.head.norm = &norm[0]
        self.head.lm_head = _dense(lm_head[0], lm_head[1], lm_head[2], H, "the LM head")
        if self.head.lm_head.rows < 1:
            raise ValueError("the LM head needs at least one row")
        self.shape.hidden, self.shape.nh, self.shape.nkv, self.shape.eps = H, nh, nkv, eps
        self.shape.hd = layers[0][2].shape[0]
        self.top_k, self.norm_topk, self.n_layers, self.hidden = top_k, norm_topk, len(layers), H
        self.vocab = self.head.lm_head.rows
        self.mm_isa, self.isa, self.threads = _resolve(mm_isa), _resolve(isa), threads
        self._keep = (layers, norm, lm_head)

    def step(self, float[:, ::1] x, const float[:, ::1] cos, const float[:, ::1] sin, float[:, :, :, ::1] k_pools,
             float[:, :, :, ::1] v_pools, const int64_t[::1] slots, const int32_t[:, ::1] tables,
             const int32_t[::1] lens, int page, float scale, int64_t[:, :, ::1] ids, float[:, :, ::1] weights,
             float[:, ::1] logits):
        """One decode step: x [B, H] the embeddings (overwritten), k_pools, v_pools the whole pool
        [L, nkv, rows, hd]; fills ids, weights [L, B, top_k] and logits [B, vocab]."""
        cdef int B = x.shape[0], L = self.n_layers, k = self.top_k
        if x.shape[1] != self.hidden:
            raise ValueError(f"x must be [B, H={self.hidden}]")
        cdef int i
        if k_pools.shape[0] != L or any(k_pools.shape[i] != v_pools.shape[i] for i in range(4)):
            raise ValueError(f"k_pools and v_pools must both be [L={L}, nkv, rows, hd]")
        _check_decode_inputs(B, self.shape.hd, self.shape.nkv, cos, sin, k_pools.shape[1], k_pools.shape[2],
                             k_pools.shape[3], slots, tables, lens, page)
        if (ids.shape[0] != L or ids.shape[1] != B or ids.shape[2] != k or weights.shape[0] != L
                or weights.shape[1] != B or weights.shape[2] != k or logits.shape[0] != B
                or logits.shape[1] != self.vocab):
            raise ValueError(f"ids, weights must be [L={L}, B={B}, top_k={k}] and logits [B, vocab={self.vocab}]")
        if B == 0:
            return
        with nogil:
            c_decode_model_step(self.layers.data(), L, self.head, self.shape, &x[0, 0], B, &cos[0, 0], &sin[0, 0],
                                &k_pools[0, 0, 0, 0], &v_pools[0, 0, 0, 0], k_pools.shape[2], &slots[0],
                                &tables[0, 0], tables.shape[1], &lens[0], page, scale, k, self.norm_topk,
                                &ids[0, 0, 0], &weights[0, 0, 0], &logits[0, 0], self.mm_isa, self.isa, self.threads)
