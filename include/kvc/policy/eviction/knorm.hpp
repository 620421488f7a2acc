// kvc/policy/eviction/knorm.hpp -- E7: keep the keys with the smallest L2 norm.
//
// Source: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
// Cache Compression" (2024): keys with low norm draw high attention, so
// s_t = -||k_t||_2. Attention-free and query-agnostic. Norms are taken of the
// keys as the cache stores them (after RoPE), as the paper does.
#pragma once

#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct knorm {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true, needs_values = false;
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t)
            scores[t] = -score_detail::norm(*in.kernels, in.keys + t * in.dim, in.dim);
    }
};
} // namespace score
using knorm = policy<score::knorm>;
} // namespace kvc::evict
