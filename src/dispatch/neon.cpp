// NEON kernels: the AArch64 baseline, compiled with no extra flags.
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_neon() noexcept {
    static constexpr kernel_table table = simd::make_table<xsimd::neon64>(arch_id::neon);
    return &table;
}
const kernel_table* dispatch_table_sse2() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx2() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx512() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx512_vnni() noexcept { return nullptr; }
} // namespace kvc::kernels
