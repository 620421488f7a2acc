// kvc/policy/eviction/head_roles.hpp -- B6: retrieval heads keep everything, streaming heads stream.
//
// Sources: RazorAttention (Tang et al., 2024), DuoAttention (Xiao et al., 2024).
// A calibration profile (calibration/head_roles.hpp) marks each (layer, KV
// head) as retrieval or streaming. Retrieval heads keep their full cache;
// streaming heads keep the budget's sinks and recent window only, so their
// memory stops growing. The compensation slot (M5) belongs to the merging
// family and is not part of this selector. The profile is checked against the
// model's shape when the cache is built.
#pragma once

#include <vector>

#include "kvc/calibration/artifact.hpp"
#include "kvc/policy/eviction/policy.hpp"
#include "kvc/policy/eviction/streaming.hpp"

namespace kvc::evict {

struct by_head_role {
    static constexpr bool uses_target = false;
    std::vector<char> retrieval; // [layers][kv_heads]: 1 retrieval, 0 streaming
    std::size_t layers = 0, kv_heads = 0;

    static by_head_role from(const calibration::artifact& profile) {
        detail::require(profile.kind == "head_roles", "evict::by_head_role: expected a 'head_roles' calibration "
                                                      "artifact, got '", profile.kind, "'");
        for (const calibration::tensor& t : profile.tensors)
            if (t.name == "retrieval" && t.shape.size() == 2) {
                by_head_role roles;
                roles.layers = t.shape[0];
                roles.kv_heads = t.shape[1];
                for (float v : t.values) roles.retrieval.push_back(v != 0.0f ? 1 : 0);
                return roles;
            }
        detail::fail("evict::by_head_role: the artifact has no [layers][kv_heads] tensor 'retrieval'");
    }

    void validate(const cache_config& config) const {
        detail::require(!retrieval.empty(), "evict::by_head_role: missing head-role profile (build it with "
                                            "calibration::head_roles and pass by_head_role::from(artifact))");
        detail::require(layers == config.layers && kv_heads == config.kv_heads,
                        "evict::by_head_role: profile is for ", layers, " layers x ", kv_heads,
                        " KV heads, the cache has ", config.layers, " x ", config.kv_heads);
    }

    void select(const layer_candidates& layer, std::vector<std::vector<std::uint32_t>>& keep) const {
        keep.resize(layer.heads.size());
        std::vector<char> chosen;
        for (std::size_t h = 0; h < layer.heads.size(); ++h) {
            const head_candidates& head = layer.heads[h];
            if (retrieval[layer.layer * kv_heads + h]) chosen.assign(head.held, 1);
            else selection::protect(head, *layer.keep, layer.first_position, head.held, chosen);
            selection::to_indices(chosen, keep[h]);
        }
    }
};

using head_roles = policy<score::streaming, by_head_role>;

} // namespace kvc::evict
