// kvc/kernels/simd/kernels.hpp -- the xsimd kernels, templated on an xsimd Arch.
//
// This header is included by the dispatch units (src/dispatch/*.cpp), each
// compiled with its own instruction-set flags, and, in header-only builds, by
// the consumer. It must contain nothing but xsimd and templates on Arch
// (docs/ARCHITECTURE.md): no STL containers, no non-template inline helpers.
//
// Layout of the work: a row of `dim` elements is processed as full batches of
// batch<float, A>::size lanes plus a scalar tail, so any head dim works; the
// hot shapes (dim a multiple of the batch width) never reach the tail.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include <xsimd/xsimd.hpp>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/table.hpp"

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

// Loops over the heads of a pass and the batches of a register tile have
// compile-time trip counts; unrolled, their accumulators live in registers
// instead of on the stack (measured: GCC 12 leaves them rolled otherwise).
#if defined(__clang__)
#define KVC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KVC_UNROLL _Pragma("GCC unroll 16")
#else
#define KVC_UNROLL
#endif

namespace kvc::kernels::simd {

template <class A>
using floats = xsimd::batch<float, A>;

// Widening loads: one batch of floats from the storage format. The generic
// versions go through the scalar conversion; each instruction set specialises
// what it can do in registers.
template <class A, dtype D>
struct loader {
    static floats<A> load(const void* p) noexcept {
        using storage = typename common::element<A, D>::storage;
        alignas(64) float buffer[floats<A>::size];
        const auto* src = static_cast<const storage*>(p);
        for (std::size_t i = 0; i < floats<A>::size; ++i) buffer[i] = common::element<A, D>::load(src + i);
        return floats<A>::load_aligned(buffer);
    }
};

template <class A>
struct loader<A, dtype::f32> {
    static floats<A> load(const void* p) noexcept { return floats<A>::load_unaligned(static_cast<const float*>(p)); }
};

// Software fp16 -> fp32 on 32-bit lanes holding half bits, for instruction sets
// without a conversion instruction (SSE2). Normal numbers rebias the exponent;
// subnormals are rebuilt as (mantissa * 2^-24) exactly; inf/NaN keep all-ones.
template <class A>
inline floats<A> half_lanes_to_float(xsimd::batch<std::uint32_t, A> h) noexcept {
    using u32 = xsimd::batch<std::uint32_t, A>;
    using i32 = xsimd::batch<std::int32_t, A>;
    const u32 sign = (h & u32(0x8000u)) << 16;
    const u32 exponent = h & u32(0x7c00u);
    const u32 mantissa = h & u32(0x03ffu);
    const u32 normal = ((exponent + u32(112u << 10)) | mantissa) << 13;
    const u32 quiet = xsimd::select(mantissa != u32(0u), u32(0x00400000u), u32(0u));
    const u32 special = u32(0x7f800000u) | (mantissa << 13) | quiet;
    const floats<A> subnormal_value =
        xsimd::batch_cast<float>(xsimd::bitwise_cast<i32>(mantissa)) * floats<A>(5.9604644775390625e-08f);
    const u32 subnormal = xsimd::bitwise_cast<u32>(subnormal_value);
    const u32 magnitude =
        xsimd::select(exponent == u32(0u), subnormal, xsimd::select(exponent == u32(0x7c00u), special, normal));
    return xsimd::bitwise_cast<floats<A>>(magnitude | sign);
}

#if defined(__SSE2__)
template <>
struct loader<xsimd::sse2, dtype::f16> {
    static floats<xsimd::sse2> load(const void* p) noexcept {
        const __m128i h = _mm_loadl_epi64(static_cast<const __m128i*>(p));
        return half_lanes_to_float<xsimd::sse2>(xsimd::batch<std::uint32_t, xsimd::sse2>(_mm_unpacklo_epi16(h, _mm_setzero_si128())));
    }
};
template <>
struct loader<xsimd::sse2, dtype::bf16> {
    static floats<xsimd::sse2> load(const void* p) noexcept {
        const __m128i h = _mm_loadl_epi64(static_cast<const __m128i*>(p));
        return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
    }
};
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
using avx2_arch = xsimd::fma3<xsimd::avx2>;
template <>
struct loader<avx2_arch, dtype::f16> {
    static floats<avx2_arch> load(const void* p) noexcept {
        return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    }
};
template <>
struct loader<avx2_arch, dtype::bf16> {
    static floats<avx2_arch> load(const void* p) noexcept {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct loader<xsimd::avx512bw, dtype::f16> {
    static floats<xsimd::avx512bw> load(const void* p) noexcept {
        return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    }
};
template <>
struct loader<xsimd::avx512bw, dtype::bf16> {
    static floats<xsimd::avx512bw> load(const void* p) noexcept {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
};
#endif

#if defined(__ARM_NEON) && defined(__aarch64__)
template <>
struct loader<xsimd::neon64, dtype::f16> {
    static floats<xsimd::neon64> load(const void* p) noexcept {
        return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const std::uint16_t*>(p))));
    }
};
template <>
struct loader<xsimd::neon64, dtype::bf16> {
    static floats<xsimd::neon64> load(const void* p) noexcept {
        return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const std::uint16_t*>(p)), 16));
    }
};
#endif

// Narrowing stores: one batch of floats into the storage format, round to
// nearest even. Generic: per lane through the scalar conversion.
template <class A, dtype D>
struct storer {
    static void store(void* p, floats<A> x) noexcept {
        using storage = typename common::element<A, D>::storage;
        alignas(64) float buffer[floats<A>::size];
        x.store_aligned(buffer);
        auto* dst = static_cast<storage*>(p);
        for (std::size_t i = 0; i < floats<A>::size; ++i) common::element<A, D>::store(dst + i, buffer[i]);
    }
};
template <class A>
struct storer<A, dtype::f32> {
    static void store(void* p, floats<A> x) noexcept { x.store_unaligned(static_cast<float*>(p)); }
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <>
struct storer<avx2_arch, dtype::f16> {
    static void store(void* p, floats<avx2_arch> x) noexcept {
        _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
};
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct storer<xsimd::avx512bw, dtype::f16> {
    static void store(void* p, floats<xsimd::avx512bw> x) noexcept {
        _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
};
#endif

// Largest and smallest lane (exact: max and min do not round; signed zeros
// and NaN are taken care of by the caller).
template <class A, bool Portable = false>
struct lane_extremes {
    static float max(floats<A> x) noexcept {
        alignas(64) float lanes[floats<A>::size];
        x.store_aligned(lanes);
        float m = lanes[0];
        for (std::size_t l = 1; l < floats<A>::size; ++l) m = lanes[l] > m ? lanes[l] : m;
        return m;
    }
    static float min(floats<A> x) noexcept {
        alignas(64) float lanes[floats<A>::size];
        x.store_aligned(lanes);
        float m = lanes[0];
        for (std::size_t l = 1; l < floats<A>::size; ++l) m = lanes[l] < m ? lanes[l] : m;
        return m;
    }
};

#if defined(__SSE2__)
template <>
struct lane_extremes<xsimd::sse2, false> {
    static float max(floats<xsimd::sse2> x) noexcept {
        const __m128 m = _mm_max_ps(x, _mm_movehl_ps(x, x));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
    static float min(floats<xsimd::sse2> x) noexcept {
        const __m128 m = _mm_min_ps(x, _mm_movehl_ps(x, x));
        return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
};
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
template <>
struct lane_extremes<avx2_arch, false> {
    static float max(floats<avx2_arch> x) noexcept {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
    static float min(floats<avx2_arch> x) noexcept {
        __m128 m = _mm_min_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct lane_extremes<xsimd::avx512bw, false> {
    static float max(floats<xsimd::avx512bw> x) noexcept {
        const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
    static float min(floats<xsimd::avx512bw> x) noexcept {
        const __m256 h = _mm256_min_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
        __m128 m = _mm_min_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
    }
};
#endif

template <class A, dtype D>
float dot(const float* q, const void* row, std::size_t n) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* x = static_cast<const storage*>(row);
    floats<A> acc0(0.0f), acc1(0.0f);
    std::size_t i = 0;
    for (; i + 2 * lanes <= n; i += 2 * lanes) {
        acc0 = xsimd::fma(floats<A>::load_unaligned(q + i), loader<A, D>::load(x + i), acc0);
        acc1 = xsimd::fma(floats<A>::load_unaligned(q + i + lanes), loader<A, D>::load(x + i + lanes), acc1);
    }
    for (; i + lanes <= n; i += lanes) acc0 = xsimd::fma(floats<A>::load_unaligned(q + i), loader<A, D>::load(x + i), acc0);
    float total = xsimd::hadd(acc0 + acc1);
    for (; i < n; ++i) total += q[i] * common::element<A, D>::load(x + i);
    return total;
}

template <class A, dtype D>
void axpy(float a, const void* row, float* y, std::size_t n) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* x = static_cast<const storage*>(row);
    const floats<A> factor(a);
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes)
        xsimd::fma(factor, loader<A, D>::load(x + i), floats<A>::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < n; ++i) y[i] += a * common::element<A, D>::load(x + i);
}

template <class A, dtype D>
void from_f32(const float* src, void* dst_row, std::size_t n) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    auto* dst = static_cast<storage*>(dst_row);
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes) storer<A, D>::store(dst + i, floats<A>::load_unaligned(src + i));
    for (; i < n; ++i) common::element<A, D>::store(dst + i, src[i]);
}

template <class A, dtype D>
void to_f32(const void* src_row, float* dst, std::size_t n) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* src = static_cast<const storage*>(src_row);
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes) loader<A, D>::load(src + i).store_unaligned(dst + i);
    for (; i < n; ++i) dst[i] = common::element<A, D>::load(src + i);
}

template <class A>
void softmax(float* x, std::size_t n) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    if (n == 0) return;
    // Pass 1: max. Pass 2: exponentials and their sum. Pass 3: scale.
    floats<A> running(-std::numeric_limits<float>::infinity());
    std::size_t i = 0;
    for (; i + lanes <= n; i += lanes) running = xsimd::max(running, floats<A>::load_unaligned(x + i));
    alignas(64) float lane_max[lanes];
    running.store_aligned(lane_max);
    float max = lane_max[0];
    for (std::size_t l = 1; l < lanes; ++l) max = lane_max[l] > max ? lane_max[l] : max;
    for (; i < n; ++i) max = x[i] > max ? x[i] : max;
    const floats<A> max_batch(max);
    floats<A> sums(0.0f);
    float sum = 0.0f;
    for (i = 0; i + lanes <= n; i += lanes) {
        const floats<A> e = xsimd::exp(floats<A>::load_unaligned(x + i) - max_batch);
        e.store_unaligned(x + i);
        sums += e;
    }
    for (; i < n; ++i) {
        x[i] = common::exp<A>(x[i] - max);
        sum += x[i];
    }
    sum += xsimd::hadd(sums);
    const float inverse = 1.0f / sum;
    const floats<A> inverse_batch(inverse);
    for (i = 0; i + lanes <= n; i += lanes) (floats<A>::load_unaligned(x + i) * inverse_batch).store_unaligned(x + i);
    for (; i < n; ++i) x[i] *= inverse;
}

// common::accumulate_mass with xsimd's exp: one exp per logit is the whole
// cost of the attention statistics, and the scalar libm call made them ~50%
// of a decode step at 32K tokens and GQA 4.
template <class A>
void accumulate_mass(const float* logits, std::size_t logits_stride, std::size_t group, std::size_t tokens,
                     const float* max, const float* sum, float* mass) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    for (std::size_t g = 0; g < group; ++g) {
        if (!(sum[g] > 0.0f)) continue;
        const float inverse = 1.0f / sum[g];
        const floats<A> max_batch(max[g]), inverse_batch(inverse);
        const float* row = logits + g * logits_stride;
        std::size_t t = 0;
        for (; t + lanes <= tokens; t += lanes) {
            const floats<A> p = xsimd::exp(floats<A>::load_unaligned(row + t) - max_batch) * inverse_batch;
            (floats<A>::load_unaligned(mass + t) + p).store_unaligned(mass + t);
        }
        for (; t < tokens; ++t) mass[t] += common::exp<A>(row[t] - max[g]) * inverse;
    }
}

// Decode attention partial. Tokens are processed in blocks of 64, for H query
// heads of the group at a time (H = 4, then the 1-3 left over, all known at
// compile time so a group of 1 does one head's arithmetic, not four):
// the logits of a block (each key row loaded and widened once for the H
// heads), one online-softmax update per head and block, then the weighted sum
// of the block's value rows (each value row widened once for the H heads, the
// accumulators held in registers across the block).
// Tokens per block of the decode kernel: one online-softmax update per block.
inline constexpr std::size_t decode_block = 64;

// weights[h][i] = scale * <q_h, k_(first + i)> + bias for Tokens consecutive
// key rows starting at `k` (key_width(p) elements each, `full` of them in
// whole batches), H heads: H x Tokens accumulators in registers.
// `weights` points at weights[0][i0] of a [H][decode_block] array.
template <class A, dtype D, std::size_t H, std::size_t Tokens>
inline void key_logits(const decode_problem& p, const typename common::element<A, D>::storage* k,
                       const float* const* q, std::size_t full, std::size_t first, float* weights) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    const std::size_t width = key_width(p);
    floats<A> acc[Tokens][H];
    KVC_UNROLL
    for (std::size_t i = 0; i < Tokens; ++i) {
        KVC_UNROLL
        for (std::size_t h = 0; h < H; ++h) acc[i][h] = floats<A>(0.0f);
    }
    for (std::size_t d = 0; d < full; d += lanes) {
        KVC_UNROLL
        for (std::size_t i = 0; i < Tokens; ++i) {
            const floats<A> kv = loader<A, D>::load(k + i * p.key_stride + d);
            KVC_UNROLL
            for (std::size_t h = 0; h < H; ++h) acc[i][h] = xsimd::fma(floats<A>::load_unaligned(q[h] + d), kv, acc[i][h]);
        }
    }
    KVC_UNROLL
    for (std::size_t i = 0; i < Tokens; ++i) {
        KVC_UNROLL
        for (std::size_t h = 0; h < H; ++h) {
            float logit = xsimd::hadd(acc[i][h]);
            for (std::size_t d = full; d < width; ++d)
                logit += q[h][d] * common::element<A, D>::load(k + i * p.key_stride + d);
            weights[h * decode_block + i] = logit * p.scale + (p.bias ? p.bias[first + i] : 0.0f);
        }
    }
}

// acc(g0 + h, d0 .. d0 + Tile * lanes) += sum over the block's tokens of
// weights[h][t] * v_t, with the H x Tile accumulators in registers.
template <class A, dtype D, std::size_t H, std::size_t Tile>
inline void accumulate_values(const decode_problem& p, const decode_state& s, std::size_t g0, std::size_t t0,
                              std::size_t count, std::size_t d0, const float (*weights)[decode_block]) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* values = static_cast<const storage*>(p.values) + t0 * p.value_stride + d0;
    floats<A> acc[H][Tile];
    KVC_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) acc[h][j] = floats<A>::load_unaligned(s.acc + (g0 + h) * p.dim + d0 + j * lanes);
    }
    for (std::size_t t = 0; t < count; ++t) {
        const storage* v = values + t * p.value_stride;
        floats<A> weight[H];
        KVC_UNROLL
        for (std::size_t h = 0; h < H; ++h) weight[h] = floats<A>(weights[h][t]);
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) {
            const floats<A> vv = loader<A, D>::load(v + j * lanes);
            KVC_UNROLL
            for (std::size_t h = 0; h < H; ++h) acc[h][j] = xsimd::fma(weight[h], vv, acc[h][j]);
        }
    }
    KVC_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) acc[h][j].store_unaligned(s.acc + (g0 + h) * p.dim + d0 + j * lanes);
    }
}

// Online-softmax update of head g with a block's logits in w (count of them):
// rescales the state to the new max, turns w into exp(logit - max), adds their sum.
template <class A>
void softmax_update(const decode_state& s, std::size_t g, std::size_t dim, float* w, std::size_t count) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    float block_max = -std::numeric_limits<float>::infinity();
    std::size_t i = 0;
    if (count >= lanes) {
        floats<A> m = floats<A>::load_aligned(w);
        for (i = lanes; i + lanes <= count; i += lanes) m = xsimd::max(m, floats<A>::load_aligned(w + i));
        block_max = lane_extremes<A>::max(m);
    }
    for (; i < count; ++i) block_max = w[i] > block_max ? w[i] : block_max;
    const float new_max = block_max > s.max[g] ? block_max : s.max[g];
    if (new_max > s.max[g]) {
        const float rescale = common::exp<A>(s.max[g] - new_max);
        s.sum[g] *= rescale;
        float* acc = s.acc + g * dim;
        const floats<A> factor(rescale);
        std::size_t d = 0;
        for (; d + lanes <= dim; d += lanes) (floats<A>::load_unaligned(acc + d) * factor).store_unaligned(acc + d);
        for (; d < dim; ++d) acc[d] *= rescale;
        s.max[g] = new_max;
    }
    const floats<A> max_batch(new_max);
    floats<A> sums(0.0f);
    std::size_t t = 0;
    for (; t + lanes <= count; t += lanes) {
        const floats<A> e = xsimd::exp(floats<A>::load_aligned(w + t) - max_batch);
        e.store_aligned(w + t);
        sums += e;
    }
    float sum = xsimd::hadd(sums);
    if (t < count) {
        alignas(64) float tail[lanes];
        for (std::size_t i = 0; i < lanes; ++i) tail[i] = t + i < count ? w[t + i] : -std::numeric_limits<float>::infinity();
        xsimd::exp(floats<A>::load_aligned(tail) - max_batch).store_aligned(tail);
        for (std::size_t i = 0; t + i < count; ++i) {
            w[t + i] = tail[i];
            sum += tail[i];
        }
    }
    s.sum[g] += sum;
}

template <class A, dtype D, std::size_t H>
void attend_heads(const decode_problem& p, const decode_state& s, std::size_t g0) noexcept {
    using storage = typename common::element<A, D>::storage;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t block = decode_block;
    const auto* keys = static_cast<const storage*>(p.keys);
    const auto* values = static_cast<const storage*>(p.values);
    const std::size_t dim = p.dim;
    const std::size_t full = dim - dim % lanes; // value elements covered by whole batches
    const std::size_t key_full = key_width(p) - key_width(p) % lanes;
    alignas(64) float weights[H][block];
    const float* q[H];
    for (std::size_t h = 0; h < H; ++h) q[h] = p.queries + (g0 + h) * p.query_stride;

    for (std::size_t t0 = 0; t0 < p.tokens; t0 += block) {
        const std::size_t count = p.tokens - t0 < block ? p.tokens - t0 : block;

        // Logits of this block, `tokens_per_step` tokens at a time so that
        // small groups still keep several independent FMA chains in flight.
        constexpr std::size_t tokens_per_step = H >= 3 ? 1 : 2;
        std::size_t t = 0;
        for (; t + tokens_per_step <= count; t += tokens_per_step)
            key_logits<A, D, H, tokens_per_step>(p, keys + (t0 + t) * p.key_stride, q, key_full, t0 + t, &weights[0][t]);
        for (; t < count; ++t) key_logits<A, D, H, 1>(p, keys + (t0 + t) * p.key_stride, q, key_full, t0 + t, &weights[0][t]);

        // Online softmax update; weights become exp(logit - new max).
        for (std::size_t h = 0; h < H; ++h) {
            const std::size_t g = g0 + h;
            if (p.logits) {
                float* out = p.logits + g * p.logits_stride + t0;
                for (std::size_t t = 0; t < count; ++t) out[t] = weights[h][t];
            }
            softmax_update<A>(s, g, dim, weights[h], count);
        }

        // Weighted sum of value rows: register tiles of `tile` batches x H
        // heads over the block's tokens, then single batches for the rest.
        constexpr std::size_t tile = H <= 2 ? 8 : 4;
        std::size_t d0 = 0;
        for (; d0 + tile * lanes <= full; d0 += tile * lanes) accumulate_values<A, D, H, tile>(p, s, g0, t0, count, d0, weights);
        if (tile > 4 && d0 + 4 * lanes <= full) accumulate_values<A, D, H, 4>(p, s, g0, t0, count, d0, weights), d0 += 4 * lanes;
        if (d0 + 2 * lanes <= full) accumulate_values<A, D, H, 2>(p, s, g0, t0, count, d0, weights), d0 += 2 * lanes;
        if (d0 < full) accumulate_values<A, D, H, 1>(p, s, g0, t0, count, d0, weights);
        for (std::size_t d = full; d < dim; ++d)
            for (std::size_t h = 0; h < H; ++h) {
                float total = s.acc[(g0 + h) * dim + d];
                for (std::size_t t = 0; t < count; ++t)
                    total += weights[h][t] * common::element<A, D>::load(values + (t0 + t) * p.value_stride + d);
                s.acc[(g0 + h) * dim + d] = total;
            }
    }
}

template <class A, dtype D>
void attend_partial(const decode_problem& p, const decode_state& s) noexcept {
    std::size_t g0 = 0;
    for (; g0 + 4 <= p.group; g0 += 4) attend_heads<A, D, 4>(p, s, g0);
    switch (p.group - g0) {
    case 3: attend_heads<A, D, 3>(p, s, g0); break;
    case 2: attend_heads<A, D, 2>(p, s, g0); break;
    case 1: attend_heads<A, D, 1>(p, s, g0); break;
    default: break;
    }
}

template <class A, dtype D>
void prefill(const prefill_problem& p, float* workspace) noexcept {
    common::prefill_by_rows<A, &attend_partial<A, D>>(p, workspace);
}

// The quantization section (kernels/quant/simd.hpp, included at the end of this header).
template <class A>
constexpr quant_kernels make_quant_kernels() noexcept;
// The Q4 rotation section (kernels/hadamard/simd.hpp, included at the end of this header).
template <class A>
constexpr hadamard_kernels make_hadamard_kernels() noexcept;
// The sparse section (kernels/sparse/simd.hpp, included at the end of this header).
template <class A>
constexpr sparse_kernels make_sparse_kernels() noexcept;
// The KIVI section (kernels/quant/kivi_simd.hpp, included at the end of quant/simd.hpp,
// whose pieces it uses, so that any of the three headers may come first).
template <class A>
constexpr kivi_kernels make_kivi_kernels() noexcept;

// The CQ section (kernels/quant/cq_simd.hpp, included at the end of this header).
template <class A>
constexpr cq_kernels make_cq_kernels() noexcept;
// The KVQuant section (kernels/quant/kvquant_simd.hpp, included at the end of this header).
template <class A>
constexpr kvquant_kernels make_kvquant_kernels() noexcept;
// The GEAR section (kernels/quant/gear_simd.hpp, included at the end of quant/simd.hpp: it chains the Q1 kernels).
template <class A>
constexpr gear_kernels make_gear_kernels() noexcept;

// The table of one instruction set.
template <class A>
constexpr kernel_table make_table(arch_id arch) noexcept {
    return kernel_table{
        arch,
        {&dot<A, dtype::f32>, &dot<A, dtype::f16>, &dot<A, dtype::bf16>},
        {&axpy<A, dtype::f32>, &axpy<A, dtype::f16>, &axpy<A, dtype::bf16>},
        &softmax<A>,
        {&from_f32<A, dtype::f32>, &from_f32<A, dtype::f16>, &from_f32<A, dtype::bf16>},
        {&to_f32<A, dtype::f32>, &to_f32<A, dtype::f16>, &to_f32<A, dtype::bf16>},
        {&attend_partial<A, dtype::f32>, &attend_partial<A, dtype::f16>, &attend_partial<A, dtype::bf16>},
        {&prefill<A, dtype::f32>, &prefill<A, dtype::f16>, &prefill<A, dtype::bf16>},
        make_quant_kernels<A>(),
        make_hadamard_kernels<A>(),
        make_sparse_kernels<A>(),
        make_kivi_kernels<A>(),
        make_cq_kernels<A>(),
        make_kvquant_kernels<A>(),
        make_gear_kernels<A>(),
        &accumulate_mass<A>,
    };
}

} // namespace kvc::kernels::simd

#include "kvc/kernels/hadamard/simd.hpp"
#include "kvc/kernels/quant/simd.hpp" // includes kernels/sparse/simd.hpp and quant/kivi_simd.hpp and quant/gear_simd.hpp at its end
#include "kvc/kernels/quant/cq_simd.hpp"
#include "kvc/kernels/quant/kvquant_simd.hpp"
