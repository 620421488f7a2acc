// kvc/policy/eviction/h2o.hpp -- E2 H2O (heavy hitters) and E3 A2SF (forgetting factor).
//
// Sources: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
// Inference of Large Language Models" (2023); Jo & Shin, "A2SF: Accumulative
// Attention Scoring with Forgetting Factor" (2024); ZipCache (He et al., 2024)
// for the normalisation.
//
// The statistic is the attention probability each token received, summed over
// the KV head's query group, as kvc's fused attention emits it (no second
// pass). H2O adds it up over every query; with `normalize`, the sum is divided
// by the number of queries that could see the token (newest position - token
// position + 1), which removes the causal bias towards old tokens. A2SF decays
// the running sum by `forgetting` per query before adding; a chunk of c
// prefill queries decays it by forgetting^c at once (kvc sees a chunk's
// attention summed, not query by query: the choice made here).
#pragma once

#include <cmath>

#include "kvc/core/error.hpp"
#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict {
namespace score {

struct h2o {
    static constexpr bool needs_attention_stats = true;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    bool normalize = false;

    // state[t] accumulates the attention the token got; `queries` new queries contributed `mass`.
    void observe(float* state, const float* mass, std::size_t tokens, std::size_t /*queries*/) const noexcept {
        for (std::size_t t = 0; t < tokens; ++t) state[t] += mass[t];
    }
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) {
            const double seen = static_cast<double>(in.last_position - in.positions[t] + 1);
            scores[t] = normalize ? static_cast<float>(in.attention[t] / seen) : in.attention[t];
        }
    }
};

struct a2sf {
    static constexpr bool needs_attention_stats = true;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = false, needs_values = false;
    float forgetting = 0.99f; // 1 is H2O

    void validate() const {
        detail::require(forgetting > 0.0f && forgetting <= 1.0f,
                        "evict::score::a2sf: expected forgetting factor in (0, 1], got ", forgetting);
    }
    void observe(float* state, const float* mass, std::size_t tokens, std::size_t queries) const noexcept {
        const float decay = std::pow(forgetting, static_cast<float>(queries));
        for (std::size_t t = 0; t < tokens; ++t) state[t] = decay * state[t] + mass[t];
    }
    void score(const head_inputs& in, float* scores) const noexcept {
        for (std::size_t t = 0; t < in.tokens; ++t) scores[t] = in.attention[t];
    }
};

} // namespace score
using h2o = policy<score::h2o>;
using a2sf = policy<score::a2sf>;
} // namespace kvc::evict
