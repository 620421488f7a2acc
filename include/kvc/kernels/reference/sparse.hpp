// kvc/kernels/reference/sparse.hpp -- the scalar reference of the sparse-row kernels (Q10).
//
// Token by token: each key and value row is widened with decode_row into a
// stack row, then the online softmax of reference::attend_partial. Every SIMD
// kernel is tested against this.
#pragma once

#include <cstddef>

#include "kvc/kernels/common.hpp"
#include "kvc/kernels/reference/kernels.hpp"
#include "kvc/kernels/sparse/common.hpp"
#include "kvc/kernels/sparse/problem.hpp"

namespace kvc::kernels::reference {

inline void sparse_decode_row(const void* src, float* dst, std::size_t n) noexcept {
    sparse_common::decode_row<A>(src, dst, n);
}

inline void sparse_attend_partial(const sparse_decode_problem& p, const decode_state& s) noexcept {
    const auto* keys = static_cast<const unsigned char*>(p.rows.keys);
    const auto* values = static_cast<const unsigned char*>(p.rows.values);
    float k[sparse_common::max_dim], v[sparse_common::max_dim];
    for (std::size_t g = 0; g < p.group; ++g) {
        const float* q = p.queries + g * p.query_stride;
        float* acc = s.acc + g * p.dim;
        for (std::size_t t = 0; t < p.tokens; ++t) {
            sparse_decode_row(keys + t * p.rows.key_row_bytes, k, p.dim);
            sparse_decode_row(values + t * p.rows.value_row_bytes, v, p.dim);
            const float logit = token_logit(p, dot<dtype::f32>(q, k, p.dim), g, t);
            const float weight = online_softmax_step(logit, s.max[g], s.sum[g], acc, p.dim);
            axpy<dtype::f32>(weight, v, acc, p.dim);
        }
    }
}

constexpr sparse_kernels make_sparse_kernels() noexcept {
    return sparse_kernels{
        {&sparse_common::encode_row<A, dtype::f32>, &sparse_common::encode_row<A, dtype::f16>,
         &sparse_common::encode_row<A, dtype::bf16>},
        &sparse_decode_row,
        &sparse_attend_partial,
    };
}

} // namespace kvc::kernels::reference
