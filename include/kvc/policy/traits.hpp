// kvc/policy/traits.hpp -- the four policy families and how a type joins one.
//
// A policy names its family with a nested `using family = kvc::eviction_family;`
// (or merging_family, quantization_family, projection_family). The traits
// below read that tag; C++20 builds also get concepts of the same names.
// compressed_cache static_asserts on the traits, so a policy put in the wrong
// slot fails to compile with a message naming the family the slot expects.
//
// Policies publish what the cache must collect for them, and the cache
// collects exactly that: needs_attention_stats (per-token attention mass from
// kvc's own fused attention, handed to the policy's observe()), needs_queries
// with query_window (a bounded window of recent queries), needs_calibration
// (an offline artifact given at construction), columns (per-token state,
// storage/token_columns.hpp).
//
// What the host lends a policy's stage for one layer (a `Layer` argument):
//   index(), config(), kernels()                 the layer, the model's shape, the active kernels
//   first_position(), last_position(), seen()    the sequence so far
//   byte_budget_tokens()                         tokens per head a byte budget buys (0: none)
//   held(h), rows(h), positions(h)               one KV head's token count, head store, positions
//   column<C>(h), mutable_column<C>(h)           a declared column (mutable: in observe only)
//   queries(h, most, out)                        the newest `most` recorded queries of head h's
//                                                GQA group, oldest first, [count][group][dim]
// A family that needs attention statistics provides
//   template <class Layer> void observe(const Layer&, const float* mass, std::size_t query_tokens) const noexcept;
// with mass holding, head after head, held(h) floats. A family that keeps
// state per appended token sets observes_append and provides
//   std::size_t append_scratch_floats(std::size_t dim) const noexcept;   // reserved before the append
//   template <class Layer, class K, class V>
//   void on_append(const Layer&, std::size_t count, const K& keys, const V& values, float* scratch) const noexcept;
// called once the new rows and columns are stored (the last `count` tokens of every head).
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/config.hpp"

namespace kvc {

struct eviction_family {
    static constexpr const char* name = "eviction";
};
struct merging_family {
    static constexpr const char* name = "merging";
};
struct quantization_family {
    static constexpr const char* name = "quantization";
};
struct projection_family {
    static constexpr const char* name = "projection";
};

namespace detail {
template <class P, class = void>
struct family_of {
    using type = void;
};
template <class P>
struct family_of<P, std::void_t<typename P::family>> {
    using type = typename P::family;
};

#define KVC_POLICY_FLAG(flag)                                                                      \
    template <class P, class = void>                                                               \
    struct flag##_of : std::false_type {};                                                         \
    template <class P>                                                                             \
    struct flag##_of<P, std::void_t<decltype(P::flag)>> : std::bool_constant<static_cast<bool>(P::flag)> {};
KVC_POLICY_FLAG(needs_attention_stats)
KVC_POLICY_FLAG(needs_queries)
KVC_POLICY_FLAG(needs_calibration)
KVC_POLICY_FLAG(observes_append)
#undef KVC_POLICY_FLAG

// The recent queries a policy needs the host to keep (needs_queries):
// `static constexpr std::size_t query_window`, 0 when it declares none.
template <class P, class = void>
struct query_window_of : std::integral_constant<std::size_t, 0> {};
template <class P>
struct query_window_of<P, std::void_t<decltype(P::query_window)>>
    : std::integral_constant<std::size_t, static_cast<std::size_t>(P::query_window)> {};

// A policy's (or a policy part's) parameter check, run by the cache at
// construction before anything is stored: `validate(const cache_config&)`
// when the part has it, else `validate()`, else nothing to check.
template <class P, class = void>
struct has_validate : std::false_type {};
template <class P>
struct has_validate<P, std::void_t<decltype(std::declval<const P&>().validate())>> : std::true_type {};
template <class P, class = void>
struct has_config_validate : std::false_type {};
template <class P>
struct has_config_validate<P, std::void_t<decltype(std::declval<const P&>().validate(std::declval<const cache_config&>()))>>
    : std::true_type {};
template <class P>
void validate_part(const P& part, const cache_config& config) {
    if constexpr (has_config_validate<P>::value) part.validate(config);
    else if constexpr (has_validate<P>::value) part.validate();
    else (void)part, (void)config;
}
} // namespace detail

template <class P>
using policy_family_t = typename detail::family_of<P>::type;

template <class P>
struct is_eviction_policy : std::is_same<policy_family_t<P>, eviction_family> {};
template <class P>
struct is_merging_policy : std::is_same<policy_family_t<P>, merging_family> {};
template <class P>
struct is_quantization_policy : std::is_same<policy_family_t<P>, quantization_family> {};
template <class P>
struct is_projection_policy : std::is_same<policy_family_t<P>, projection_family> {};

template <class P>
inline constexpr bool is_eviction_policy_v = is_eviction_policy<P>::value;
template <class P>
inline constexpr bool is_merging_policy_v = is_merging_policy<P>::value;
template <class P>
inline constexpr bool is_quantization_policy_v = is_quantization_policy<P>::value;
template <class P>
inline constexpr bool is_projection_policy_v = is_projection_policy<P>::value;

// What a policy asks the cache to collect (false when it does not say).
template <class P>
inline constexpr bool needs_attention_stats_v = detail::needs_attention_stats_of<P>::value;
template <class P>
inline constexpr bool needs_queries_v = detail::needs_queries_of<P>::value;
template <class P>
inline constexpr bool needs_calibration_v = detail::needs_calibration_of<P>::value;
template <class P>
inline constexpr std::size_t query_window_v = detail::query_window_of<P>::value;

// What a policy asks the host to collect, as values. The host reads them
// once, at construction: a policy type's constants above answer for it; a
// policy wrapping one chosen at run time (evict::policy over score::any)
// provides `policy_requests requests() const` and answers for what it holds.
// The constants stay what may be asked (the host compiles the collecting
// code only when some policy may ask); these say what is.
struct policy_requests {
    bool attention_stats = false;
    std::size_t query_window = 0;
};

namespace detail {
template <class P, class = void>
struct has_requests : std::false_type {};
template <class P>
struct has_requests<P, std::void_t<decltype(policy_requests{std::declval<const P&>().requests()})>> : std::true_type {};
struct probe_column {};
template <class P, class = void>
struct has_keeps_column : std::false_type {};
template <class P>
struct has_keeps_column<P, std::void_t<decltype(bool{std::declval<const P&>().template keeps_column<probe_column>()})>>
    : std::true_type {};
} // namespace detail

template <class P>
policy_requests requests_of(const P& policy) noexcept {
    if constexpr (detail::has_requests<P>::value) {
        return policy.requests();
    } else {
        (void)policy;
        policy_requests r;
        r.attention_stats = needs_attention_stats_v<P>;
        r.query_window = needs_queries_v<P> ? query_window_v<P> : 0;
        return r;
    }
}
// Whether a policy uses a column it declares: every one, unless it says
// otherwise through `template <class Column> bool keeps_column() const`.
template <class Column, class P>
bool keeps_column_of(const P& policy) noexcept {
    if constexpr (detail::has_keeps_column<P>::value) return policy.template keeps_column<Column>();
    else return (void)policy, true;
}

#if KVC_HAS_CONCEPTS
template <class P>
concept eviction_policy = is_eviction_policy_v<P>;
template <class P>
concept merging_policy = is_merging_policy_v<P>;
template <class P>
concept quantization_policy = is_quantization_policy_v<P>;
template <class P>
concept projection_policy = is_projection_policy_v<P>;
#endif

} // namespace kvc
