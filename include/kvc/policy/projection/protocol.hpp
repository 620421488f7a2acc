// kvc/policy/projection/protocol.hpp -- what a projection policy is, and what
// the host hands its stage of compress.
//
// Projection (METHODS.md P*) stores fewer channels per token than the model's
// head_dim. It owns the head store: it wraps the codec's store in one of its
// own, whose rows may be narrower than head_dim and whose attend() maps the
// queries into the stored space (and the output back) around the kernels.
// The host runs its stage last in compress, after eviction, merging and
// compaction, one KV head at a time:
//
//   [eviction plan -> merger fold -> compaction]    (when the cache evicts)
//   projection.project(layer, h, store) -> a new store, or nothing to change
//   swap                                           the only step that changes the cache
//
// Required of a policy with `static constexpr bool projects = true`:
//   template <class Inner> using head_storage = S;  the store it keeps, around
//                                                   the codec's store Inner (it may
//                                                   static_assert on which Inner it takes)
//   S make_head(Inner inner, const cache_config&, std::size_t layer, std::size_t kv_head) const;
//   template <class Layer>
//   std::optional<S> project(const Layer&, std::size_t kv_head, const S& from) const;
//       `from` is the head as compaction left it (not necessarily the cache's
//       current store: read its rows from `from`, the recent queries and
//       columns from the layer); returns the projected store, or nullopt when
//       nothing changes. May throw; must not change `from`.
// Optional:
//   std::size_t stored_width(const cache_config&) const;
//       the width the codec's store Inner is built for (default head_dim): a
//       projection that keeps r coordinates a row (P1 PCA) asks for r, and
//       any codec that accepts rows of that width stores them (the host
//       validates the codec against the narrowed config).
// S is a head store (storage/protocol.hpp). It may also declare what every
// family may: columns, needs_queries + query_window (query-driven methods:
// the host keeps the window for it), needs_attention_stats + observe,
// validate(const cache_config&). Without an evicting policy the host runs
// the stage after the prompt (the first single-token append after
// attend_chunk) and on compress().
#pragma once

#include <cstddef>
#include <optional>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/policy/traits.hpp"

namespace kvc::detail {

template <class P, class = void>
struct projects_of : std::false_type {};
template <class P>
struct projects_of<P, std::void_t<decltype(P::projects)>> : std::bool_constant<static_cast<bool>(P::projects)> {};

// The head store of a cache: the projection's store around the codec's, or
// the codec's own when the projection does not project.
template <class P, class Inner, bool = projects_of<P>::value>
struct projected_store {
    using type = Inner;
};
template <class P, class Inner>
struct projected_store<P, Inner, true> {
    using type = typename P::template head_storage<Inner>;
};
template <class P, class Inner>
using projected_store_t = typename projected_store<P, Inner>::type;

template <class P, class Inner, class = void>
struct has_projection_make_head : std::false_type {};
template <class P, class Inner>
struct has_projection_make_head<
    P, Inner,
    std::void_t<decltype(std::declval<const P&>().make_head(std::declval<Inner>(), std::declval<const cache_config&>(),
                                                           std::size_t{}, std::size_t{}))>> : std::true_type {};

template <class P, class = void>
struct has_stored_width : std::false_type {};
template <class P>
struct has_stored_width<
    P, std::void_t<decltype(std::size_t{std::declval<const P&>().stored_width(std::declval<const cache_config&>())})>>
    : std::true_type {};

// The config the codec's store is built for: the model's, its head_dim
// narrowed to the projection's stored width.
template <class P>
cache_config inner_config_of(const P& projection, const cache_config& config) {
    cache_config inner = config;
    if constexpr (has_stored_width<P>::value) inner.head_dim = projection.stored_width(config);
    else (void)projection;
    return inner;
}

struct any_projection_layer {};
template <class P, class S, class = void>
struct has_project : std::false_type {};
template <class P, class S>
struct has_project<P, S,
                   std::void_t<decltype(std::declval<const P&>().project(std::declval<const any_projection_layer&>(),
                                                                        std::size_t{}, std::declval<const S&>()))>>
    : std::is_same<decltype(std::declval<const P&>().project(std::declval<const any_projection_layer&>(), std::size_t{},
                                                             std::declval<const S&>())),
                   std::optional<S>> {};

// Compile-time check of a projection policy over the codec store Inner, each missing member named.
template <class P, class Inner>
constexpr bool check_projection() {
    static_assert(is_projection_policy_v<P>, "kvc projection protocol: missing `using family = kvc::projection_family;`");
    if constexpr (projects_of<P>::value) {
        using S = projected_store_t<P, Inner>;
        static_assert(has_projection_make_head<P, Inner>::value,
                      "kvc projection protocol: a policy with `projects = true` needs `S make_head(Inner, const "
                      "cache_config&, std::size_t layer, std::size_t kv_head) const`");
        static_assert(has_project<P, S>::value,
                      "kvc projection protocol: a policy with `projects = true` needs `template <class Layer> "
                      "std::optional<S> project(const Layer&, std::size_t kv_head, const S& from) const`");
    }
    return true;
}

} // namespace kvc::detail
