// AVX-512 F/BW/DQ/VL kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl).
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_avx512() noexcept {
    static constexpr kernel_table table = simd::make_table<xsimd::avx512bw>(arch_id::avx512);
    return &table;
}
} // namespace kvc::kernels
