// kvc/policy/quantization/protocol.hpp -- what a codec (a quantization policy) is.
//
// Required (check_codec<P>() names the first one missing):
//   using family = kvc::quantization_family;
//   using head_storage = S;                    a head store (storage/protocol.hpp)
//   S make_head(const cache_config&) const     one empty store per (layer, KV head), or
//   S make_head(const cache_config&, layer, kv_head) const
//                                              when the codec has per-head parameters (calibrated
//                                              ranges and codebooks)
// Optional, with defaults:
//   validate(const cache_config&) or validate()  parameter checks at cache construction (none)
//   needs_attention_stats, needs_queries, needs_calibration   (false; policy/traits.hpp)
//   static key_bits_per_value(), value_bits_per_value()      nominal bits (benchmarks and tables)
//   static constexpr dtype storage             rows kept as they are in this type (query window's type)
// Wrapping codecs (with_sinks, rotated) read their inner codec through these
// traits and forward what it has, so a capability is never lost by wrapping.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "kvc/core/cache_config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/policy/traits.hpp"
#include "kvc/storage/protocol.hpp"

namespace kvc::detail {

template <class P, class = void>
struct has_head_storage : std::false_type {};
template <class P>
struct has_head_storage<P, std::void_t<typename P::head_storage>> : std::true_type {};

template <class P, class = void>
struct has_plain_make_head : std::false_type {};
template <class P>
struct has_plain_make_head<P, std::void_t<decltype(std::declval<const P&>().make_head(std::declval<const cache_config&>()))>>
    : std::true_type {};

template <class P, class = void>
struct has_indexed_make_head : std::false_type {};
template <class P>
struct has_indexed_make_head<P, std::void_t<decltype(std::declval<const P&>().make_head(
                                    std::declval<const cache_config&>(), std::size_t{}, std::size_t{}))>>
    : std::true_type {};

template <class P, class = void>
struct has_bits_per_value : std::false_type {};
template <class P>
struct has_bits_per_value<P, std::void_t<decltype(P::key_bits_per_value()), decltype(P::value_bits_per_value())>>
    : std::true_type {};

// Codecs that store rows as they are, in one element type, name it:
// `static constexpr dtype storage` (quant::none<T>). The host keeps its query
// window in that type (default: config.storage).
template <class P, class = void>
struct declares_storage_dtype : std::false_type {};
template <class P>
struct declares_storage_dtype<P, std::void_t<decltype(P::storage)>>
    : std::is_same<std::remove_cv_t<decltype(P::storage)>, dtype> {};

// The element type a codec keeps rows in when it stores them as they are,
// else `otherwise`: a codec type's `storage`, or a codec chosen at run time
// (quant::any) asked through `storage_or`.
template <class P, class = void>
struct has_storage_or : std::false_type {};
template <class P>
struct has_storage_or<P, std::void_t<decltype(std::declval<const P&>().storage_or(dtype::f32))>> : std::true_type {};
template <class P>
dtype storage_dtype_or(const P& codec, dtype otherwise) noexcept {
    if constexpr (declares_storage_dtype<P>::value) return (void)codec, (void)otherwise, P::storage;
    else if constexpr (has_storage_or<P>::value) return codec.storage_or(otherwise);
    else return (void)codec, otherwise;
}

template <class P>
constexpr bool check_codec() {
    static_assert(is_quantization_policy_v<P>,
                  "kvc quantization (codec) protocol: missing `using family = kvc::quantization_family;`");
    static_assert(has_head_storage<P>::value, "kvc quantization (codec) protocol: missing `using head_storage = ...;`");
    if constexpr (has_head_storage<P>::value) {
        static_assert(has_plain_make_head<P>::value || has_indexed_make_head<P>::value,
                      "kvc quantization (codec) protocol: missing `head_storage make_head(const cache_config&) const` "
                      "(or make_head(config, layer, kv_head))");
        check_store<typename P::head_storage>();
    }
    return true;
}

// The store of (layer, kv_head): per-head parameters when the codec has them.
template <class P>
typename P::head_storage make_head_of(const P& codec, const cache_config& config, std::size_t layer,
                                      std::size_t kv_head) {
    if constexpr (has_indexed_make_head<P>::value) return codec.make_head(config, layer, kv_head);
    else return (void)layer, (void)kv_head, codec.make_head(config);
}

} // namespace kvc::detail
