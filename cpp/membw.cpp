// STREAM-like read bandwidth (see peak.h): a sum over a large buffer, split in contiguous
// slices over the kernel pool, with the widest loads the CPU has and the kernels' software
// prefetch distance, so it measures what the MoE kernels could stream at best.
#include <algorithm>
#include <chrono>
#include <vector>

#include "peak.h"
#include "threadpool.h"

#if KTLAB_X86
// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_*().
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define KTLAB_MEMBW_AVX2 __attribute__((target("avx2")))
#define KTLAB_MEMBW_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512vl")))
#endif

namespace ktlab {

namespace {

uint64_t sum_generic(const uint8_t* p, size_t bytes) {
    const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= bytes / 8; i += 4) {
        s0 += w[i];
        s1 += w[i + 1];
        s2 += w[i + 2];
        s3 += w[i + 3];
    }
    return s0 + s1 + s2 + s3;
}

#if KTLAB_X86
// 256 bytes per step: four independent 512-bit load+add chains, prefetching kPrefetchBytes
// ahead (the distance the kernels use).
KTLAB_MEMBW_AVX512 uint64_t sum_avx512(const uint8_t* p, size_t bytes) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= bytes; i += 256) {
        _mm_prefetch((const char*)p + i + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)p + i + kPrefetchBytes + 64, _MM_HINT_T0);
        _mm_prefetch((const char*)p + i + kPrefetchBytes + 128, _MM_HINT_T0);
        _mm_prefetch((const char*)p + i + kPrefetchBytes + 192, _MM_HINT_T0);
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(p + i + 64));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(p + i + 128));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(p + i + 192));
    }
    const __m512i s = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
    return (uint64_t)_mm512_reduce_add_epi64(s) + sum_generic(p + i, bytes - i);
}

KTLAB_MEMBW_AVX2 uint64_t sum_avx2(const uint8_t* p, size_t bytes) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
        _mm_prefetch((const char*)p + i + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch((const char*)p + i + kPrefetchBytes + 64, _MM_HINT_T0);
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i*)(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i*)(p + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i*)(p + i + 96)));
    }
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256((__m256i*)lanes, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_generic(p + i, bytes - i);
}
#endif

using sum_fn = uint64_t (*)(const uint8_t*, size_t);

sum_fn widest_sum() {
#if KTLAB_X86
    const CpuFeatures& f = cpu_features();
    if (f.avx512f && f.avx512bw && f.avx512vl) return sum_avx512;
    if (f.avx2) return sum_avx2;
#endif
    return sum_generic;
}

}  // namespace

uint64_t read_sum(const uint8_t* data, size_t bytes, int threads, double* seconds) {
    if (threads <= 0) threads = default_num_threads();
    const sum_fn sum = widest_sum();
    const size_t lines = bytes / 64;
    std::vector<uint64_t> partial((size_t)threads, 0);
    ThreadPool& pool = global_pool(threads);
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(
        threads,
        [&](int task) {
            const size_t l0 = lines * (size_t)task / (size_t)threads;
            const size_t l1 = lines * (size_t)(task + 1) / (size_t)threads;
            partial[(size_t)task] = sum(data + l0 * 64, (l1 - l0) * 64);
        },
        threads);
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    uint64_t total = 0;
    for (uint64_t v : partial) total += v;
    return total;
}

uint64_t read_regions(const uint8_t* const* ptrs, const size_t* sizes, int n, int threads, double* seconds) {
    constexpr size_t kChunk = 1 << 20;
    struct Piece {
        const uint8_t* p;
        size_t bytes;
    };
    std::vector<Piece> pieces;
    for (int i = 0; i < n; ++i) {
        for (size_t off = 0; off < sizes[i]; off += kChunk) {
            pieces.push_back({ptrs[i] + off, std::min(kChunk, sizes[i] - off)});
        }
    }
    const sum_fn sum = widest_sum();
    std::vector<uint64_t> partial(pieces.size(), 0);
    const auto t0 = std::chrono::steady_clock::now();
    run_parallel_ranges((int)pieces.size(), threads, [&](int task) {
        partial[(size_t)task] = sum(pieces[(size_t)task].p, pieces[(size_t)task].bytes);
    });
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    uint64_t total = 0;
    for (uint64_t v : partial) total += v;
    return total;
}

}  // namespace ktlab
