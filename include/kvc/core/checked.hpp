// kvc/core/checked.hpp -- size arithmetic that cannot wrap.
//
// Every size kvc computes from a caller's count (tokens to reserve, rows times
// row bytes, layers times heads) goes through these: a product or sum that
// does not fit std::size_t would otherwise wrap to a small number, kvc would
// allocate that, record the count it was asked for, and write past the block.
// The throwing forms name both quantities, so the message says what was asked:
//   "kvc::aligned_buffer::reserve: expected elements x bytes per element to
//    fit in std::size_t, got 4611686018427387905 x 4"
#pragma once

#include <cstddef>
#include <limits>

#include "kvc/core/error.hpp"

namespace kvc::detail {

// a * b (or a + b) into out; false, out untouched, when it does not fit std::size_t.
constexpr bool checked_mul(std::size_t a, std::size_t b, std::size_t& out) noexcept {
    if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a) return false;
    out = a * b;
    return true;
}
constexpr bool checked_add(std::size_t a, std::size_t b, std::size_t& out) noexcept {
    if (b > std::numeric_limits<std::size_t>::max() - a) return false;
    out = a + b;
    return true;
}

// For noexcept paths that only compare: the sum, or SIZE_MAX when it does not fit.
constexpr std::size_t saturating_add(std::size_t a, std::size_t b) noexcept {
    return b > std::numeric_limits<std::size_t>::max() - a ? std::numeric_limits<std::size_t>::max() : a + b;
}

// Kept out of line of the callers: they sit on append paths.
[[noreturn]] inline void size_overflow(const char* who, const char* a_name, const char* op, const char* b_name,
                                       std::size_t a, std::size_t b) {
    fail(who, ": expected ", a_name, op, b_name, " to fit in std::size_t, got ", a, op, b);
}

// a * b, or kvc::error "<who>: expected <a_name> x <b_name> to fit in std::size_t, got <a> x <b>".
inline std::size_t checked_mul(std::size_t a, std::size_t b, const char* who, const char* a_name,
                               const char* b_name) {
    std::size_t out = 0;
    if (!checked_mul(a, b, out)) size_overflow(who, a_name, " x ", b_name, a, b);
    return out;
}
// a + b, or kvc::error "<who>: expected <a_name> + <b_name> to fit in std::size_t, got <a> + <b>".
inline std::size_t checked_add(std::size_t a, std::size_t b, const char* who, const char* a_name,
                               const char* b_name) {
    std::size_t out = 0;
    if (!checked_add(a, b, out)) size_overflow(who, a_name, " + ", b_name, a, b);
    return out;
}

} // namespace kvc::detail
