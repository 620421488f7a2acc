// kvc/policy/eviction/keydiff.hpp -- E8 KeyDiff: keep the keys least like the average key.
//
// Source: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for
// Long-Context LLM Inference in Resource-Constrained Environments" (2025).
// s_t = -cos(k_t, a) with a = mean_t(k_t / ||k_t||), the anchor over the keys
// the head holds at compression time. Zero keys get cosine 0. The keys are
// read in tiles of 64 rows, twice (anchor, then cosines), instead of being
// widened to fp32 all at once.
#pragma once

#include <algorithm>
#include <vector>

#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct keydiff {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false; // reads the rows in tiles (two passes)
    void score(const head_inputs& in, float* scores) const {
        const kernels::kernel_table& k = *in.kernels;
        constexpr int f32 = kernels::index_of(dtype::f32);
        constexpr std::size_t tile = 64;
        std::vector<float> anchor(in.dim, 0.0f), rows(tile * in.dim);
        // Pass 1: norms (kept in `scores` until pass 2) and the anchor.
        for (std::size_t t0 = 0; t0 < in.tokens; t0 += tile) {
            const std::size_t count = std::min(tile, in.tokens - t0);
            in.rows->keys(in.rows->head, k, t0, count, rows.data());
            for (std::size_t i = 0; i < count; ++i) {
                const float* key = rows.data() + i * in.dim;
                const float norm = score_detail::norm(k, key, in.dim);
                scores[t0 + i] = norm;
                if (norm > 0.0f) k.axpy[f32](1.0f / norm, key, anchor.data(), in.dim);
            }
        }
        const float anchor_norm = score_detail::norm(k, anchor.data(), in.dim);
        // Pass 2: s_t = -cos(k_t, anchor).
        for (std::size_t t0 = 0; t0 < in.tokens; t0 += tile) {
            const std::size_t count = std::min(tile, in.tokens - t0);
            in.rows->keys(in.rows->head, k, t0, count, rows.data());
            for (std::size_t i = 0; i < count; ++i) {
                const float denominator = scores[t0 + i] * anchor_norm;
                const float cosine =
                    denominator > 0.0f ? k.dot[f32](anchor.data(), rows.data() + i * in.dim, in.dim) / denominator
                                       : 0.0f;
                scores[t0 + i] = -cosine;
            }
        }
    }
};
} // namespace score
using keydiff = policy<score::keydiff>;
} // namespace kvc::evict
