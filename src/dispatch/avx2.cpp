// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c).
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_avx2() noexcept {
    static constexpr kernel_table table = simd::make_table<xsimd::fma3<xsimd::avx2>>(arch_id::avx2);
    return &table;
}
} // namespace kvc::kernels
