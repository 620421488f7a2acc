// kvc/policy/eviction/global_local.hpp -- E16 global-local importance (EMS).
//
// Source: Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise
// KV Cache Compression Based on Global-Local Importance" (2024,
// arXiv:2412.08521). Accumulated attention over every query (H2O's global
// view) favours old tokens and misses what the current text is about;
// attention of the last few queries (the local view) misses tokens that matter
// throughout. The score blends both, each normalised to sum 1 over the head:
//
//   s_t = lambda * global_t / sum(global) + (1 - lambda) * local_t / sum(local)
//
// Parameters: lambda = 0.5 (equal weight); window = 32 local queries
// (query_window, the ring the cache keeps for this scorer). Pairs with M3
// (EMS merges what it evicts).
//
// Choices where the source leaves room:
// - global: attention mass from kvc's fused attention (observe), summed over
//   the GQA group and over every query since the token arrived, as h2o.
// - local: the newest `window` recorded queries' attention, recomputed
//   exactly at compression time over the held tokens each could see (causal),
//   summed over the queries and the group.
// - A view with zero total (no query recorded yet, no attention observed)
//   drops out instead of dividing by zero.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct global_local {
    static constexpr bool needs_attention_stats = true;
    static constexpr std::size_t query_window = 32;
    static constexpr bool needs_keys = true, needs_values = false;
    float lambda = 0.5f;                // weight of the global view
    std::size_t window = query_window;  // local queries (at most query_window)

    void validate() const {
        detail::require(lambda >= 0.0f && lambda <= 1.0f, "evict::score::global_local: expected lambda in [0, 1], got ",
                        lambda);
        detail::require(window >= 1 && window <= query_window, "evict::score::global_local: expected window in 1..",
                        query_window, ", got ", window);
    }
    void observe(float* state, const float* mass, std::size_t tokens, std::size_t /*queries*/) const noexcept {
        for (std::size_t t = 0; t < tokens; ++t) state[t] += mass[t];
    }
    void score(const head_inputs& in, float* scores) const {
        std::vector<float> local(in.tokens, 0.0f);
        score_detail::for_each_recent_attention(in, window, [&](const float* probability, std::size_t visible) {
            for (std::size_t t = 0; t < visible; ++t) local[t] += probability[t];
        });
        double global_sum = 0.0, local_sum = 0.0;
        for (std::size_t t = 0; t < in.tokens; ++t) global_sum += in.attention[t], local_sum += local[t];
        const float global_weight = global_sum > 0.0 ? static_cast<float>(lambda / global_sum) : 0.0f;
        const float local_weight = local_sum > 0.0 ? static_cast<float>((1.0 - lambda) / local_sum) : 0.0f;
        for (std::size_t t = 0; t < in.tokens; ++t)
            scores[t] = global_weight * in.attention[t] + local_weight * local[t];
    }
};

} // namespace score
using global_local = policy<score::global_local>;
} // namespace kvc::evict
