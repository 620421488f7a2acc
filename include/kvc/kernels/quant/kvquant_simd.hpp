// kvc/kernels/quant/kvquant_simd.hpp -- the KVQuant (Q3) attention kernel, templated on an xsimd Arch.
//
// Included at the end of kernels/simd/kernels.hpp (xsimd and Arch templates
// only, as every dispatch-unit header). The stored form is described in
// kernels/quant/kvquant_problem.hpp.
//
// Per block of 64 tokens and pass of H <= 4 query heads (queries first copied
// into stored channel order, once per call):
// 1. Each key row is decoded into one stack row of dim floats (the only
//    widened copy, reused for every token): codes -> codebook value in
//    registers (AVX-512: 16-entry permute; AVX2: 8-entry permutes; other sets
//    through a small per-batch buffer), times the channel scale plus offset;
//    the token's outliers then overwrite their elements; the row is rotated by
//    RoPE in place and dotted with the H queries.
// 2. RoPE without per-token trigonometry: cos/sin of position * frequency per
//    pair are carried from one token to the next by the angle-addition
//    recurrence in double (one complex multiply per pair and token) when the
//    next position is one more than the last, and re-anchored with cos/sin
//    when it is not (after eviction) and every 1024 tokens, so rounding
//    drift stays below ~1e-13. The rotation itself is done in float.
//    (Rotating the key once serves all H query heads; rotating each query
//    per token would cost H times more.)
// 3. One online-softmax update per head and block.
// 4. Values: register tiles of H heads x Tile batches accumulate
//    (weight * half-range) * codebook value over the block's tokens; the
//    offsets' share, sum_t weight * offset, is added once per block and head.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include <xsimd/xsimd.hpp>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/kvquant_problem.hpp"
#include "kvc/kernels/simd/kernels.hpp"

namespace kvc::kernels::simd {
namespace kvquant {

// Tokens between re-anchorings of the RoPE recurrence.
inline constexpr std::size_t rope_anchor_interval = 1024;

template <class A>
inline double cosine(double x) noexcept {
    return __builtin_cos(x);
}
template <class A>
inline double sine(double x) noexcept {
    return __builtin_sin(x);
}

// Codebook values of floats<A>::size consecutive elements of a packed row.
// Generic: through a per-batch stack buffer.
template <class A>
struct codebook {
    const float* table;
    unsigned bits;
    codebook(const float* t, unsigned b) noexcept : table(t), bits(b) {}
    floats<A> at(const unsigned char* row, std::size_t s) const noexcept {
        alignas(64) float buffer[floats<A>::size];
        for (std::size_t i = 0; i < floats<A>::size; ++i) buffer[i] = table[kvquant_code<A>(row, s + i, bits)];
        return floats<A>::load_aligned(buffer);
    }
};

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// 8 elements = one group: broadcast its word, shift each lane by 0, b, .., 7b,
// mask, and look the codes up with one (b <= 3) or two permutes.
template <>
struct codebook<avx2_arch> {
    __m256 low, high;
    __m256i shifts, mask;
    unsigned bits;
    codebook(const float* t, unsigned b) noexcept
        : low(_mm256_loadu_ps(t)), high(_mm256_loadu_ps(t + 8)),
          shifts(_mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(b)))),
          mask(_mm256_set1_epi32(static_cast<int>((1u << b) - 1u))), bits(b) {}
    floats<avx2_arch> at(const unsigned char* row, std::size_t s) const noexcept {
        std::uint32_t word;
        std::memcpy(&word, row + (s / 8) * bits, 4);
        const __m256i codes =
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
        const __m256 lo = _mm256_permutevar8x32_ps(low, codes);
        if (bits < 4) return lo;
        const __m256 hi = _mm256_permutevar8x32_ps(high, codes);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
    }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 elements = two groups: their words in the two halves, per-lane shifts,
// and one 16-entry permute (the whole codebook in a register).
template <>
struct codebook<xsimd::avx512bw> {
    __m512 table;
    __m512i shifts, mask;
    unsigned bits;
    codebook(const float* t, unsigned b) noexcept
        : table(_mm512_loadu_ps(t)),
          shifts(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7),
                                    _mm512_set1_epi32(static_cast<int>(b)))),
          mask(_mm512_set1_epi32(static_cast<int>((1u << b) - 1u))), bits(b) {}
    floats<xsimd::avx512bw> at(const unsigned char* row, std::size_t s) const noexcept {
        const unsigned char* group = row + (s / 8) * bits;
        std::uint32_t w0, w1;
        std::memcpy(&w0, group, 4);
        std::memcpy(&w1, group + bits, 4);
        const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(w0))),
                                                 _mm256_set1_epi32(static_cast<int>(w1)), 1);
        const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(words, shifts), mask);
        return _mm512_permutexvar_ps(codes, table);
    }
};
#endif

// cos/sin of position * frequency for every pair, carried token to token.
template <class A>
struct rotation {
    using doubles = xsimd::batch<double, A>;
    const kvquant_rows& r;
    double c[kvquant_max_dim / 2], s[kvquant_max_dim / 2];
    alignas(64) float cf[kvquant_max_dim / 2];
    alignas(64) float sf[kvquant_max_dim / 2];
    std::int64_t last = -1;
    std::size_t since_anchor = 0;
    bool anchored = false;

    explicit rotation(const kvquant_rows& rows) noexcept : r(rows) {}

    void move_to(std::int32_t position) noexcept {
        const std::size_t pairs = r.rotary_pairs;
        if (anchored && position == last + 1 && since_anchor < rope_anchor_interval) {
            constexpr std::size_t lanes = doubles::size;
            const double* step_cos = r.rope_step;
            const double* step_sin = r.rope_step + pairs;
            std::size_t i = 0;
            for (; i + lanes <= pairs; i += lanes) {
                const doubles x = doubles::load_unaligned(c + i), y = doubles::load_unaligned(s + i);
                const doubles a = doubles::load_unaligned(step_cos + i), b = doubles::load_unaligned(step_sin + i);
                (x * a - y * b).store_unaligned(c + i);
                (y * a + x * b).store_unaligned(s + i);
            }
            for (; i < pairs; ++i) {
                const double x = c[i], y = s[i];
                c[i] = x * step_cos[i] - y * step_sin[i];
                s[i] = y * step_cos[i] + x * step_sin[i];
            }
            ++since_anchor;
        } else {
            const double p = static_cast<double>(position);
            for (std::size_t i = 0; i < pairs; ++i) {
                const double angle = p * r.rope_frequency[i];
                c[i] = cosine<A>(angle);
                s[i] = sine<A>(angle);
            }
            anchored = true;
            since_anchor = 0;
        }
        last = position;
        for (std::size_t i = 0; i < pairs; ++i) {
            cf[i] = static_cast<float>(c[i]);
            sf[i] = static_cast<float>(s[i]);
        }
    }

    // Rotates the rotary pairs of `row` (stored order) in place.
    void apply(float* row) const noexcept {
        constexpr std::size_t lanes = floats<A>::size;
        const std::size_t pairs = r.rotary_pairs;
        float* second = row + pairs;
        std::size_t i = 0;
        for (; i + lanes <= pairs; i += lanes) {
            const floats<A> x = floats<A>::load_unaligned(row + i), y = floats<A>::load_unaligned(second + i);
            const floats<A> cv = floats<A>::load_aligned(cf + i), sv = floats<A>::load_aligned(sf + i);
            xsimd::fms(x, cv, y * sv).store_unaligned(row + i);
            xsimd::fma(x, sv, y * cv).store_unaligned(second + i);
        }
        for (; i < pairs; ++i) {
            const float x = row[i], y = second[i];
            row[i] = x * cf[i] - y * sf[i];
            second[i] = x * sf[i] + y * cf[i];
        }
    }
};

// acc(g0 + h, d0 .. d0 + Tile * lanes) += sum over the block's tokens of
// scaled[h][t] * codebook value, with the H x Tile accumulators in registers.
template <class A, std::size_t H, std::size_t Tile>
inline void accumulate_values(const kvquant_decode_problem& p, const decode_state& s, const codebook<A>& book,
                              std::size_t g0, std::size_t t0, std::size_t count, std::size_t d0,
                              const float (*scaled)[decode_block]) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    floats<A> acc[H][Tile];
    KVC_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) acc[h][j] = floats<A>::load_unaligned(s.acc + (g0 + h) * p.dim + d0 + j * lanes);
    }
    const unsigned char* rows = p.rows.value_codes + t0 * p.rows.row_bytes;
    for (std::size_t t = 0; t < count; ++t) {
        const unsigned char* row = rows + t * p.rows.row_bytes;
        floats<A> weight[H];
        KVC_UNROLL
        for (std::size_t h = 0; h < H; ++h) weight[h] = floats<A>(scaled[h][t]);
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) {
            const floats<A> v = book.at(row, d0 + j * lanes);
            KVC_UNROLL
            for (std::size_t h = 0; h < H; ++h) acc[h][j] = xsimd::fma(weight[h], v, acc[h][j]);
        }
    }
    KVC_UNROLL
    for (std::size_t h = 0; h < H; ++h) {
        KVC_UNROLL
        for (std::size_t j = 0; j < Tile; ++j) acc[h][j].store_unaligned(s.acc + (g0 + h) * p.dim + d0 + j * lanes);
    }
}

template <class A, std::size_t H>
void attend_heads(const kvquant_decode_problem& p, const decode_state& s, std::size_t g0) noexcept {
    constexpr std::size_t lanes = floats<A>::size;
    constexpr std::size_t block = decode_block;
    const kvquant_rows& r = p.rows;
    const std::size_t dim = p.dim;
    const std::size_t full = dim - dim % lanes;
    alignas(64) float q[H][kvquant_max_dim];
    for (std::size_t h = 0; h < H; ++h)
        for (std::size_t c = 0; c < dim; ++c) q[h][c] = p.queries[(g0 + h) * p.query_stride + r.channel_of[c]];
    alignas(64) float key[kvquant_max_dim];
    alignas(64) float weights[H][block];
    alignas(64) float scaled[H][block];
    rotation<A> rope(r);
    const codebook<A> key_book(r.key_codebook, r.bits), value_book(r.value_codebook, r.bits);

    for (std::size_t t0 = 0; t0 < p.tokens; t0 += block) {
        const std::size_t count = p.tokens - t0 < block ? p.tokens - t0 : block;

        // Logits: decode, patch the outliers, rotate, dot with the H queries.
        for (std::size_t i = 0; i < count; ++i) {
            const std::size_t t = t0 + i;
            const unsigned char* codes = r.key_codes + t * r.row_bytes;
            std::size_t c = 0;
            for (; c < full; c += lanes)
                xsimd::fma(key_book.at(codes, c), floats<A>::load_unaligned(r.key_scale + c),
                           floats<A>::load_unaligned(r.key_offset + c))
                    .store_aligned(key + c);
            for (; c < dim; ++c)
                key[c] = r.key_offset[c] + r.key_scale[c] * r.key_codebook[kvquant_code<A>(codes, c, r.bits)];
            for (std::uint32_t o = t ? r.outlier_end[t - 1] : 0; o < r.outlier_end[t]; ++o)
                key[r.outlier_channel[o]] = r.outlier_value[o];
            if (r.rotary_pairs) {
                rope.move_to(r.positions[t]);
                rope.apply(key);
            }
            floats<A> acc[H];
            KVC_UNROLL
            for (std::size_t h = 0; h < H; ++h) acc[h] = floats<A>(0.0f);
            for (c = 0; c < full; c += lanes) {
                const floats<A> k = floats<A>::load_aligned(key + c);
                KVC_UNROLL
                for (std::size_t h = 0; h < H; ++h) acc[h] = xsimd::fma(floats<A>::load_aligned(q[h] + c), k, acc[h]);
            }
            KVC_UNROLL
            for (std::size_t h = 0; h < H; ++h) {
                float logit = xsimd::hadd(acc[h]);
                for (c = full; c < dim; ++c) logit += q[h][c] * key[c];
                weights[h][i] = logit * p.scale + (p.bias ? p.bias[t] : 0.0f);
            }
        }

        // Online softmax update; weights become exp(logit - new max), and
        // scaled = weight * half-range of the token's values.
        float offset_share[H];
        for (std::size_t h = 0; h < H; ++h) {
            const std::size_t g = g0 + h;
            float* w = weights[h];
            if (p.logits) {
                float* out = p.logits + g * p.logits_stride + t0;
                for (std::size_t i = 0; i < count; ++i) out[i] = w[i];
            }
            softmax_update<A>(s, g, dim, w, count);
            float share = 0.0f;
            for (std::size_t i = 0; i < count; ++i) {
                const float* params = r.value_params + 2 * (t0 + i);
                scaled[h][i] = w[i] * params[1];
                share += w[i] * params[0];
            }
            offset_share[h] = share;
        }

        // Values.
        constexpr std::size_t tile = H <= 2 ? 8 : 4;
        std::size_t d0 = 0;
        for (; d0 + tile * lanes <= full; d0 += tile * lanes)
            accumulate_values<A, H, tile>(p, s, value_book, g0, t0, count, d0, scaled);
        if (tile > 4 && d0 + 4 * lanes <= full)
            accumulate_values<A, H, 4>(p, s, value_book, g0, t0, count, d0, scaled), d0 += 4 * lanes;
        if (d0 + 2 * lanes <= full) accumulate_values<A, H, 2>(p, s, value_book, g0, t0, count, d0, scaled), d0 += 2 * lanes;
        if (d0 < full) accumulate_values<A, H, 1>(p, s, value_book, g0, t0, count, d0, scaled);
        for (std::size_t d = full; d < dim; ++d)
            for (std::size_t h = 0; h < H; ++h) {
                float total = s.acc[(g0 + h) * dim + d];
                for (std::size_t i = 0; i < count; ++i)
                    total += scaled[h][i] *
                             r.value_codebook[kvquant_code<A>(r.value_codes + (t0 + i) * r.row_bytes, d, r.bits)];
                s.acc[(g0 + h) * dim + d] = total;
            }
        for (std::size_t h = 0; h < H; ++h) {
            float* acc = s.acc + (g0 + h) * dim;
            const floats<A> share(offset_share[h]);
            std::size_t d = 0;
            for (; d < full; d += lanes) (floats<A>::load_unaligned(acc + d) + share).store_unaligned(acc + d);
            for (; d < dim; ++d) acc[d] += offset_share[h];
        }
    }
}

template <class A>
void attend_partial(const kvquant_decode_problem& p, const decode_state& s) noexcept {
    std::size_t g0 = 0;
    for (; g0 + 4 <= p.group; g0 += 4) attend_heads<A, 4>(p, s, g0);
    switch (p.group - g0) {
    case 3: attend_heads<A, 3>(p, s, g0); break;
    case 2: attend_heads<A, 2>(p, s, g0); break;
    case 1: attend_heads<A, 1>(p, s, g0); break;
    default: break;
    }
}

} // namespace kvquant

template <class A>
constexpr kvquant_kernels make_kvquant_kernels() noexcept {
    return kvquant_kernels{&kvquant::attend_partial<A>};
}

} // namespace kvc::kernels::simd
