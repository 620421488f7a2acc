// examples/engine/cache_registry.hpp -- what the engine adds to kvc's method
// registry (kvc/registry.hpp): how it LEARNS the artifact of each calibrated
// method from the rows it recorded over calibration text, and which values
// of each method the fidelity sweep measures. The methods themselves, their
// names, parameters and factories, are the library's: kvc::make_cache builds
// every cache the command line names (cache_choice.cpp), so a method added to
// src/registry.cpp runs here with nothing to add unless it is learnt from the
// model (then a learner below).
//
// Only cache_choice.cpp includes this file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <kvc/calibration/cq.hpp>
#include <kvc/calibration/head_roles.hpp>
#include <kvc/calibration/kvquant.hpp>
#include <kvc/calibration/pca.hpp>
#include <kvc/calibration/query_filters.hpp>
#include <kvc/policy/eviction/policy.hpp>
#include <kvc/registry.hpp>

#include "cache_choice.hpp"

namespace engine::registry {

// What a learner uses: the cache shape and the model's calibration.
struct calibration_context {
    const kvc::cache_config& shape;
    const calibration& calibrated;
    const cache_spec& spec;

    // The artifact kept under `key` in calibrated.artifacts, learnt from the
    // calibration rows on first use. `spelled` ("--cache cq:c4b8") and
    // `learnt_from` ("keys and values") word the error when there are no
    // rows. learn: (const recorded_rows&) -> artifact.
    template <class Learn>
    const kvc::calibration::artifact& artifact(const std::string& key, const std::string& spelled,
                                               const std::string& learnt_from, Learn learn) const {
        auto found = calibrated.artifacts->find(key);
        if (found != calibrated.artifacts->end()) return found->second;
        if (!calibrated.rows)
            throw std::invalid_argument(spelled + " is learnt from the model's " + learnt_from + "; it needs "
                                        "calibration text (kvc-fidelity, kvc-attention-error and kvc_engine provide it)");
        return calibrated.artifacts->emplace(key, learn(calibrated.rows())).first->second;
    }

    // A view of recorded rows ([tokens][heads][head_dim]) of one layer, tokens [first, first + count).
    kvc::kv_view<const float> view_of(const std::vector<float>& layer_rows, std::size_t heads, std::size_t first,
                                      std::size_t count) const {
        return kvc::kv_view<const float>(layer_rows.data() + first * heads * shape.head_dim, count, heads,
                                         shape.head_dim);
    }
    // One view per layer of all recorded rows (keys and values: heads = kv_heads; queries: query_heads).
    std::vector<kvc::kv_view<const float>> per_layer(const std::vector<std::vector<float>>& rows,
                                                     std::size_t heads = 0) const {
        if (heads == 0) heads = shape.kv_heads;
        std::vector<kvc::kv_view<const float>> views;
        for (std::size_t layer = 0; layer < shape.layers; ++layer)
            views.push_back(view_of(rows.at(layer), heads, 0, rows.at(layer).size() / (heads * shape.head_dim)));
        return views;
    }
};

// ===========================================================================
// Learners: one per calibrated method of kvc::methods() the engine can learn.
// ===========================================================================

// Q8 CQ with `channels` channels coupled per `bits`-bit code (the library's
// cq:c4b8 and cq:c8b8), codebooks learnt from the calibration keys after RoPE
// (what the engine appends) and values.
inline kvc::calibration::artifact learn_cq(const calibration_context& context, const recorded_rows& rows,
                                           std::size_t channels, std::size_t bits) {
    kvc::calibration::cq_options options;
    options.channels_per_group = channels;
    options.bits = bits;
    return kvc::calibration::calibrate_cq(context.per_layer(rows.keys), context.per_layer(rows.values), options);
}

// Q3 KVQuant at `bits`: ranges (1% outliers) and codebooks learnt from the
// calibration keys BEFORE RoPE and values. The library's `kvquant` takes its
// bits from the artifact; the engine spells the bits it learns at as
// kvquant:BITS (kvquant_spelling), plain `kvquant` learning at
// kvquant_options' default.
inline kvc::calibration::artifact learn_kvquant(const calibration_context& context, const recorded_rows& rows,
                                                unsigned bits) {
    kvc::calibration::kvquant_options options;
    options.bits = bits;
    return kvc::calibration::calibrate_kvquant(context.shape, context.per_layer(rows.keys_before_rope),
                                               context.per_layer(rows.values), options);
}

// E10 Q-Filters: each KV head's filter is the dominant direction of its
// group's queries over the calibration text (after RoPE, as the engine
// attends with them).
inline kvc::calibration::artifact learn_query_filters(const calibration_context& context, const recorded_rows& rows) {
    return kvc::calibration::query_filters(context.shape, context.per_layer(rows.queries, context.shape.query_heads));
}

// B6's measurement, the artifact of head_roles: tensor "far_mass"
// [layers][kv_heads], the attention mass a head's queries put on tokens a
// streaming head drops (neither among the budget's 4 sinks nor within its
// 16 newest tokens), averaged over every query of the calibration text.
// calibration::head_roles measures it on each calibration sequence alone
// (attention must not reach into another sequence, whose first tokens would
// pass for far ones), and the sequences are weighted by the queries each
// measured. Which heads become retrieval heads for a share is the library's
// choice (kvc::make_cache, head_roles:SHARE), made from this profile.
inline kvc::calibration::artifact learn_far_attention(const calibration_context& context, const recorded_rows& rows) {
    const kvc::cache_config& shape = context.shape;
    const kvc::evict::budget protected_tokens; // every budget's sinks and window (the library's too)
    kvc::calibration::head_role_options options;
    options.sinks = protected_tokens.sinks;
    options.window = protected_tokens.window;
    const std::vector<std::uint64_t> profile_shape{shape.layers, shape.kv_heads};
    std::vector<double> mass(shape.layers * shape.kv_heads, 0.0);
    double queries_measured = 0.0;
    std::size_t first = 0;
    for (std::size_t tokens : rows.sequences) {
        const std::size_t measured = tokens > options.sinks + options.window ? tokens - options.sinks - options.window : 0;
        if (measured != 0) {
            std::vector<kvc::kv_view<const float>> keys, queries;
            for (std::size_t layer = 0; layer < shape.layers; ++layer) {
                keys.push_back(context.view_of(rows.keys.at(layer), shape.kv_heads, first, tokens));
                queries.push_back(context.view_of(rows.queries.at(layer), shape.query_heads, first, tokens));
            }
            const kvc::calibration::artifact one = kvc::calibration::head_roles(shape, keys, queries, options);
            const std::vector<float>& far = one.get("far_mass", profile_shape).values;
            for (std::size_t i = 0; i < mass.size(); ++i) mass[i] += static_cast<double>(far[i]) * static_cast<double>(measured);
            queries_measured += static_cast<double>(measured);
        }
        first += tokens;
    }
    const std::size_t recorded = rows.keys.at(0).size() / (shape.kv_heads * shape.head_dim);
    if (first != recorded)
        throw std::invalid_argument("--evict " + context.spec.evict + ": the calibration rows' sequences add up to " +
                                    std::to_string(first) + " tokens, the rows hold " + std::to_string(recorded));
    if (queries_measured == 0.0)
        throw std::invalid_argument("--evict " + context.spec.evict + ": every calibration sequence is too short; "
                                    "expected more than " + std::to_string(options.sinks + options.window) + " tokens");
    kvc::calibration::tensor far{"far_mass", profile_shape, {}};
    for (double m : mass) far.values.push_back(static_cast<float>(m / queries_measured));
    kvc::calibration::artifact profile;
    profile.kind = "head_roles"; // without a "retrieval" tensor: the library picks the heads per share
    profile.tensors.push_back(std::move(far));
    return profile;
}

// P1 PCA and P4 Loki: per (layer, KV head) principal bases of the
// calibration keys after RoPE (what the engine appends, so what the cache
// projects) and values, with every component (rank head_dim). One artifact
// serves every rank: project::pca takes the leading r columns of it, and
// project::loki wants the full-rank key basis (it ranks tokens by their
// leading r coordinates in it, then attends exactly).
inline kvc::calibration::artifact learn_principal_bases(const calibration_context& context, const recorded_rows& rows) {
    return kvc::calibration::calibrate_pca(context.shape, context.per_layer(rows.keys), context.per_layer(rows.values));
}

// The engine's spelling kvquant:BITS (2, 3 or 4): the library's kvquant with
// an artifact learnt at BITS. Returns 0 for any other spelling.
inline unsigned kvquant_spelling(const std::string& cache) {
    for (unsigned bits : {2u, 3u, 4u})
        if (cache == "kvquant:" + std::to_string(bits)) return bits;
    return 0;
}

// Where calibration::artifacts keeps a method's artifact, and how to learn
// it: a codec's under its --cache spelling ("cq:c4b8", "kvquant:3"), an
// eviction policy's under eviction_artifact_key() (one per policy, whatever
// its value), a projection's under projection_artifact_key() (pca, loki and
// cskv hold the same full-rank bases, learnt once: loki's and cskv's are copies of pca's).
// Throws std::invalid_argument for a calibrated method the engine has no
// learner for.
inline const kvc::calibration::artifact& learn(const calibration_context& context, const kvc::method_info& method) {
    const std::string& name = method.name;
    const std::string codec_flag = "--cache " + context.spec.cache;
    const auto codec = [&](auto learner) -> const kvc::calibration::artifact& {
        return context.artifact(context.spec.cache, codec_flag, "keys and values", learner);
    };
    if (name == "cq:c4b8") return codec([&](const recorded_rows& rows) { return learn_cq(context, rows, 4, 8); });
    if (name == "cq:c8b8") return codec([&](const recorded_rows& rows) { return learn_cq(context, rows, 8, 8); });
    if (name == "kvquant") {
        const unsigned spelled = kvquant_spelling(context.spec.cache);
        const unsigned bits = spelled != 0 ? spelled : kvc::calibration::kvquant_options{}.bits;
        return codec([&](const recorded_rows& rows) { return learn_kvquant(context, rows, bits); });
    }
    const std::string evict_flag = "--evict " + context.spec.evict;
    if (name == "qfilter")
        return context.artifact(eviction_artifact_key(context.spec.evict), evict_flag, "queries",
                                [&](const recorded_rows& rows) { return learn_query_filters(context, rows); });
    if (name == "head_roles")
        return context.artifact(eviction_artifact_key(context.spec.evict), evict_flag, "keys and queries",
                                [&](const recorded_rows& rows) { return learn_far_attention(context, rows); });
    if (name == "pca" || name == "loki" || name == "cskv") {
        const kvc::calibration::artifact& bases =
            context.artifact(projection_artifact_key("pca"), "--project " + context.spec.project, "keys and values",
                             [&](const recorded_rows& rows) { return learn_principal_bases(context, rows); });
        if (name == "pca") return bases;
        // Kept under loki's (cskv's) key too, so that learnt_from() names the calibration for its cache.
        return context.calibrated.artifacts->emplace(projection_artifact_key(name), bases).first->second;
    }
    throw std::invalid_argument("'" + name + "' is learnt from the model, and this engine does not learn its "
                                "artifact; expected a method whose artifact it learns (cq:c4b8, cq:c8b8, kvquant, "
                                "qfilter, head_roles, pca, loki, cskv) or one that needs none");
}

// True when the engine can build `method` from the model (it needs no artifact, or the engine learns it).
inline bool learnable(const kvc::method_info& method) {
    if (!method.calibrated) return true;
    for (const char* name : {"cq:c4b8", "cq:c8b8", "kvquant", "qfilter", "head_roles", "pca", "loki", "cskv"})
        if (method.name == name) return true;
    return false;
}

// ===========================================================================
// The fidelity sweep: which values of each method scripts/fidelity.sh measures.
// ===========================================================================

// A method's swept values, as the command line writes them after "name:".
struct sweep_values {
    std::string_view method;
    std::vector<std::string> values;
};

// Codecs with a parameter, and KVQuant's learnt bits (the engine's kvquant:BITS).
// A codec without a parameter is swept once; one with a parameter not listed
// here, at its default.
inline const std::vector<sweep_values>& codec_sweeps() {
    static const std::vector<sweep_values> list = {{"kivi", {"2", "4"}},
                                                   {"sparse", {"0.5", "0.7"}},
                                                   {"kvquant", {"3", "4"}},
                                                   {"mixed:int8/int2", {"0.2"}},
                                                   {"mixed:int4/int2", {"0.2"}}};
    return list;
}

// Evictions whose value is the share of the cache they keep (a keep ratio,
// or head_roles' share of retrieval heads): each at these values.
inline const std::vector<std::string> keep_ratio_sweep = {"0.75", "0.5", "0.25", "0.125"};

// Projections with a parameter: ThinK's pruned share; PCA's rank; Loki's
// rank:ratio (the leading coordinates it scores tokens with, the share of
// tokens it attends to). The ranks are fixed numbers, as the sweep is listed
// before a model is loaded (`kvc-fidelity --list`): d/2, d/4 and d/8 of
// kvref's head_dim d = 64. Loki at d/4 with two ratios, and at d/8; CSKV at
// d/4 and d/8 with the source's window of 32 tokens.
inline const std::vector<sweep_values>& projection_sweeps() {
    static const std::vector<sweep_values> list = {{"think", {"0.25", "0.4", "0.5"}},
                                                   {"pca", {"32", "16", "8"}},
                                                   {"loki", {"16:0.125", "16:0.25", "8:0.25"}},
                                                   {"cskv", {"16:32", "8:32"}}};
    return list;
}

// Methods the sweep leaves out: E18 external ranks by scores the caller
// writes, which neither the engine nor the fidelity tools write.
inline bool never_swept(const kvc::method_info& method) { return method.name == "external"; }

// The codec eviction, merging and projection sweeps store their rows with (fp16, the usual engine cache).
inline constexpr std::string_view eviction_sweep_codec = "none:f16";

} // namespace engine::registry
