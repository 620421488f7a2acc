// kvc/kernels/reference/hadamard.hpp -- the scalar reference of the Q4 Hadamard rotation.
//
// Block by block with hadamard_common::rotate_block_scalar (the definition in
// kernels/hadamard/common.hpp). The SIMD kernels are tested against this, and
// this against a dense Hadamard matrix product in double.
#pragma once

#include <cstddef>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/hadamard/common.hpp"

namespace kvc::kernels::reference {

inline void hadamard_rotate(float* rows, std::size_t count, std::size_t stride, std::size_t dim, bool random_signs,
                            hadamard_direction direction) noexcept {
    for (std::size_t r = 0; r < count; ++r) {
        float* row = rows + r * stride;
        for (std::size_t offset = 0; offset < dim;) {
            const std::size_t n = hadamard_block(dim - offset);
            hadamard_common::rotate_block_scalar<reference_arch>(
                row + offset, n, random_signs ? hadamard_signs_of<reference_arch>::table.value + offset : nullptr, direction);
            offset += n;
        }
    }
}

constexpr hadamard_kernels make_hadamard_kernels() noexcept { return hadamard_kernels{&hadamard_rotate}; }

} // namespace kvc::kernels::reference
