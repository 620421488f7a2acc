// SSE2 kernels: the x86-64 baseline, compiled with no extra flags.
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_sse2() noexcept {
    static constexpr kernel_table table = simd::make_table<xsimd::sse2>(arch_id::sse2);
    return &table;
}
const kernel_table* dispatch_table_neon() noexcept { return nullptr; }
} // namespace kvc::kernels
