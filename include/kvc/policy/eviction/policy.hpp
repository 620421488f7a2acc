// kvc/policy/eviction/policy.hpp -- how an eviction policy is put together.
//
// An eviction policy is a scorer (E1-E18 in METHODS.md: how important is each
// token of a KV head), a budget (how many tokens each head keeps; sinks and a
// recent window always stay and count inside it), a selector (B1 per-head
// top-k by default) and a schedule (B9: when compression runs). The cache
// owns every piece of running state (accumulated attention, recent queries)
// per (layer, KV head), so policies stay small values.
//
//   using policy = kvc::evict::knorm;   // = evict::policy<score::knorm>
//   kvc::compressed_cache<policy, ...> cache(config, policy(kvc::evict::budget::ratio(0.25)));
//
// A default-constructed policy keeps everything (ratio 1): eviction starts
// only once a budget is given.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/kernels/table.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc::evict {

// How many tokens a KV head keeps after compression.
struct budget {
    double keep_ratio = 1.0;     // fraction of the tokens the head has seen (used when tokens == 0)
    std::size_t tokens = 0;      // absolute tokens per head; overrides keep_ratio when nonzero
    std::size_t sinks = 4;       // the first tokens of the sequence, always kept (attention sinks)
    std::size_t window = 16;     // the most recent tokens, always kept

    static budget ratio(double keep_ratio, std::size_t sinks = 4, std::size_t window = 16) {
        budget b;
        b.keep_ratio = keep_ratio;
        b.sinks = sinks;
        b.window = window;
        return b;
    }
    static budget absolute(std::size_t tokens, std::size_t sinks = 4, std::size_t window = 16) {
        budget b;
        b.tokens = tokens;
        b.sinks = sinks;
        b.window = window;
        return b;
    }

    // Tokens to keep for a head that holds `held` tokens and has seen `seen`.
    // Never below the protected sinks + window (the budget counts them), never above `held`.
    std::size_t target(std::size_t held, std::size_t seen) const noexcept {
        std::size_t want = tokens != 0 ? tokens
                                       : static_cast<std::size_t>(std::ceil(keep_ratio * static_cast<double>(seen)));
        want = std::max(want, sinks + window);
        return std::min(want, held);
    }

    void validate() const {
        detail::require(tokens != 0 || (keep_ratio > 0.0 && keep_ratio <= 1.0),
                        "evict::budget: expected keep_ratio in (0, 1] or tokens > 0, got keep_ratio ", keep_ratio);
        detail::require(tokens == 0 || tokens >= sinks + window, "evict::budget: tokens ", tokens,
                        " must be at least sinks + window = ", sinks + window, " (the budget counts them)");
    }
};

// When compression runs (B9). After the prompt: at the first decode append
// that follows chunked prefill (attend_chunk). During decode: whenever a head
// holds `interval` tokens more than its target, it goes back to the target.
// compress() runs it on demand.
struct schedule {
    bool after_prefill = true;
    std::size_t interval = 0; // 0: no decode-time compression
};

// What a scorer sees of one KV head. Rows are fp32, [tokens][dim], decoded
// from whatever the codec stores; pointers a scorer did not ask for are null.
struct head_inputs {
    std::size_t layer = 0, kv_head = 0;
    std::size_t tokens = 0, dim = 0;
    std::size_t target = 0;                    // tokens the selector will keep (two-stage scorers use it)
    const float* keys = nullptr;               // if Scorer::needs_keys
    const float* values = nullptr;             // if Scorer::needs_values
    const std::int32_t* positions = nullptr;   // original positions, ascending
    std::int64_t last_position = 0;            // newest position appended to the layer
    const float* attention = nullptr;          // running attention statistic (if needs_attention_stats)
    const float* queries = nullptr;            // recent queries of this head's group, [count][group][dim]
    std::size_t query_count = 0, group = 1;
    const float* external = nullptr;           // engine-supplied scores (E18)
    float scale = 1.0f;                        // the cache's attention logit scale
    const kernels::kernel_table* kernels = nullptr;
};

// B1: each head keeps its `target` best tokens; sinks and the recent window
// first. Ties go to the more recent token. Writes ascending indices.
struct per_head_topk {
    void select(const float* scores, const std::int32_t* positions, std::size_t held, std::size_t target,
                const budget& b, std::int64_t first_position, std::vector<std::uint32_t>& keep) const {
        keep.clear();
        if (target >= held) {
            keep.resize(held);
            std::iota(keep.begin(), keep.end(), 0u);
            return;
        }
        std::vector<std::uint32_t> order;
        order.reserve(held);
        std::vector<char> chosen(held, 0);
        std::size_t taken = 0;
        // Sinks: the first b.sinks positions of the sequence that the head still holds.
        for (std::size_t t = 0; t < held && positions[t] < first_position + static_cast<std::int64_t>(b.sinks); ++t)
            if (taken < target) chosen[t] = 1, ++taken;
        // The recent window.
        for (std::size_t i = 0; i < b.window && i < held && taken < target; ++i)
            if (!chosen[held - 1 - i]) chosen[held - 1 - i] = 1, ++taken;
        for (std::size_t t = 0; t < held; ++t)
            if (!chosen[t]) order.push_back(static_cast<std::uint32_t>(t));
        const std::size_t rest = target - taken;
        std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(rest), order.end(),
                          [&](std::uint32_t a, std::uint32_t c) {
                              const float sa = scores[a], sc = scores[c];
                              // NaN scores rank last, so a broken scorer cannot evict everything useful.
                              if (std::isnan(sa) != std::isnan(sc)) return std::isnan(sc);
                              return sa > sc || (sa == sc && a > c);
                          });
        for (std::size_t i = 0; i < rest; ++i) chosen[order[i]] = 1;
        for (std::size_t t = 0; t < held; ++t)
            if (chosen[t]) keep.push_back(static_cast<std::uint32_t>(t));
    }
};

// The policy type the eviction slot of compressed_cache takes.
template <class Scorer, class Selector = per_head_topk>
struct policy {
    using family = eviction_family;
    using scorer_type = Scorer;
    using selector_type = Selector;
    static constexpr bool evicts = true;
    static constexpr bool needs_attention_stats = Scorer::needs_attention_stats;
    static constexpr bool needs_queries = Scorer::query_window > 0;

    budget keep{};
    schedule when{};
    Scorer scorer{};
    Selector selector{};

    policy() = default;
    explicit policy(budget keep_budget, schedule when_to = {}, Scorer scorer_ = {}, Selector selector_ = {})
        : keep(keep_budget), when(when_to), scorer(std::move(scorer_)), selector(std::move(selector_)) {}

    void validate() const {
        keep.validate();
        if constexpr (has_validate<Scorer>::value) scorer.validate();
    }

private:
    template <class S, class = void>
    struct has_validate : std::false_type {};
    template <class S>
    struct has_validate<S, std::void_t<decltype(std::declval<const S&>().validate())>> : std::true_type {};
};

} // namespace kvc::evict
