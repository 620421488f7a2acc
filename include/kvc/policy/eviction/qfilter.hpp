// kvc/policy/eviction/qfilter.hpp -- E10 Q-Filters: keys scored against a calibrated query direction.
//
// Source: Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV
// Cache Compression" (2025). s_t = <f_h, k_t>, where f_h is the dominant
// direction of the head's sample queries (calibration/query_filters.hpp),
// oriented so queries project positively: keys along it draw attention and
// stay. (Other write-ups use s_t = -<f_h, k_t> with the opposite orientation of
// f_h; the ranking is the same.) No attention pass, no queries at run time;
// the calibration artifact is required and checked against the model's shape
// when the cache is built.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/checked.hpp"
#include "kvc/policy/eviction/scorers_common.hpp"

namespace kvc::evict {
namespace score {
struct qfilter {
    static constexpr bool needs_attention_stats = false;
    static constexpr std::size_t query_window = 0;
    static constexpr bool needs_keys = true, needs_values = false;
    static constexpr bool needs_calibration = true;

    std::vector<float> filters; // [layers][kv_heads][dim]
    std::size_t layers = 0, kv_heads = 0, dim = 0;

    // From the artifact calibration::query_filters produced (or loaded from its file).
    static qfilter from(const calibration::artifact& calibration) {
        detail::require(calibration.kind == "qfilter", "evict::qfilter: expected a 'qfilter' calibration artifact, got '",
                        calibration.kind, "'");
        for (const calibration::tensor& t : calibration.tensors)
            if (t.name == "filters" && t.shape.size() == 3) {
                qfilter q;
                q.layers = t.shape[0];
                q.kv_heads = t.shape[1];
                q.dim = t.shape[2];
                q.filters = t.values;
                return q;
            }
        detail::fail("evict::qfilter: the artifact has no [layers][kv_heads][dim] tensor 'filters'");
    }

    void validate(const cache_config& config) const {
        detail::require(!filters.empty(), "evict::qfilter: missing calibration (build it with "
                                          "calibration::query_filters and pass qfilter::from(artifact))");
        detail::require(layers == config.layers && kv_heads == config.kv_heads && dim == config.head_dim,
                        "evict::qfilter: calibration is for [", layers, "][", kv_heads, "][", dim,
                        "] (layers, kv heads, head dim), the cache is [", config.layers, "][", config.kv_heads, "][",
                        config.head_dim, "]");
        // score() reads dim floats at (layer * kv_heads + head) * dim: the table must hold all of them.
        const std::size_t expected =
            detail::checked_mul(detail::checked_mul(layers, kv_heads, "evict::qfilter", "layers", "kv_heads"), dim,
                                "evict::qfilter", "heads", "dim");
        detail::require(filters.size() == expected, "evict::qfilter: expected ", expected,
                        " filter values ([layers][kv_heads][dim]), got ", filters.size());
        for (std::size_t i = 0; i < filters.size(); ++i)
            detail::require(std::isfinite(filters[i]), "evict::qfilter: expected finite filter values, got ",
                            filters[i], " at index ", i);
    }

    void score(const head_inputs& in, float* scores) const noexcept {
        const float* f = filters.data() + (in.layer * kv_heads + in.kv_head) * dim;
        for (std::size_t t = 0; t < in.tokens; ++t)
            scores[t] = in.kernels->dot[kernels::index_of(dtype::f32)](f, in.keys + t * in.dim, in.dim);
    }
};
} // namespace score
using qfilter = policy<score::qfilter>;
} // namespace kvc::evict
