// Row-wise ops between a layer's matmuls (see rowops.h).
#include "rowops.h"

#include <cmath>
#include <vector>

#include "threadpool.h"

namespace ktlab {

namespace {

constexpr int kLanes = 16;           // independent partial sums per reduction
constexpr int kRowsPerTask = 16;     // rows (tokens) per pool task

// sum(x[i]^2): kLanes partial sums, added pairwise at the end (a fixed order).
inline float sum_squares(const float* x, int n) {
    float acc[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * x[i + l];
    }
    for (int l = 0; i < n; ++i, ++l) acc[l] += x[i] * x[i];
    for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    }
    return acc[0];
}

inline void rms_norm_row(const float* x, const float* w, float* out, int n, float eps) {
    const float inv = 1.0f / std::sqrt(sum_squares(x, n) / (float)n + eps);
    for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// out = rope(rms_norm(x)) for one head of hd values; tmp: hd floats of scratch.
inline void norm_rope_head(const float* x, const float* w, const float* cos, const float* sin, int hd, float eps,
                           float* tmp, float* out) {
    rms_norm_row(x, w, tmp, hd, eps);
    const int half = hd / 2;
    for (int i = 0; i < half; ++i) out[i] = tmp[i] * cos[i] + (-tmp[i + half]) * sin[i];
    for (int i = half; i < hd; ++i) out[i] = tmp[i] * cos[i] + tmp[i - half] * sin[i];
}

template <class F>
void over_row_blocks(int64_t rows, int threads, F&& rows_fn) {
    const int tasks = (int)((rows + kRowsPerTask - 1) / kRowsPerTask);
    run_parallel(tasks, threads, [&](int task) {
        const int64_t r0 = (int64_t)task * kRowsPerTask;
        rows_fn(r0, rows < r0 + kRowsPerTask ? rows : r0 + kRowsPerTask);
    });
}

}  // namespace

void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int n, float eps, int threads) {
    over_row_blocks(rows, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) rms_norm_row(x + r * n, w, out + r * n, n, eps);
    });
}

void qk_norm_rope(const float* qkv, int64_t stride, int64_t n_tokens, int nh, int nkv, int hd, const float* q_norm,
                  const float* k_norm, const float* cos, const float* sin, float eps, float* q_out, float* k_out,
                  int threads) {
    over_row_blocks(n_tokens, threads, [&](int64_t t0, int64_t t1) {
        std::vector<float> tmp(hd);
        for (int64_t t = t0; t < t1; ++t) {
            const float* row = qkv + t * stride;
            const float* c = cos + t * hd;
            const float* s = sin + t * hd;
            for (int h = 0; h < nh; ++h) {
                norm_rope_head(row + (int64_t)h * hd, q_norm, c, s, hd, eps, tmp.data(), q_out + (t * nh + h) * hd);
            }
            for (int h = 0; h < nkv; ++h) {
                norm_rope_head(row + (int64_t)(nh + h) * hd, k_norm, c, s, hd, eps, tmp.data(),
                               k_out + (t * nkv + h) * hd);
            }
        }
    });
}

void route_topk(const float* logits, int64_t rows, int n_experts, int top_k, bool norm_topk, int64_t* ids,
                float* weights) {
    std::vector<float> probs(n_experts);
    std::vector<char> taken(n_experts);
    for (int64_t r = 0; r < rows; ++r) {
        const float* l = logits + r * n_experts;
        float mx = l[0];
        for (int e = 1; e < n_experts; ++e) mx = l[e] > mx ? l[e] : mx;
        float sum = 0.0f;
        for (int e = 0; e < n_experts; ++e) {
            probs[e] = std::exp(l[e] - mx);
            sum += probs[e];
        }
        for (int e = 0; e < n_experts; ++e) probs[e] /= sum;
        std::fill(taken.begin(), taken.end(), 0);
        int64_t* id = ids + r * top_k;
        float* wt = weights + r * top_k;
        float picked = 0.0f;
        for (int j = 0; j < top_k; ++j) {  // k passes of argmax: k * E compares, E is ~100
            int best = -1;
            for (int e = 0; e < n_experts; ++e) {
                if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
            }
            taken[best] = 1;
            id[j] = best;
            wt[j] = probs[best];
            picked += probs[best];
        }
        if (norm_topk) {
            for (int j = 0; j < top_k; ++j) wt[j] /= picked;
        }
    }
}

}  // namespace ktlab
