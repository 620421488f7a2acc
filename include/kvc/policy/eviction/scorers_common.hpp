// kvc/policy/eviction/scorers_common.hpp -- pieces several scorers share.
#pragma once

#include <cmath>
#include <cstddef>
#include <vector>

#include "kvc/kernels/table.hpp"
#include "kvc/policy/eviction/policy.hpp"

namespace kvc::evict::score_detail {

// Attention probabilities of the recent queries on every token, averaged over
// the queries and the GQA group: mean_q softmax(q . k_t * scale). Returns
// false (and leaves `out` zero) when no query was recorded yet.
inline bool mean_query_attention(const head_inputs& in, std::size_t last_queries, float* out) {
    for (std::size_t t = 0; t < in.tokens; ++t) out[t] = 0.0f;
    if (in.query_count == 0 || in.tokens == 0) return false;
    const kernels::kernel_table& k = *in.kernels;
    const std::size_t first = in.query_count > last_queries ? in.query_count - last_queries : 0;
    const float scale = in.scale;
    std::vector<float> row(in.tokens);
    std::size_t rows = 0;
    for (std::size_t q = first; q < in.query_count; ++q)
        for (std::size_t g = 0; g < in.group; ++g) {
            const float* query = in.queries + (q * in.group + g) * in.dim;
            for (std::size_t t = 0; t < in.tokens; ++t)
                row[t] = scale * k.dot[kernels::index_of(dtype::f32)](query, in.keys + t * in.dim, in.dim);
            k.softmax(row.data(), in.tokens);
            for (std::size_t t = 0; t < in.tokens; ++t) out[t] += row[t];
            ++rows;
        }
    const float inverse = 1.0f / static_cast<float>(rows);
    for (std::size_t t = 0; t < in.tokens; ++t) out[t] *= inverse;
    return true;
}

inline float norm(const kernels::kernel_table& k, const float* row, std::size_t dim) {
    return std::sqrt(k.dot[kernels::index_of(dtype::f32)](row, row, dim));
}

} // namespace kvc::evict::score_detail
