// examples/engine/cache_registry.hpp -- the policies the engine's command line
// can name: one line per policy, by its METHODS.md name. Adding a policy is
// one line in codec_options() or eviction_options().
//
// Only the engine's cache_*.cpp files include this: every line here becomes
// compressed_cache instantiations, compiled once, in the library the engine
// tools and tests link (see cache_choice.hpp).
//
// Which pairs exist. Every codec runs alone (--evict none). A codec marked
// `with_eviction` also runs under every eviction policy; the others would
// multiply the build time for pairs nobody sweeps, and are one flag away.
#pragma once

#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/calibration/cq.hpp>
#include <kvc/calibration/kvquant.hpp>
#include <kvc/kvc.hpp>

#include "cache_choice.hpp"

namespace engine::registry {

// A name the command line uses and how to build the policy.
template <class Make, bool WithEviction = false>
struct policy_option {
    static constexpr bool with_eviction = WithEviction;
    std::string_view name;      // "none:f16", "q4_0", "snapkv"
    std::string_view parameter; // what follows "name:" on the command line ("keep_ratio"); empty: nothing
    std::vector<double> sweep;  // parameter values scripts/fidelity.sh measures
    std::string_view summary;   // one line for --list
    Make make;                  // () -> policy, or (double value, std::size_t every) -> policy
};

// What a codec's factory may use besides nothing: the cache shape and the
// model's calibration. Factories are () -> policy, or (const codec_context&)
// -> policy for codecs learnt from the model's rows.
struct codec_context {
    const kvc::cache_config& shape;
    const calibration& calibrated;
    const cache_spec& spec;

    // The artifact this spelling learns from the calibration rows, learnt on
    // first use and kept in calibrated.artifacts. learn: (const recorded_rows&) -> artifact.
    template <class Learn>
    const kvc::calibration::artifact& artifact(Learn learn) const {
        auto found = calibrated.artifacts->find(spec.cache);
        if (found != calibrated.artifacts->end()) return found->second;
        if (!calibrated.rows)
            throw std::invalid_argument("--cache " + spec.cache + " is learnt from the model's keys and values; it "
                                        "needs calibration text (kvc-fidelity and kvc_engine provide it)");
        return calibrated.artifacts->emplace(spec.cache, learn(calibrated.rows())).first->second;
    }
    // One view per layer of recorded rows ([tokens][kv_heads][head_dim] each).
    std::vector<kvc::kv_view<const float>> per_layer(const std::vector<std::vector<float>>& rows) const {
        const std::size_t row = shape.kv_heads * shape.head_dim;
        std::vector<kvc::kv_view<const float>> views;
        for (std::size_t layer = 0; layer < shape.layers; ++layer)
            views.emplace_back(rows.at(layer).data(), rows.at(layer).size() / row, shape.kv_heads, shape.head_dim);
        return views;
    }
};

// Q8 CQ with `channels` channels coupled per `bits`-bit code, codebooks learnt
// from the calibration keys after RoPE (what the engine appends) and values.
inline kvc::quant::cq cq_codec(const codec_context& context, std::size_t channels, std::size_t bits) {
    return kvc::quant::cq(context.artifact([&](const recorded_rows& rows) {
        kvc::calibration::cq_options options;
        options.channels_per_group = channels;
        options.bits = bits;
        return kvc::calibration::calibrate_cq(context.per_layer(rows.keys), context.per_layer(rows.values), options);
    }));
}

// Q3 KVQuant at `bits`: ranges (1% outliers) and codebooks learnt from the
// calibration keys BEFORE RoPE and values; one fp16 sink; the model's RoPE.
inline kvc::quant::kvquant kvquant_codec(const codec_context& context, unsigned bits) {
    const kvc::calibration::artifact& learnt = context.artifact([&](const recorded_rows& rows) {
        kvc::calibration::kvquant_options options;
        options.bits = bits;
        return kvc::calibration::calibrate_kvquant(context.shape, context.per_layer(rows.keys_before_rope),
                                                   context.per_layer(rows.values), options);
    });
    return kvc::quant::kvquant(learnt, context.calibrated.rope);
}

// The policy `option` makes, from nothing or from the context.
template <class Option>
auto make_codec(const Option& option, const codec_context& context) {
    if constexpr (std::is_invocable_v<const decltype(option.make)&, const codec_context&>)
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
// An eviction policy without a parameter.
template <class Make>
policy_option<Make> eviction(std::string_view name, std::string_view summary, Make make) {
    return {name, {}, {}, summary, std::move(make)};
}
// An eviction policy taking one number ("snapkv:0.25"), swept over `sweep`.
template <class Make>
policy_option<Make> eviction(std::string_view name, std::string_view parameter, std::vector<double> sweep,
                             std::string_view summary, Make make) {
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
        codec_with_eviction("none:f16", "compressed_cache, rows as they are in fp16",
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
              [](const codec_context& c) { return cq_codec(c, 4, 8); }),
        codec("cq:c8b8", "CQ (Q8): 8 channels per 8-bit code (1 bit/channel), codebooks learnt on calibration text",
              [](const codec_context& c) { return cq_codec(c, 8, 8); }),
        codec("kvquant:3", "KVQuant (Q3): 3-bit pre-RoPE per-channel keys, 1% sparse outliers, learnt codebooks",
              [](const codec_context& c) { return kvquant_codec(c, 3); }),
        codec("kvquant:4", "KVQuant (Q3): 4-bit pre-RoPE per-channel keys, 1% sparse outliers, learnt codebooks",
              [](const codec_context& c) { return kvquant_codec(c, 4); }),
        codec("mixed:int8/int2:0.2", "Mixed precision (Q6): the 20% of tokens with most prompt attention in int8, "
              "the rest int2 (groups of 32)", [] { return q::mixed<q::int8_sym, q::int2_asym, 32>(0.2); }),
        codec("mixed:int4/int2:0.2", "Mixed precision (Q6): the 20% of tokens with most prompt attention in int4, "
              "the rest int2 (groups of 32)", [] { return q::mixed<q::int4_sym, q::int2_asym, 32>(0.2); }));
}

// ===========================================================================
// Eviction: --evict NAME:KEEP_RATIO.
// ===========================================================================

// Each keeps that fraction of the tokens every KV head has seen (the first 4,
// the attention sinks, and the newest 16 always among them: kvc's budget
// defaults), compressing once after the prompt (B9) and, with --evict-every N,
// during decode whenever a head is N tokens over its budget.
inline kvc::evict::schedule schedule_for(std::size_t every) { return kvc::evict::schedule{true, every}; }

template <class Policy>
auto keep_ratio_eviction(std::string_view name, std::string_view summary) {
    return eviction(name, "keep_ratio", {0.75, 0.5, 0.25, 0.125}, summary, [](double keep_ratio, std::size_t every) {
        return Policy(kvc::evict::budget::ratio(keep_ratio), schedule_for(every));
    });
}

inline auto eviction_options() {
    namespace e = kvc::evict;
    return std::make_tuple(
        eviction("none", "keep every token", [] { return e::none{}; }),
        keep_ratio_eviction<e::streaming>("streaming", "StreamingLLM (E1): attention sinks + newest tokens"),
        keep_ratio_eviction<e::h2o>("h2o", "H2O (E2): attention accumulated over all queries"),
        keep_ratio_eviction<e::a2sf>("a2sf", "A2SF (E3): accumulated attention with a forgetting factor"),
        keep_ratio_eviction<e::scissorhands>("scissorhands", "Scissorhands (E4): persistence of high attention"),
        keep_ratio_eviction<e::snapkv>("snapkv", "SnapKV (E5): attention of the last 64 queries, pooled"),
        keep_ratio_eviction<e::tova>("tova", "TOVA (E6): attention of the newest query"),
        keep_ratio_eviction<e::knorm>("knorm", "K-norm (E7): keep low-norm keys"),
        keep_ratio_eviction<e::keydiff>("keydiff", "KeyDiff (E8): keep keys unlike the mean key"),
        keep_ratio_eviction<e::expected_attention>("expected_attention",
                                                   "Expected attention (E9): attention expected from query statistics"),
        keep_ratio_eviction<e::lagkv>("lagkv", "LagKV (E11): lag-relative information, attention-free"),
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
            "chunkkv", "ChunkKV (B4) over SnapKV scores: whole chunks of 10 tokens"));
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
auto make_eviction(const Option& option, const std::string& argument, const cache_spec& spec) {
    if constexpr (std::is_invocable_v<const decltype(option.make)&>) {
        if (!argument.empty())
            throw std::invalid_argument("--evict " + spec.evict + ": '" + std::string(option.name) +
                                        "' takes no value; write --evict " + std::string(option.name));
        if (spec.every != 0)
            throw std::invalid_argument("--evict-every needs an evicting policy, not --evict " + spec.evict);
        return option.make();
    } else {
        std::size_t used = 0;
        double value = 0.0;
        try {
            value = std::stod(argument, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (argument.empty() || used != argument.size())
            throw std::invalid_argument("--evict " + spec.evict + ": expected " + std::string(option.name) + ":" +
                                        std::string(option.parameter) + " with a number, e.g. " +
                                        std::string(option.name) + ":0.25");
        return option.make(value, spec.every);
    }
}

// visit(std::get<Begin + I>(options)) for each I: only that slice is instantiated.
template <std::size_t Begin, class Tuple, class Visit, std::size_t... I>
void visit_slice(const Tuple& options, Visit& visit, std::index_sequence<I...>) {
    (visit(std::get<Begin + I>(options)), ...);
}

// What make_compressed found while looking for the spelled names.
struct lookup {
    bool codec_found = false;
    bool eviction_found = false;
    bool pair_offered = true;
};

// The compressed cache for `spec` if its codec is one of codec_options()'s
// entries [Begin, End); the cache_*.cpp files split the codecs between them.
template <std::size_t Begin, std::size_t End>
std::unique_ptr<kv_cache> make_compressed(const kvc::cache_config& shape, const cache_spec& spec,
                                          const calibration& calibrated, lookup& found) {
    const std::size_t colon = spec.evict.find(':');
    const std::string evict_name = spec.evict.substr(0, colon);
    const std::string evict_argument = colon == std::string::npos ? "" : spec.evict.substr(colon + 1);
    std::unique_ptr<kv_cache> cache;
    const auto codecs = codec_options();
    auto build = [&](const auto& codec_option) {
        if (codec_option.name != spec.cache) return;
        found.codec_found = true;
        using codec_option_type = std::decay_t<decltype(codec_option)>;
        auto quantization = make_codec(codec_option, codec_context{shape, calibrated, spec});
        using quantization_type = decltype(quantization);
        if (evict_name == "none") {
            found.eviction_found = true;
            (void)make_eviction(std::get<0>(eviction_options()), evict_argument, spec);
            using cache_type =
                kvc::compressed_cache<kvc::evict::none, kvc::merge::none, quantization_type, kvc::project::none>;
            cache = std::make_unique<kvc_cache<cache_type>>(shape, kvc::evict::none{}, kvc::merge::none{},
                                                            std::move(quantization), kvc::project::none{});
            return;
        }
        for_each_option(eviction_options(), [&](const auto& eviction_option) {
            if (eviction_option.name != evict_name) return;
            found.eviction_found = true;
            if constexpr (codec_option_type::with_eviction) {
                auto eviction = make_eviction(eviction_option, evict_argument, spec);
                using cache_type = kvc::compressed_cache<decltype(eviction), kvc::merge::none, quantization_type,
                                                         kvc::project::none>;
                cache = std::make_unique<kvc_cache<cache_type>>(shape, std::move(eviction), kvc::merge::none{},
                                                                std::move(quantization), kvc::project::none{});
            } else {
                found.pair_offered = false;
            }
        });
    };
    visit_slice<Begin>(codecs, build, std::make_index_sequence<End - Begin>{});
    return cache;
}

inline constexpr std::size_t codec_count = std::tuple_size_v<decltype(codec_options())>;

// The library's translation units (cache_part*.cpp) each build a slice of
// the codecs; together they cover [0, codec_count). A codec with eviction is
// about 20 compressed_cache types, one without is one: parts 0 to 3 take
// one or two of the former each and share the light ones with part 4.
inline constexpr std::size_t part_bounds[] = {0, 2, 4, 9, 16, codec_count};
std::unique_ptr<kv_cache> make_compressed_part0(const kvc::cache_config&, const cache_spec&, const calibration&,
                                                lookup&);
std::unique_ptr<kv_cache> make_compressed_part1(const kvc::cache_config&, const cache_spec&, const calibration&,
                                                lookup&);
std::unique_ptr<kv_cache> make_compressed_part2(const kvc::cache_config&, const cache_spec&, const calibration&,
                                                lookup&);
std::unique_ptr<kv_cache> make_compressed_part3(const kvc::cache_config&, const cache_spec&, const calibration&,
                                                lookup&);
std::unique_ptr<kv_cache> make_compressed_part4(const kvc::cache_config&, const cache_spec&, const calibration&,
                                                lookup&);

} // namespace engine::registry
