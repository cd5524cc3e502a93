// The fused MoE layer forward: out[t] = sum over the owned (t, slot) of
//     weights[t, slot] * down_e(silu(gate_e x_t) * up_e x_t),   e = ids[t, slot],
// for x [T, H] fp32, ids/weights [T, k], and a mask of the experts this call owns (the
// others run elsewhere, e.g. on the GPU, and are skipped here).
//
// Weights: where the path has kernels for a repacked layout of the format (KernelTable::packed:
// Q8_0 -> Q8_0x16 on every path, BF16 -> BF16x16 where avx512_bf16 is, the K-quants ->
// Q4_Kx16 / Q5_Kx16 / Q6_Kx16 on every path), the constructor re-lays every matrix whose row
// count is a multiple of 16 once, into memory the layer owns (the raw bytes are then no longer
// read); otherwise the kernels read the raw GGUF rows. The AMX tile
// kernels also pack the *activations*, once per expert per call. One call, per chunk of up
// to kChunkTokens tokens:
//   1. group: (token, slot) pairs counted and ordered by expert, then by token and slot, so
//      an expert's pairs are consecutive ("positions"), each weight matrix is read once per
//      chunk and reused across its tokens;
//   2. quantize x once per token to the gate/up activation format (all paths share the
//      scalar quantizers, so every path sees the same activations);
//   3. gate/up tasks (expert, block of I rows): G, U for the expert's tokens, h = silu(G) * U,
//      quantized straight into the down projection's activation format;
//   4. down: decode-sized calls (up to kFewPositions positions) run tasks (expert, block of H
//      rows), so each task streams one long run of one expert's rows, into a [positions, H]
//      buffer, then out[t] = sum over slots, in slot order, of weight * output; bigger calls
//      run tasks (block of H rows, every expert), each summing its own block. Both give the
//      same bits: every output is the same dot product, summed in the same order.
// The task partition and each task's arithmetic depend on the shapes and the chunk only, and
// every output value is computed by exactly one task, so results are bit-identical for any
// thread count. Tasks are taken from the pool's atomic counter, big experts first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "isa.h"
#include "threadpool.h"

namespace ktlab {

// E expert matrices of [rows, cols] (cols = the dot-product length), consecutive in memory,
// each row `cols / block_values * block_bytes` bytes of `fmt` (the GGUF layout), or of the
// format's repacked layout when `packed` (format_packed_block_bytes per block).
struct ExpertMatrix {
    WFormat fmt = WFormat::q8_0;
    const uint8_t* data = nullptr;
    int rows = 0;
    int cols = 0;
    bool packed = false;

    size_t row_bytes() const {
        const int block = packed ? format_packed_block_bytes(fmt) : format_block_bytes(fmt);
        return (size_t)(cols / format_block_values(fmt)) * (size_t)block;
    }
    size_t expert_bytes() const { return row_bytes() * (size_t)rows; }
    const uint8_t* expert(int e) const { return data + expert_bytes() * (size_t)e; }
};

// The expert MLP around the three products, where it is not plain SwiGLU without biases (gpt-oss):
// optional per-expert biases added to gate and up before the activation and to down's output
// before the routing weight, and the clamped SwiGLU h = (min(max(u, -limit), limit) + 1) *
// g' * sigmoid(alpha g') with g' = min(g, limit) when `clamped` (else silu(g) * u).
struct ExpertMlp {
    bool clamped = false;
    float alpha = 1.702f;
    float limit = 7.0f;
    const float* gate_bias = nullptr;  // [E, I] or null
    const float* up_bias = nullptr;    // [E, I] or null
    const float* down_bias = nullptr;  // [E, H] or null
};

class MoeLayer {
public:
    // gate, up: [E][I, H]; down: [E][H, I]. gate and up share a format. Throws
    // std::invalid_argument on inconsistent shapes (the Python side checks first). The
    // weight memory is borrowed and must outlive the layer.
    MoeLayer(int n_experts, int hidden, int inter, ExpertMatrix gate, ExpertMatrix up, ExpertMatrix down, Isa isa,
             int threads);
    ~MoeLayer() = default;  // async_ waits for a pending call first
    MoeLayer(const MoeLayer&) = delete;
    MoeLayer& operator=(const MoeLayer&) = delete;

    // x [T, H], ids [T, k] int32, weights [T, k], owned [E] (nullptr: all) -> out [T, H]
    // (overwritten; tokens with no owned slot get zeros). Throws std::invalid_argument for an
    // expert id outside [0, E) before any work.
    void forward(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned, int64_t n_tokens,
                 int top_k, float* out);
    // forward() on the background thread; returns at once. The arrays must stay alive and
    // untouched until sync(). Throws std::logic_error while a call is pending.
    void submit(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned, int64_t n_tokens,
                int top_k, float* out);
    // Waits for the submitted call; rethrows its error. std::logic_error if none is pending.
    void sync() { async_.wait(); }
    bool pending() const { return async_.pending(); }

    // g, u [m, I]: expert e's gate and up products of m rows x [m, H], as forward computes them (the
    // same activations and kernels; no biases). For training's backward; on the layer's threads.
    void expert_gate_up(int e, const float* x, int m, float* g, float* u) const;

    // Sets the MLP form (default: SwiGLU, no biases). The bias arrays are borrowed and must outlive
    // the layer. Not while a call is pending.
    void set_mlp(const ExpertMlp& mlp) { mlp_ = mlp; }

    Isa isa() const { return isa_; }
    int threads() const { return threads_; }

    static constexpr int kChunkTokens = 1024;

private:
    void repack_weights();
    void run_chunk(const float* x, const int32_t* ids, const float* weights, const uint8_t* owned, int n_tokens,
                   int top_k, float* out);

    int n_experts_, hidden_, inter_;
    ExpertMatrix gate_, up_, down_;
    ExpertMlp mlp_;
    Isa isa_;
    int threads_;
    int rows_gu_;    // rows of I per gate/up task
    int rows_down_;  // rows of H per down task
    const FormatKernels* k_gu_;    // the kernels for gate/up and down as stored (raw or packed)
    const FormatKernels* k_down_;
    struct FreeBytes {
        void operator()(uint8_t* p) const;
    };
    std::unique_ptr<uint8_t, FreeBytes> repacked_;  // owned repacked weights; may be null

    // Per-chunk buffers, kept between calls (one call at a time per layer).
    std::vector<int32_t> count_, offset_, fill_, pos_of_, tok_of_, order_;
    std::vector<std::pair<int, int>> gu_tasks_, down_tasks_;  // (expert, first row)
    std::vector<float> y_down_;  // [positions, H]: down outputs of decode-sized calls before the slot sums
    std::vector<uint8_t> xq_, hq_, packed_gu_, packed_down_;
    std::vector<size_t> pack_off_gu_, pack_off_down_;  // per expert; SIZE_MAX: not packed

    AsyncCall async_;  // last member: destroyed (waiting for a pending call) first
};

}  // namespace ktlab
