// kvc/kernels/arch.hpp -- which instruction set the kernels run on.
//
// kvc detects the CPU itself (cpuid + xgetbv) instead of trusting xsimd 8.1's
// detection, which misreads AVX and never asks the OS whether it saves the wide
// registers (XCR0). An instruction set counts as present only when the CPU has
// every extension its kernels use and the OS enables the register state.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvc/core/config.hpp"

#if KVC_X86_64 && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace kvc {

// The instruction sets kvc has kernels for. `scalar` is the portable
// reference every other kernel is tested against.
enum class arch_id : std::uint8_t { scalar = 0, sse2 = 1, avx2 = 2, avx512 = 3, neon = 4 };
inline constexpr int arch_count = 5;

constexpr const char* name_of(arch_id arch) noexcept {
    switch (arch) {
    case arch_id::scalar: return "scalar";
    case arch_id::sse2: return "sse2";
    case arch_id::avx2: return "avx2";
    case arch_id::avx512: return "avx512";
    case arch_id::neon: return "neon";
    }
    return "?";
}

// Parses a KVC_ARCH value; returns false for an unknown name.
inline bool parse_arch(const char* text, arch_id& out) noexcept {
    if (text == nullptr) return false;
    for (int i = 0; i < arch_count; ++i) {
        const auto arch = static_cast<arch_id>(i);
        if (std::strcmp(text, name_of(arch)) == 0) {
            out = arch;
            return true;
        }
    }
    return false;
}

// What this CPU (and its OS) can run: one bit per arch_id.
struct cpu_features {
    bool sse2 = false;
    bool avx2 = false;    // AVX2 + FMA + F16C, YMM state enabled by the OS
    bool avx512 = false;  // AVX-512 F/BW/DQ/VL on top of avx2, ZMM state enabled
    bool avx512_vnni = false;
    bool neon = false;

    bool supports(arch_id arch) const noexcept {
        switch (arch) {
        case arch_id::scalar: return true;
        case arch_id::sse2: return sse2;
        case arch_id::avx2: return avx2;
        case arch_id::avx512: return avx512;
        case arch_id::neon: return neon;
        }
        return false;
    }
};

namespace detail {

#if KVC_X86_64 && (defined(__GNUC__) || defined(__clang__))
inline std::uint64_t read_xcr0() noexcept {
    std::uint32_t eax = 0, edx = 0;
    // xgetbv as raw bytes: the intrinsic would need -mxsave on this translation unit.
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

inline cpu_features detect_cpu_features() noexcept {
    cpu_features f;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
    f.sse2 = (edx >> 26) & 1u;
    const bool osxsave = (ecx >> 27) & 1u;
    const bool avx = (ecx >> 28) & 1u;
    const bool fma = (ecx >> 12) & 1u;
    const bool f16c = (ecx >> 29) & 1u;
    if (!osxsave || !avx) return f;
    const std::uint64_t xcr0 = read_xcr0();
    const bool os_ymm = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
    const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0; // opmask, ZMM hi256, hi16 ZMM
    if (!os_ymm) return f;
    unsigned max_leaf = __get_cpuid_max(0, nullptr);
    if (max_leaf < 7) return f;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    const bool avx2 = (ebx >> 5) & 1u;
    f.avx2 = avx2 && fma && f16c;
    const bool avx512f = (ebx >> 16) & 1u, avx512dq = (ebx >> 17) & 1u;
    const bool avx512bw = (ebx >> 30) & 1u, avx512vl = (ebx >> 31) & 1u;
    f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
    f.avx512_vnni = f.avx512 && ((ecx >> 11) & 1u);
    return f;
}
#else
inline cpu_features detect_cpu_features() noexcept {
    cpu_features f;
#if KVC_AARCH64
    f.neon = true; // Advanced SIMD is part of the AArch64 baseline.
#endif
    return f;
}
#endif

} // namespace detail

// Detected once; the answer cannot change while the process runs.
inline const cpu_features& cpu() noexcept {
    static const cpu_features features = detail::detect_cpu_features();
    return features;
}

} // namespace kvc
