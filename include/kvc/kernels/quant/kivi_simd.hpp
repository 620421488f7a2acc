// kvc/kernels/quant/kivi_simd.hpp -- the xsimd KIVI (Q2) attention, templated on an xsimd Arch.
//
// Included at the end of kernels/quant/simd.hpp (so after it), whose
// pieces it reuses (payload decoders, lane sums, the online-softmax update and
// the packed value accumulation); the same rules hold: nothing but xsimd and
// templates on the Arch.
//
// Keys of a block share per-channel scales d_c and minimums m_c, so for query h
//   <q_h, k_i> = sum_c (q_hc d_c) code_ic + sum_c q_hc m_c.
// Per block and query head the kernel computes w_h = q_h * d (dim floats, a
// stack buffer) and the constant C_h = <q_h, m> once; each token's logit is
// then one dot of its codes, widened in registers payload by payload, with
// w_h: one FMA per element and no dequantized key. Tokens go in pieces of at
// most 64 (one online-softmax update per head and piece), their value rows
// through quant::accumulate_values (packed rows, accumulators in registers).
// The fp16 sink and residual rows run through the fp16 decode partial; all
// three segments share the running state.
//
// Rounding: the logit is computed from the factors of each key element
// instead of from its float value code * d_c + m_c, so it differs from the
// dot with the element values by a few ulp of sum_c |q_c| (|code d_c| + |m_c|)
// (the tests' bound uses that sum instead of sum |q_c k_c|).
#pragma once

#include <cstddef>
#include <cstdint>

#include <xsimd/xsimd.hpp>

#include "kvc/core/config.hpp"
#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/kivi_common.hpp"
#include "kvc/kernels/quant/kivi_problem.hpp"
#include "kvc/kernels/quant/simd.hpp"

namespace kvc::kernels::simd {
namespace kivi {

inline constexpr std::size_t max_dim = kivi_max_dim;

// sums[i * H + h] = <w_h, codes of token i .. i + T - 1 of `rows`> for T
// consecutive code rows; every payload is widened once and used for all H heads.
template <class A, bool Portable, quant_format F, std::size_t H, std::size_t T>
KVC_QUANT_INLINE void code_dots(const unsigned char* rows, std::size_t row_bytes, std::size_t dim,
                                const float (*w)[max_dim], float* sums) noexcept {
    using decoder = quant::codes<A, F, Portable>;
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t batches = decoder::batches;
    floats<A> acc[T * H];
    KVC_QUANT_UNROLL
    for (std::size_t j = 0; j < T * H; ++j) acc[j] = floats<A>(0.0f);
    const unsigned char* payload = rows;
    for (std::size_t e = 0; e < dim; e += quant_payload_elements, payload += format_traits<F>::payload_bytes) {
        floats<A> k[T][batches];
        KVC_QUANT_UNROLL
        for (std::size_t i = 0; i < T; ++i) decoder::decode(payload + i * row_bytes, k[i]);
        KVC_QUANT_UNROLL
        for (std::size_t b = 0; b < batches; ++b) {
            KVC_QUANT_UNROLL
            for (std::size_t h = 0; h < H; ++h) {
                const floats<A> wv = floats<A>::load_aligned(w[h] + e + b * lanes);
                KVC_QUANT_UNROLL
                for (std::size_t i = 0; i < T; ++i) acc[i * H + h] = xsimd::fma(wv, k[i][b], acc[i * H + h]);
            }
        }
    }
    quant::lane_sums<A, T * H, Portable>::reduce(acc, sums);
}

// weights[h][i] = scale * (<w_h, codes of token i0 + i> + constant[h]) + bias,
// i < count, for the tokens of one block.
template <class A, bool Portable, quant_format F, std::size_t H>
void block_logits(const kivi_decode_problem& p, const unsigned char* block, std::size_t i0, std::size_t count,
                  const float (*w)[max_dim], const float* constant, const float* bias,
                  float (*weights)[quant::block_tokens]) noexcept {
    constexpr std::size_t T = floats<A>::size >= 16 ? 4 : (H <= 2 ? 2 : 1);
    const std::size_t row_bytes = kivi_code_row_bytes(F, p.dim);
    const unsigned char* rows = block + 4 * p.dim + i0 * row_bytes;
    float sums[T * H];
    std::size_t i = 0;
    for (; i + T <= count; i += T) {
        code_dots<A, Portable, F, H, T>(rows + i * row_bytes, row_bytes, p.dim, w, sums);
        KVC_QUANT_UNROLL
        for (std::size_t j = 0; j < T; ++j) {
            KVC_QUANT_UNROLL
            for (std::size_t h = 0; h < H; ++h)
                weights[h][i + j] = (sums[j * H + h] + constant[h]) * p.scale + (bias ? bias[i + j] : 0.0f);
        }
    }
    for (; i < count; ++i) {
        code_dots<A, Portable, F, H, 1>(rows + i * row_bytes, row_bytes, p.dim, w, sums);
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) weights[h][i] = (sums[h] + constant[h]) * p.scale + (bias ? bias[i] : 0.0f);
    }
}

// w_h = q_h * d and constant[h] = <q_h, m> for one block (scales and minimums widened from fp16).
template <class A, std::size_t H>
void prepare_block(const unsigned char* block, std::size_t dim, const float* const* q, float (*w)[max_dim],
                   float* constant) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    floats<A> c[H];
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) c[h] = floats<A>(0.0f);
    for (std::size_t e = 0; e < dim; e += lanes) {
        const floats<A> scale = loader<A, dtype::f16>::load(block + 2 * e);
        const floats<A> minimum = loader<A, dtype::f16>::load(block + 2 * dim + 2 * e);
        KVC_QUANT_UNROLL
        for (std::size_t h = 0; h < H; ++h) {
            const floats<A> qv = floats<A>::load_unaligned(q[h] + e);
            (qv * scale).store_aligned(w[h] + e);
            c[h] = xsimd::fma(qv, minimum, c[h]);
        }
    }
    KVC_QUANT_UNROLL
    for (std::size_t h = 0; h < H; ++h) constant[h] = xsimd::hadd(c[h]);
}

template <class A, bool Portable, quant_format F, std::size_t H>
void attend_heads(const kivi_decode_problem& p, const decode_state& s, std::size_t g0) noexcept {
    alignas(64) float w[H][max_dim];
    alignas(64) float weights[H][quant::block_tokens];
    float constant[H];
    const float* q[H];
    for (std::size_t h = 0; h < H; ++h) q[h] = p.queries + (g0 + h) * p.query_stride;
    // The value rows as the quant section's packed-row problem.
    quant_decode_problem values;
    values.rows.values = p.values;
    values.rows.value_row_bytes = p.value_row_bytes;
    values.rows.value_format = F;
    values.rows.group_size = p.group_size;
    values.dim = p.dim;
    const auto* blocks = static_cast<const unsigned char*>(p.key_blocks);
    const std::size_t first = p.sink.tokens;
    for (std::size_t t0 = 0; t0 < p.quantized; t0 += p.group_size) {
        const unsigned char* block = blocks + t0 / p.group_size * p.key_block_bytes;
        prepare_block<A, H>(block, p.dim, q, w, constant);
        const std::size_t in_block = p.quantized - t0 < p.group_size ? p.quantized - t0 : p.group_size;
        for (std::size_t i0 = 0; i0 < in_block; i0 += quant::block_tokens) {
            const std::size_t count = in_block - i0 < quant::block_tokens ? in_block - i0 : quant::block_tokens;
            const std::size_t t = t0 + i0;
            block_logits<A, Portable, F, H>(p, block, i0, count, w, constant, p.bias ? p.bias + first + t : nullptr,
                                            weights);
            for (std::size_t h = 0; h < H; ++h) {
                if (p.logits) {
                    float* out = p.logits + (g0 + h) * p.logits_stride + first + t;
                    for (std::size_t j = 0; j < count; ++j) out[j] = weights[h][j];
                }
                softmax_update<A>(s, g0 + h, p.dim, weights[h], count);
            }
            quant::accumulate_values<A, Portable, F, H>(values, s, g0, t, count, weights);
        }
    }
}

template <class A, bool Portable, quant_format F>
void packed_partial(const kivi_decode_problem& p, const decode_state& s) noexcept {
    std::size_t g0 = 0;
    for (; g0 + 4 <= p.group; g0 += 4) attend_heads<A, Portable, F, 4>(p, s, g0);
    switch (p.group - g0) {
    case 3: attend_heads<A, Portable, F, 3>(p, s, g0); break;
    case 2: attend_heads<A, Portable, F, 2>(p, s, g0); break;
    case 1: attend_heads<A, Portable, F, 1>(p, s, g0); break;
    default: break;
    }
}

template <class A, bool Portable>
void attend_partial(const kivi_decode_problem& p, const decode_state& s) noexcept {
    if (p.sink.tokens > 0) simd::attend_partial<A, dtype::f16>(kivi_common::segment_problem<A>(p, p.sink, 0), s);
    if (p.quantized > 0) {
        if (p.format == quant_format::int4_asym) packed_partial<A, Portable, quant_format::int4_asym>(p, s);
        else packed_partial<A, Portable, quant_format::int2_asym>(p, s);
    }
    if (p.residual.tokens > 0)
        simd::attend_partial<A, dtype::f16>(kivi_common::segment_problem<A>(p, p.residual, p.sink.tokens + p.quantized),
                                            s);
}

template <class A, quant_format F>
void quantize_key_block(const std::uint16_t* keys, std::size_t stride, std::size_t dim, std::size_t group_size,
                        unsigned char* block, unsigned char* non_finite) noexcept {
    kivi_common::quantize_key_block<A, F>(keys, stride, dim, group_size, block, non_finite);
}

template <class A, quant_format F>
void dequantize_key(const unsigned char* block, std::size_t dim, std::size_t i, float* out) noexcept {
    kivi_common::dequantize_key<A, F>(block, dim, i, out);
}

} // namespace kivi

// The KIVI section of one instruction set's table (Portable as make_quant_kernels_of).
template <class A, bool Portable>
constexpr kivi_kernels make_kivi_kernels_of() noexcept {
    using F = quant_format;
    return kivi_kernels{
        {&kivi::quantize_key_block<A, F::int2_asym>, &kivi::quantize_key_block<A, F::int4_asym>},
        {&kivi::dequantize_key<A, F::int2_asym>, &kivi::dequantize_key<A, F::int4_asym>},
        &kivi::attend_partial<A, Portable>,
    };
}

template <class A>
constexpr kivi_kernels make_kivi_kernels() noexcept {
    return make_kivi_kernels_of<A, false>();
}

} // namespace kvc::kernels::simd
