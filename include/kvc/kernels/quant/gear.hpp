// kvc/kernels/quant/gear.hpp -- GEAR (docs/METHODS.md Q7): fused attention over Q(X) + L + S, and its encoder pieces.
//
// A GEAR head (storage/gear_rows.hpp) holds, for each compressed token t,
//   Q(d_t)  the token's rows without their outliers, packed in a Q1 format (format.hpp),
//   S_t     `outliers` (channel, fp16 value) pairs per key and per value row,
//   A_t     `rank` fp16 coefficients per key and per value row,
// and for each chunk c of tokens compressed together the fp16 factor B_c
// (rank x dim) per key and value, so that a stored row is
//   x_t = Q(d_t) + A_t B_c + S_t.
// The newest tokens (fewer than one chunk) wait in an fp16 segment.
//
// Attention never rebuilds x_t. Per chunk and query head g:
//   logit_t = scale * (q . Q(k_t) + q . S_t + (B_c q) . A_t)
// with B_c q computed once (rank dot products of fp16 rows); the last two
// terms are a per-token additive bias of the Q1 decode kernel, which folds
// the packed rows into the running softmax state. Then the kernel's logits
// give p_t = exp(logit_t - max) and the value side is added to the same state:
//   acc += sum_t p_t S_t + (sum_t p_t A_t) B_c
// (a scatter of the sparse values and rank fp16 axpys). The fp16 segment goes
// last through the same state. Everything is written once here, templated on
// the arch A and on the kernels it chains (the Q1 partial, fp16 dot and
// axpy), and instantiated with the scalar reference kernels
// (kernels/reference/gear.hpp) and with each instruction set's xsimd kernels
// (kernels/quant/gear_simd.hpp).
//
// The Q1 partial runs with a group of one query head per chunk (the bias
// differs per head), so unlike block codecs a key row is widened once per
// query head instead of once per group; the chunk's rows stay in L1 across
// the heads of the group.
//
// The encoder pieces (outlier selection, power iteration) are templates on A
// too but are used with reference_arch only: they run in the storage, once
// per chunk, in double, so every build and instruction set stores the same bytes.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/problem.hpp"
#include "kvc/kernels/quant/problem.hpp"

namespace kvc::kernels {

// Limits the kernels and the encoder are sized for (stack buffers).
inline constexpr std::size_t gear_max_chunk_tokens = 256;
inline constexpr std::size_t gear_max_rank = 4;
inline constexpr std::size_t gear_max_dim = 512;
inline constexpr std::size_t gear_max_outliers_per_side = 16;

// Decode attention of one KV head's query group over the first `tokens`
// compressed tokens, then `recent.tokens` fp16 rows. bias and logits (optional)
// index the whole sequence: compressed tokens first, then the fp16 rows.
struct gear_decode_problem : decode_queries {
    // Queries: bias [tokens + recent.tokens].
    quant_rows rows;                         // Q(d_t) of the compressed tokens
    std::size_t tokens = 0;                  // compressed tokens attended (a prefix of the stored ones)
    // Token record t at extras + t * extras_stride (uint16 units):
    //   [key sparse: outliers x (channel, fp16 value)] [value sparse: same]
    //   [key A_t: rank fp16] [value A_t: rank fp16]
    const std::uint16_t* extras = nullptr;
    std::size_t extras_stride = 0;
    std::size_t outliers = 0;                // sparse entries per row (both ends together)
    std::size_t rank = 0;                    // 0 .. gear_max_rank
    const std::uint32_t* chunk_tokens = nullptr; // tokens of chunk c (consecutive chunks cover the compressed tokens)
    std::size_t chunks = 0;
    const std::uint16_t* key_factors = nullptr;   // B_c of keys at key_factors + c * factor_stride, rank x dim fp16
    const std::uint16_t* value_factors = nullptr; // B_c of values at value_factors + c * factor_stride
    std::size_t factor_stride = 0;                // uint16 units from one chunk's factor to the next
    dense_segment recent;                    // fp16 rows after the compressed tokens
};

// The GEAR section of a kernel_table.
struct gear_kernels {
    // Folds the compressed tokens, then the fp16 rows, into `state`.
    void (*attend_partial)(const gear_decode_problem&, const decode_state&) noexcept;
};

namespace gear {

using quant_partial_fn = void (*)(const quant_decode_problem&, const decode_state&) noexcept;
using dot_fn = float (*)(const float*, const void*, std::size_t) noexcept;
using axpy_fn = void (*)(float, const void*, float*, std::size_t) noexcept;

// Offsets inside a token record (uint16 units).
inline constexpr std::size_t value_sparse_offset(std::size_t outliers) noexcept { return 2 * outliers; }
inline constexpr std::size_t key_coefficient_offset(std::size_t outliers) noexcept { return 4 * outliers; }
inline constexpr std::size_t value_coefficient_offset(std::size_t outliers, std::size_t rank) noexcept {
    return 4 * outliers + rank;
}
inline constexpr std::size_t record_units(std::size_t outliers, std::size_t rank) noexcept {
    return 4 * outliers + 2 * rank;
}

// See the header comment. Quant: the Q1 partial; Dot and Axpy: the fp16 row kernels, all of arch A.
template <class A, quant_partial_fn Quant, dot_fn Dot, axpy_fn Axpy>
void attend_partial(const gear_decode_problem& p, const decode_state& s) noexcept {
    const std::size_t dim = p.dim, rank = p.rank, outliers = p.outliers;
    const std::size_t value_sparse = value_sparse_offset(outliers);
    const std::size_t key_coefficients = key_coefficient_offset(outliers);
    const std::size_t value_coefficients = value_coefficient_offset(outliers, rank);
    float bias[gear_max_chunk_tokens];
    float own_logits[gear_max_chunk_tokens];
    const auto* keys = static_cast<const unsigned char*>(p.rows.keys);
    const auto* values = static_cast<const unsigned char*>(p.rows.values);
    std::size_t t0 = 0;
    for (std::size_t c = 0; c < p.chunks && t0 < p.tokens; ++c) {
        const std::size_t stored = p.chunk_tokens[c];
        const std::size_t count = stored < p.tokens - t0 ? stored : p.tokens - t0;
        const std::uint16_t* key_factor = p.key_factors + c * p.factor_stride;
        const std::uint16_t* value_factor = p.value_factors + c * p.factor_stride;
        for (std::size_t g = 0; g < p.group; ++g) {
            const float* q = p.queries + g * p.query_stride;
            float projected[gear_max_rank]; // B_c q
            for (std::size_t i = 0; i < rank; ++i) projected[i] = Dot(q, key_factor + i * dim, dim);
            for (std::size_t t = 0; t < count; ++t) {
                const std::uint16_t* record = p.extras + (t0 + t) * p.extras_stride;
                float extra = 0.0f;
                for (std::size_t j = 0; j < outliers; ++j)
                    extra += q[record[2 * j]] * common::half_bits_to_float<A>(record[2 * j + 1]);
                for (std::size_t i = 0; i < rank; ++i)
                    extra += common::half_bits_to_float<A>(record[key_coefficients + i]) * projected[i];
                bias[t] = p.scale * extra + (p.bias ? p.bias[t0 + t] : 0.0f);
            }
            float* logits = p.logits ? p.logits + g * p.logits_stride + t0 : own_logits;
            quant_decode_problem qp;
            qp.rows = p.rows;
            qp.rows.keys = keys + t0 * p.rows.key_row_bytes;
            qp.rows.values = values + t0 * p.rows.value_row_bytes;
            qp.tokens = count;
            qp.dim = dim;
            qp.group = 1;
            qp.queries = q;
            qp.query_stride = dim;
            qp.scale = p.scale;
            qp.bias = bias;
            qp.logits = logits;
            qp.logits_stride = count;
            const decode_state head{s.max + g, s.sum + g, s.acc + g * dim};
            Quant(qp, head);

            // The value side of the chunk against the state's (final) max.
            const float max = s.max[g];
            float* acc = s.acc + g * dim;
            float weighted[gear_max_rank] = {};
            for (std::size_t t = 0; t < count; ++t) {
                const float l = logits[t];
                const float w = l == -std::numeric_limits<float>::infinity() ? 0.0f : common::exp<A>(l - max);
                const std::uint16_t* record = p.extras + (t0 + t) * p.extras_stride;
                for (std::size_t j = 0; j < outliers; ++j)
                    acc[record[value_sparse + 2 * j]] +=
                        w * common::half_bits_to_float<A>(record[value_sparse + 2 * j + 1]);
                for (std::size_t i = 0; i < rank; ++i)
                    weighted[i] += w * common::half_bits_to_float<A>(record[value_coefficients + i]);
            }
            for (std::size_t i = 0; i < rank; ++i) Axpy(weighted[i], value_factor + i * dim, acc, dim);
        }
        t0 += stored;
    }
    if (p.recent.tokens > 0) {
        quant_decode_problem qp;
        qp.sink = p.recent;
        qp.rows = p.rows;
        qp.tokens = 0;
        queries_of(qp) = p;
        qp.bias = p.bias ? p.bias + p.tokens : nullptr;
        qp.logits = p.logits ? p.logits + p.tokens : nullptr;
        Quant(qp, s);
    }
}

// ---------------------------------------------------------------------------
// Encoder pieces (used with reference_arch by storage/gear_rows.hpp).

// The channels of the `per_side` largest and the `per_side` smallest values of
// a finite row (signed: the two ends of the range an asymmetric quantizer
// must cover), largest first then smallest; ties go to the lower channel.
// `channels` receives 2 * per_side entries; needs 2 * per_side <= n.
template <class A>
void select_outliers(const float* row, std::size_t n, std::size_t per_side, std::uint16_t* channels) noexcept {
    const auto taken = [&](std::size_t d, std::size_t chosen) {
        for (std::size_t j = 0; j < chosen; ++j)
            if (channels[j] == d) return true;
        return false;
    };
    std::size_t chosen = 0;
    for (int side = 0; side < 2; ++side)
        for (std::size_t k = 0; k < per_side; ++k) {
            std::size_t best = n;
            for (std::size_t d = 0; d < n; ++d) {
                if (taken(d, chosen)) continue;
                if (best == n || (side == 0 ? row[d] > row[best] : row[d] < row[best])) best = d;
            }
            channels[chosen++] = static_cast<std::uint16_t>(best);
        }
}

// The deterministic start of the power iteration: uniform in [-1, 1) from
// splitmix64 with a fixed seed, so every run and build encodes alike.
template <class A>
void power_iteration_start(double* q, std::size_t count) noexcept {
    std::uint64_t state = 0x6765617251370000ull; // "gearQ7"
    for (std::size_t i = 0; i < count; ++i) {
        std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        q[i] = static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
    }
}

// Rank-`rank` approximation P Q^T of an n x dim matrix R given row by row
// (`residual(t, row)` writes row t as dim floats), by subspace (power)
// iteration: Q0 fixed pseudo-random; then `iterations` times P = orth(R Q),
// Q = R^T P (modified Gram-Schmidt; a column that vanishes stays zero).
// p: [rank][n], q: [rank][dim], both column-major per component, in double.
// An exactly rank-r R with R Q0 of rank r is recovered after one iteration.
template <class A, class Residual>
void power_iteration(Residual&& residual, std::size_t n, std::size_t dim, std::size_t rank, std::size_t iterations,
                     double* p, double* q) noexcept {
    float row[gear_max_dim];
    power_iteration_start<A>(q, rank * dim);
    for (std::size_t it = 0; it < iterations; ++it) {
        for (std::size_t t = 0; t < n; ++t) {
            residual(t, row);
            for (std::size_t i = 0; i < rank; ++i) {
                double dot = 0.0;
                for (std::size_t d = 0; d < dim; ++d) dot += static_cast<double>(row[d]) * q[i * dim + d];
                p[i * n + t] = dot;
            }
        }
        for (std::size_t i = 0; i < rank; ++i) {
            double* column = p + i * n;
            for (std::size_t j = 0; j < i; ++j) {
                const double* other = p + j * n;
                double dot = 0.0;
                for (std::size_t t = 0; t < n; ++t) dot += column[t] * other[t];
                for (std::size_t t = 0; t < n; ++t) column[t] -= dot * other[t];
            }
            double norm = 0.0;
            for (std::size_t t = 0; t < n; ++t) norm += column[t] * column[t];
            norm = std::sqrt(norm);
            const double inverse = norm > 0.0 ? 1.0 / norm : 0.0;
            for (std::size_t t = 0; t < n; ++t) column[t] *= inverse;
        }
        for (std::size_t i = 0; i < rank * dim; ++i) q[i] = 0.0;
        for (std::size_t t = 0; t < n; ++t) {
            residual(t, row);
            for (std::size_t i = 0; i < rank; ++i) {
                const double weight = p[i * n + t];
                for (std::size_t d = 0; d < dim; ++d) q[i * dim + d] += weight * static_cast<double>(row[d]);
            }
        }
    }
}

} // namespace gear
} // namespace kvc::kernels
