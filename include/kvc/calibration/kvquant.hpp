// kvc/calibration/kvquant.hpp -- calibration of the KVQuant (Q3) codec: key ranges and codebooks.
//
// Input: sample keys BEFORE RoPE and values, one [tokens][kv_heads][head_dim]
// view of each per layer (any kv_view element type). Output: the artifact of
// kind "kvquant" that kvc::quant::kvquant is built from, with tensors
//
//   "bits"              [1]                            2, 3 or 4
//   "outlier_fraction"  [1]                            share of key elements outside the ranges
//   "key_lower"         [layers][kv_heads][head_dim]   per channel: quantile(outlier_fraction / 2)
//   "key_upper"         [layers][kv_heads][head_dim]   per channel: quantile(1 - outlier_fraction / 2)
//   "key_codebook"      [layers][2^bits]               ascending centroids in [-1, 1]
//   "value_codebook"    [layers][2^bits]               ascending centroids in [-1, 1]
//
// Method (KVQuant, Hooper et al. 2024, sections 3.1-3.4):
// - Keys per channel: the calibrated range of each (layer, KV head, channel)
//   is its [f/2, 1 - f/2] quantile interval (f = outlier_fraction, quantiles
//   by linear interpolation between order statistics). At run time values
//   outside it are the sparse outliers (stored exactly); inside, they are
//   normalised to [-1, 1] (storage/kvquant_head.hpp's kvquant_channel_normaliser).
// - The key codebook of a layer: k-means (calibration/kmeans.hpp, 1-D,
//   2^bits clusters) over the normalised in-range calibration keys of all
//   its heads and channels. The paper weights points by Fisher information
//   (needs gradients); here every point weighs the same.
// - Values per token: each sample row is normalised by its own midpoint and
//   half-range (kvquant_row_normaliser, what the codec does at append); the
//   value codebook of a layer is k-means over those normalised elements.
// - Determinism: with more than max_kmeans_points points, every ceil(n / max)-th
//   point (in token, head, channel order) is used; k-means is seeded with
//   seed + 2 * layer (keys) and seed + 2 * layer + 1 (values). The same
//   inputs and options give the same artifact bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/kmeans.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"
#include "kvc/storage/kvquant_head.hpp"

namespace kvc::calibration {

struct kvquant_options {
    unsigned bits = 3;
    double outlier_fraction = 0.01; // in [0, 0.5)
    std::uint64_t seed = 0;
    std::size_t kmeans_iterations = 50;
    std::size_t max_kmeans_points = std::size_t{1} << 16; // per layer and codebook
};

namespace detail {

// Quantile q of sorted values by linear interpolation between order statistics.
inline float quantile_sorted(const std::vector<float>& sorted, double q) noexcept {
    const double at = q * static_cast<double>(sorted.size() - 1);
    const std::size_t i = static_cast<std::size_t>(std::floor(at));
    if (i + 1 >= sorted.size()) return sorted.back();
    const double frac = at - static_cast<double>(i);
    return static_cast<float>(static_cast<double>(sorted[i]) +
                              frac * (static_cast<double>(sorted[i + 1]) - static_cast<double>(sorted[i])));
}

// Sorted k-means centroids of 1-D points, subsampled deterministically.
inline std::vector<float> scalar_codebook(const std::vector<float>& points, const kvquant_options& options,
                                          std::uint64_t seed) {
    const std::size_t clusters = std::size_t{1} << options.bits;
    std::vector<float> sample;
    if (points.empty()) {
        sample.push_back(0.0f); // nothing in range: a degenerate book at 0
    } else if (points.size() > options.max_kmeans_points) {
        const std::size_t stride = (points.size() + options.max_kmeans_points - 1) / options.max_kmeans_points;
        for (std::size_t i = 0; i < points.size(); i += stride) sample.push_back(points[i]);
    } else {
        sample = points;
    }
    kmeans_options k;
    k.clusters = clusters;
    k.iterations = options.kmeans_iterations;
    k.seed = seed;
    std::vector<float> book = kmeans(sample.data(), sample.size(), 1, k).centroids;
    std::sort(book.begin(), book.end());
    return book;
}

} // namespace detail

template <class KeyView, class ValueView>
artifact calibrate_kvquant(const cache_config& config, const std::vector<KeyView>& keys,
                           const std::vector<ValueView>& values, const kvquant_options& options = {}) {
    kvc::detail::require(options.bits >= 2 && options.bits <= 4,
                         "calibration::calibrate_kvquant: expected bits 2, 3 or 4, got ", options.bits);
    kvc::detail::require(options.outlier_fraction >= 0.0 && options.outlier_fraction < 0.5,
                         "calibration::calibrate_kvquant: expected outlier_fraction in [0, 0.5), got ",
                         options.outlier_fraction);
    kvc::detail::require(options.max_kmeans_points >= 1 && options.kmeans_iterations >= 1,
                         "calibration::calibrate_kvquant: expected max_kmeans_points and kmeans_iterations >= 1");
    kvc::detail::require(keys.size() == config.layers && values.size() == config.layers,
                         "calibration::calibrate_kvquant: expected one key and one value view per layer (",
                         config.layers, "), got ", keys.size(), " and ", values.size());
    const std::size_t heads = config.kv_heads, dim = config.head_dim;
    const std::size_t clusters = std::size_t{1} << options.bits;
    const double f = options.outlier_fraction;
    artifact a;
    a.kind = "kvquant";
    tensor bits{"bits", {1}, {static_cast<float>(options.bits)}};
    tensor fraction{"outlier_fraction", {1}, {static_cast<float>(f)}};
    tensor lower{"key_lower", {config.layers, heads, dim}, {}}, upper{"key_upper", {config.layers, heads, dim}, {}};
    tensor key_book{"key_codebook", {config.layers, clusters}, {}};
    tensor value_book{"value_codebook", {config.layers, clusters}, {}};
    for (std::size_t l = 0; l < config.layers; ++l) {
        const KeyView& k = keys[l];
        const ValueView& v = values[l];
        kvc::detail::require(k.heads() == heads && k.dim() == dim && v.heads() == heads && v.dim() == dim &&
                                 k.tokens() == v.tokens() && k.tokens() >= 1,
                             "calibration::calibrate_kvquant: layer ", l, " expects keys and values [T][", heads, "][",
                             dim, "] with the same T >= 1, got keys [", k.tokens(), "][", k.heads(), "][", k.dim(),
                             "] and values [", v.tokens(), "][", v.heads(), "][", v.dim(), "]");
        const std::size_t tokens = k.tokens();
        std::vector<float> key_points, value_points, column(tokens), row(dim);
        std::vector<float> layer_lower(heads * dim), layer_upper(heads * dim);
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t c = 0; c < dim; ++c) {
                for (std::size_t t = 0; t < tokens; ++t) {
                    column[t] = static_cast<float>(k(t, h, c));
                    kvc::detail::require(std::isfinite(column[t]), "calibration::calibrate_kvquant: layer ", l,
                                         " key (token ", t, ", head ", h, ", channel ", c, ") is not finite");
                }
                std::sort(column.begin(), column.end());
                layer_lower[h * dim + c] = detail::quantile_sorted(column, f / 2.0);
                layer_upper[h * dim + c] = detail::quantile_sorted(column, 1.0 - f / 2.0);
            }
        for (std::size_t t = 0; t < tokens; ++t)
            for (std::size_t h = 0; h < heads; ++h) {
                for (std::size_t c = 0; c < dim; ++c) {
                    const float x = static_cast<float>(k(t, h, c));
                    const float lo = layer_lower[h * dim + c], hi = layer_upper[h * dim + c];
                    if (x < lo || x > hi) continue; // an outlier: stored exactly, not in the dense code
                    const kvc::detail::kvquant_normaliser n = kvc::detail::kvquant_channel_normaliser(lo, hi);
                    const float normalised = (x - n.offset) / n.scale;
                    key_points.push_back(normalised > 1.0f ? 1.0f : (normalised < -1.0f ? -1.0f : normalised));
                }
                for (std::size_t c = 0; c < dim; ++c) {
                    row[c] = static_cast<float>(v(t, h, c));
                    kvc::detail::require(std::isfinite(row[c]), "calibration::calibrate_kvquant: layer ", l,
                                         " value (token ", t, ", head ", h, ", channel ", c, ") is not finite");
                }
                const kvc::detail::kvquant_normaliser n = kvc::detail::kvquant_row_normaliser(row.data(), dim);
                for (std::size_t c = 0; c < dim; ++c) {
                    const float normalised = n.scale > 0.0f ? (row[c] - n.offset) / n.scale : 0.0f;
                    value_points.push_back(normalised > 1.0f ? 1.0f : (normalised < -1.0f ? -1.0f : normalised));
                }
            }
        const std::vector<float> kb = detail::scalar_codebook(key_points, options, options.seed + 2 * l);
        const std::vector<float> vb = detail::scalar_codebook(value_points, options, options.seed + 2 * l + 1);
        lower.values.insert(lower.values.end(), layer_lower.begin(), layer_lower.end());
        upper.values.insert(upper.values.end(), layer_upper.begin(), layer_upper.end());
        key_book.values.insert(key_book.values.end(), kb.begin(), kb.end());
        value_book.values.insert(value_book.values.end(), vb.begin(), vb.end());
    }
    a.tensors = {bits, fraction, lower, upper, key_book, value_book};
    return a;
}

} // namespace kvc::calibration
