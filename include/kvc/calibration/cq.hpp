// kvc/calibration/cq.hpp -- codebooks of channel-coupled vector quantization (CQ, docs/METHODS.md Q8).
//
// CQ splits each key (value) row of a KV head into groups of c adjacent
// channels and replaces each group by the index of the nearest of 2^b
// centroids learnt offline. calibrate_cq learns those centroids: for every
// (layer, KV head, channel group), separately for keys and values, the
// deterministic k-means of calibration/kmeans.hpp over the sample rows'
// c-channel slices, with 2^b clusters.
//
// The artifact (calibration/artifact.hpp, kind "cq") holds four tensors:
//   "channels_per_group"  [1]                          c
//   "bits"                [1]                          b (bits per group code)
//   "key_codebooks"       [layers][kv_heads][groups][2^b][c]
//   "value_codebooks"     [layers][kv_heads][groups][2^b][c]
// with groups = head_dim / c; centroid k of group g holds the values of
// channels g c .. g c + c - 1. kvc::quant::cq (policy/quantization/cq.hpp)
// is built from it.
//
// Determinism: the same samples, options and seed give the same artifact
// bytes on every machine. Each k-means run gets its own seed derived from
// (seed, layer, head, group, keys/values) through splitmix64, so a layer's
// codebooks do not depend on which other layers were calibrated with it.
//
// Cost: one k-means per (layer, head, group) and per keys/values, each
// O(tokens x 2^b x c x iterations). A few hundred to a few thousand sample
// tokens per layer are the intended size (calibration is offline).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/calibration/kmeans.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/float16.hpp"

namespace kvc::calibration {

inline constexpr const char* cq_kind = "cq";

struct cq_options {
    std::size_t channels_per_group = 4; // c: 1, 2, 4 or 8
    std::size_t bits = 8;               // b: bits per group code, 1..8 (2^b centroids)
    std::uint64_t seed = 0;
    std::size_t iterations = 25;        // Lloyd passes at most (kmeans_options::iterations)
};

namespace detail {

// Throws kvc::error unless (c, b) is supported and c divides head_dim.
inline void validate_cq_shape(std::size_t channels, std::size_t bits, std::size_t head_dim, const char* who) {
    kvc::detail::require(channels == 1 || channels == 2 || channels == 4 || channels == 8, who,
                         ": expected channels per group 1, 2, 4 or 8, got ", channels);
    kvc::detail::require(bits >= 1 && bits <= 8, who, ": expected 1..8 bits per group code, got ", bits);
    kvc::detail::require(head_dim > 0 && head_dim % channels == 0, who, ": expected head_dim a multiple of ",
                         channels, " channels per group, got head_dim ", head_dim);
}

// Seed of one k-means run: a splitmix64 step over the run's coordinates.
inline std::uint64_t cq_run_seed(std::uint64_t seed, std::size_t layer, std::size_t head, std::size_t group,
                                 bool values) noexcept {
    splitmix64 mix(seed ^ (static_cast<std::uint64_t>(layer) << 40) ^ (static_cast<std::uint64_t>(head) << 24) ^
                   (static_cast<std::uint64_t>(group) << 1) ^ (values ? 1u : 0u));
    return mix.next();
}

} // namespace detail

// Codebooks from sample keys and values of `layers` layers: keys[l] and
// values[l] are kv_views ([tokens][kv_heads][head_dim], any layout and
// element type) of layer l; every layer must have the same heads and head
// dim, keys and values of a layer the same token count (>= 1). Throws
// kvc::error for bad options, mismatched shapes, no tokens or a non-finite
// sample element (naming layer, token, head and channel).
template <class KeyView, class ValueView>
artifact calibrate_cq(const KeyView* keys, const ValueView* values, std::size_t layers, const cq_options& options) {
    const char* who = "kvc::calibration::calibrate_cq";
    kvc::detail::require(layers > 0 && keys != nullptr && values != nullptr, who,
                         ": expected samples of at least one layer, got ", layers);
    const std::size_t heads = keys[0].heads(), dim = keys[0].dim();
    detail::validate_cq_shape(options.channels_per_group, options.bits, dim, who);
    const std::size_t c = options.channels_per_group, groups = dim / c, clusters = std::size_t{1} << options.bits;
    for (std::size_t l = 0; l < layers; ++l) {
        kvc::detail::require(keys[l].heads() == heads && values[l].heads() == heads && keys[l].dim() == dim &&
                                 values[l].dim() == dim,
                             who, ": expected every layer's keys and values as ", heads, " heads x ", dim,
                             " dims, layer ", l, " has keys ", keys[l].heads(), " x ", keys[l].dim(), ", values ",
                             values[l].heads(), " x ", values[l].dim());
        kvc::detail::require(keys[l].tokens() > 0 && keys[l].tokens() == values[l].tokens(), who,
                             ": expected the same number (>= 1) of key and value tokens, layer ", l, " has ",
                             keys[l].tokens(), " keys and ", values[l].tokens(), " values");
    }
    artifact a;
    a.kind = cq_kind;
    a.tensors.push_back({"channels_per_group", {1}, {static_cast<float>(c)}});
    a.tensors.push_back({"bits", {1}, {static_cast<float>(options.bits)}});
    const std::vector<std::uint64_t> shape = {layers, heads, groups, clusters, c};
    tensor key_books{"key_codebooks", shape, std::vector<float>(layers * heads * groups * clusters * c)};
    tensor value_books{"value_codebooks", shape, std::vector<float>(key_books.values.size())};
    std::vector<float> points;
    // The c-channel slices of group g of head h of one layer's view, checked finite.
    auto gather = [&](const auto& view, std::size_t l, std::size_t h, std::size_t g, const char* what) {
        const std::size_t tokens = view.tokens();
        points.resize(tokens * c);
        for (std::size_t t = 0; t < tokens; ++t) {
            const auto* row = view.row(t, h);
            for (std::size_t j = 0; j < c; ++j) {
                const float x = kvc::to_float(row[g * c + j]);
                kvc::detail::require(std::isfinite(x), who, ": expected finite samples, ", what, " of layer ", l,
                                     " token ", t, " head ", h, " channel ", g * c + j, " is ", x);
                points[t * c + j] = x;
            }
        }
        return tokens;
    };
    auto learn = [&](std::size_t tokens, std::size_t l, std::size_t h, std::size_t g, bool of_values, float* out) {
        kmeans_options k;
        k.clusters = clusters;
        k.iterations = options.iterations;
        k.seed = detail::cq_run_seed(options.seed, l, h, g, of_values);
        const kmeans_result result = kmeans(points.data(), tokens, c, k);
        for (std::size_t i = 0; i < clusters * c; ++i) out[i] = result.centroids[i];
    };
    for (std::size_t l = 0; l < layers; ++l)
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t g = 0; g < groups; ++g) {
                const std::size_t offset = ((l * heads + h) * groups + g) * clusters * c;
                learn(gather(keys[l], l, h, g, "key"), l, h, g, false, key_books.values.data() + offset);
                learn(gather(values[l], l, h, g, "value"), l, h, g, true, value_books.values.data() + offset);
            }
    a.tensors.push_back(std::move(key_books));
    a.tensors.push_back(std::move(value_books));
    return a;
}

// One view per layer.
template <class KeyView, class ValueView>
artifact calibrate_cq(const std::vector<KeyView>& keys, const std::vector<ValueView>& values,
                      const cq_options& options) {
    kvc::detail::require(keys.size() == values.size(), "kvc::calibration::calibrate_cq: expected as many value ",
                         "views as key views (one per layer), got ", keys.size(), " and ", values.size());
    return calibrate_cq(keys.data(), values.data(), keys.size(), options);
}

// A one-layer artifact.
template <class KeyView, class ValueView>
artifact calibrate_cq(const KeyView& keys, const ValueView& values, const cq_options& options) {
    return calibrate_cq(&keys, &values, 1, options);
}

} // namespace kvc::calibration
