// kvc/policy/eviction/snapkv.hpp -- E5 SnapKV and E6 TOVA: scores from recent queries.
//
// Sources: Li et al., "SnapKV: LLM Knows What You are Looking for Before
// Generation" (2024); Oren et al., "Transformers are Multi-State RNNs" (TOVA, 2024).
//
// SnapKV: the last `window` (64) queries the cache saw (the end of the
// prompt, when compression runs after prefill) vote: s_t = mean over those
// queries and the GQA group of softmax(q . k_t * scale), then 1-D average
// pooling over t (kernel 5, edges averaged over the taps that exist). The
// observation window's own tokens are kept through the budget's recent window
// (set budget.window >= the query window to follow the paper exactly).
// TOVA: the attention of the most recent query alone, averaged over the group.
// The cache keeps the recent queries only because these scorers ask for them.
#pragma once

#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {

struct snapkv {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 64;
    static constexpr bool needs_keys = true, needs_values = false;
    std::size_t window = query_window; // queries that vote (at most query_window)
    std::size_t pool = 5;              // odd pooling kernel; 1 disables pooling

    void validate() const {
        detail::require(window >= 1 && window <= query_window, "evict::score::snapkv: expected window in 1..",
                        query_window, ", got ", window);
        detail::require(pool % 2 == 1, "evict::score::snapkv: expected an odd pooling kernel, got ", pool);
    }
    void score(const head_inputs& in, float* scores) const {
        std::vector<float> votes(in.tokens);
        score_detail::mean_query_attention(in, window, votes.data());
        const std::ptrdiff_t half = static_cast<std::ptrdiff_t>(pool / 2);
        const std::ptrdiff_t n = static_cast<std::ptrdiff_t>(in.tokens);
        for (std::ptrdiff_t t = 0; t < n; ++t) {
            float sum = 0.0f;
            int taps = 0;
            for (std::ptrdiff_t j = t - half; j <= t + half; ++j)
                if (j >= 0 && j < n) sum += votes[static_cast<std::size_t>(j)], ++taps;
            scores[t] = sum / static_cast<float>(taps);
        }
    }
};

struct tova {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 1;
    static constexpr bool needs_keys = true, needs_values = false;
    void score(const head_inputs& in, float* scores) const { score_detail::mean_query_attention(in, 1, scores); }
};

} // namespace score
using snapkv = policy<score::snapkv>;
using tova = policy<score::tova>;
} // namespace kvc::evict
