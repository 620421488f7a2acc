// kvc/policy/eviction/scissorhands.hpp -- E4 Scissorhands: persistence of importance.
//
// Source: Liu et al., "Scissorhands: Exploiting the Persistence of Importance
// Hypothesis for LLM KV Cache Compression at Test Time" (NeurIPS 2023).
// Tokens that drew more than their share of attention in the recent past keep
// drawing it. Over a history window of recent queries, each token counts how
// often a query gave it more than the uniform level 1/t (t = tokens that query
// could see); the highest counts stay. Counting "above uniform" is the
// complement of the paper's "below average" count, with tokens a query could
// not see counted as not above, as the paper's causal mask does.
//
// Choices where the source and kvc leave room:
// - Exact per-query counts, computed at compression time from the recorded
//   queries (query_window = 64 newest), not from the running attention mass.
//   kvc's fused attention emits, per call, the mass summed over the GQA group
//   and over all queries of a prefill chunk, and keeps one float per token:
//   from that sum one cannot tell one query putting all its weight on a token
//   from many queries each putting a little above uniform, which is exactly
//   the distinction this method rests on, and one float cannot hold a sliding
//   history. The price is `history x group` dot products per held token at
//   compression (SnapKV's cost) and the query ring (window x query heads x dim
//   floats per layer), which the cache keeps only because this scorer asks.
// - Each query head of the group counts separately (a count over the group,
//   i.e. the group mean up to a factor); t is the held tokens the query could
//   see (causal prefix, see scorer_helpers.hpp for how positions are inferred).
// - Ties in the count are broken by the mean attention over the history,
//   scaled into [0, 0.5] so it never overturns a count.
// - The newest tokens are seen by fewer queries of the history, as in the
//   paper; set budget.window to at least `history` to keep them outright, as
//   the paper's recent window does.
#pragma once

#include <cstddef>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/scorer_helpers.hpp"

namespace kvc::evict {
namespace score {

struct scissorhands {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 64;
    static constexpr bool needs_keys = true, needs_values = false;
    std::size_t history = query_window; // recent queries that count (at most query_window)

    void validate() const {
        detail::require(history >= 1 && history <= query_window, "evict::score::scissorhands: expected history in 1..",
                        query_window, ", got ", history);
    }
    void score(const head_inputs& in, float* scores) const {
        std::vector<float> count(in.tokens, 0.0f), mass(in.tokens, 0.0f);
        const std::size_t rows =
            score_detail::for_each_recent_attention(in, history, [&](const float* probability, std::size_t visible) {
                const float uniform = 1.0f / static_cast<float>(visible);
                for (std::size_t t = 0; t < visible; ++t) {
                    count[t] += probability[t] > uniform ? 1.0f : 0.0f;
                    mass[t] += probability[t];
                }
            });
        const float tie_break = rows ? 0.5f / static_cast<float>(rows) : 0.0f;
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = count[t] + tie_break * mass[t];
    }
};

} // namespace score
using scissorhands = policy<score::scissorhands>;
} // namespace kvc::evict
