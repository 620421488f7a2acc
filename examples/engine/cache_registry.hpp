// examples/engine/cache_registry.hpp -- the policies the engine's command line
// can name: one line per policy, by its docs/METHODS.md name. Adding a policy is
// one line in codec_options() or eviction_options(); a policy learnt from
// the model (calibration text) adds the function that learns it too.
//
// Only the engine's cache_*.cpp files include this: every line here becomes
// compressed_cache instantiations, compiled once, in the library the engine
// tools and tests link (see cache_choice.hpp).
//
// Which pairs exist. Every codec runs alone (--evict none). A codec marked
// `with_eviction` also runs under every eviction policy; the others would
// multiply the build time for pairs nobody sweeps, and are one flag away.
// A codec marked `with_merging` (it must re-encode rows: store_row) also
// runs every merging policy under the evictions marked `with_merging` (each
// triple is a cache type: four evictions, not all, keep the build quick); one marked `with_projection` (rows
// stored as they are, which ThinK prunes) runs every projection, without
// eviction (--evict none): pairs with eviction are one line away.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/calibration/cq.hpp>
#include <kvc/calibration/head_roles.hpp>
#include <kvc/calibration/kvquant.hpp>
#include <kvc/calibration/query_filters.hpp>
#include <kvc/all.hpp>

#include "cache_choice.hpp"

namespace engine::registry {

// A name the command line uses and how to build the policy.
template <class Make, bool WithEviction = false, bool WithMerging = false, bool WithProjection = false>
struct policy_option {
    static constexpr bool with_eviction = WithEviction;
    static constexpr bool with_merging = WithMerging;
    static constexpr bool with_projection = WithProjection;
    std::string_view name;      // "none:f16", "q4_0", "snapkv"
    std::string_view parameter; // what follows "name:" on the command line ("keep_ratio"); empty: nothing
    std::vector<double> sweep;  // parameter values scripts/fidelity.sh measures
    std::string_view summary;   // one line for --list
    // Codecs: () -> policy, or (const calibration_context&) -> policy.
    // Eviction: () -> policy, (double value, std::size_t every) -> policy, or
    // (double value, std::size_t every, const calibration_context&) -> policy.
    Make make;
};

// What a factory may use besides its value: the cache shape and the model's
// calibration, for policies learnt from the model's rows.
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
    // A codec's artifact, kept under its spelling.
    template <class Learn>
    const kvc::calibration::artifact& codec_artifact(Learn learn) const {
        return artifact(spec.cache, "--cache " + spec.cache, "keys and values", std::move(learn));
    }
    // An eviction policy's artifact, one per policy whatever its value.
    template <class Learn>
    const kvc::calibration::artifact& eviction_artifact(const std::string& learnt_from, Learn learn) const {
        return artifact(eviction_artifact_key(spec.evict), "--evict " + spec.evict, learnt_from, std::move(learn));
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

// Q8 CQ with `channels` channels coupled per `bits`-bit code, codebooks learnt
// from the calibration keys after RoPE (what the engine appends) and values.
inline kvc::quant::cq cq_codec(const calibration_context& context, std::size_t channels, std::size_t bits) {
    return kvc::quant::cq(context.codec_artifact([&](const recorded_rows& rows) {
        kvc::calibration::cq_options options;
        options.channels_per_group = channels;
        options.bits = bits;
        return kvc::calibration::calibrate_cq(context.per_layer(rows.keys), context.per_layer(rows.values), options);
    }));
}

// Q3 KVQuant at `bits`: ranges (1% outliers) and codebooks learnt from the
// calibration keys BEFORE RoPE and values; one fp16 sink; the model's RoPE.
inline kvc::quant::kvquant kvquant_codec(const calibration_context& context, unsigned bits) {
    const kvc::calibration::artifact& learnt = context.codec_artifact([&](const recorded_rows& rows) {
        kvc::calibration::kvquant_options options;
        options.bits = bits;
        return kvc::calibration::calibrate_kvquant(context.shape, context.per_layer(rows.keys_before_rope),
                                                   context.per_layer(rows.values), options);
    });
    return kvc::quant::kvquant(learnt, context.calibrated.rope);
}

// The policy `option` makes, from nothing or from the context.
template <class Option>
auto make_codec(const Option& option, const calibration_context& context) {
    if constexpr (std::is_invocable_v<const decltype(option.make)&, const calibration_context&>)
        return option.make(context);
    else
        return option.make();
}

// A quantization codec (the compressed_cache's third slot) that runs only alone.
template <class Make>
policy_option<Make> codec(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// A codec that also runs under every eviction policy.
template <class Make>
policy_option<Make, true> codec_with_eviction(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// A codec that also runs under every eviction policy with every merging
// policy, and with every projection.
template <class Make>
policy_option<Make, true, true, true> codec_with_every_family(std::string_view name, std::string_view summary,
                                                              Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// An eviction policy without a parameter.
template <class Make>
policy_option<Make> eviction(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// An eviction policy taking one number ("snapkv:0.25"), swept over `sweep`;
// WithMerging: it also runs under every merging policy.
template <bool WithMerging = false, class Make>
policy_option<Make, false, WithMerging> eviction(std::string_view name, std::string_view parameter,
                                                 std::vector<double> sweep, std::string_view summary, Make make) {
    return {name, parameter, std::move(sweep), summary, std::move(make)};
}

// ===========================================================================
// Codecs: --cache NAME.
// ===========================================================================

inline auto codec_options() {
    namespace q = kvc::quant;
    return std::make_tuple(
        codec_with_eviction("none:f32", "compressed_cache, rows as they are in fp32 (bit-identical to full:f32)",
                            [] { return q::none<float>{}; }),
        codec_with_every_family("none:f16", "compressed_cache, rows as they are in fp16",
                                [] { return q::none<kvc::half>{}; }),
        codec("none:bf16", "compressed_cache, rows as they are in bf16", [] { return q::none<kvc::bfloat16>{}; }),
        codec_with_eviction("q8_0", "Q1 int8 symmetric, groups of 32 (ggml q8_0 bytes), 8.5 bits/value",
                            [] { return q::q8_0{}; }),
        codec_with_eviction("q4_0", "Q1 int4 symmetric, groups of 32 (ggml q4_0 bytes), 4.5 bits/value",
                            [] { return q::q4_0{}; }),
        codec("q4_1", "Q1 int4 asymmetric, groups of 32 (ggml q4_1 bytes), 5 bits/value", [] { return q::q4_1{}; }),
        codec("int8:g64", "Q1 int8 symmetric, groups of 64, 8.25 bits/value",
              [] { return q::block<q::int8_sym, 64>{}; }),
        codec("int4:g64", "Q1 int4 asymmetric, groups of 64, 4.5 bits/value",
              [] { return q::block<q::int4_asym, 64>{}; }),
        codec("int2:g32", "Q1 int2 asymmetric, groups of 32, 3 bits/value",
              [] { return q::block<q::int2_asym, 32>{}; }),
        codec("fp8:e4m3", "Q1 fp8 e4m3 with a scale per 32, 8.5 bits/value",
              [] { return q::block<q::fp8_e4m3, 32>{}; }),
        codec("fp8:e5m2", "Q1 fp8 e5m2 with a scale per 32, 8.5 bits/value",
              [] { return q::block<q::fp8_e5m2, 32>{}; }),
        codec("k8v4", "Q5 keys int8, values int4 (groups of 32), 6.5 bits/value",
              [] { return q::block_kv<q::int8_sym, q::int4_sym, 32>{}; }),
        codec("k4v2", "Q5 keys int4, values int2 (groups of 32), 3.75 bits/value",
              [] { return q::block_kv<q::int4_sym, q::int2_asym, 32>{}; }),
        codec("q4_0+sinks", "Q9 q4_0 with the first 4 tokens of every head in fp16",
              [] { return q::block<q::int4_sym, 32, 4>{}; }),
        codec_with_eviction("kivi:2", "KIVI (Q2): 2-bit keys per channel, values per token, 128+ newest in fp16",
                            [] { return q::kivi<2>{}; }),
        codec("kivi:4", "KIVI (Q2): 4-bit keys per channel, values per token, 128+ newest in fp16",
              [] { return q::kivi<4>{}; }),
        codec("hadamard:q4_0", "Hadamard rotation (Q4) of keys and values, then q4_0",
              [] { return q::rotated<q::q4_0>{}; }),
        codec("hadamard:k4v2", "Hadamard rotation (Q4), then keys int4, values int2",
              [] { return q::rotated<q::block_kv<q::int4_sym, q::int2_asym, 32>>{}; }),
        codec("sparse:0.5", "Mustafar sparsity (Q10): half of each key and value row kept, bitmap + fp16",
              [] { return q::sparse(0.5); }),
        codec("sparse:0.7", "Mustafar sparsity (Q10): 30% of each row kept, bitmap + fp16",
              [] { return q::sparse(0.7); }),
        codec("cq:c4b8", "CQ (Q8): 4 channels per 8-bit code (2 bits/channel), codebooks learnt on calibration text",
              [](const calibration_context& c) { return cq_codec(c, 4, 8); }),
        codec("cq:c8b8", "CQ (Q8): 8 channels per 8-bit code (1 bit/channel), codebooks learnt on calibration text",
              [](const calibration_context& c) { return cq_codec(c, 8, 8); }),
        codec("kvquant:3", "KVQuant (Q3): 3-bit pre-RoPE per-channel keys, 1% sparse outliers, learnt codebooks",
              [](const calibration_context& c) { return kvquant_codec(c, 3); }),
        codec("kvquant:4", "KVQuant (Q3): 4-bit pre-RoPE per-channel keys, 1% sparse outliers, learnt codebooks",
              [](const calibration_context& c) { return kvquant_codec(c, 4); }),
        codec("mixed:int8/int2:0.2", "Mixed precision (Q6): the 20% of tokens with most prompt attention in int8, "
              "the rest int2 (groups of 32)", [] { return q::mixed<q::int8_sym, q::int2_asym, 32>(0.2); }),
        codec("mixed:int4/int2:0.2", "Mixed precision (Q6): the 20% of tokens with most prompt attention in int4, "
              "the rest int2 (groups of 32)", [] { return q::mixed<q::int4_sym, q::int2_asym, 32>(0.2); }));
}

// ===========================================================================
// Eviction: --evict NAME:KEEP_RATIO (head_roles: NAME:RETRIEVAL_SHARE).
// ===========================================================================

// Each keeps that fraction of the tokens every KV head has seen (the first 4,
// the attention sinks, and the newest 16 always among them: kvc's budget
// defaults), compressing once after the prompt (B9) and, with --evict-every N,
// during decode whenever a head is N tokens over its budget. Head roles (B6)
// instead keep everything in a share of the heads and sinks + newest 16 in
// the others. qfilter and head_roles learn from calibration text
// (`calibration`, cache_choice.hpp): once per policy, whatever its value.
inline kvc::evict::schedule schedule_for(std::size_t every) { return kvc::evict::schedule{true, every}; }

inline const std::vector<double> keep_ratio_sweep = {0.75, 0.5, 0.25, 0.125};

template <class Policy, bool WithMerging = false>
auto keep_ratio_eviction(std::string_view name, std::string_view summary) {
    return eviction<WithMerging>(name, "keep_ratio", keep_ratio_sweep, summary, [](double keep_ratio, std::size_t every) {
        return Policy(kvc::evict::budget::ratio(keep_ratio), schedule_for(every));
    });
}

// E10 Q-Filters: each KV head's filter is the dominant direction of its
// group's queries over the calibration text (after RoPE, as the engine
// attends with them); tokens whose keys point along it stay.
inline kvc::evict::qfilter qfilter_policy(const calibration_context& context, double keep_ratio, std::size_t every) {
    const kvc::calibration::artifact& filters = context.eviction_artifact("queries", [&](const recorded_rows& rows) {
        return kvc::calibration::query_filters(context.shape, context.per_layer(rows.queries, context.shape.query_heads));
    });
    return kvc::evict::qfilter(kvc::evict::budget::ratio(keep_ratio), schedule_for(every),
                               kvc::evict::score::qfilter::from(filters));
}

// B6's measurement, the artifact of head_roles: tensor "far_mass"
// [layers][kv_heads], the attention mass a head's queries put on tokens a
// streaming head drops (neither among the budget's 4 sinks nor within its
// 16 newest tokens), averaged over every query of the calibration text.
// calibration::head_roles measures it on each calibration sequence alone
// (attention must not reach into another sequence, whose first tokens would
// pass for far ones), and the sequences are weighted by the queries each measured.
inline kvc::calibration::artifact far_attention_profile(const calibration_context& context,
                                                        const recorded_rows& rows) {
    const kvc::cache_config& shape = context.shape;
    const kvc::evict::budget protected_tokens; // every engine budget's sinks and window
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
    profile.kind = "head_roles";
    profile.tensors.push_back(std::move(far));
    return profile;
}

// B6 head roles with the share `retrieval_share` of the model's KV heads as
// retrieval heads: the floor(share x layers x kv_heads) heads with the most
// far attention on the calibration text, over the whole model (ties to the
// earlier head), keep every token; the others keep the budget's sinks and
// newest 16 tokens (DuoAttention's knob: the retrieval heads' share).
inline kvc::evict::head_roles head_roles_policy(const calibration_context& context, double retrieval_share,
                                                std::size_t every) {
    if (!(retrieval_share > 0.0 && retrieval_share <= 1.0))
        throw std::invalid_argument("--evict " + context.spec.evict + ": expected a retrieval share in (0, 1], got " +
                                    std::to_string(retrieval_share));
    kvc::calibration::artifact roles = context.eviction_artifact(
        "keys and queries", [&](const recorded_rows& rows) { return far_attention_profile(context, rows); });
    const std::vector<float>& far = roles.get("far_mass", {context.shape.layers, context.shape.kv_heads}).values;
    const auto retrieval_heads =
        static_cast<std::size_t>(std::floor(retrieval_share * static_cast<double>(far.size()) + 1e-9));
    std::vector<std::size_t> order(far.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return far[a] > far[b]; });
    kvc::calibration::tensor retrieval{"retrieval", {context.shape.layers, context.shape.kv_heads},
                                       std::vector<float>(far.size(), 0.0f)};
    for (std::size_t i = 0; i < retrieval_heads; ++i) retrieval.values[order[i]] = 1.0f;
    roles.tensors.push_back(std::move(retrieval));
    return kvc::evict::head_roles(kvc::evict::budget::ratio(retrieval_share), schedule_for(every), {},
                                  kvc::evict::by_head_role::from(roles));
}

inline auto eviction_options() {
    namespace e = kvc::evict;
    return std::make_tuple(
        eviction("none", "keep every token", [] { return e::none{}; }),
        keep_ratio_eviction<e::streaming, true>("streaming", "StreamingLLM (E1): attention sinks + newest tokens"),
        keep_ratio_eviction<e::h2o, true>("h2o", "H2O (E2): attention accumulated over all queries"),
        keep_ratio_eviction<e::a2sf>("a2sf", "A2SF (E3): accumulated attention with a forgetting factor"),
        keep_ratio_eviction<e::scissorhands>("scissorhands", "Scissorhands (E4): persistence of high attention"),
        keep_ratio_eviction<e::snapkv, true>("snapkv", "SnapKV (E5): attention of the last 64 queries, pooled"),
        keep_ratio_eviction<e::tova>("tova", "TOVA (E6): attention of the newest query"),
        keep_ratio_eviction<e::knorm>("knorm", "K-norm (E7): keep low-norm keys"),
        keep_ratio_eviction<e::keydiff>("keydiff", "KeyDiff (E8): keep keys unlike the mean key"),
        keep_ratio_eviction<e::expected_attention>("expected_attention",
                                                   "Expected attention (E9): attention expected from query statistics"),
        // LagKV twice: its default lag (128, the paper's) and lag 16. LagKV
        // keeps the sinks, the last full chunk and the partial tail after it
        // outright (score 1): with lag 128 on the tools' 512-token prompts
        // that is 4 + 252 tokens, half the prompt, so at keep ratios up to
        // 0.5 it keeps exactly streaming's tokens. Lag 16 leaves 4 + 28.
        keep_ratio_eviction<e::lagkv>("lagkv", "LagKV (E11): lag-relative information, attention-free, lag 128 "
                                      "(on 512-token prompts it keeps what streaming keeps up to ratio 0.5)"),
        eviction("lagkv16", "keep_ratio", keep_ratio_sweep,
                 "LagKV (E11) with lag 16: chunks short enough for the 512-token prompts of the fidelity tools",
                 [](double keep_ratio, std::size_t every) {
                     e::score::lagkv lag16;
                     lag16.lag = 16;
                     return e::lagkv(e::budget::ratio(keep_ratio), schedule_for(every), lag16);
                 }),
        keep_ratio_eviction<e::leverage>("leverage", "Leverage scores of the keys (E12)"),
        keep_ratio_eviction<e::cur>("cur", "CUR (E13): key norm x value norm, windowed"),
        keep_ratio_eviction<e::value_weighted<>>("value_weighted",
                                                 "Value-weighted SnapKV (E14): attention x value norm"),
        keep_ratio_eviction<e::hash_evict>("hash_evict", "HashEvict (E15): LSH distance of keys to the query"),
        keep_ratio_eviction<e::global_local>("global_local", "Global-local importance (E16)"),
        keep_ratio_eviction<e::random>("random", "random (E17): the baseline every scorer must beat"),
        keep_ratio_eviction<e::policy<e::score::snapkv, e::adakv>>(
            "adakv", "AdaKV (B2) over SnapKV scores: one budget per layer shared by its heads"),
        eviction("pyramidkv", "keep_ratio", {0.75, 0.5, 0.25, 0.125},
                 "PyramidKV (B3) over SnapKV scores: more tokens in lower layers",
                 [](double keep_ratio, std::size_t every) {
                     e::budget keep = e::budget::ratio(keep_ratio);
                     keep.layers = e::layer_allocation::pyramid();
                     return e::snapkv(keep, schedule_for(every));
                 }),
        keep_ratio_eviction<e::policy<e::score::snapkv, e::chunkkv>>(
            "chunkkv", "ChunkKV (B4) over SnapKV scores: whole chunks of 10 tokens"),
        eviction("qfilter", "keep_ratio", keep_ratio_sweep,
                 "Q-Filters (E10): keys along the heads' dominant query direction, learnt on calibration text",
                 [](double keep_ratio, std::size_t every, const calibration_context& c) {
                     return qfilter_policy(c, keep_ratio, every);
                 }),
        eviction<true>("head_roles", "retrieval_share", keep_ratio_sweep,
                 "Head roles (B6): that share of the KV heads, those attending farthest back on calibration text, "
                 "keep every token; the rest keep sinks + newest 16",
                 [](double share, std::size_t every, const calibration_context& c) {
                     return head_roles_policy(c, share, every);
                 }));
}

// ===========================================================================
// Merging: --merge NAME (with an evicting --evict, on codecs marked with_merging).
// ===========================================================================

// A merging policy (no parameter).
template <class Make>
policy_option<Make> merging(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}

inline auto merge_options() {
    namespace m = kvc::merge;
    return std::make_tuple(
        merging("none", "what eviction drops is gone", [] { return m::none{}; }),
        merging("compensation", "M5: one slot per head, the count-weighted mean of everything dropped, "
                "attended with log(count)", [] { return m::compensation{}; }),
        merging("zero_merge", "M4: each dropped token joins its most similar kept key as a count-weighted mean, "
                "attended with log(count)", [] { return m::zero_merge{}; }),
        merging("similarity", "M2 (KVMerger, D2O): dropped values blended into the most similar kept token, "
                "keys untouched", [] { return m::similarity{}; }),
        merging("cam", "M1 CaM: each dropped value spread over the next 32 kept tokens, scaled by its attention "
                "relative to theirs", [] { return m::cam{}; }));
}

// The number after "NAME:" of an option taking one ("--evict snapkv:0.25"),
// or an error naming the flag as spelled (`spelled`) and an example value.
template <class Option>
double option_value(const std::string& spelled, const Option& option, const std::string& argument,
                    const char* example) {
    std::size_t used = 0;
    double value = 0.0;
    try {
        value = std::stod(argument, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (argument.empty() || used != argument.size())
        throw std::invalid_argument(spelled + ": expected " + std::string(option.name) + ":" +
                                    std::string(option.parameter) + " with a number, e.g. " +
                                    std::string(option.name) + ":" + example);
    return value;
}

// ===========================================================================
// Projection: --project NAME:VALUE (with --evict none, on codecs marked with_projection).
// ===========================================================================

// A projection taking one number ("think:0.4"), swept over `sweep`.
template <class Make>
policy_option<Make> projection(std::string_view name, std::string_view parameter, std::vector<double> sweep,
                               std::string_view summary, Make make) {
    return {name, parameter, std::move(sweep), summary, std::move(make)};
}

inline auto project_options() {
    namespace p = kvc::project;
    return std::make_tuple(
        projection("none", "", {}, "every channel of every key stored", [](double) { return p::none{}; }),
        projection("think", "pruned_share", {0.25, 0.4, 0.5},
                   "ThinK (P3): that share of each head's key channels, the least used by the newest 32 queries, "
                   "dropped from all but the newest 128 tokens", [](double share) { return p::think(share); }));
}

// The projection a --project spelling builds ("none" or "NAME:VALUE").
template <class Option>
auto make_projection(const Option& option, const std::string& argument, const cache_spec& spec) {
    if (option.parameter.empty()) {
        if (!argument.empty())
            throw std::invalid_argument("--project " + spec.project + ": '" + std::string(option.name) +
                                        "' takes no value");
        return option.make(0.0);
    }
    return option.make(option_value("--project " + spec.project, option, argument, "0.4"));
}

// The codec eviction sweeps store their kept rows with (fp16, the usual engine cache).
inline constexpr std::string_view eviction_sweep_codec = "none:f16";

template <class Tuple, class Visit>
void for_each_option(const Tuple& options, Visit&& visit) {
    std::apply([&](const auto&... option) { (visit(option), ...); }, options);
}

// How the command line writes an option: "none:f16", "snapkv:keep_ratio".
template <class Option>
std::string spelling(const Option& option) {
    std::string text(option.name);
    if (!option.parameter.empty()) {
        text += ':';
        text += option.parameter;
    }
    return text;
}

// The policy an eviction option builds from the argument after ':' ("" when absent).
template <class Option>
auto make_eviction(const Option& option, const std::string& argument, const calibration_context& context) {
    const cache_spec& spec = context.spec;
    if constexpr (std::is_invocable_v<const decltype(option.make)&>) {
        if (!argument.empty())
            throw std::invalid_argument("--evict " + spec.evict + ": '" + std::string(option.name) +
                                        "' takes no value; write --evict " + std::string(option.name));
        if (spec.every != 0)
            throw std::invalid_argument("--evict-every needs an evicting policy, not --evict " + spec.evict);
        return option.make();
    } else {
        const double value = option_value("--evict " + spec.evict, option, argument, "0.25");
        if constexpr (std::is_invocable_v<const decltype(option.make)&, double, std::size_t, const calibration_context&>)
            return option.make(value, spec.every, context);
        else
            return option.make(value, spec.every);
    }
}

// What make_compressed found while looking for the spelled names.
struct lookup {
    bool codec_found = false;
    bool eviction_found = false;
    bool merge_found = false;
    bool project_found = false;
    bool pair_offered = true;
    bool merge_offered = true;
    bool project_offered = true;
};

// The compressed cache `spec` names, or null when a name is unknown (`found`
// says which, and which pairing is not offered). Defined in cache_compressed.cpp,
// the one file that instantiates the engine's compressed_cache types.
std::unique_ptr<kv_cache> make_compressed(const kvc::cache_config& shape, const cache_spec& spec,
                                          const calibration& calibrated, lookup& found);

} // namespace engine::registry
