// kvc/policy/eviction/streaming.hpp -- E1 StreamingLLM: attention sinks plus a recent window.
//
// Source: Xiao et al., "Efficient Streaming Language Models with Attention
// Sinks" (2023). Keeps the first `budget.sinks` tokens (4 by default) and the
// most recent tokens; nothing else. Here the score is recency, so whatever the
// budget leaves after the sinks is filled with the newest tokens: the window
// is the budget minus the sinks, as in the paper.
#pragma once

#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {
struct streaming {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = static_cast<float>(in.positions[t]);
    }
};
} // namespace score
using streaming = policy<score::streaming>;
} // namespace kvc::evict
