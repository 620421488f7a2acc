// kvc/storage/protocol.hpp -- what a head store is: the per-(layer, KV head)
// container of encoded rows that a codec supplies and a cache hosts.
//
// Written once, here, below the codecs that implement it and the caches that
// consume it, so a wrapping codec (quant::with_sinks, quant::rotated) reads
// its inner store's capabilities without including any cache.
//
// Required members (check_store<S>() names the first one missing):
//   tokens(), bytes()                          rows held, bytes allocated
//   reserve_for_append(n)                      the only step of an append that may throw
//   push_back(kernels, from, key, value)       encode one row pair (noexcept, capacity reserved);
//                                              (..., position) instead when wants_positions
//   attend(kernels, decode_problem, decode_state&)
//                                              fold every row into a running softmax state
//   prefill(kernels, prefill_problem, workspace)
//                                              causal chunk attention over the rows
//   decode_keys / decode_values(kernels, first, count, out)
//                                              rows widened to fp32 (what scorers and tools read)
//   keep(indices, count)                       compact in place to the rows at ascending indices,
//     or compacted(indices, count) -> S        a new store of exactly those rows (preferred:
//                                              the cache then never copies the dropped rows)
//   reserve(n), shrink_to_fit(), release()
// Optional capabilities, each with the default a cache uses without it:
//   bytes_per_token()                          needed for byte budgets (default: none allowed)
//   stored_bytes()                             the bytes one attention reads (default: bytes())
//   push_back_rows(kernels, from, keys, values, count, first_position)
//                                              push_back of `count` rows given by pointers, the
//                                              t-th at position first_position + t (any_store:
//                                              one indirect call a block; default: push_back a row)
//   store_key(kernels, t, row)                 rewrite a key (key re-rotation; default: refused)
//   store_row(kernels, t, key, value)          re-encode a token from fp32 rows (merged slots;
//                                              default: merging refused)
//   assign_precision(kernels, scores)          re-encode by importance (Q6; default: absent)
//   prefill_workspace_floats(group, chunk, with_mass)
//                                              scratch beyond the kernels' (default: theirs)
//   static constexpr bool wants_positions      push_back takes each row's position (default false)
//   template <class Self, class Archive> static void transfer(Self&, Archive&)
//                                              its serialized form (kvc/core/archive.hpp; default:
//                                              a cache of it cannot be saved; any_store refuses
//                                              at run time with kvc::error)
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvc/core/archive.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/table.hpp"

namespace kvc::detail {

// One detection trait per member; `KVC_STORE_MEMBER(name, expression)` keeps
// each to a line, with `s` the store (const unless the member mutates).
#define KVC_STORE_MEMBER(trait, ...)                                                               \
    template <class S, class = void>                                                               \
    struct trait : std::false_type {};                                                             \
    template <class S>                                                                             \
    struct trait<S, std::void_t<decltype(__VA_ARGS__)>> : std::true_type {};

// Required.
KVC_STORE_MEMBER(has_tokens, std::size_t{std::declval<const S&>().tokens()})
KVC_STORE_MEMBER(has_bytes, std::size_t{std::declval<const S&>().bytes()})
KVC_STORE_MEMBER(has_reserve_for_append, std::declval<S&>().reserve_for_append(std::size_t{}))
KVC_STORE_MEMBER(has_push_back, std::declval<S&>().push_back(std::declval<const kernels::kernel_table&>(), dtype::f32,
                                                             std::declval<const void*>(), std::declval<const void*>()))
KVC_STORE_MEMBER(has_push_back_at, std::declval<S&>().push_back(std::declval<const kernels::kernel_table&>(), dtype::f32,
                                                                std::declval<const void*>(), std::declval<const void*>(),
                                                                std::int32_t{}))
KVC_STORE_MEMBER(has_push_back_rows,
                 std::declval<S&>().push_back_rows(std::declval<const kernels::kernel_table&>(), dtype::f32,
                                                   std::declval<const void* const*>(),
                                                   std::declval<const void* const*>(), std::size_t{}, std::int32_t{}))
KVC_STORE_MEMBER(has_attend, std::declval<const S&>().attend(std::declval<const kernels::kernel_table&>(),
                                                             std::declval<kernels::decode_problem>(),
                                                             std::declval<kernels::decode_state&>()))
KVC_STORE_MEMBER(has_prefill, std::declval<const S&>().prefill(std::declval<const kernels::kernel_table&>(),
                                                               std::declval<kernels::prefill_problem>(),
                                                               std::declval<float*>()))
KVC_STORE_MEMBER(has_decode_rows, (std::declval<const S&>().decode_keys(std::declval<const kernels::kernel_table&>(),
                                                                         std::size_t{}, std::size_t{}, std::declval<float*>()),
                                   std::declval<const S&>().decode_values(std::declval<const kernels::kernel_table&>(),
                                                                           std::size_t{}, std::size_t{}, std::declval<float*>())))
KVC_STORE_MEMBER(has_keep, std::declval<S&>().keep(std::declval<const std::uint32_t*>(), std::size_t{}))
KVC_STORE_MEMBER(has_capacity_control, (std::declval<S&>().reserve(std::size_t{}), std::declval<S&>().shrink_to_fit(),
                                        std::declval<S&>().release()))

// Optional.
KVC_STORE_MEMBER(has_compacted, std::declval<const S&>().compacted(std::declval<const std::uint32_t*>(), std::size_t{}))
KVC_STORE_MEMBER(has_bytes_per_token, std::declval<const S&>().bytes_per_token())
KVC_STORE_MEMBER(has_stored_bytes, std::declval<const S&>().stored_bytes())
KVC_STORE_MEMBER(has_store_key, std::declval<S&>().store_key(std::declval<const kernels::kernel_table&>(), std::size_t{},
                                                             std::declval<const float*>()))
KVC_STORE_MEMBER(has_store_row, std::declval<S&>().store_row(std::declval<const kernels::kernel_table&>(), std::size_t{},
                                                             std::declval<const float*>(), std::declval<const float*>()))
KVC_STORE_MEMBER(has_assign_precision, std::declval<S&>().assign_precision(std::declval<const kernels::kernel_table&>(),
                                                                           std::declval<const float*>()))
KVC_STORE_MEMBER(has_prefill_workspace, std::declval<const S&>().prefill_workspace_floats(std::size_t{}, std::size_t{},
                                                                                          bool{}))
KVC_STORE_MEMBER(has_transfer, (S::transfer(std::declval<const S&>(), std::declval<archive_writer&>()),
                                 S::transfer(std::declval<S&>(), std::declval<archive_reader&>())))
#undef KVC_STORE_MEMBER

// The bytes one attention over the store reads: its stored_bytes(), or by
// default all it holds.
template <class S>
std::size_t stored_bytes_of(const S& store) noexcept {
    if constexpr (has_stored_bytes<S>::value) return store.stored_bytes();
    else return store.bytes();
}

// Codecs that need each token's position with its rows (KVQuant stores keys
// before RoPE and rotates them inside attention) declare
// `static constexpr bool wants_positions = true` and take push_back(..., position).
template <class S, class = void>
struct wants_positions : std::false_type {};
template <class S>
struct wants_positions<S, std::void_t<decltype(S::wants_positions)>> : std::bool_constant<S::wants_positions> {};

// Compile-time check of the required members, each with a message naming the
// member, so a store missing one fails here rather than deep in a cache.
template <class S>
constexpr bool check_store() {
    static_assert(has_tokens<S>::value, "kvc head store protocol: missing `std::size_t tokens() const`");
    static_assert(has_bytes<S>::value, "kvc head store protocol: missing `std::size_t bytes() const`");
    static_assert(has_reserve_for_append<S>::value,
                  "kvc head store protocol: missing `void reserve_for_append(std::size_t)`");
    static_assert(wants_positions<S>::value ? has_push_back_at<S>::value : has_push_back<S>::value,
                  "kvc head store protocol: missing `void push_back(const kernel_table&, dtype, const void* key, "
                  "const void* value[, std::int32_t position when wants_positions]) noexcept`");
    static_assert(has_attend<S>::value,
                  "kvc head store protocol: missing `void attend(const kernel_table&, decode_problem, decode_state&) "
                  "const noexcept`");
    static_assert(has_prefill<S>::value,
                  "kvc head store protocol: missing `void prefill(const kernel_table&, prefill_problem, float*) "
                  "const noexcept`");
    static_assert(has_decode_rows<S>::value,
                  "kvc head store protocol: missing `decode_keys` / `decode_values(const kernel_table&, first, count, "
                  "float*) const`");
    static_assert(has_keep<S>::value || has_compacted<S>::value,
                  "kvc head store protocol: missing `void keep(const std::uint32_t* indices, std::size_t count)` "
                  "or `S compacted(const std::uint32_t* indices, std::size_t count) const`");
    static_assert(has_capacity_control<S>::value,
                  "kvc head store protocol: missing one of `reserve(std::size_t)`, `shrink_to_fit()`, `release()`");
    return true;
}

// Floats of prefill workspace one head store needs: kernels::prefill_workspace_floats
// for its rows, unless the store says more (a codec that transforms the
// queries first, e.g. quant::rotated, keeps them there: prefill is noexcept
// and must not allocate, so the caller's scratch holds them).
template <class S>
std::size_t prefill_workspace_of(const S& store, std::size_t group, std::size_t dim, std::size_t chunk,
                                 bool with_mass) noexcept {
    if constexpr (has_prefill_workspace<S>::value) {
        (void)dim;
        return store.prefill_workspace_floats(group, chunk, with_mass);
    } else {
        (void)chunk;
        return kernels::prefill_workspace_floats(group, dim, store.tokens(), with_mass);
    }
}

} // namespace kvc::detail
