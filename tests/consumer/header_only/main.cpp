// Header-only kvc compiled with -march=native: no dispatch units are linked
// (KVC_USE_DISPATCH_LIBRARY is not defined, so the dispatch tables' symbols
// are never referenced) and the kernels run on the best instruction set the
// compiler was allowed to use and the CPU has -- never the scalar reference
// on x86-64, where even the baseline has SSE2.
#include "../consumer_checks.hpp"

#if defined(KVC_USE_DISPATCH_LIBRARY)
#error "kvc::kvc-header-only must not define KVC_USE_DISPATCH_LIBRARY"
#endif

namespace {

// The instruction set header-only kvc should pick in this translation unit.
kvc::arch_id expected_arch() {
    const kvc::cpu_features& cpu = kvc::cpu();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__FMA__) && defined(__F16C__)
    if (cpu.avx512) return kvc::arch_id::avx512;
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (cpu.avx2) return kvc::arch_id::avx2;
#endif
#if defined(__ARM_NEON) && KVC_AARCH64
    if (cpu.neon) return kvc::arch_id::neon;
#endif
#if defined(__SSE2__) && KVC_X86_64
    if (cpu.sse2) return kvc::arch_id::sse2;
#endif
    (void)cpu;
    return kvc::arch_id::scalar;
}

} // namespace

int main() {
    int status = consumer::run_all("header_only");
    const kvc::arch_id active = kvc::active_arch(), expected = expected_arch();
    if (active != expected) {
        std::printf("FAIL active_arch(): expected %s (the best of -march=native and this CPU), got %s\n",
                    kvc::name_of(expected), kvc::name_of(active));
        status = 1;
    }
#if KVC_X86_64
    if (active == kvc::arch_id::scalar) {
        std::printf("FAIL active_arch(): scalar on x86-64; the inline SIMD kernels were not compiled in\n");
        status = 1;
    }
#endif
    return status;
}
