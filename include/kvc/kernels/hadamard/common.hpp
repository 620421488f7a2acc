// kvc/kernels/hadamard/common.hpp -- the orthonormal rotation of Q4 (Hadamard), shared by every instruction set.
//
// The transform of a row of `dim` floats is H = B D:
//
//   D   a fixed diagonal of +-1 (random signs, optional): sign i is bit i % 64
//       of the (i / 64 + 1)-th output of splitmix64(hadamard_sign_seed).
//   B   block-diagonal: the row is cut left to right into the largest power
//       of two blocks that fit (dim = 2^a1 + 2^a2 + ..., a1 > a2 > ...: 128 is
//       one block, 96 is 64 + 32, 80 is 64 + 16, 3 is 2 + 1), and each block
//       of n gets the normalised Walsh-Hadamard matrix H_n / sqrt(n), with
//       (H_n)_ij = (-1)^popcount(i & j) (Sylvester order). Every block starts
//       at a multiple of its own size, so a block codec's groups (32, 64, 128)
//       never straddle two blocks of at least their size.
//
// B is symmetric and orthonormal (B B = I) and D D = I, so H^T = D B and
// H^T H = I: the forward transform is x -> B (D x), the inverse y -> D (B y).
//
// How it is computed (every instruction set, bit for bit): per block,
// forward multiplies by the signs (exact), runs the butterfly stages
// h = 1, 2, 4, .., n/2 in that order ((a, b) -> (a + b, a - b) on the pairs
// i, i + h with bit h of i clear), then multiplies by 1 / sqrt(n) rounded to
// fp32; the inverse runs the same stages, the same scale, then the signs.
// Since every sign product is exact and the stages are the same additions
// in the same order, the SIMD kernels equal the scalar reference exactly.
//
// A block of 1 (odd dims) is the identity up to its sign. NaN or Inf in a
// block spreads over that block (every output of a butterfly stage depends
// on every input), so over the whole row when dim is a power of two.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/core/random.hpp"
#include "kvc/kernels/common.hpp"

namespace kvc::kernels {

enum class hadamard_direction : unsigned char { forward, inverse };

// The Q4 section of a kernel_table.
struct hadamard_kernels {
    // Rotates `count` rows of `dim` floats in place (row r at rows + r * stride,
    // dim <= hadamard_max_dim): forward x -> H x, inverse x -> H^T x, with the
    // random sign diagonal D when `random_signs`, D = I otherwise.
    void (*rotate)(float* rows, std::size_t count, std::size_t stride, std::size_t dim, bool random_signs,
                   hadamard_direction direction) noexcept;
};

// Longest row the sign table covers (kvc::max_head_dim).
inline constexpr std::size_t hadamard_max_dim = 1024;
// "KVC_HADA": any fixed value would do; fixed so stored rows mean the same in every build.
inline constexpr std::uint64_t hadamard_sign_seed = 0x4b56435f48414441ull;

struct hadamard_sign_table {
    float value[hadamard_max_dim];
};

constexpr hadamard_sign_table make_hadamard_signs() noexcept {
    hadamard_sign_table table{};
    splitmix64 random(hadamard_sign_seed);
    std::uint64_t word = 0;
    for (std::size_t i = 0; i < hadamard_max_dim; ++i) {
        if (i % 64 == 0) word = random.next();
        table.value[i] = ((word >> (i % 64)) & 1u) ? -1.0f : 1.0f;
    }
    return table;
}

// The diagonal D (element i of every row gets value[i]), one copy per
// instruction set: a static member of a template on the Arch, so the
// dispatch units' copies carry their Arch in the symbol name like every
// other weak symbol there (tests/cmake/dispatch_hygiene.cmake).
template <class A>
struct hadamard_signs_of {
    static constexpr hadamard_sign_table table = make_hadamard_signs();
};
template <class A>
constexpr hadamard_sign_table hadamard_signs_of<A>::table;

// The size of the block that starts when `remaining` elements of the row are left.
constexpr std::size_t hadamard_block(std::size_t remaining) noexcept {
    std::size_t n = 1;
    while (n * 2 <= remaining) n *= 2;
    return n;
}

namespace hadamard_common {

// 1 / sqrt(n) rounded to fp32 for n = 2^k: 2^(-k/2) exactly for even k,
// 2^(-(k-1)/2) / sqrt(2) otherwise.
template <class A>
constexpr float inverse_sqrt(std::size_t n) noexcept {
    std::size_t k = 0;
    while ((std::size_t{1} << k) < n) ++k;
    double scale = (k % 2) ? 0.70710678118654752440 : 1.0;
    for (std::size_t i = 0; i < k / 2; ++i) scale *= 0.5;
    return static_cast<float>(scale);
}

// One block of n (a power of two) in place, element by element, in the
// order the header describes. `signs` is the table at the block's offset,
// or nullptr for D = I.
template <class A>
inline void rotate_block_scalar(float* x, std::size_t n, const float* signs, hadamard_direction direction) noexcept {
    if (signs && direction == hadamard_direction::forward)
        for (std::size_t i = 0; i < n; ++i) x[i] *= signs[i];
    for (std::size_t h = 1; h < n; h *= 2)
        for (std::size_t j = 0; j < n; j += 2 * h)
            for (std::size_t i = j; i < j + h; ++i) {
                const float a = x[i], b = x[i + h];
                x[i] = a + b;
                x[i + h] = a - b;
            }
    const float scale = inverse_sqrt<A>(n);
    for (std::size_t i = 0; i < n; ++i) x[i] *= scale;
    if (signs && direction == hadamard_direction::inverse)
        for (std::size_t i = 0; i < n; ++i) x[i] *= signs[i];
}

} // namespace hadamard_common
} // namespace kvc::kernels
