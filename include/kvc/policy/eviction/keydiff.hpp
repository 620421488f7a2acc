// kvc/policy/eviction/keydiff.hpp -- E8 KeyDiff: keep the keys least like the average key.
//
// Source: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for
// Long-Context LLM Inference in Resource-Constrained Environments" (2025).
// s_t = -cos(k_t, a) with a = mean_t(k_t / ||k_t||), the anchor over the keys
// the head holds at compression time. Zero keys get cosine 0.
#pragma once

#include <vector>

#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct keydiff {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true, needs_values = false;
    void score(const head_inputs& in, float* scores) const {
        const kernels::kernel_table& k = *in.kernels;
        constexpr int f32 = kernels::index_of(dtype::f32);
        std::vector<float> anchor(in.dim, 0.0f), norms(in.tokens);
        for (std::size_t t = 0; t < in.tokens; ++t) {
            norms[t] = score_detail::norm(k, in.keys + t * in.dim, in.dim);
            if (norms[t] > 0.0f) k.axpy[f32](1.0f / norms[t], in.keys + t * in.dim, anchor.data(), in.dim);
        }
        const float anchor_norm = score_detail::norm(k, anchor.data(), in.dim);
        for (std::size_t t = 0; t < in.tokens; ++t) {
            const float denominator = norms[t] * anchor_norm;
            const float cosine = denominator > 0.0f
                                     ? k.dot[f32](anchor.data(), in.keys + t * in.dim, in.dim) / denominator
                                     : 0.0f;
            scores[t] = -cosine;
        }
    }
};
} // namespace score
using keydiff = policy<score::keydiff>;
} // namespace kvc::evict
