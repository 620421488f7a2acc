// kvc/policy/merging/protocol.hpp -- what a merging policy is, and what the
// host hands its stage of compress.
//
// Merging (METHODS.md M*) folds what eviction drops into what it keeps. The
// host runs it inside compress, between the eviction plan and compaction,
// one KV head at a time, for every head the plan drops tokens from:
//
//   eviction.plan(layer) -> kept indices per head
//   merger.fold(layer, h, plan)     reads the head's rows and columns, may add
//                                   dropped tokens to plan.kept (the slots its
//                                   folds land in) and lists rows to rewrite
//   compaction of plan.kept         a new store and new columns, in their own memory
//   store_row(...) per rewrite      the codec re-encodes the merged rows
//   merger.settle(plan, columns)    writes its columns of the new head (counts, log-count bias)
//   swap                            the only step that changes the cache
//
// Every step before the swap may throw and leaves the layer as it was (the
// strong guarantee of compress holds with a merger too).
//
// A merging policy has `using family = kvc::merging_family;` and
// `static constexpr bool merges` (false: the slot is decorative, as
// merge::none). One that merges provides
//   template <class Layer> void fold(const Layer&, std::size_t kv_head, merge_plan&) const;
//   template <class Columns> void settle(const merge_plan&, Columns& compacted) const noexcept;
// Layer is the host's read view (policy/traits.hpp); Columns the new head's
// token_columns, numbered as plan.kept. It may also declare what every
// family may: columns, needs_attention_stats + observe, needs_queries +
// query_window, observes_append + on_append, validate(const cache_config&).
// The cache's codec must offer store_row (storage/protocol.hpp): a merger
// writes rows the codec has to encode; the cache refuses the pairing at
// compile time otherwise.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/policy/traits.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc::merge {

// One head's merge, built by the host and the merger together.
struct merge_plan {
    // In: the eviction plan's kept indices (ascending). The merger may insert
    // dropped indices (they must stay ascending and unique): those tokens are
    // kept as slots, their rows rewritten below.
    std::vector<std::uint32_t>& kept;
    // Rows the merger replaces, as positions in `kept` (the new head's
    // numbering), with their new key and value rows, fp32 [rewritten][dim],
    // in the model's space (before any codec transform).
    std::vector<std::uint32_t> rewritten;
    std::vector<float> keys, values;
    // How many original tokens each rewritten slot stands for, for settle().
    std::vector<float> counts;

    explicit merge_plan(std::vector<std::uint32_t>& kept_indices) noexcept : kept(kept_indices) {}

    // Appends one rewritten slot (kept position `at`) with its rows and count.
    void rewrite(std::uint32_t at, const float* key, const float* value, std::size_t dim, float count) {
        rewritten.push_back(at);
        keys.insert(keys.end(), key, key + dim);
        values.insert(values.end(), value, value + dim);
        counts.push_back(count);
    }
};

// The indices of [0, held) missing from ascending `kept`: what the plan drops.
inline std::vector<std::uint32_t> dropped_of(const std::vector<std::uint32_t>& kept, std::size_t held) {
    std::vector<std::uint32_t> dropped;
    dropped.reserve(held - kept.size());
    std::size_t next = 0;
    for (std::size_t t = 0; t < held; ++t) {
        if (next < kept.size() && kept[next] == t) ++next;
        else dropped.push_back(static_cast<std::uint32_t>(t));
    }
    return dropped;
}

// settle() of a merger whose counts live in the bias column alone: each
// rewritten slot weighs log(count) (exp(bias) = count).
template <class Columns>
void write_log_counts(const merge_plan& plan, Columns& columns) noexcept {
    float* bias = columns.template data<attention_bias_column>();
    for (std::size_t i = 0; i < plan.rewritten.size(); ++i) bias[plan.rewritten[i]] = std::log(plan.counts[i]);
}

} // namespace kvc::merge

namespace kvc::detail {

template <class P, class = void>
struct merges_of : std::false_type {};
template <class P>
struct merges_of<P, std::void_t<decltype(P::merges)>> : std::bool_constant<static_cast<bool>(P::merges)> {};

// A probe of the stage members: a Layer and Columns that accept any call.
struct any_layer {};
struct any_columns {};
template <class P, class = void>
struct has_fold : std::false_type {};
template <class P>
struct has_fold<P, std::void_t<decltype(std::declval<const P&>().fold(
                       std::declval<const any_layer&>(), std::size_t{}, std::declval<merge::merge_plan&>()))>>
    : std::true_type {};
template <class P, class = void>
struct has_settle : std::false_type {};
template <class P>
struct has_settle<P, std::void_t<decltype(std::declval<const P&>().settle(std::declval<const merge::merge_plan&>(),
                                                                          std::declval<any_columns&>()))>>
    : std::true_type {};

// Compile-time check of a merging policy, each missing member named.
template <class P>
constexpr bool check_merger() {
    static_assert(is_merging_policy_v<P>, "kvc merging protocol: missing `using family = kvc::merging_family;`");
    if constexpr (merges_of<P>::value) {
        static_assert(has_fold<P>::value, "kvc merging protocol: a policy with `merges = true` needs "
                                          "`template <class Layer> void fold(const Layer&, std::size_t kv_head, "
                                          "kvc::merge::merge_plan&) const`");
        static_assert(has_settle<P>::value, "kvc merging protocol: a policy with `merges = true` needs "
                                            "`template <class Columns> void settle(const kvc::merge::merge_plan&, "
                                            "Columns&) const noexcept`");
    }
    return true;
}

} // namespace kvc::detail
