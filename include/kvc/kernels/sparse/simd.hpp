// kvc/kernels/sparse/simd.hpp -- the xsimd kernels of the sparse rows (Q10), templated on an xsimd Arch.
//
// Included at the end of kernels/simd/kernels.hpp, after kernels/quant/simd.hpp
// (whose softmax update and lane sums it reuses); the same rules hold: nothing
// but xsimd and templates on the Arch.
//
// Widening a slice of 16 elements (chunk_expander): AVX-512 loads the
// popcount(bits) kept fp16 values with a masked load (lanes past them are not
// read), converts them, and expands them to their positions with vexpandps.
// Other sets place the kept fp16 bits at their positions in a 16-element
// stack buffer of zeros and widen it with the set's fp16 loader (F16C on
// AVX2). Either way the slice exists only in registers or that small buffer.
//
// Decode attention: tokens in blocks of 64; logits of up to four query heads
// at a time (each key slice widened once for all of them, several key rows
// per step on wide vectors), one online-softmax update per head and block,
// then the weighted sum of the block's value rows in register tiles of one or
// two slices x heads; each value row's read position advances slice by slice
// (a per-token offset kept for the block), since kept counts differ per slice.
// encode_row is the scalar selection of sparse/common.hpp on every set.
#pragma once

#include <cstddef>
#include <cstdint>

#include <xsimd/xsimd.hpp>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/simd.hpp"
#include "kvc/kernels/simd/kernels.hpp"
#include "kvc/kernels/sparse/common.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace kvc::kernels::simd {
namespace sparse {

namespace sc = sparse_common;

// Slice -> sparse_chunk_elements / lanes float batches; returns the kept count.
// Portable = true uses only generic pieces (what NEON runs), for the tests.
template <class A, bool Portable = false>
struct chunk_expander {
    static constexpr std::size_t lanes = floats<A>::size;
    static constexpr std::size_t batches = sparse_chunk_elements / lanes;
    static unsigned expand(const unsigned char* halves, unsigned bits, floats<A>* out) noexcept {
        alignas(64) std::uint16_t scattered[sparse_chunk_elements];
        for (std::size_t i = 0; i < sparse_chunk_elements; ++i) scattered[i] = 0;
        unsigned kept = 0;
        for (; bits != 0; bits &= bits - 1, ++kept)
            scattered[sc::lowest_bit<A>(bits)] = sc::load_u16<A>(halves + 2 * kept);
        for (std::size_t b = 0; b < batches; ++b) {
            if constexpr (Portable) {
                alignas(64) float widened[lanes];
                for (std::size_t l = 0; l < lanes; ++l) widened[l] = common::half_bits_to_float<A>(scattered[b * lanes + l]);
                out[b] = floats<A>::load_aligned(widened);
            } else {
                out[b] = loader<A, dtype::f16>::load(scattered + b * lanes);
            }
        }
        return kept;
    }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <>
struct chunk_expander<xsimd::avx512bw, false> {
    static constexpr std::size_t batches = 1;
    static unsigned expand(const unsigned char* halves, unsigned bits, floats<xsimd::avx512bw>* out) noexcept {
        const unsigned kept = sc::popcount16<xsimd::avx512bw>(bits);
        const __m256i packed = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << kept) - 1u), halves);
        out[0] = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), _mm512_cvtph_ps(packed));
        return kept;
    }
};
#endif

template <class A, bool Portable>
void decode_row(const void* src, float* dst, std::size_t n) noexcept {
    using expander = chunk_expander<A, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    const auto* bitmap = static_cast<const unsigned char*>(src);
    const unsigned char* values = bitmap + n / 8;
    for (std::size_t e = 0; e < n; e += sparse_chunk_elements) {
        floats<A> x[expander::batches];
        values += 2 * expander::expand(values, sc::load_u16<A>(bitmap + e / 8), x);
        for (std::size_t b = 0; b < expander::batches; ++b) x[b].store_unaligned(dst + e + b * lanes);
    }
}

using quant::block_tokens;

// sums[i * H + h] = <q_h, k_i> for T consecutive key rows from `row`.
template <class A, bool Portable, std::size_t H, std::size_t T>
KVC_QUANT_INLINE void key_dots(const sparse_decode_problem& p, const unsigned char* row, const float* const* q,
                               float* sums) noexcept {
    using expander = chunk_expander<A, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = expander::batches;
    const std::size_t row_bytes = p.rows.key_row_bytes;
    const unsigned char* values[T];
    KVC_QUANT_UNROLL
    for (std::size_t i = 0; i < T; ++i) values[i] = row + i * row_bytes + p.dim / 8;
    floats<A> acc[T * H];
    KVC_QUANT_UNROLL
    for (std::size_t j = 0; j < T * H; ++j) acc[j] = floats<A>(0.0f);
    for (std::size_t e = 0; e < p.dim; e += sparse_chunk_elements) {
        floats<A> k[T][batches];
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < T; ++i)
            values[i] += 2 * expander::expand(values[i], sc::load_u16<A>(row + i * row_bytes + e / 8), k[i]);
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < batches; ++b) {
            KVC_QUANT_UNROLL
            for (std::size_t h = 0; h < H; ++h) {
                const floats<A> qv = floats<A>::load_unaligned(q[h] + e + b * lanes);
                KVC_QUANT_UNROLL
                for (std::size_t i = 0; i < T; ++i) acc[i * H + h] = xsimd::fma(qv, k[i][b], acc[i * H + h]);
            }
        }
    }
    quant::lane_sums<A, T * H, Portable>::reduce(acc, sums);
}

// weights[h][t] = scale * <q_h, k_(t0 + t)> + bias for the block's key rows.
template <class A, bool Portable, std::size_t H>
void key_logits(const sparse_decode_problem& p, std::size_t t0, std::size_t count, const float* const* q,
                float (*weights)[block_tokens]) noexcept {
    constexpr std::size_t T = floats<A>::size >= 16 ? 4 : (H <= 2 ? 2 : 1);
    const auto* rows = static_cast<const unsigned char*>(p.rows.keys) + t0 * p.rows.key_row_bytes;
    const float* bias = p.bias ? p.bias + t0 : nullptr;
    float sums[T * H];
    std::size_t t = 0;
    for (; t + T <= count; t += T) {
        key_dots<A, Portable, H, T>(p, rows + t * p.rows.key_row_bytes, q, sums);
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < T; ++i) {
            KVC_QUANT_UNROLL
            for (std::size_t h = 0; h < H; ++h) weights[h][t + i] = sums[i * H + h] * p.scale + (bias ? bias[t + i] : 0.0f);
        }
    }
    for (; t < count; ++t) {
        key_dots<A, Portable, H, 1>(p, rows + t * p.rows.key_row_bytes, q, sums);
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) weights[h][t] = sums[h] * p.scale + (bias ? bias[t] : 0.0f);
    }
}

// acc(g0 + h, slices c0 .. c0 + C - 1) += sum over the block's tokens of
// weights[h][t] * v_(t0 + t), H x C slices of accumulators in registers.
// offsets[t]: byte offset in row t of the first kept value of slice c0 (advanced here).
template <class A, bool Portable, std::size_t H, std::size_t C>
KVC_QUANT_INLINE void accumulate_tile(const sparse_decode_problem& p, float* acc_out, const unsigned char* rows,
                                      std::size_t count, std::size_t c0, const float (*weights)[block_tokens],
                                      std::uint32_t* offsets) noexcept {
    using expander = chunk_expander<A, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = expander::batches;
    const std::size_t row_bytes = p.rows.value_row_bytes;
    float* out = acc_out + c0 * sparse_chunk_elements;
    floats<A> acc[H][C * batches];
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < C * batches; ++b) acc[h][b] = floats<A>::load_unaligned(out + h * p.dim + b * lanes);
    }
    const unsigned char* row = rows;
    for (std::size_t t = 0; t < count; ++t, row += row_bytes) {
        floats<A> v[C * batches];
        std::uint32_t offset = offsets[t];
        KVC_QUANT_UNROLL
        for (std::size_t c = 0; c < C; ++c)
            offset += 2 * expander::expand(row + offset, sc::load_u16<A>(row + (c0 + c) * 2), v + c * batches);
        offsets[t] = offset;
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) {
            const floats<A> w(weights[h][t]);
            KVC_QUANT_UNROLL
            for (std::size_t b = 0; b < C * batches; ++b) acc[h][b] = xsimd::fma(w, v[b], acc[h][b]);
        }
    }
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < C * batches; ++b) acc[h][b].store_unaligned(out + h * p.dim + b * lanes);
    }
}

template <class A, bool Portable, std::size_t H>
void accumulate_values(const sparse_decode_problem& p, const decode_state& s, std::size_t g0, std::size_t t0,
                       std::size_t count, const float (*weights)[block_tokens]) noexcept {
    constexpr std::size_t batches = chunk_expander<A, Portable>::batches;
    constexpr std::size_t C = 2 * batches * H <= 16 ? 2 : 1;
    const auto* rows = static_cast<const unsigned char*>(p.rows.values) + t0 * p.rows.value_row_bytes;
    std::uint32_t offsets[block_tokens];
    for (std::size_t t = 0; t < count; ++t) offsets[t] = static_cast<std::uint32_t>(p.dim / 8);
    const std::size_t slices = p.dim / sparse_chunk_elements;
    float* acc = s.acc + g0 * p.dim;
    std::size_t c = 0;
    for (; c + C <= slices; c += C) accumulate_tile<A, Portable, H, C>(p, acc, rows, count, c, weights, offsets);
    for (; c < slices; ++c) accumulate_tile<A, Portable, H, 1>(p, acc, rows, count, c, weights, offsets);
}

template <class A, bool Portable, std::size_t H>
void attend_heads(const sparse_decode_problem& p, const decode_state& s, std::size_t g0) noexcept {
    alignas(64) float weights[H][block_tokens];
    const float* q[H];
    for (std::size_t h = 0; h < H; ++h) q[h] = p.queries + (g0 + h) * p.query_stride;
    for (std::size_t t0 = 0; t0 < p.tokens; t0 += block_tokens) {
        const std::size_t count = p.tokens - t0 < block_tokens ? p.tokens - t0 : block_tokens;
        key_logits<A, Portable, H>(p, t0, count, q, weights);
        for (std::size_t h = 0; h < H; ++h) {
            if (p.logits) {
                float* out = p.logits + (g0 + h) * p.logits_stride + t0;
                for (std::size_t t = 0; t < count; ++t) out[t] = weights[h][t];
            }
            softmax_update<A>(s, g0 + h, p.dim, weights[h], count);
        }
        accumulate_values<A, Portable, H>(p, s, g0, t0, count, weights);
    }
}

template <class A, bool Portable>
void attend_partial(const sparse_decode_problem& p, const decode_state& s) noexcept {
    if (p.tokens == 0) return;
    std::size_t g0 = 0;
    for (; g0 + 4 <= p.group; g0 += 4) attend_heads<A, Portable, 4>(p, s, g0);
    switch (p.group - g0) {
    case 3: attend_heads<A, Portable, 3>(p, s, g0); break;
    case 2: attend_heads<A, Portable, 2>(p, s, g0); break;
    case 1: attend_heads<A, Portable, 1>(p, s, g0); break;
    default: break;
    }
}

} // namespace sparse

// The sparse section of one instruction set's table (Portable: generic pieces only, for tests).
template <class A, bool Portable>
constexpr sparse_kernels make_sparse_kernels_of() noexcept {
    return sparse_kernels{
        {&sparse_common::encode_row<A, dtype::f32>, &sparse_common::encode_row<A, dtype::f16>,
         &sparse_common::encode_row<A, dtype::bf16>},
        &sparse::decode_row<A, Portable>,
        &sparse::attend_partial<A, Portable>,
    };
}

template <class A>
constexpr sparse_kernels make_sparse_kernels() noexcept {
    return make_sparse_kernels_of<A, false>();
}

} // namespace kvc::kernels::simd
