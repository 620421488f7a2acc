// kvc/kernels/quant/gear_simd.hpp -- the GEAR section of one instruction set's table.
//
// The attention of kernels/quant/gear.hpp chained with this arch's Q1 decode
// partial and fp16 dot/axpy kernels (the low-rank and sparse parts are a few
// dot products, axpys and scalar gathers per chunk). Included at
// the end of kernels/quant/simd.hpp (after the Q1 kernels it names).
#pragma once

#include "kvc/kernels/quant/gear.hpp"
#include "kvc/kernels/quant/simd.hpp"
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels::simd {

template <class A>
constexpr gear_kernels make_gear_kernels() noexcept {
    return gear_kernels{
        &gear::attend_partial<A, &quant::attend_partial<A, false>, &dot<A, dtype::f16>, &axpy<A, dtype::f16>>,
    };
}

} // namespace kvc::kernels::simd
