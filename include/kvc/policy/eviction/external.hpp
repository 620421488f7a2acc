// kvc/policy/eviction/external.hpp -- E18: scores the engine computed itself.
//
// For methods whose scores come from outside the cache: KVzip's context
// reconstruction pass, a draft model's attention (SpecKV), a learned scorer.
// The engine writes one score per held token into
// cache.external_scores(layer, kv_head) (in the order of cache.positions)
// before compression runs; tokens it never scored keep 0. The cache keeps the
// scores aligned with the tokens through compaction.
#pragma once

#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {
struct external {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    static constexpr bool needs_external_scores = true;
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.external[t];
    }
};
} // namespace score
using external = policy<score::external>;
} // namespace kvc::evict
