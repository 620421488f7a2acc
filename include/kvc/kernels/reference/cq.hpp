// kvc/kernels/reference/cq.hpp -- the scalar reference of the CQ (Q8) kernels.
//
// The definitions the SIMD kernels are tested against: nearest centroid by a
// linear scan, and decode attention token by token (online softmax as
// reference::attend_partial) over the centroid values the codes name, with the
// query's dot product taken per group through a lookup table of
// <q slice, centroid> for every centroid -- the arithmetic CQ is built on.
#pragma once

#include <cstddef>
#include <limits>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/quant/cq_common.hpp"
#include "kvc/kernels/quant/cq_problem.hpp"
#include "kvc/kernels/reference/kernels.hpp"

namespace kvc::kernels::reference {

inline void cq_encode_row(const float* x, const float* codebook, std::size_t dim, std::size_t channels,
                          std::size_t bits, unsigned char* out) noexcept {
    const std::size_t groups = dim / channels, clusters = std::size_t{1} << bits;
    unsigned char codes[max_cq_groups];
    for (std::size_t g = 0; g < groups; ++g) {
        const float* book = codebook + g * channels * clusters;
        // Strictly smaller only: NaN, +-Inf and overflowing distances never
        // replace the start (+inf, code 0), and ties keep the lowest index.
        float best = std::numeric_limits<float>::infinity();
        std::size_t best_code = 0;
        for (std::size_t k = 0; k < clusters; ++k) {
            const float d = cq_common::squared_distance<A>(x + g * channels, book, channels, clusters, k);
            if (d < best) {
                best = d;
                best_code = k;
            }
        }
        codes[g] = static_cast<unsigned char>(best_code);
    }
    cq_common::pack_codes<A>(codes, groups, bits, out);
}

inline void cq_attend_partial(const cq_decode_problem& p, const decode_state& s) noexcept {
    const cq_rows& r = p.rows;
    const std::size_t c = r.channels, groups = p.dim / c, clusters = std::size_t{1} << r.bits;
    float* table = p.workspace; // [groups][clusters]: <q slice g, centroid k>
    for (std::size_t h = 0; h < p.group; ++h) {
        const float* q = p.queries + h * p.query_stride;
        float* acc = s.acc + h * p.dim;
        for (std::size_t g = 0; g < groups; ++g)
            for (std::size_t k = 0; k < clusters; ++k) {
                float dot = 0.0f;
                for (std::size_t j = 0; j < c; ++j) dot += q[g * c + j] * r.key_codebook[(g * c + j) * clusters + k];
                table[g * clusters + k] = dot;
            }
        for (std::size_t t = 0; t < p.tokens; ++t) {
            const unsigned char* key = r.keys + t * r.row_bytes;
            const unsigned char* value = r.values + t * r.row_bytes;
            float dot = 0.0f;
            for (std::size_t g = 0; g < groups; ++g) dot += table[g * clusters + cq_common::code_at<A>(key, g, r.bits)];
            const float logit = token_logit(p, dot, h, t);
            const float weight = online_softmax_step(logit, s.max[h], s.sum[h], acc, p.dim);
            for (std::size_t g = 0; g < groups; ++g) {
                const unsigned k = cq_common::code_at<A>(value, g, r.bits);
                for (std::size_t j = 0; j < c; ++j)
                    acc[g * c + j] += weight * r.value_codebook[(g * c + j) * clusters + k];
            }
        }
    }
}

constexpr cq_kernels make_cq_kernels() noexcept { return cq_kernels{&cq_encode_row, &cq_attend_partial}; }

} // namespace kvc::kernels::reference
