// Compute-peak loops, one function per ISA path and kind (see peak.h). Each loop keeps its
// operands in registers and runs independent accumulator chains, enough of them to cover the
// instruction latency, so it measures issue throughput: what a kernel could reach at best.
// SIMD functions are compiled with target attributes like cpp/moe_*.cpp and only called
// after peak_supported() said yes.
#include "peak.h"

#include <chrono>
#include <stdexcept>
#include <vector>

#include "threadpool.h"

#if KTLAB_X86
// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define KTLAB_PEAK_AVX2 __attribute__((target("avx2,fma")))
#define KTLAB_PEAK_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define KTLAB_PEAK_AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define KTLAB_PEAK_AMX_INT8 __attribute__((target("amx-tile,amx-int8")))
#define KTLAB_PEAK_AMX_BF16 __attribute__((target("amx-tile,amx-bf16")))
#endif

namespace ktlab {

namespace {

// Keeps a value "changed" for the optimiser (no code emitted): stops loop-invariant hoisting
// and closed-form folding of the loops below.
template <class T>
inline void opaque(T& v) {
    __asm__ volatile("" : "+m"(v));
}

volatile double g_sink = 0.0;  // results land here so no loop is dead code

// ---- scalar ---------------------------------------------------------------------------------
//
// The scalar path is plain C++ compiled for the baseline target, which the compiler
// auto-vectorizes: on x86-64 that is SSE2, so its peak is SSE2's: pmaddwd (int16 pairs into
// int32, how gcc vectorizes the int8 dot products) and mulps + addps (no FMA at baseline).
// Elsewhere, plain scalar multiply-add chains.

#if KTLAB_X86
constexpr int kSse2Chains = 8;

double peak_fp32_scalar(int64_t iters) {
    __m128 acc[kSse2Chains];
    for (int c = 0; c < kSse2Chains; ++c) acc[c] = _mm_set1_ps(1.0f + 0.001f * (float)c);
    const __m128 a = _mm_set1_ps(0.999999f), b = _mm_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 8
        for (int c = 0; c < kSse2Chains; ++c) acc[c] = _mm_add_ps(_mm_mul_ps(acc[c], a), b);
    }
    __m128 s = acc[0];
    for (int c = 1; c < kSse2Chains; ++c) s = _mm_add_ps(s, acc[c]);
    g_sink = g_sink + (double)_mm_cvtss_f32(s);
    return 8.0 * kSse2Chains * (double)iters;
}

double peak_int8_scalar(int64_t iters) {
    __m128i acc[kSse2Chains];
    for (int c = 0; c < kSse2Chains; ++c) acc[c] = _mm_set1_epi32(c);
    __m128i x = _mm_set1_epi16(3);
    const __m128i w = _mm_set1_epi16(5);
    for (int64_t i = 0; i < iters; ++i) {
        __asm__ volatile("" : "+x"(x));  // x "changes" every iteration: nothing is hoisted
#pragma GCC unroll 8
        for (int c = 0; c < kSse2Chains; ++c) acc[c] = _mm_add_epi32(acc[c], _mm_madd_epi16(w, x));
    }
    __m128i s = acc[0];
    for (int c = 1; c < kSse2Chains; ++c) s = _mm_add_epi32(s, acc[c]);
    g_sink = g_sink + (double)_mm_cvtsi128_si32(s);
    return 16.0 * kSse2Chains * (double)iters;
}
#else
constexpr int kScalarChains = 8;

double peak_fp32_scalar(int64_t iters) {
    float acc[kScalarChains];
    for (int c = 0; c < kScalarChains; ++c) acc[c] = 1.0f + 0.001f * (float)c;
    float a = 0.999999f, b = 1e-7f;
    opaque(a);
    opaque(b);
    for (int64_t i = 0; i < iters; ++i) {
        for (int c = 0; c < kScalarChains; ++c) acc[c] = acc[c] * a + b;
    }
    float s = 0.0f;
    for (float v : acc) s += v;
    g_sink = g_sink + s;
    return 2.0 * kScalarChains * (double)iters;
}

double peak_int8_scalar(int64_t iters) {
    int32_t acc[kScalarChains];
    for (int c = 0; c < kScalarChains; ++c) acc[c] = c + 1;
    int32_t a = 3, b = 7;
    opaque(a);
    opaque(b);
    for (int64_t i = 0; i < iters; ++i) {
        for (int c = 0; c < kScalarChains; ++c) acc[c] = (int32_t)((uint32_t)acc[c] * (uint32_t)a + (uint32_t)b);
    }
    int64_t s = 0;
    for (int32_t v : acc) s += v;
    g_sink = g_sink + (double)s;
    return 2.0 * kScalarChains * (double)iters;
}
#endif

#if KTLAB_X86

// ---- AVX2 -----------------------------------------------------------------------------------

constexpr int kAvx2Chains = 10;  // 2 FMA ports x 4-5 cycles latency

KTLAB_PEAK_AVX2 double peak_fp32_avx2(int64_t iters) {
    __m256 acc[kAvx2Chains];
    for (int c = 0; c < kAvx2Chains; ++c) acc[c] = _mm256_set1_ps(1.0f + 0.001f * (float)c);
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 10
        for (int c = 0; c < kAvx2Chains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    }
    __m256 s = acc[0];
    for (int c = 1; c < kAvx2Chains; ++c) s = _mm256_add_ps(s, acc[c]);
    g_sink = g_sink + (double)_mm256_cvtss_f32(s);
    return 16.0 * kAvx2Chains * (double)iters;
}

// The AVX2 int8 dot product as the kernels do it: vpmaddubsw (u8 x s8 -> s16 pairs),
// vpmaddwd with ones (-> s32), vpaddd. 32 multiply-adds per vpmaddubsw.
KTLAB_PEAK_AVX2 double peak_int8_avx2(int64_t iters) {
    constexpr int kChains = 8;
    __m256i acc[kChains];
    __m256i w[kChains];
    for (int c = 0; c < kChains; ++c) {
        acc[c] = _mm256_setzero_si256();
        w[c] = _mm256_set1_epi8((char)(c + 1));
    }
    __m256i x = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < iters; ++i) {
        __asm__ volatile("" : "+x"(x));  // x "changes" every iteration: nothing is hoisted
#pragma GCC unroll 8
        for (int c = 0; c < kChains; ++c) {
            acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(w[c], x), ones));
        }
    }
    __m256i s = acc[0];
    for (int c = 1; c < kChains; ++c) s = _mm256_add_epi32(s, acc[c]);
    g_sink = g_sink + (double)_mm256_extract_epi32(s, 0);
    return 64.0 * kChains * (double)iters;
}

// ---- AVX-512 --------------------------------------------------------------------------------

constexpr int kAvx512Chains = 12;

KTLAB_PEAK_AVX512 double peak_fp32_avx512(int64_t iters) {
    __m512 acc[kAvx512Chains];
    for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_set1_ps(1.0f + 0.001f * (float)c);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    }
    __m512 s = acc[0];
    for (int c = 1; c < kAvx512Chains; ++c) s = _mm512_add_ps(s, acc[c]);
    g_sink = g_sink + (double)_mm512_reduce_add_ps(s);
    return 32.0 * kAvx512Chains * (double)iters;
}

// vpdpbusd: 64 u8 x s8 multiply-adds into 16 int32 lanes.
KTLAB_PEAK_AVX512 double peak_int8_avx512(int64_t iters) {
    __m512i acc[kAvx512Chains];
    for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_set1_epi32(c);
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_dpbusd_epi32(acc[c], a, b);
    }
    __m512i s = acc[0];
    for (int c = 1; c < kAvx512Chains; ++c) s = _mm512_add_epi32(s, acc[c]);
    g_sink = g_sink + (double)_mm512_reduce_add_epi32(s);
    return 128.0 * kAvx512Chains * (double)iters;
}

// vdpbf16ps: 32 bf16 multiply-adds (pairs) into 16 fp32 lanes. (24 chains measured the same as
// 12 here: it is throughput-bound, about one every two cycles on this CPU.)
KTLAB_PEAK_AVX512BF16 double peak_bf16_avx512(int64_t iters) {
    __m512 acc[kAvx512Chains];
    for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_setzero_ps();
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0
    const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3400);  // 2^-23
    for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < kAvx512Chains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    __m512 s = acc[0];
    for (int c = 1; c < kAvx512Chains; ++c) s = _mm512_add_ps(s, acc[c]);
    g_sink = g_sink + (double)_mm512_reduce_add_ps(s);
    return 64.0 * kAvx512Chains * (double)iters;
}

// ---- AMX ------------------------------------------------------------------------------------
//
// Four accumulator tiles C0..C3 (tmm0-3, 16 x 16 int32/fp32), A tiles tmm4-5, B tiles tmm6-7,
// all 16 rows x 64 bytes: C[2i+j] += A[i] x B[j] per iteration, like a 2 x 2 register block
// of a tile GEMM. One tdpbssd is 16 x 16 x 64 multiply-adds, one tdpbf16ps 16 x 16 x 32.

struct alignas(64) PeakTileConfig {
    uint8_t palette_id = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

PeakTileConfig full_tiles() {
    PeakTileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    return cfg;
}

alignas(64) const uint8_t kTileOperand[16 * 64] = {};  // zeros: the values don't change the speed

// Accumulators C0..C3 zeroed, operands A4, A5, B6, B7 loaded: four independent tile FMAs per
// iteration (the loops below), so the tile unit never waits on a result.
__attribute__((target("amx-tile"))) inline void start_peak_tiles() {
    const PeakTileConfig cfg = full_tiles();
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, kTileOperand, 64);
    _tile_loadd(5, kTileOperand, 64);
    _tile_loadd(6, kTileOperand, 64);
    _tile_loadd(7, kTileOperand, 64);
}

// Store one accumulator (so the work is observable) and release the tiles.
__attribute__((target("amx-tile"))) inline void finish_peak_tiles() {
    alignas(64) int32_t c[16 * 16];
    _tile_stored(0, c, 64);
    _tile_release();
    g_sink = g_sink + (double)c[0];
}

KTLAB_PEAK_AMX_INT8 double peak_int8_amx(int64_t iters) {
    start_peak_tiles();
    for (int64_t i = 0; i < iters; ++i) {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    finish_peak_tiles();
    return 4.0 * 2.0 * 16 * 16 * 64 * (double)iters;
}

KTLAB_PEAK_AMX_BF16 double peak_bf16_amx(int64_t iters) {
    start_peak_tiles();
    for (int64_t i = 0; i < iters; ++i) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    finish_peak_tiles();
    return 4.0 * 2.0 * 16 * 16 * 32 * (double)iters;
}

#endif  // KTLAB_X86

using peak_fn = double (*)(int64_t);

// The loop for (isa, kind), or null when this CPU has none.
peak_fn peak_loop(Isa isa, PeakKind kind) {
    const CpuFeatures& f = cpu_features();
    (void)f;  // unused without the x86 paths
    switch (isa) {
        case Isa::scalar:
            if (kind == PeakKind::fp32) return peak_fp32_scalar;
            if (kind == PeakKind::int8) return peak_int8_scalar;
            return nullptr;
#if KTLAB_X86
        case Isa::avx2:
            if (!(f.avx2 && f.fma)) return nullptr;
            if (kind == PeakKind::fp32) return peak_fp32_avx2;
            if (kind == PeakKind::int8) return peak_int8_avx2;
            return nullptr;
        case Isa::avx512:
            if (!(f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni)) return nullptr;
            if (kind == PeakKind::fp32) return peak_fp32_avx512;
            if (kind == PeakKind::int8) return peak_int8_avx512;
            return f.avx512bf16 ? peak_bf16_avx512 : nullptr;
        case Isa::amx:
            if (!(f.amx_tile && f.amx_permitted)) return nullptr;
            if (kind == PeakKind::int8) return f.amx_int8 ? peak_int8_amx : nullptr;
            if (kind == PeakKind::bf16) return f.amx_bf16 ? peak_bf16_amx : nullptr;
            return nullptr;
#endif
        default:
            return nullptr;
    }
}

using Clock = std::chrono::steady_clock;

double elapsed_s(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

int resolve_threads(int threads) { return threads > 0 ? threads : default_num_threads(); }

}  // namespace

bool peak_supported(Isa isa, PeakKind kind) { return peak_loop(isa, kind) != nullptr; }

double run_peak(Isa isa, PeakKind kind, int threads, int64_t iters, double* seconds) {
    const peak_fn loop = peak_loop(isa, kind);
    if (!loop) throw std::invalid_argument("no peak loop of this kind on this ISA path");
    threads = resolve_threads(threads);
    std::vector<double> ops((size_t)threads, 0.0);
    ThreadPool& pool = global_pool(threads);
    const auto t0 = Clock::now();
    pool.parallel_for(threads, [&](int task) { ops[(size_t)task] = loop(iters); }, threads);
    *seconds = elapsed_s(t0);
    double total = 0.0;
    for (double v : ops) total += v;
    return total;
}

}  // namespace ktlab
