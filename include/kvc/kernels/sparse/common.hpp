// kvc/kernels/sparse/common.hpp -- the scalar rules of the sparse rows (Q10), shared by every instruction set.
//
// Everything here is a template on the Arch `A` (docs/ARCHITECTURE.md: dispatch units
// hold only Arch-templated code), even where A is unused.
//
// Which elements a row keeps (encode_row): the row is first rounded to fp16
// (round to nearest even, as full_cache's fp16 storage), then the `kept`
// elements whose fp16 values have the largest magnitude are kept. Magnitude
// is compared as the fp16 bit pattern without its sign, which orders every
// number by |x| and puts NaN above +-Inf above every finite value: NaN and
// Inf are always kept first. Ties at the threshold go to the lower element
// index. So the choice depends only on the fp16 values, and every
// instruction set writes the same bytes (the selection is this scalar code).
//
// Selection without sorting or allocation: the threshold is the largest
// 15-bit magnitude T with at least `kept` elements >= T, found bit by bit
// (15 counting passes over the row); then every element above T is kept and
// the first (kept - count above T) elements equal to T, in index order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace kvc::kernels::sparse_common {

// Largest head dim the encoder's stack buffer takes (cache_config allows up to 1024).
inline constexpr std::size_t max_dim = 1024;

template <class A>
inline std::uint16_t load_u16(const unsigned char* p) noexcept {
    std::uint16_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return bits;
}

template <class A>
inline unsigned popcount16(unsigned bits) noexcept {
#if defined(__GNUC__) || defined(__clang__)
    return static_cast<unsigned>(__builtin_popcount(bits));
#else
    unsigned count = 0;
    for (; bits != 0; bits &= bits - 1) ++count;
    return count;
#endif
}

template <class A>
inline unsigned lowest_bit(unsigned bits) noexcept { // bits != 0
#if defined(__GNUC__) || defined(__clang__)
    return static_cast<unsigned>(__builtin_ctz(bits));
#else
    unsigned i = 0;
    while (((bits >> i) & 1u) == 0) ++i;
    return i;
#endif
}

// The fp16 bits of element i of a source row.
template <class A, dtype D>
inline std::uint16_t half_bits_of(const void* src, std::size_t i) noexcept {
    if constexpr (D == dtype::f16) {
        std::uint16_t bits;
        std::memcpy(&bits, static_cast<const unsigned char*>(src) + 2 * i, sizeof bits);
        return bits;
    } else {
        using storage = typename common::element<A, D>::storage;
        return common::float_to_half_bits<A>(common::element<A, D>::load(static_cast<const storage*>(src) + i));
    }
}

template <class A, dtype D>
void encode_row(const void* src, void* dst, std::size_t n, std::size_t kept) noexcept {
    std::uint16_t half[max_dim];
    std::uint16_t magnitude[max_dim];
    for (std::size_t i = 0; i < n; ++i) {
        half[i] = half_bits_of<A, D>(src, i);
        magnitude[i] = static_cast<std::uint16_t>(half[i] & 0x7fffu);
    }
    unsigned threshold = 0;
    for (int bit = 14; bit >= 0; --bit) {
        const unsigned candidate = threshold | (1u << bit);
        std::size_t at_least = 0;
        for (std::size_t i = 0; i < n; ++i) at_least += magnitude[i] >= candidate ? 1u : 0u;
        if (at_least >= kept) threshold = candidate;
    }
    std::size_t above = 0;
    for (std::size_t i = 0; i < n; ++i) above += magnitude[i] > threshold ? 1u : 0u;
    std::size_t ties = kept - above; // elements equal to the threshold still to keep, lowest index first

    auto* bitmap = static_cast<unsigned char*>(dst);
    unsigned char* values = bitmap + n / 8;
    std::memset(bitmap, 0, n / 8);
    for (std::size_t i = 0; i < n; ++i) {
        bool keep = magnitude[i] > threshold;
        if (!keep && magnitude[i] == threshold && ties > 0) {
            keep = true;
            --ties;
        }
        if (!keep) continue;
        bitmap[i / 8] = static_cast<unsigned char>(bitmap[i / 8] | (1u << (i % 8)));
        std::memcpy(values, &half[i], 2);
        values += 2;
    }
}

// The 16 elements of one bitmap slice as floats (zeros where not kept);
// `halves` points at the slice's first kept value. Returns the kept count.
template <class A>
inline unsigned expand_chunk(const unsigned char* halves, unsigned bits, float* out) noexcept {
    for (std::size_t i = 0; i < sparse_chunk_elements; ++i) out[i] = 0.0f;
    unsigned j = 0;
    for (; bits != 0; bits &= bits - 1, ++j)
        out[lowest_bit<A>(bits)] = common::half_bits_to_float<A>(load_u16<A>(halves + 2 * j));
    return j;
}

template <class A>
void decode_row(const void* src, float* dst, std::size_t n) noexcept {
    const auto* bitmap = static_cast<const unsigned char*>(src);
    const unsigned char* values = bitmap + n / 8;
    for (std::size_t c = 0; c < n; c += sparse_chunk_elements)
        values += 2 * expand_chunk<A>(values, load_u16<A>(bitmap + c / 8), dst + c);
}

} // namespace kvc::kernels::sparse_common
