// Processors without a SIMD unit kvc knows: only the scalar reference runs.
#include "kvc/kernels/table.hpp"

namespace kvc::kernels {
const kernel_table* dispatch_table_sse2() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx2() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx512() noexcept { return nullptr; }
const kernel_table* dispatch_table_avx512_vnni() noexcept { return nullptr; }
const kernel_table* dispatch_table_neon() noexcept { return nullptr; }
} // namespace kvc::kernels
