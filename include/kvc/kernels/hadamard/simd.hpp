// kvc/kernels/hadamard/simd.hpp -- the xsimd Hadamard rotation (Q4), templated on an xsimd Arch.
//
// Included at the end of kernels/simd/kernels.hpp (make_table puts it in the
// table's `hadamard` section); the same rules hold: nothing but xsimd and
// templates on the Arch.
//
// A block of n >= L floats (L lanes per batch) is rotated in three sweeps:
// 1. per batch: the forward signs, then the stages h < L inside the register
//    (partner lanes by a constant swizzle i -> i ^ h, then x * (+-1) + partner,
//    which is a + b on the lanes with bit h clear and b - a on the others);
// 2. the stages h = L .. n/2 on whole batches (a + b, a - b);
// 3. the scale 1 / sqrt(n) and the inverse signs.
// The additions are the reference's in the reference's order, so the results
// are identical (kernels/hadamard/common.hpp). Blocks shorter than a batch
// (only in head dims that are not a multiple of L) use the scalar block.
#pragma once

#include <cstddef>
#include <cstdint>

#include <xsimd/xsimd.hpp>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/hadamard/common.hpp"
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels::simd {
namespace hadamard {

// Lane i takes lane i ^ H.
template <std::size_t H>
struct partner_lane {
    static constexpr std::uint32_t get(std::size_t i, std::size_t) noexcept { return static_cast<std::uint32_t>(i ^ H); }
};

// +1 on the lanes with bit H clear (they keep a + b), -1 on the others (b - a).
template <class A, std::size_t H>
inline floats<A> butterfly_signs() noexcept {
    alignas(64) float signs[floats<A>::size];
    for (std::size_t i = 0; i < floats<A>::size; ++i) signs[i] = (i & H) ? -1.0f : 1.0f;
    return floats<A>::load_aligned(signs);
}

// The stages H, 2H, .. < L of one batch.
template <class A, std::size_t H>
inline floats<A> lane_stages(floats<A> x) noexcept {
    if constexpr (H < floats<A>::size) {
        const floats<A> partner =
            xsimd::swizzle(x, xsimd::make_batch_constant<xsimd::batch<std::uint32_t, A>, partner_lane<H>>());
        x = xsimd::fma(butterfly_signs<A, H>(), x, partner);
        return lane_stages<A, 2 * H>(x);
    } else {
        return x;
    }
}

template <class A>
inline void rotate_block(float* x, std::size_t n, const float* signs, hadamard_direction direction) noexcept {
    constexpr std::size_t L = floats<A>::size;
    const bool forward_signs = signs && direction == hadamard_direction::forward;
    for (std::size_t i = 0; i < n; i += L) {
        floats<A> v = floats<A>::load_unaligned(x + i);
        if (forward_signs) v *= floats<A>::load_unaligned(signs + i);
        lane_stages<A, 1>(v).store_unaligned(x + i);
    }
    for (std::size_t h = L; h < n; h *= 2)
        for (std::size_t j = 0; j < n; j += 2 * h)
            for (std::size_t i = j; i < j + h; i += L) {
                const floats<A> a = floats<A>::load_unaligned(x + i), b = floats<A>::load_unaligned(x + i + h);
                (a + b).store_unaligned(x + i);
                (a - b).store_unaligned(x + i + h);
            }
    const floats<A> scale(hadamard_common::inverse_sqrt<A>(n));
    const bool inverse_signs = signs && direction == hadamard_direction::inverse;
    for (std::size_t i = 0; i < n; i += L) {
        floats<A> v = floats<A>::load_unaligned(x + i) * scale;
        if (inverse_signs) v *= floats<A>::load_unaligned(signs + i);
        v.store_unaligned(x + i);
    }
}

template <class A>
void rotate(float* rows, std::size_t count, std::size_t stride, std::size_t dim, bool random_signs,
            hadamard_direction direction) noexcept {
    for (std::size_t r = 0; r < count; ++r) {
        float* row = rows + r * stride;
        for (std::size_t offset = 0; offset < dim;) {
            const std::size_t n = hadamard_block(dim - offset);
            const float* signs = random_signs ? hadamard_signs_of<A>::table.value + offset : nullptr;
            if (n >= floats<A>::size) rotate_block<A>(row + offset, n, signs, direction);
            else hadamard_common::rotate_block_scalar<A>(row + offset, n, signs, direction);
            offset += n;
        }
    }
}

} // namespace hadamard

template <class A>
constexpr hadamard_kernels make_hadamard_kernels() noexcept {
    return hadamard_kernels{&hadamard::rotate<A>};
}

} // namespace kvc::kernels::simd
