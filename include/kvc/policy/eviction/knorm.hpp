// kvc/policy/eviction/knorm.hpp -- E7: keep the keys with the smallest L2 norm.
//
// Source: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
// Cache Compression" (2024): keys with low norm draw high attention, so
// s_t = -||k_t||_2. Attention-free and query-agnostic.
//
// Choices: the norm is taken once, at append, of the key the model produced
// (RoPE leaves norms unchanged, so before or after rotation is the same),
// not of the codec's reconstruction: a quantized cache ranks by the true
// keys, and compression reads one float per token instead of every key.
#pragma once

#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct knorm {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    static constexpr bool scores_on_append = true;
    float on_append(const kernels::kernel_table& k, const float* key, const float*, std::size_t dim) const noexcept {
        return -score_detail::norm(k, key, dim);
    }
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.appended[t];
    }
};
} // namespace score
using knorm = policy<score::knorm>;
} // namespace kvc::evict
