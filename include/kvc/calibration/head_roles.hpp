// kvc/calibration/head_roles.hpp -- B6: which KV heads retrieve and which only stream.
//
// Sources: RazorAttention (Tang et al., 2024) and DuoAttention (Xiao et al.,
// 2024): a few heads fetch information from far back ("retrieval heads") and
// need the full cache; the rest attend to the attention sinks and recent
// tokens ("streaming heads") and lose nothing with sinks + a window.
// Criterion used here: for each KV head, the attention mass its group's sample
// queries put on tokens that are neither sinks nor within `window` positions
// of the query, averaged over queries (causal attention computed in double
// from sample keys and queries of one forward pass). Heads whose mass reaches
// `threshold` are retrieval heads.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/core/cache_config.hpp"
#include "kvc/core/error.hpp"

namespace kvc::calibration {

struct head_role_options {
    std::size_t sinks = 4;
    std::size_t window = 64;
    double threshold = 0.1;
};

// keys [tokens][kv_heads][dim] and queries [tokens][query_heads][dim] per
// layer, token i's query at position i. Returns the artifact "head_roles" with
// tensors "far_mass" [layers][kv_heads] (the measured mass) and "retrieval"
// [layers][kv_heads] (1 for retrieval heads, 0 for streaming heads).
template <class KeyView, class QueryView>
artifact head_roles(const cache_config& config, const std::vector<KeyView>& keys,
                    const std::vector<QueryView>& queries, const head_role_options& options = {}) {
    kvc::detail::require(keys.size() == config.layers && queries.size() == config.layers,
                         "calibration::head_roles: expected one key and one query view per layer (", config.layers,
                         "), got ", keys.size(), " and ", queries.size());
    kvc::detail::require(options.threshold >= 0.0 && options.threshold <= 1.0,
                         "calibration::head_roles: expected threshold in [0, 1], got ", options.threshold);
    const std::size_t dim = config.head_dim, group = config.group();
    const double scale = config.logit_scale();
    tensor far{"far_mass", {config.layers, config.kv_heads}, {}}, roles{"retrieval", {config.layers, config.kv_heads}, {}};
    for (std::size_t l = 0; l < config.layers; ++l) {
        const KeyView& k = keys[l];
        const QueryView& q = queries[l];
        kvc::detail::require(k.heads() == config.kv_heads && k.dim() == dim && q.heads() == config.query_heads &&
                                 q.dim() == dim && q.tokens() == k.tokens(),
                             "calibration::head_roles: layer ", l, " expects keys [T][", config.kv_heads, "][", dim,
                             "] and queries [T][", config.query_heads, "][", dim, "] with the same T");
        const std::size_t tokens = k.tokens();
        for (std::size_t h = 0; h < config.kv_heads; ++h) {
            double total = 0.0;
            std::size_t counted = 0;
            std::vector<double> logits(tokens);
            for (std::size_t i = options.sinks + options.window; i < tokens; ++i)
                for (std::size_t g = 0; g < group; ++g) {
                    double max = -INFINITY;
                    for (std::size_t t = 0; t <= i; ++t) {
                        double dot = 0.0;
                        for (std::size_t d = 0; d < dim; ++d)
                            dot += static_cast<double>(q(i, h * group + g, d)) * static_cast<double>(k(t, h, d));
                        logits[t] = dot * scale;
                        max = std::max(max, logits[t]);
                    }
                    double sum = 0.0, far_mass = 0.0;
                    for (std::size_t t = 0; t <= i; ++t) {
                        const double p = std::exp(logits[t] - max);
                        sum += p;
                        if (t >= options.sinks && t + options.window < i) far_mass += p;
                    }
                    total += far_mass / sum;
                    ++counted;
                }
            const double mass = counted ? total / static_cast<double>(counted) : 0.0;
            far.values.push_back(static_cast<float>(mass));
            roles.values.push_back(mass >= options.threshold ? 1.0f : 0.0f);
        }
    }
    artifact out;
    out.kind = "head_roles";
    out.tensors.push_back(std::move(far));
    out.tensors.push_back(std::move(roles));
    return out;
}

} // namespace kvc::calibration
