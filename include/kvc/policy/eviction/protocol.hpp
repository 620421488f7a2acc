// kvc/policy/eviction/protocol.hpp -- what a scorer and a selector are, and what the host hands them.
//
// An eviction policy (evict::policy<Scorer, Selector>) is assembled in
// policy.hpp; this header is the contract between its parts and the cache.
//
// Scorer, required (check_scorer<S>() names the first one missing):
//   static constexpr bool needs_attention_stats;  the host keeps a float per token of running
//                                                 attention state and calls observe() after
//                                                 every attention of the layer
//   static constexpr std::size_t query_window;    recent queries the host keeps (0: none)
//   static constexpr bool needs_keys, needs_values;  rows decoded to fp32 before score()
//   void score(const head_inputs&, float* scores) const;  one score per held token
//   void observe(float* state, const float* mass, std::size_t tokens, std::size_t queries) const noexcept
//                                                 (only when needs_attention_stats)
// Scorer, optional:
//   validate(const cache_config&) or validate()  (policy/traits.hpp)
//   needs_external_scores                       host keeps engine-written scores per token (E18)
//   scores_on_append + on_append / on_append_rows   scores computed at append (below)
// Selector, required (check_selector<S>()):
//   static constexpr bool uses_target;          false: ignores the budget's token targets
//   void select(const layer_candidates&, std::vector<std::vector<std::uint32_t>>& keep) const;
//                                               ascending kept indices per head
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvc/kernels/table.hpp"
#include "kvc/storage/token_columns.hpp"

namespace kvc::evict {

struct budget;

// Scorers whose score of a token depends on nothing but that token's key and
// value (knorm, CUR) compute it once, at append, from the rows the model
// produced, while they are still in cache: compression then reads one float
// per token instead of decoding every row of the head (16 MiB of fp32 for a
// 32K-token head of dim 128). Such a scorer declares
//   static constexpr bool scores_on_append = true;
//   float on_append(const kernels::kernel_table&, const float* key, const float* value,
//                   std::size_t dim) const noexcept;
// and reads the results in head_inputs::appended. The cache keeps them per
// token through compaction, and bytes() counts them.
template <class S, class = void>
struct scores_on_append_of : std::false_type {};
template <class S>
struct scores_on_append_of<S, std::void_t<decltype(S::scores_on_append)>> : std::bool_constant<S::scores_on_append> {};

// The head's stored rows, decoded on request: [first, first + count) widened
// to fp32 into `out`, [count][dim]. Scorers that make one or two passes over
// the rows (keydiff, lagkv) read them in tiles through this instead of asking
// for every row decoded at once (needs_keys), which writes and reads back
// 16 MiB of fp32 per 32K-token head of dim 128.
struct row_source {
    const void* head = nullptr;
    void (*keys)(const void* head, const kernels::kernel_table&, std::size_t first, std::size_t count,
                 float* out) = nullptr;
    void (*values)(const void* head, const kernels::kernel_table&, std::size_t first, std::size_t count,
                   float* out) = nullptr;

    template <class Head>
    static row_source of(const Head& head) noexcept {
        row_source source;
        source.head = &head;
        source.keys = [](const void* h, const kernels::kernel_table& k, std::size_t first, std::size_t count,
                         float* out) { static_cast<const Head*>(h)->decode_keys(k, first, count, out); };
        source.values = [](const void* h, const kernels::kernel_table& k, std::size_t first, std::size_t count,
                           float* out) { static_cast<const Head*>(h)->decode_values(k, first, count, out); };
        return source;
    }
};

// A scorer whose token scores need their neighbours' rows (LagKV measures a
// chunk against the chunk after it) declares scores_on_append and, instead of
// on_append, scores once per head after an append's rows are stored:
//   std::size_t append_scratch(std::size_t dim) const noexcept;  // floats of scratch it needs
//   void on_append_rows(const append_inputs&, float* scores) const noexcept;
// `scores` holds the head's per-token append scores, [held]; the scorer sets
// the new tokens' [held_before, held) and may rewrite older ones (a chunk
// that can be scored now). The cache reserves the scratch before the append
// changes anything, so the call cannot fail.
struct append_inputs {
    std::size_t held_before = 0, held = 0, dim = 0;
    const std::int32_t* positions = nullptr; // of the held tokens, ascending
    std::int64_t first_position = 0;         // the sequence's first position (where the sinks are)
    const row_source* rows = nullptr;
    const kernels::kernel_table* kernels = nullptr;
    float* scratch = nullptr; // append_scratch(dim) floats
};
template <class S, class = void>
struct scores_append_rows_of : std::false_type {};
template <class S>
struct scores_append_rows_of<S, std::void_t<decltype(std::declval<const S&>().on_append_rows(
                                    std::declval<const append_inputs&>(), std::declval<float*>()))>> : std::true_type {};

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
    const float* appended = nullptr;           // what on_append returned per token (if Scorer::scores_on_append)
    const row_source* rows = nullptr;          // the stored rows, decoded in tiles on request (always set)
    float scale = 1.0f;                        // the cache's attention logit scale
    const kernels::kernel_table* kernels = nullptr;
};

// What a selector sees of one KV head and of a layer.
struct head_candidates {
    const float* scores = nullptr;
    const std::int32_t* positions = nullptr;
    std::size_t held = 0;
    std::size_t target = 0; // the budget's tokens for this head
};
struct layer_candidates {
    std::size_t layer = 0;
    std::vector<head_candidates> heads; // every KV head of the layer (held == 0 or target >= held: nothing to drop)
    const budget* keep = nullptr;
    std::int64_t first_position = 0;    // position of the sequence's first token (the sinks)
};

template <class S, class = void>
struct needs_external_scores_of : std::false_type {};
template <class S>
struct needs_external_scores_of<S, std::void_t<decltype(S::needs_external_scores)>>
    : std::bool_constant<S::needs_external_scores> {};

// The per-token columns (storage/token_columns.hpp) an eviction policy asks
// the host to keep, from what its scorer declares.
namespace column {
struct attention_state { // running attention statistic, updated by Scorer::observe (needs_attention_stats)
    using value_type = float;
    static constexpr value_type initial = 0.0f;
};
struct external_score { // written by the engine through external_scores() (needs_external_scores)
    using value_type = float;
    static constexpr value_type initial = 0.0f;
};
struct append_score { // what on_append / on_append_rows computed (scores_on_append)
    using value_type = float;
    static constexpr value_type initial = 0.0f;
};
} // namespace column

template <class Scorer>
using scorer_columns_t =
    column_union_t<std::conditional_t<Scorer::needs_attention_stats, column_list<column::attention_state>, column_list<>>,
                   std::conditional_t<needs_external_scores_of<Scorer>::value, column_list<column::external_score>,
                                      column_list<>>,
                   std::conditional_t<scores_on_append_of<Scorer>::value, column_list<column::append_score>,
                                      column_list<>>>;

// A scorer that computes its append scores token by token (not by on_append_rows).
template <class S, class = void>
struct scores_each_append_of : std::false_type {};
template <class S>
struct scores_each_append_of<S, std::void_t<decltype(std::declval<const S&>().on_append(
                                    std::declval<const kernels::kernel_table&>(), std::declval<const float*>(),
                                    std::declval<const float*>(), std::size_t{}))>> : std::true_type {};

// A token-by-token append scorer that also takes a block of rows in one call
// (score::any: one indirect call a block instead of one a token):
//   void on_append_block(kernels, keys, values, count, dim, scores)   rows [count][dim], fp32
template <class S, class = void>
struct scores_append_blocks_of : std::false_type {};
template <class S>
struct scores_append_blocks_of<S, std::void_t<decltype(std::declval<const S&>().on_append_block(
                                      std::declval<const kernels::kernel_table&>(), std::declval<const float*>(),
                                      std::declval<const float*>(), std::size_t{}, std::size_t{},
                                      std::declval<float*>()))>> : std::true_type {};

// What a scorer asks for, as values. A scorer type's constants say it
// (needs_of reads them, at compile time); a scorer chosen at run time
// (score::any) declares every request possible and answers `needs()` with
// those of the scorer it holds, which the eviction policy then follows.
struct scorer_needs {
    bool attention_stats = false;
    std::size_t query_window = 0;
    bool keys = false, values = false;
    bool external_scores = false;
    bool scores_on_append = false; // by on_append_rows when append_rows, else token by token
    bool append_rows = false;
};
template <class S, class = void>
struct has_runtime_needs : std::false_type {};
template <class S>
struct has_runtime_needs<S, std::void_t<decltype(scorer_needs{std::declval<const S&>().needs()})>> : std::true_type {};
template <class S>
constexpr scorer_needs needs_of(const S& scorer) noexcept {
    if constexpr (has_runtime_needs<S>::value) {
        return scorer.needs();
    } else {
        (void)scorer;
        scorer_needs needs;
        needs.attention_stats = S::needs_attention_stats;
        needs.query_window = S::query_window;
        needs.keys = S::needs_keys;
        needs.values = S::needs_values;
        needs.external_scores = needs_external_scores_of<S>::value;
        needs.scores_on_append = scores_on_append_of<S>::value;
        needs.append_rows = scores_on_append_of<S>::value && scores_append_rows_of<S>::value;
        return needs;
    }
}

// Whether a selector uses the budget's targets, and whether it keeps the
// same length in every head (what key re-rotation needs): a selector type's
// constants, or, for a selector chosen at run time (select::any), its answers.
template <class S, class = void>
struct has_runtime_targets : std::false_type {};
template <class S>
struct has_runtime_targets<S, std::void_t<decltype(bool{std::declval<const S&>().targets()})>> : std::true_type {};
template <class S>
constexpr bool uses_target_of(const S& selector) noexcept {
    if constexpr (has_runtime_targets<S>::value) return selector.targets();
    else return (void)selector, S::uses_target;
}

namespace protocol_detail {
template <class S, class = void>
struct has_score : std::false_type {};
template <class S>
struct has_score<S, std::void_t<decltype(std::declval<const S&>().score(std::declval<const head_inputs&>(),
                                                                           std::declval<float*>()))>> : std::true_type {};
template <class S, class = void>
struct has_observe : std::false_type {};
template <class S>
struct has_observe<S, std::void_t<decltype(std::declval<const S&>().observe(
                          std::declval<float*>(), std::declval<const float*>(), std::size_t{}, std::size_t{}))>>
    : std::true_type {};
template <class S, class = void>
struct has_scorer_flags : std::false_type {};
template <class S>
struct has_scorer_flags<S, std::void_t<decltype(bool{S::needs_attention_stats}), decltype(std::size_t{S::query_window}),
                                       decltype(bool{S::needs_keys}), decltype(bool{S::needs_values})>>
    : std::true_type {};
template <class S, class = void>
struct has_select : std::false_type {};
template <class S>
struct has_select<S, std::void_t<decltype(bool{S::uses_target}),
                                 decltype(std::declval<const S&>().select(
                                     std::declval<const layer_candidates&>(),
                                     std::declval<std::vector<std::vector<std::uint32_t>>&>()))>> : std::true_type {};
} // namespace protocol_detail

template <class S>
constexpr bool check_scorer() {
    static_assert(protocol_detail::has_scorer_flags<S>::value,
                  "kvc eviction scorer protocol: missing one of `static constexpr bool needs_attention_stats`, "
                  "`static constexpr std::size_t query_window`, `static constexpr bool needs_keys, needs_values`");
    static_assert(protocol_detail::has_score<S>::value,
                  "kvc eviction scorer protocol: missing `void score(const head_inputs&, float* scores) const`");
    if constexpr (protocol_detail::has_scorer_flags<S>::value) {
        static_assert(!S::needs_attention_stats || protocol_detail::has_observe<S>::value,
                      "kvc eviction scorer protocol: needs_attention_stats without `void observe(float* state, "
                      "const float* mass, std::size_t tokens, std::size_t queries) const noexcept`");
    }
    return true;
}

template <class S>
constexpr bool check_selector() {
    static_assert(protocol_detail::has_select<S>::value,
                  "kvc eviction selector protocol: missing `static constexpr bool uses_target` or `void "
                  "select(const layer_candidates&, std::vector<std::vector<std::uint32_t>>& keep) const`");
    return true;
}

} // namespace kvc::evict
