// kvc/kernels/reference/gear.hpp -- the scalar reference of the GEAR section.
//
// The attention of kernels/quant/gear.hpp chained with the scalar reference
// kernels (the token-by-token Q1 partial and the fp16 dot/axpy); every
// instruction set's GEAR kernel is tested against it.
#pragma once

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/gear.hpp"
#include "kvc/kernels/reference/kernels.hpp"
#include "kvc/kernels/reference/quant.hpp"

namespace kvc::kernels::reference {

constexpr gear_kernels make_gear_kernels() noexcept {
    return gear_kernels{
        &gear::attend_partial<reference_arch, &quant_attend_partial, &dot<dtype::f16>, &axpy<dtype::f16>>,
    };
}

} // namespace kvc::kernels::reference
