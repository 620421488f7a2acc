// tests/cache/learnt_artifacts.hpp -- an artifact for every calibrated method
// of kvc's registry, learnt from random rows: what the registry needs to
// build each of them (cache_options::artifacts, keyed by method name). What
// the artifacts are worth is the fidelity tools' business; these only have
// to be valid for the shape.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/all.hpp"

namespace kvc_test {

// 256 tokens a layer of random keys, values and queries (seeds seed, seed + 1, seed + 2).
inline std::map<std::string, kvc::calibration::artifact> learnt_artifacts(const kvc::cache_config& c,
                                                                           std::uint32_t seed) {
    const std::size_t tokens = 256;
    const std::vector<float> keys = random_floats(tokens * c.kv_heads * c.head_dim, seed);
    const std::vector<float> values = random_floats(tokens * c.kv_heads * c.head_dim, seed + 1);
    const std::vector<float> queries = random_floats(tokens * c.query_heads * c.head_dim, seed + 2);
    using view = kvc::kv_view<const float>;
    const std::vector<view> k(c.layers, view(keys.data(), tokens, c.kv_heads, c.head_dim));
    const std::vector<view> v(c.layers, view(values.data(), tokens, c.kv_heads, c.head_dim));
    const std::vector<view> q(c.layers, view(queries.data(), tokens, c.query_heads, c.head_dim));
    std::map<std::string, kvc::calibration::artifact> out;
    kvc::calibration::cq_options coupled;
    coupled.bits = 8;
    coupled.channels_per_group = 4;
    out["cq:c4b8"] = kvc::calibration::calibrate_cq(k, v, coupled);
    coupled.channels_per_group = 8;
    out["cq:c8b8"] = kvc::calibration::calibrate_cq(k, v, coupled);
    kvc::calibration::kvquant_options bits3;
    bits3.bits = 3;
    out["kvquant"] = kvc::calibration::calibrate_kvquant(c, k, v, bits3);
    out["qfilter"] = kvc::calibration::query_filters(c, q);
    out["head_roles"] = kvc::calibration::head_roles(c, k, q);
    out["pca"] = out["loki"] = out["cskv"] = kvc::calibration::calibrate_pca(c, k, v);
    return out;
}

} // namespace kvc_test
