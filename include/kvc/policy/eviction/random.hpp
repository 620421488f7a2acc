// kvc/policy/eviction/random.hpp -- E17: uniform random scores, the floor every scorer must beat.
//
// Deterministic: the score of a token is a hash of (seed, layer, KV head,
// position), so runs repeat exactly and a token's score does not change
// between compressions.
#pragma once

#include <cstdint>

#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {
struct random {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    std::uint64_t seed = 0x6b7663u;

    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) {
            std::uint64_t x = seed ^ (static_cast<std::uint64_t>(in.layer) << 48) ^
                              (static_cast<std::uint64_t>(in.kv_head) << 32) ^
                              static_cast<std::uint32_t>(in.positions[t]);
            // splitmix64 finaliser
            x += 0x9e3779b97f4a7c15ull;
            x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
            x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
            x ^= x >> 31;
            scores[t] = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
        }
    }
};
} // namespace score
using random = policy<score::random>;
} // namespace kvc::evict
