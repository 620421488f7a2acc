// kvc/kernels/dispatch.hpp -- choosing the kernel table at run time.
//
// Two ways to get kernels:
// - kvc::kvc (CMake) links one translation unit per instruction set
//   (src/dispatch/*.cpp) and defines KVC_USE_DISPATCH_LIBRARY; the tables
//   compiled there are declared below and picked by CPU detection.
// - Header-only (kvc::kvc-header-only, or plain -I): the kernels are
//   instantiated inline for every instruction set the consumer's own flags
//   enable (with -march=native: all the CPU has), no dispatch units needed.
//
// The choice is made once: the best table the CPU supports, or the one named
// by the environment variable KVC_ARCH (scalar, sse2, avx2, avx512, neon).
// Tests and benchmarks may switch with kvc::set_active_arch().
#pragma once

#include <atomic>
#include <cstdlib>

#include "kvc/core/error.hpp"
#include "kvc/kernels/arch.hpp"
#include "kvc/kernels/reference/hadamard.hpp"
#include "kvc/kernels/reference/gear.hpp"
#include "kvc/kernels/reference/kernels.hpp"
#include "kvc/kernels/reference/kivi.hpp"
#include "kvc/kernels/reference/cq.hpp"
#include "kvc/kernels/reference/kvquant.hpp"
#include "kvc/kernels/reference/quant.hpp"
#include "kvc/kernels/reference/sparse.hpp"
#include "kvc/kernels/table.hpp"

#if !defined(KVC_USE_DISPATCH_LIBRARY)
#include "kvc/kernels/simd/kernels.hpp"
#endif

namespace kvc {
namespace kernels {

inline const kernel_table& reference_table() noexcept {
    static constexpr kernel_table table{
        arch_id::scalar,
        {&reference::dot<dtype::f32>, &reference::dot<dtype::f16>, &reference::dot<dtype::bf16>},
        {&reference::axpy<dtype::f32>, &reference::axpy<dtype::f16>, &reference::axpy<dtype::bf16>},
        &reference::softmax,
        {&reference::from_f32<dtype::f32>, &reference::from_f32<dtype::f16>, &reference::from_f32<dtype::bf16>},
        {&reference::to_f32<dtype::f32>, &reference::to_f32<dtype::f16>, &reference::to_f32<dtype::bf16>},
        {&reference::attend_partial<dtype::f32>, &reference::attend_partial<dtype::f16>,
         &reference::attend_partial<dtype::bf16>},
        {&reference::prefill<dtype::f32>, &reference::prefill<dtype::f16>, &reference::prefill<dtype::bf16>},
        reference::make_quant_kernels(),
        reference::make_hadamard_kernels(),
        reference::make_sparse_kernels(),
        reference::make_kivi_kernels(),
        reference::make_cq_kernels(),
        reference::make_kvquant_kernels(),
        reference::make_gear_kernels(),
        &common::accumulate_mass<reference_arch>,
    };
    return table;
}

#if defined(KVC_USE_DISPATCH_LIBRARY)
// Defined in src/dispatch/<arch>.cpp; nullptr where that unit was not built
// for this processor family.
const kernel_table* dispatch_table_sse2() noexcept;
const kernel_table* dispatch_table_avx2() noexcept;
const kernel_table* dispatch_table_avx512() noexcept;
const kernel_table* dispatch_table_avx512_vnni() noexcept; // AVX-512 plus VNNI integer key scores
const kernel_table* dispatch_table_neon() noexcept;

// The table compiled for `arch`, or nullptr when this build has none.
inline const kernel_table* compiled_table(arch_id arch) noexcept {
    switch (arch) {
    case arch_id::scalar: return &reference_table();
    case arch_id::sse2: return dispatch_table_sse2();
    case arch_id::avx2: return dispatch_table_avx2();
    // The VNNI variant only where the CPU has it (compiled_table is asked for
    // tables the CPU supports; cpu() is cached).
    case arch_id::avx512: return cpu().avx512_vnni ? dispatch_table_avx512_vnni() : dispatch_table_avx512();
    case arch_id::neon: return dispatch_table_neon();
    }
    return nullptr;
}
#else
inline const kernel_table* compiled_table(arch_id arch) noexcept {
    switch (arch) {
    case arch_id::scalar: return &reference_table();
#if defined(__SSE2__) && KVC_X86_64
    case arch_id::sse2: {
        static constexpr kernel_table table = simd::make_table<xsimd::sse2>(arch_id::sse2);
        return &table;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    case arch_id::avx2: {
        static constexpr kernel_table table = simd::make_table<xsimd::fma3<xsimd::avx2>>(arch_id::avx2);
        return &table;
    }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__FMA__) && defined(__F16C__)
    case arch_id::avx512: {
        static constexpr kernel_table table = simd::make_table<xsimd::avx512bw>(arch_id::avx512);
#if defined(KVC_QUANT_HAS_VNNI)
        static constexpr kernel_table vnni = simd::make_table_vnni<xsimd::avx512bw>(arch_id::avx512);
        if (cpu().avx512_vnni) return &vnni;
#endif
        return &table;
    }
#endif
#if defined(__ARM_NEON) && KVC_AARCH64
    case arch_id::neon: {
        static constexpr kernel_table table = simd::make_table<xsimd::neon64>(arch_id::neon);
        return &table;
    }
#endif
    default: return nullptr;
    }
}
#endif

// The table for `arch` if this build has it and this CPU can run it.
inline const kernel_table* table_for(arch_id arch) noexcept {
    if (!cpu().supports(arch)) return nullptr;
    return compiled_table(arch);
}

// Every instruction set usable here, scalar first.
inline int available_archs(arch_id (&out)[arch_count]) noexcept {
    int count = 0;
    for (int i = 0; i < arch_count; ++i)
        if (table_for(static_cast<arch_id>(i)) != nullptr) out[count++] = static_cast<arch_id>(i);
    return count;
}

namespace detail {
inline const kernel_table* best_table() noexcept {
    static const arch_id preference[] = {arch_id::avx512, arch_id::avx2, arch_id::neon, arch_id::sse2};
    for (arch_id arch : preference)
        if (const kernel_table* table = table_for(arch)) return table;
    return &reference_table();
}

// KVC_ARCH picks the table; an unknown or unavailable name is an error at the
// first kernel call, not a silent fallback that would make benchmarks lie.
inline const kernel_table* initial_table() {
    const char* requested = std::getenv("KVC_ARCH");
    if (requested == nullptr || *requested == '\0') return best_table();
    arch_id arch;
    if (!parse_arch(requested, arch))
        kvc::detail::fail("KVC_ARCH: expected one of scalar, sse2, avx2, avx512, neon; got '", requested, "'");
    const kernel_table* table = table_for(arch);
    if (table == nullptr)
        kvc::detail::fail("KVC_ARCH=", requested, ": this CPU or this build has no kernels for that instruction set");
    return table;
}

inline std::atomic<const kernel_table*>& active_slot() {
    static std::atomic<const kernel_table*> slot{initial_table()};
    return slot;
}
} // namespace detail

// The kernels every cache call uses.
inline const kernel_table& active() { return *detail::active_slot().load(std::memory_order_relaxed); }

} // namespace kernels

// The instruction set kvc's kernels run on.
inline arch_id active_arch() { return kernels::active().arch; }

// Switches every later kernel call to `arch`; throws kvc::error when the CPU
// or the build lacks it. Meant for tests and benchmarks comparing instruction sets.
inline void set_active_arch(arch_id arch) {
    const kernels::kernel_table* table = kernels::table_for(arch);
    if (table == nullptr)
        detail::fail("set_active_arch: expected an instruction set this CPU and build support, got ", name_of(arch));
    kernels::detail::active_slot().store(table, std::memory_order_relaxed);
}

} // namespace kvc
