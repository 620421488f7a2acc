// AVX-512 F/BW/DQ/VL kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl).
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_avx512() noexcept {
    static constexpr kernel_table table = simd::make_table<xsimd::avx512bw>(arch_id::avx512);
    return &table;
}
// The same table with AVX-512 VNNI key scores for the quantized formats
// (kernels/quant/simd.hpp: target-attributed functions; only called when
// the CPU reports avx512_vnni).
const kernel_table* dispatch_table_avx512_vnni() noexcept {
    static constexpr kernel_table table = simd::make_table_vnni<xsimd::avx512bw>(arch_id::avx512);
    return &table;
}
} // namespace kvc::kernels
