// kvc/policy/merging/nearest.hpp -- what the mergers share: the dropped
// rows decoded a block at a time, non-finite ones skipped (M1, M2, M4, M5),
// and, for those that route each dropped token to one kept token (M2
// similarity, M4 zero_merge), one head's kept rows decoded once and each
// dropped row's most cosine-similar kept key.
//
// Row arithmetic goes through the kernel table (dot, axpy on fp32 rows), as
// everywhere in the policies. A row whose squared norm is not finite (NaN,
// Inf, overflow) takes part in nothing: a dropped one is simply dropped, a
// kept one receives no merge, so one bad row cannot poison its neighbours.
// Cost: the search is exhaustive, one dot per (dropped, kept) pair per head,
// i.e. dropped x kept x head_dim multiply-adds per compression: fine for the
// prompts kvc measures, quadratic for 32K-token layers (no index yet).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/kernels/table.hpp"

namespace kvc::merge {

// Decodes the rows of KV head h at the ascending `indices` [0, n) into keys
// and values ([n][dim] each), one decode call per run of consecutive indices.
template <class Layer>
void decode_rows_at(const Layer& layer, std::size_t h, const std::uint32_t* indices, std::size_t n, float* keys,
                    float* values) {
    const std::size_t dim = layer.config().head_dim;
    const kernels::kernel_table& k = layer.kernels();
    for (std::size_t i = 0; i < n;) {
        std::size_t run = 1;
        while (i + run < n && indices[i + run] == indices[i] + run) ++run;
        layer.rows(h).decode_keys(k, indices[i], run, keys + i * dim);
        layer.rows(h).decode_values(k, indices[i], run, values + i * dim);
        i += run;
    }
}

// The kept rows of one head, decoded, with what routing needs of them.
struct kept_rows {
    std::size_t dim = 0;
    std::vector<float> keys, values;        // [kept][dim], in the model's space
    std::vector<float> key_norm, value_norm; // Euclidean norms
    std::vector<unsigned char> joinable;    // finite rows with a nonzero key: a dropped token may join them

    const float* key(std::size_t i) const noexcept { return keys.data() + i * dim; }
    const float* value(std::size_t i) const noexcept { return values.data() + i * dim; }
    std::size_t size() const noexcept { return key_norm.size(); }
};

// A row's squared norm through the kernels; +Inf or NaN when it is not finite.
inline float squared_norm(const kernels::kernel_table& k, const float* row, std::size_t dim) noexcept {
    return k.dot[kernels::index_of(dtype::f32)](row, row, dim);
}

template <class Layer>
kept_rows gather_kept(const Layer& layer, std::size_t h, const std::vector<std::uint32_t>& kept) {
    const std::size_t dim = layer.config().head_dim, n = kept.size();
    const kernels::kernel_table& k = layer.kernels();
    kept_rows rows;
    rows.dim = dim;
    rows.keys.resize(n * dim);
    rows.values.resize(n * dim);
    rows.key_norm.resize(n);
    rows.value_norm.resize(n);
    rows.joinable.resize(n);
    decode_rows_at(layer, h, kept.data(), n, rows.keys.data(), rows.values.data());
    for (std::size_t i = 0; i < n; ++i) {
        const float keys2 = squared_norm(k, rows.key(i), dim), values2 = squared_norm(k, rows.value(i), dim);
        rows.key_norm[i] = std::sqrt(keys2);
        rows.value_norm[i] = std::sqrt(values2);
        rows.joinable[i] = std::isfinite(keys2) && std::isfinite(values2) && keys2 > 0.0f;
    }
    return rows;
}

// The kept token a dropped key is most cosine-similar to (the first on a
// tie), and that similarity; at == size() when none can be joined (no
// joinable kept token, or a zero or non-finite dropped key).
struct nearest_kept {
    std::size_t at;
    float similarity;
};
inline nearest_kept nearest_of(const kernels::kernel_table& k, const kept_rows& kept, const float* key,
                               float key_norm) noexcept {
    nearest_kept best{kept.size(), -std::numeric_limits<float>::infinity()};
    if (!(key_norm > 0.0f) || !std::isfinite(key_norm)) return best;
    const int f32 = kernels::index_of(dtype::f32);
    for (std::size_t i = 0; i < kept.size(); ++i) {
        if (!kept.joinable[i]) continue;
        const float similarity = k.dot[f32](key, kept.key(i), kept.dim) / (key_norm * kept.key_norm[i]);
        if (similarity > best.similarity) best = {i, similarity};
    }
    return best;
}

// Calls visit(token, key_row, value_row, key_norm, value_norm) for every
// finite dropped row of head h (ascending), decoding `block` rows at a time.
template <class Layer, class Visit>
void for_each_dropped(const Layer& layer, std::size_t h, const std::vector<std::uint32_t>& dropped, Visit&& visit) {
    constexpr std::size_t block = 64;
    const std::size_t dim = layer.config().head_dim;
    const kernels::kernel_table& k = layer.kernels();
    std::vector<float> keys(block * dim), values(block * dim);
    for (std::size_t first = 0; first < dropped.size(); first += block) {
        const std::size_t n = dropped.size() - first < block ? dropped.size() - first : block;
        decode_rows_at(layer, h, dropped.data() + first, n, keys.data(), values.data());
        for (std::size_t i = 0; i < n; ++i) {
            const float* key = keys.data() + i * dim;
            const float* value = values.data() + i * dim;
            const float keys2 = squared_norm(k, key, dim), values2 = squared_norm(k, value, dim);
            if (!std::isfinite(keys2) || !std::isfinite(values2)) continue;
            visit(dropped[first + i], key, value, std::sqrt(keys2), std::sqrt(values2));
        }
    }
}

// out = scale * row (out is overwritten), through the kernels.
inline void scaled_copy(const kernels::kernel_table& k, float scale, const float* row, float* out, std::size_t dim) noexcept {
    std::fill(out, out + dim, 0.0f);
    k.axpy[kernels::index_of(dtype::f32)](scale, row, out, dim);
}

} // namespace kvc::merge
