// kvc/kernels/quant/cq_simd.hpp -- the xsimd CQ (Q8) kernels, templated on an xsimd Arch.
//
// Included at the end of kernels/simd/kernels.hpp (make_table fills the
// table's `cq` section); the same rules hold: nothing but xsimd, intrinsics
// and templates on the Arch.
//
// Fused decode attention on the codes, up to four query heads per pass:
// - a lookup table T[g][k][h] = <q_h slice g, key centroid k of group g> for
//   every group, centroid and head of the pass (2^b x dim multiply-adds per
//   head), so a token's logit is the sum over groups of T[g][code_g] -- one
//   4-lane load and add per group for all four heads at once;
// - values as a histogram: the softmax weight of each token is added to
//   W[g][code_g][h] (again one 4-lane read-modify-write per group for the four
//   heads); the output is sum_k W[g][k][h] * value centroid k of group g,
//   formed once at the end of the call (2^b x dim multiply-adds per head).
//   Per token this costs dim / c additions for the values instead of dim
//   multiply-adds per head for accumulating centroids token by token, which
//   is why it was chosen: the per-call term is amortised over the tokens.
// - online softmax per block of 64 tokens in a local state (max, sum, W);
//   when a head's max grows, its W lane is rescaled. The local state joins
//   the caller's running state through common::merge_state, so segments chain.
// The 4-lane pieces are SSE intrinsics on x86 (every x86 set has them) and a
// plain 4-float struct elsewhere (`Portable` forces it, so the tests run the
// NEON code path on x86). The exponentials and the nearest-centroid search use
// full-width xsimd batches. No decoded key or value row is ever written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include <xsimd/xsimd.hpp>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/cq_common.hpp"
#include "kvc/kernels/quant/cq_problem.hpp"
#include "kvc/kernels/simd/kernels.hpp"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace kvc::kernels::simd {
namespace cq {

namespace cc = cq_common;

// Four float lanes, one per query head of a pass.
template <class A, bool Portable>
struct lane4 {
    struct type {
        float v[4];
    };
    static KVC_ALWAYS_INLINE type zero() noexcept { return type{{0.0f, 0.0f, 0.0f, 0.0f}}; }
    static KVC_ALWAYS_INLINE type load(const float* p) noexcept { return type{{p[0], p[1], p[2], p[3]}}; }
    static KVC_ALWAYS_INLINE void store(float* p, type a) noexcept {
        for (int i = 0; i < 4; ++i) p[i] = a.v[i];
    }
    static KVC_ALWAYS_INLINE type broadcast(float x) noexcept { return type{{x, x, x, x}}; }
    static KVC_ALWAYS_INLINE type add(type a, type b) noexcept {
        for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
        return a;
    }
    static KVC_ALWAYS_INLINE type mul(type a, type b) noexcept {
        for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i];
        return a;
    }
    // a * b + c
    static KVC_ALWAYS_INLINE type madd(type a, type b, type c) noexcept {
        for (int i = 0; i < 4; ++i) c.v[i] += a.v[i] * b.v[i];
        return c;
    }
};

#if defined(__SSE2__)
template <class A>
struct lane4<A, false> {
    using type = __m128;
    static KVC_ALWAYS_INLINE type zero() noexcept { return _mm_setzero_ps(); }
    static KVC_ALWAYS_INLINE type load(const float* p) noexcept { return _mm_loadu_ps(p); }
    static KVC_ALWAYS_INLINE void store(float* p, type a) noexcept { _mm_storeu_ps(p, a); }
    static KVC_ALWAYS_INLINE type broadcast(float x) noexcept { return _mm_set1_ps(x); }
    static KVC_ALWAYS_INLINE type add(type a, type b) noexcept { return _mm_add_ps(a, b); }
    static KVC_ALWAYS_INLINE type mul(type a, type b) noexcept { return _mm_mul_ps(a, b); }
    static KVC_ALWAYS_INLINE type madd(type a, type b, type c) noexcept {
#if defined(__FMA__)
        return _mm_fmadd_ps(a, b, c);
#else
        return _mm_add_ps(_mm_mul_ps(a, b), c);
#endif
    }
};
#endif

// Nearest centroid per group over full-width batches of centroids (lane i of
// batch n holds centroid n * lanes + i); codebooks smaller than a batch take
// the scalar scan. Ties and non-finite input as the reference (cq_problem.hpp).
template <class A>
void encode_row(const float* x, const float* codebook, std::size_t dim, std::size_t channels, std::size_t bits,
                unsigned char* out) noexcept {
    using batch = floats<A>;
    constexpr std::size_t lanes = batch::size;
    const std::size_t groups = dim / channels, clusters = std::size_t{1} << bits;
    unsigned char codes[max_cq_groups];
    alignas(64) float lane_distance[lanes], lane_code[lanes];
    alignas(64) float first_codes[lanes];
    for (std::size_t i = 0; i < lanes; ++i) first_codes[i] = static_cast<float>(i);
    const float infinity = std::numeric_limits<float>::infinity();
    for (std::size_t g = 0; g < groups; ++g) {
        const float* book = codebook + g * channels * clusters;
        const float* point = x + g * channels;
        float best = infinity;
        std::size_t best_code = 0;
        if (clusters < lanes) {
            for (std::size_t k = 0; k < clusters; ++k) {
                const float d = cc::squared_distance<A>(point, book, channels, clusters, k);
                if (d < best) {
                    best = d;
                    best_code = k;
                }
            }
        } else {
            batch best_distance(infinity), best_index(0.0f);
            batch index = batch::load_aligned(first_codes);
            const batch step(static_cast<float>(lanes));
            for (std::size_t k = 0; k < clusters; k += lanes) {
                batch d(0.0f);
                for (std::size_t j = 0; j < channels; ++j) {
                    const batch diff = batch(point[j]) - batch::load_unaligned(book + j * clusters + k);
                    d = xsimd::fma(diff, diff, d);
                }
                const auto closer = d < best_distance;
                best_distance = xsimd::select(closer, d, best_distance);
                best_index = xsimd::select(closer, index, best_index);
                index += step;
            }
            best_distance.store_aligned(lane_distance);
            best_index.store_aligned(lane_code);
            best_code = clusters; // none yet
            for (std::size_t i = 0; i < lanes; ++i) {
                const std::size_t code = static_cast<std::size_t>(lane_code[i]);
                if (lane_distance[i] < best || (lane_distance[i] == best && code < best_code)) {
                    best = lane_distance[i];
                    best_code = code;
                }
            }
            if (best_code == clusters) best_code = 0; // every distance NaN or infinite
        }
        codes[g] = static_cast<unsigned char>(best_code);
    }
    cc::pack_codes<A>(codes, groups, bits, out);
}

// One pass over the rows for query heads g0 .. g0 + H - 1 (H <= 4).
template <class A, bool Portable, bool ByteCodes>
void attend_pass(const cq_decode_problem& p, const decode_state& s, std::size_t g0, std::size_t H) noexcept {
    using L = lane4<A, Portable>;
    using lanes4 = typename L::type;
    using batch = floats<A>;
    constexpr std::size_t width = batch::size; // a multiple of 4 on every set
    constexpr std::size_t P = cq_pass_heads;
    const cq_rows& r = p.rows;
    const std::size_t c = r.channels, groups = p.dim / c, K = std::size_t{1} << r.bits, dim = p.dim;
    const float infinity = std::numeric_limits<float>::infinity();

    float* table = p.workspace;            // [groups][K][P]
    float* hist = table + groups * K * P;  // [groups][K][P]
    float* acc = hist + groups * K * P;    // [dim][P], then [P][dim]
    float* out = acc + P * dim;            // [P][dim]
    float* weights = out + P * dim;        // [cq_block_tokens][P]
    float* local = weights + cq_block_tokens * P; // max[P], sum[P]
    float* local_max = local;
    float* local_sum = local + P;

    // Query lanes: acc[d][h] = q_h[d] (0 for the heads past H).
    for (std::size_t d = 0; d < dim; ++d)
        for (std::size_t h = 0; h < P; ++h) acc[d * P + h] = h < H ? p.queries[(g0 + h) * p.query_stride + d] : 0.0f;
    // Lookup table of the key centroids.
    for (std::size_t g = 0; g < groups; ++g) {
        const float* book = r.key_codebook + g * c * K;
        lanes4 q[8];
        for (std::size_t j = 0; j < c; ++j) q[j] = L::load(acc + (g * c + j) * P);
        float* row = table + g * K * P;
        for (std::size_t k = 0; k < K; ++k) {
            lanes4 t = L::mul(q[0], L::broadcast(book[k]));
            for (std::size_t j = 1; j < c; ++j) t = L::madd(q[j], L::broadcast(book[j * K + k]), t);
            L::store(row + k * P, t);
        }
    }
    for (std::size_t i = 0; i < groups * K * P; ++i) hist[i] = 0.0f;
    for (std::size_t h = 0; h < P; ++h) {
        local_max[h] = -infinity;
        local_sum[h] = 0.0f;
    }

    unsigned char unpacked[2][max_cq_groups];
    const lanes4 scale = L::broadcast(p.scale);
    for (std::size_t t0 = 0; t0 < p.tokens; t0 += cq_block_tokens) {
        const std::size_t count = p.tokens - t0 < cq_block_tokens ? p.tokens - t0 : cq_block_tokens;
        // Logits of the block: four partial sums over the groups.
        for (std::size_t t = 0; t < count; ++t) {
            const unsigned char* key = r.keys + (t0 + t) * r.row_bytes;
            if (!ByteCodes) {
                cc::unpack_codes<A>(key, groups, r.bits, unpacked[0]);
                key = unpacked[0];
            }
            lanes4 s0 = L::zero(), s1 = L::zero(), s2 = L::zero(), s3 = L::zero();
            std::size_t g = 0;
            for (; g + 4 <= groups; g += 4) {
                s0 = L::add(s0, L::load(table + ((g + 0) * K + key[g + 0]) * P));
                s1 = L::add(s1, L::load(table + ((g + 1) * K + key[g + 1]) * P));
                s2 = L::add(s2, L::load(table + ((g + 2) * K + key[g + 2]) * P));
                s3 = L::add(s3, L::load(table + ((g + 3) * K + key[g + 3]) * P));
            }
            for (; g < groups; ++g) s0 = L::add(s0, L::load(table + (g * K + key[g]) * P));
            L::store(weights + t * P, L::mul(scale, L::add(L::add(s0, s1), L::add(s2, s3))));
        }
        // Bias, logits out, block max; padding (tokens past count, heads past H) at -inf.
        float block_max[P];
        for (std::size_t h = 0; h < P; ++h) block_max[h] = -infinity;
        for (std::size_t t = 0; t < cq_block_tokens; ++t)
            for (std::size_t h = 0; h < P; ++h) {
                float& w = weights[t * P + h];
                if (t >= count || h >= H) {
                    w = -infinity;
                    continue;
                }
                if (p.bias) w += p.bias[t0 + t];
                if (p.logits) p.logits[(g0 + h) * p.logits_stride + t0 + t] = w;
                block_max[h] = w > block_max[h] ? w : block_max[h];
            }
        // Online softmax: rescale the heads whose max grew.
        alignas(64) float shift[width];
        float factor[P];
        bool rescale = false;
        for (std::size_t h = 0; h < P; ++h) {
            factor[h] = 1.0f;
            if (block_max[h] > local_max[h]) {
                if (local_sum[h] > 0.0f) {
                    factor[h] = common::exp<A>(local_max[h] - block_max[h]);
                    local_sum[h] *= factor[h];
                    rescale = true;
                }
                local_max[h] = block_max[h];
            }
        }
        for (std::size_t i = 0; i < width; ++i) {
            const float m = local_max[i % P];
            shift[i] = m == -infinity ? 0.0f : m; // a head with no finite logit yet: exp(-inf) = 0
        }
        if (rescale) {
            const lanes4 f = L::load(factor);
            for (std::size_t i = 0; i < groups * K; ++i) L::store(hist + i * P, L::mul(L::load(hist + i * P), f));
        }
        const batch shift_batch = batch::load_aligned(shift);
        batch sums(0.0f);
        for (std::size_t i = 0; i < cq_block_tokens * P; i += width) {
            const batch e = xsimd::exp(batch::load_unaligned(weights + i) - shift_batch);
            e.store_unaligned(weights + i);
            sums += e;
        }
        alignas(64) float lane_sums[width];
        sums.store_aligned(lane_sums);
        for (std::size_t i = 0; i < width; ++i) local_sum[i % P] += lane_sums[i];
        // Histogram of the value codes, weighted.
        for (std::size_t t = 0; t < count; ++t) {
            const unsigned char* value = r.values + (t0 + t) * r.row_bytes;
            if (!ByteCodes) {
                cc::unpack_codes<A>(value, groups, r.bits, unpacked[1]);
                value = unpacked[1];
            }
            const lanes4 w = L::load(weights + t * P);
            for (std::size_t g = 0; g < groups; ++g) {
                float* bin = hist + (g * K + value[g]) * P;
                L::store(bin, L::add(L::load(bin), w));
            }
        }
    }

    // acc[d][h] = sum_k W[g][k][h] * value centroid k, channel j (d = g c + j).
    for (std::size_t g = 0; g < groups; ++g) {
        const float* book = r.value_codebook + g * c * K;
        for (std::size_t j = 0; j < c; ++j) {
            const float* channel = book + j * K;
            lanes4 a0 = L::zero(), a1 = L::zero();
            std::size_t k = 0;
            for (; k + 2 <= K; k += 2) {
                a0 = L::madd(L::load(hist + (g * K + k) * P), L::broadcast(channel[k]), a0);
                a1 = L::madd(L::load(hist + (g * K + k + 1) * P), L::broadcast(channel[k + 1]), a1);
            }
            if (k < K) a0 = L::madd(L::load(hist + (g * K + k) * P), L::broadcast(channel[k]), a0);
            L::store(acc + (g * c + j) * P, L::add(a0, a1));
        }
    }
    for (std::size_t h = 0; h < H; ++h)
        for (std::size_t d = 0; d < dim; ++d) out[h * dim + d] = acc[d * P + h];
    const decode_state into{s.max + g0, s.sum + g0, s.acc + g0 * dim};
    const decode_state from{local_max, local_sum, out};
    common::merge_state<A>(into, from, H, dim);
}

template <class A, bool Portable>
void attend_partial(const cq_decode_problem& p, const decode_state& s) noexcept {
    for (std::size_t g0 = 0; g0 < p.group; g0 += cq_pass_heads) {
        const std::size_t H = p.group - g0 < cq_pass_heads ? p.group - g0 : cq_pass_heads;
        if (p.rows.bits == 8) attend_pass<A, Portable, true>(p, s, g0, H);
        else attend_pass<A, Portable, false>(p, s, g0, H);
    }
}

} // namespace cq

template <class A, bool Portable>
constexpr cq_kernels make_cq_kernels_of() noexcept {
    return cq_kernels{&cq::encode_row<A>, &cq::attend_partial<A, Portable>};
}

template <class A>
constexpr cq_kernels make_cq_kernels() noexcept {
    return make_cq_kernels_of<A, false>();
}

} // namespace kvc::kernels::simd
