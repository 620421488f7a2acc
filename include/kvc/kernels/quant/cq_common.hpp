// kvc/kernels/quant/cq_common.hpp -- pieces of the CQ (Q8) kernels every instruction set shares.
//
// Templates on the Arch (reference_arch for the scalar reference), like
// kernels/common.hpp, so each dispatch unit compiles its own copy.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/cq_problem.hpp"

namespace kvc::kernels::cq_common {

// Code of group g in a packed row (cq_problem.hpp: LSB first, b bits each).
// Reads only the bytes that hold the code, never past the row.
template <class A>
inline unsigned code_at(const unsigned char* row, std::size_t g, std::size_t bits) noexcept {
    const std::size_t bit = g * bits, byte = bit / 8, shift = bit % 8;
    unsigned word = row[byte];
    if (shift + bits > 8) word |= static_cast<unsigned>(row[byte + 1]) << 8;
    return (word >> shift) & ((1u << bits) - 1u);
}

// Writes `codes[g]` for every group into a zeroed-then-filled row of cq_row_bytes(groups, bits).
template <class A>
inline void pack_codes(const unsigned char* codes, std::size_t groups, std::size_t bits, unsigned char* row) noexcept {
    if (bits == 8) {
        for (std::size_t g = 0; g < groups; ++g) row[g] = codes[g];
        return;
    }
    const std::size_t bytes = cq_row_bytes(groups, bits);
    for (std::size_t i = 0; i < bytes; ++i) row[i] = 0;
    for (std::size_t g = 0; g < groups; ++g) {
        const std::size_t bit = g * bits, byte = bit / 8, shift = bit % 8;
        const unsigned shifted = static_cast<unsigned>(codes[g]) << shift;
        row[byte] = static_cast<unsigned char>(row[byte] | (shifted & 0xffu));
        if (shift + bits > 8) row[byte + 1] = static_cast<unsigned char>(row[byte + 1] | (shifted >> 8));
    }
}

// All codes of a row into one byte each.
template <class A>
inline void unpack_codes(const unsigned char* row, std::size_t groups, std::size_t bits, unsigned char* codes) noexcept {
    for (std::size_t g = 0; g < groups; ++g) codes[g] = static_cast<unsigned char>(code_at<A>(row, g, bits));
}

// Squared distance of c channels of x to centroid k of a group's codebook
// ([c][clusters]), summed over channels in ascending order.
template <class A>
inline float squared_distance(const float* x, const float* group_codebook, std::size_t channels, std::size_t clusters,
                              std::size_t k) noexcept {
    float total = 0.0f;
    for (std::size_t j = 0; j < channels; ++j) {
        const float d = x[j] - group_codebook[j * clusters + k];
        total += d * d;
    }
    return total;
}

} // namespace kvc::kernels::cq_common
