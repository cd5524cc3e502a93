// CPU feature detection and the dispatch table. See isa.h.
#include "isa.h"
#include "kquant.h"
#include "mxfp4.h"

#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#if KTLAB_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace ktlab {

namespace {

#if KTLAB_X86
uint64_t read_xcr0() {
    uint32_t eax = 0, edx = 0;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((uint64_t)edx << 32) | eax;
}

// Ask Linux for permission to use AMX tile data (XFEATURE_XTILEDATA = 18). Process-wide.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr long kArchGetXcompPerm = 0x1022;  // ARCH_GET_XCOMP_PERM
    constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
    return (bitmask & (1ul << kXfeatureXtiledata)) != 0;
#else
    return false;
#endif
}

CpuFeatures detect() {
    CpuFeatures f;
    __builtin_cpu_init();
    uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
    const bool osxsave = (ecx >> 27) & 1;
    const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
    const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
    const bool os_zmm = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
    const bool os_tile_cfg = (xcr0 & (1ull << 17)) != 0;  // XTILECFG enabled by the OS

    f.fma = os_ymm && __builtin_cpu_supports("fma");
    f.f16c = os_ymm && ((ecx >> 29) & 1);
    f.avx2 = os_ymm && __builtin_cpu_supports("avx2");
    f.avx512f = os_zmm && __builtin_cpu_supports("avx512f");
    f.avx512bw = os_zmm && __builtin_cpu_supports("avx512bw");
    f.avx512vl = os_zmm && __builtin_cpu_supports("avx512vl");
    f.avx512vnni = os_zmm && __builtin_cpu_supports("avx512vnni");

    uint32_t max_leaf = __get_cpuid_max(0, nullptr);
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, eax, ebx, ecx, edx);
        f.amx_bf16 = (edx >> 22) & 1;
        f.amx_tile = (edx >> 24) & 1;
        f.amx_int8 = (edx >> 25) & 1;
        const uint32_t max_subleaf = eax;
        if (max_subleaf >= 1) {
            __cpuid_count(7, 1, eax, ebx, ecx, edx);
            f.avx512bf16 = os_zmm && ((eax >> 5) & 1);
        }
    }
    if (!os_tile_cfg) f.amx_tile = f.amx_int8 = f.amx_bf16 = false;
    if (f.amx_tile && f.amx_int8) f.amx_permitted = request_amx_permission();
    return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

bool hardware_supports(const CpuFeatures& f, Isa isa) {
    switch (isa) {
        case Isa::scalar:
            return true;
        case Isa::avx2:
            return f.avx2 && f.fma && f.f16c;
        case Isa::avx512:
            return hardware_supports(f, Isa::avx2) && f.avx512f && f.avx512bw && f.avx512vl &&
                   f.avx512vnni;
        case Isa::amx:  // the AMX kernels also use the AVX-512 path (tails, scaling)
            return hardware_supports(f, Isa::avx512) && f.amx_tile && f.amx_int8 && f.amx_permitted;
    }
    return false;
}

std::string lower_trim(const char* s) {
    std::string out;
    if (!s) return out;
    for (const char* p = s; *p; ++p) {
        if (!std::isspace((unsigned char)*p)) out.push_back((char)std::tolower((unsigned char)*p));
    }
    return out;
}

// Bit i set: path i disabled by KTLAB_ISA_DISABLE.
unsigned disabled_mask() {
    static const unsigned mask = [] {
        unsigned m = 0;
        std::string all = lower_trim(std::getenv("KTLAB_ISA_DISABLE"));
        size_t start = 0;
        while (start <= all.size()) {
            size_t comma = all.find(',', start);
            if (comma == std::string::npos) comma = all.size();
            std::string item = all.substr(start, comma - start);
            Isa isa;
            if (!item.empty() && isa_from_name(item.c_str(), &isa) && isa != Isa::scalar) {
                m |= 1u << (int)isa;
            }
            start = comma + 1;
        }
        return m;
    }();
    return mask;
}

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures features = detect();
    return features;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::scalar: return "scalar";
        case Isa::avx2: return "avx2";
        case Isa::avx512: return "avx512";
        case Isa::amx: return "amx";
    }
    return "?";
}

bool isa_from_name(const char* name, Isa* out) {
    if (!name) return false;
    for (int i = 0; i < kNumIsa; ++i) {
        if (std::strcmp(name, isa_name((Isa)i)) == 0) {
            *out = (Isa)i;
            return true;
        }
    }
    return false;
}

bool isa_disabled(Isa isa) { return isa != Isa::scalar && ((disabled_mask() >> (int)isa) & 1); }

bool isa_available(Isa isa) {
    if (isa_disabled(isa)) return false;
    return hardware_supports(cpu_features(), isa);
}

Isa best_isa() {
    for (int i = kNumIsa - 1; i > 0; --i) {
        if (isa_available((Isa)i)) return (Isa)i;
    }
    return Isa::scalar;
}

const char* forced_isa_env() {
    static const std::string value = lower_trim(std::getenv("KTLAB_ISA"));
    return value.c_str();
}

int resolve_isa(const char* name, Isa* out) {
    std::string wanted = lower_trim(name);
    if (wanted.empty()) wanted = forced_isa_env();
    if (wanted.empty()) {
        *out = best_isa();
        return kResolveOk;
    }
    Isa isa;
    if (!isa_from_name(wanted.c_str(), &isa)) return kResolveUnknown;
    if (!isa_available(isa)) return kResolveUnavailable;
    *out = isa;
    return kResolveOk;
}

// ---- the dispatch table: the one place that maps a path to its kernels -------------------
//
// Entries a path has no kernel of its own for reuse the next path down (what is there is
// correct, just not specialised): raw Q4_K and Q6_K rows on AVX-512 and AMX run the 256-bit
// AVX2 row kernels, raw Q5_K rows the scalar one (K-quant rows in 16s are repacked instead).
// Where a kernel needs a feature beyond the path's baseline (avx512_bf16, amx_bf16), the entry
// is picked here from cpu_features().

namespace {

// Tile kernels pay for their packing once an expert has this many activation rows
// (16 fill a tile; below 4 the AVX-512 row kernels win). Untuned: rough.
constexpr int kAmxMinRows = 4;
// The AVX-512 Q8_0x16 kernel converts the activations per gemm call below this many rows,
// and reads them converted once per expert (the pack step) from here on.
constexpr int kVnniPackMinRows = 4;

KernelTable make_table(Isa isa) {
    const CpuFeatures& f = cpu_features();
    const gemm_fn bf16_avx512 = f.avx512bf16 ? bf16_gemm_avx512bf16 : bf16_gemm_avx512;
    // Q8_0 and BF16 repacked at load (Q8_0x16, BF16x16: quant.h) where the path has kernels
    // for it (BF16x16 needs avx512_bf16 on AVX-512 and AMX; without it BF16 stays raw); the
    // scalar path too, so that its twins of those kernels are the reference the tests use.
    // AVX2 has its own kernel for that layout (eight rows a ymm, no horizontal sums).
    // K-quants are repacked on every path (Q4_Kx16, Q5_Kx16, Q6_Kx16: kquant.h); AMX runs the
    // AVX-512 VNNI kernels for them.
    const FormatKernels none{nullptr};
    const FormatKernels dense_q8_0x16_avx512{q8_0x16_gemm_avx512, q8_0x16_pack_avx512, q8_0x16_pack_bytes_avx512, 1,
                                             repack_q8_0x16};
    const FormatKernels bf16_packed_avx512 =
        f.avx512bf16 ? FormatKernels{bf16x16_gemm_avx512bf16, nullptr, nullptr, 0, repack_bf16x16} : none;
    auto kx16 = [](gemm_fn q4, gemm_fn q5, gemm_fn q6) {  // the packed K-quant entries of a path
        return std::array<FormatKernels, 3>{FormatKernels{q4, nullptr, nullptr, 0, repack_q4_kx16},
                                            FormatKernels{q5, nullptr, nullptr, 0, repack_q5_kx16},
                                            FormatKernels{q6, nullptr, nullptr, 0, repack_q6_kx16}};
    };
    const auto kx16_avx512 = kx16(q4_kx16_gemm_avx512, q5_kx16_gemm_avx512, q6_kx16_gemm_avx512);
    // Raw-row kernels by format (order of WFormat: q8_0, q4_k, q6_k, bf16, q5_k, mxfp4).
    auto raw = [](gemm_fn q8, gemm_fn q4, gemm_fn q6, gemm_fn bf16) {
        return std::array<FormatKernels, kNumFormats>{FormatKernels{q8}, FormatKernels{q4}, FormatKernels{q6},
                                                      FormatKernels{bf16}, FormatKernels{q5_k_gemm_scalar},
                                                      FormatKernels{mxfp4_gemm_scalar}};
    };
    // MXFP4 (mxfp4.h) is repacked to MXFP4x16 on every path; AMX runs the AVX-512 kernel.
    auto packed = [](FormatKernels q8, FormatKernels bf16, const std::array<FormatKernels, 3>& k, gemm_fn mxfp4) {
        return std::array<FormatKernels, kNumFormats>{
            q8, k[0], k[2], bf16, k[1], FormatKernels{mxfp4, nullptr, nullptr, 0, repack_mxfp4x16}};
    };
    KernelTable t{isa, nullptr, nullptr, nullptr, nullptr, {}, {}, none};
    auto fill = [&](const std::array<FormatKernels, kNumFormats>& fmt, const std::array<FormatKernels, kNumFormats>& pk) {
        for (int i = 0; i < kNumFormats; ++i) {
            t.fmt[i] = fmt[i];
            t.packed[i] = pk[i];
        }
    };
    switch (isa) {
        case Isa::scalar:
            t.q8_0_gemv_rows = q8_0_gemv_rows_scalar;
            t.q8_0_gemm_rows = q8_0_gemm_rows_scalar;
            t.quantize_q8_act = quantize_row_q8_act;
            t.quantize_q8_K = quantize_row_q8_K;
            fill(raw(q8_0_gemm_scalar, q4_k_gemm_scalar, q6_k_gemm_scalar, bf16_gemm_scalar),
                 packed({q8_0x16_gemm_scalar, nullptr, nullptr, 0, repack_q8_0x16},
                        {bf16x16_gemm_scalar, nullptr, nullptr, 0, repack_bf16x16},
                        kx16(q4_kx16_gemm_scalar, q5_kx16_gemm_scalar, q6_kx16_gemm_scalar), mxfp4x16_gemm_scalar));
            t.dense_q8_0 = {q8_0x16_gemm_scalar, nullptr, nullptr, 0, repack_q8_0x16};
            return t;
        case Isa::avx2:
            t.q8_0_gemv_rows = q8_0_gemv_rows_avx2;
            t.q8_0_gemm_rows = q8_0_gemm_rows_avx2;
            t.quantize_q8_act = quantize_row_q8_act_avx2;
            t.quantize_q8_K = quantize_row_q8_K_avx2;
            fill(raw(q8_0_gemm_avx2, q4_k_gemm_avx2, q6_k_gemm_avx2, bf16_gemm_avx2),
                 packed({q8_0x16_gemm_avx2, nullptr, nullptr, 1, repack_q8_0x16}, none,
                        kx16(q4_kx16_gemm_avx2, q5_kx16_gemm_avx2, q6_kx16_gemm_avx2), mxfp4x16_gemm_avx2));
            t.dense_q8_0 = {q8_0x16_gemm_avx2, nullptr, nullptr, 1, repack_q8_0x16};
            return t;
        case Isa::avx512:
            t.q8_0_gemv_rows = q8_0_gemv_rows_avx512;
            t.q8_0_gemm_rows = q8_0_gemm_rows_avx512;
            t.quantize_q8_act = quantize_row_q8_act_avx512;
            t.quantize_q8_K = quantize_row_q8_K_avx512;
            fill(raw(q8_0_gemm_avx512, q4_k_gemm_avx2, q6_k_gemm_avx2, bf16_avx512),
                 packed({q8_0x16_gemm_avx512, q8_0x16_pack_avx512, q8_0x16_pack_bytes_avx512, kVnniPackMinRows,
                         repack_q8_0x16},
                        bf16_packed_avx512, kx16_avx512, mxfp4x16_gemm_avx512));
            t.dense_q8_0 = dense_q8_0x16_avx512;
            return t;
        case Isa::amx: {
            // The BF16 tile kernel falls back to the vdpbf16ps one below kAmxMinRows tokens.
            const FormatKernels bf16 = f.amx_bf16 && f.avx512bf16
                ? FormatKernels{bf16x16_gemm_amx, bf16x16_pack_amx, bf16x16_pack_bytes_amx, kAmxMinRows, repack_bf16x16}
                : bf16_packed_avx512;
            t.q8_0_gemv_rows = q8_0_gemv_rows_amx;
            t.q8_0_gemm_rows = q8_0_gemm_rows_amx;
            t.quantize_q8_act = quantize_row_q8_act_avx512;
            t.quantize_q8_K = quantize_row_q8_K_avx512;
            fill(raw(q8_0_gemm_avx512, q4_k_gemm_avx2, q6_k_gemm_avx2, bf16_avx512),
                 packed({q8_0x16_gemm_amx, q8_0x16_pack_amx, q8_0x16_pack_bytes_amx, kAmxMinRows, repack_q8_0x16},
                        bf16, kx16_avx512, mxfp4x16_gemm_avx512));
            t.dense_q8_0 = dense_q8_0x16_avx512;
            return t;
        }
    }
    return make_table(Isa::scalar);
}

}  // namespace

const KernelTable& kernels_for(Isa isa) {
    static const KernelTable table[kNumIsa] = {
        make_table(Isa::scalar),
        make_table(Isa::avx2),
        make_table(Isa::avx512),
        make_table(Isa::amx),
    };
    int i = (int)isa;
    if (i < 0 || i >= kNumIsa) i = 0;
    return table[i];
}

}  // namespace ktlab
