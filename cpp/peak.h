// Machine microbenchmarks for `ktlab bench-experts`: compute peaks per ISA path and a
// STREAM-like read bandwidth. They give the "% of ISA peak" and "% of measured read
// bandwidth" columns, so they run the same pool, the same threads and the same kind of
// instructions as the MoE kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"

namespace ktlab {

// What a peak loop multiplies: int8 dot products (AVX2 vpmaddubsw+vpmaddwd, AVX-512 VNNI
// vpdpbusd, AMX tdpbssd), bf16 dot products (AVX-512 vdpbf16ps, AMX tdpbf16ps) or fp32 FMA.
// The scalar path is compiled for the baseline target and auto-vectorized, so its loops are
// the baseline's SIMD (x86-64: SSE2 pmaddwd, mulps + addps). A multiply-add counts as 2 ops.
enum class PeakKind : int { fp32 = 0, int8 = 1, bf16 = 2 };

// Whether `isa` has a loop of this kind on this CPU (bf16 needs avx512bf16 / amx-bf16; AMX has
// no fp32 loop). Does not check that the path itself is available: callers resolve it first.
bool peak_supported(Isa isa, PeakKind kind);

// Runs `iters` iterations of the register-resident loop on each of `threads` threads of the
// global pool (threads <= 0: default_num_threads()) and returns the ops done by all of them;
// *seconds gets the wall time of the whole run. Throws std::invalid_argument when the pair is
// not supported.
double run_peak(Isa isa, PeakKind kind, int threads, int64_t iters, double* seconds);

// Sums `bytes` bytes (a multiple of 64) as uint64 words, split in contiguous slices over
// `threads` threads of the global pool, with the widest loads this CPU has and software
// prefetch like the kernels; returns the sum (so the reads can't be optimised away) and
// writes the wall time to *seconds.
uint64_t read_sum(const uint8_t* data, size_t bytes, int threads, double* seconds);

// Reads the n regions (ptrs[i], sizes[i] bytes) once, in 1 MiB tasks handed out in per-thread
// ranges like the kernels' (run_parallel_ranges), with the same loads as read_sum; returns the
// sum and writes the wall time to *seconds. Reading the very bytes a step read (its experts and
// dense weights, where they live) is the step's bandwidth-bound ideal at that moment.
uint64_t read_regions(const uint8_t* const* ptrs, const size_t* sizes, int n, int threads, double* seconds);

}  // namespace ktlab
