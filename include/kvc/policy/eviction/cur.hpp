// kvc/policy/eviction/cur.hpp -- E13 CUR-style leverage of keys and values.
//
// Source: the CUR decomposition view of KV selection (row leverage from
// norms, as in kvpress's CURPress). s_t = ||k_t||^2 * ||v_t||^2, normalised by
// its sum inside consecutive windows of 16 tokens (so every stretch of the
// sequence competes on its own scale); the first 4 tokens are kept by the
// budget's sinks. Choices where the source leaves them open: windows are
// counted over the tokens the head holds, in order; ||k_t||^2 ||v_t||^2 is
// taken once, at append, of the rows the model produced (not the codec's
// reconstruction), so compression reads one float per token.
#pragma once

#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct cur {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    static constexpr bool scores_on_append = true;
    std::size_t window = 16;

    void validate() const { detail::require(window > 0, "evict::score::cur: expected window > 0, got 0"); }

    float on_append(const kernels::kernel_table& k, const float* key, const float* value,
                    std::size_t dim) const noexcept {
        constexpr int f32 = kernels::index_of(dtype::f32);
        return k.dot[f32](key, key, dim) * k.dot[f32](value, value, dim);
    }

    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.appended[t];
        for (std::size_t w0 = 0; w0 < in.tokens; w0 += window) {
            const std::size_t end = w0 + window < in.tokens ? w0 + window : in.tokens;
            float sum = 0.0f;
            for (std::size_t t = w0; t < end; ++t) sum += scores[t];
            if (sum > 0.0f)
                for (std::size_t t = w0; t < end; ++t) scores[t] /= sum;
        }
    }
};
} // namespace score
using cur = policy<score::cur>;
} // namespace kvc::evict
