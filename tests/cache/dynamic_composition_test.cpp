// Run-time composition: one cache type, compressed_cache<evict::any,
// merge::none, quant::any, project::none>, holds whatever codec, scorer and
// selector it is given, and must produce exactly what the statically
// composed type produces: every attention output bit for bit, the same
// tokens and positions in every head after every compression, and bytes()
// larger by exactly the blocks the run-time stores live in.
#include <gtest/gtest.h>

#include <map>

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/all.hpp"
#include "kvc/cache/dynamic_cache.hpp"
#include "kvc/policy/eviction/any.hpp"
#include "kvc/policy/quantization/any.hpp"
#include "kvc/registry.hpp"
#include "learnt_artifacts.hpp"

namespace {

using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
using run_time_cache = kvc::compressed_cache<kvc::evict::any, kvc::merge::none, kvc::quant::any, kvc::project::none>;
using run_time_codec_only = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::any, kvc::project::none>;

// evict::policy has a default constructor exactly when both stages do:
// score::any holds a chosen scorer and has none. (Asking used to be a hard
// error under clang, which evaluated `Scorer scorer{}` for the defaulted one.)
static_assert(!std::is_default_constructible_v<kvc::evict::any>);
static_assert(std::is_default_constructible_v<kvc::evict::snapkv>);
static_assert(std::is_constructible_v<std::optional<kvc::evict::any>>);

kvc::cache_config shape() {
    return kvc_test::shape_of(2, 2, 4, 64); // head_dim: a multiple of every codec's group (32, 64)
}

// What one run of a cache produced: every output, then each head's tokens,
// positions and store bytes at the end, and the cache's bytes.
struct run_record {
    std::vector<float> outputs;
    std::vector<std::size_t> tokens, store_bytes;
    std::vector<std::int32_t> positions;
    std::size_t bytes = 0;
};

template <class Cache, class = void>
struct exposes_heads : std::false_type {};
template <class Cache>
struct exposes_heads<Cache, std::void_t<decltype(std::declval<const Cache&>().head(0, 0))>> : std::true_type {};

// A prompt of 96 tokens in two chunks, attended chunk by chunk, then 40
// decode steps (append, attend); the policies' schedules compress after the
// prompt and during decode.
template <class Cache>
run_record run(Cache& cache) {
    const kvc::cache_config c = shape();
    run_record r;
    r.outputs = kvc_test::prompt_then_decode(cache, c, 96, 48, 40, 11);
    for (std::size_t l = 0; l < c.layers; ++l)
        for (std::size_t h = 0; h < c.kv_heads; ++h) {
            const std::size_t held = cache.tokens(l, h);
            r.tokens.push_back(held);
            if constexpr (exposes_heads<Cache>::value) r.store_bytes.push_back(cache.head(l, h).bytes());
            const std::int32_t* p = cache.positions(l, h);
            r.positions.insert(r.positions.end(), p, p + held);
        }
    r.bytes = cache.bytes();
    return r;
}

// Outputs, tokens and positions identical.
void expect_same_results(const run_record& a, const run_record& b, const std::string& what) {
    ASSERT_EQ(a.outputs.size(), b.outputs.size()) << what;
    EXPECT_EQ(0, std::memcmp(a.outputs.data(), b.outputs.data(), a.outputs.size() * sizeof(float)))
        << what << ": attention outputs differ";
    EXPECT_EQ(a.tokens, b.tokens) << what;
    EXPECT_EQ(a.positions, b.positions) << what;
}

// The static cache's record against the run-time one's: identical, but for
// the block each run-time store lives in (sizeof the codec's store).
template <class Static, class Dynamic, class Store>
void expect_same(Static& fixed, Dynamic& chosen, const Store*, const std::string& what) {
    const run_record a = run(fixed), b = run(chosen);
    expect_same_results(a, b, what);
    for (std::size_t i = 0; i < a.store_bytes.size(); ++i)
        EXPECT_EQ(a.store_bytes[i] + sizeof(Store), b.store_bytes[i]) << what << ": head " << i;
    EXPECT_GT(b.bytes, a.bytes) << what;
}

template <class Codec>
void codec_alone(Codec codec, const std::string& name) {
    kvc::compressed_cache<kvc::evict::none, kvc::merge::none, Codec, kvc::project::none> fixed(shape(), {}, {}, codec);
    run_time_codec_only chosen(shape(), {}, {}, kvc::quant::any(codec));
    expect_same(fixed, chosen, static_cast<const typename Codec::head_storage*>(nullptr), name);
}

template <class Codec, class Scorer, class Selector = kvc::evict::per_head_topk>
void evicting(Codec codec, Scorer scorer, const std::string& name, Selector selector = {},
              kvc::evict::budget budget = kvc::evict::budget::ratio(0.3)) {
    using fixed_policy = kvc::evict::policy<Scorer, Selector>;
    const kvc::evict::schedule when{true, 8}; // after the prompt, and 8 tokens over budget in decode
    kvc::compressed_cache<fixed_policy, kvc::merge::none, Codec, kvc::project::none> fixed(
        shape(), fixed_policy(budget, when, scorer, selector), {}, codec);
    run_time_cache chosen(shape(),
                          kvc::evict::any(budget, when, kvc::evict::score::any(scorer), kvc::evict::select::any(selector)),
                          {}, kvc::quant::any(codec));
    expect_same(fixed, chosen, static_cast<const typename Codec::head_storage*>(nullptr), name);
    // The comparison covered compressions: some head holds fewer tokens than were appended.
    std::size_t fewest = fixed.tokens(0, 0);
    for (std::size_t l = 0; l < shape().layers; ++l)
        for (std::size_t h = 0; h < shape().kv_heads; ++h) fewest = std::min(fewest, fixed.tokens(l, h));
    EXPECT_LT(fewest, fixed.tokens_seen(0)) << name << ": nothing was evicted";
}

namespace q = kvc::quant;
namespace e = kvc::evict;

// Artifacts learnt from random sample rows (256 tokens a layer), as the
// conformance suite learns them, for the calibrated codecs and scorers.
const std::map<std::string, kvc::calibration::artifact>& learnt() {
    static const std::map<std::string, kvc::calibration::artifact> a = kvc_test::learnt_artifacts(shape(), 61);
    return a;
}

// Every codec of the registry, by its spec, with its static type:
// f(spec, codec). The coverage test below checks that no registry codec is missing.
template <class F>
void every_codec(F&& f) {
    f("none:f32", q::none<float>{});
    f("none:f16", q::none<kvc::half>{});
    f("none:bf16", q::none<kvc::bfloat16>{});
    f("q8_0", q::q8_0{});
    f("q4_0", q::q4_0{});
    f("q4_1", q::q4_1{});
    f("int8:g64", q::block<q::int8_sym, 64>{});
    f("int4:g64", q::block<q::int4_asym, 64>{});
    f("int2:g32", q::block<q::int2_asym, 32>{});
    f("fp8:e4m3", q::block<q::fp8_e4m3, 32>{});
    f("fp8:e5m2", q::block<q::fp8_e5m2, 32>{});
    f("k8v4", q::block_kv<q::int8_sym, q::int4_sym, 32>{});
    f("k4v2", q::block_kv<q::int4_sym, q::int2_asym, 32>{});
    f("q4_0+sinks", q::block<q::int4_sym, 32, 4>{});
    f("kivi:2", q::kivi<2>{});
    f("kivi:4", q::kivi<4>{});
    f("gear", q::gear{});
    f("hadamard:q4_0", q::rotated<q::q4_0>{});
    f("hadamard:k4v2", q::rotated<q::block_kv<q::int4_sym, q::int2_asym, 32>>{});
    f("sparse:0.5", q::sparse(0.5));
    f("cq:c4b8", q::cq(learnt().at("cq:c4b8")));
    f("cq:c8b8", q::cq(learnt().at("cq:c8b8")));
    f("kvquant", q::kvquant(learnt().at("kvquant"), kvc::rope_config{}));
    f("mixed:int8/int2", q::mixed<q::int8_sym, q::int2_asym, 32>(0.2));
    f("mixed:int4/int2", q::mixed<q::int4_sym, q::int2_asym, 32>(0.2));
}

// Every eviction of the registry but head_roles (its own test below), by
// its spec, with its static scorer, selector and budget: f(spec, scorer,
// selector, budget).
template <class F>
void every_eviction(F&& f) {
    const e::per_head_topk topk;
    const e::budget keep = e::budget::ratio(0.3);
    f("streaming", e::score::streaming{}, topk, keep);
    f("h2o", e::score::h2o{}, topk, keep);
    f("a2sf", e::score::a2sf{}, topk, keep);
    f("scissorhands", e::score::scissorhands{}, topk, keep);
    f("snapkv", e::score::snapkv{}, topk, keep);
    f("tova", e::score::tova{}, topk, keep);
    f("knorm", e::score::knorm{}, topk, keep);
    f("keydiff", e::score::keydiff{}, topk, keep);
    f("expected_attention", e::score::expected_attention{}, topk, keep);
    f("qfilter", e::score::qfilter::from(learnt().at("qfilter")), topk, keep);
    f("lagkv", e::score::lagkv{}, topk, keep);
    e::score::lagkv lag16;
    lag16.lag = 16;
    f("lagkv16", lag16, topk, keep);
    f("leverage", e::score::leverage{}, topk, keep);
    f("cur", e::score::cur{}, topk, keep);
    f("value_weighted", e::score::value_weighted<>{}, topk, keep);
    f("hash_evict", e::score::hash_evict{}, topk, keep);
    f("global_local", e::score::global_local{}, topk, keep);
    f("random", e::score::random{}, topk, keep);
    f("external", e::score::external{}, topk, keep);
    f("adakv", e::score::snapkv{}, e::adakv{}, keep);
    e::budget pyramid = keep;
    pyramid.layers = e::layer_allocation::pyramid();
    f("pyramidkv", e::score::snapkv{}, topk, pyramid);
    f("chunkkv", e::score::snapkv{}, e::chunkkv{}, keep);
}

TEST(RunTimeComposition, EveryCodecAloneMatchesItsStaticCache) {
    every_codec([](const std::string& spec, const auto& codec) { codec_alone(codec, spec); });
}

TEST(RunTimeComposition, EveryScorerAndSelectorMatchesItsStaticPolicy) {
    const q::none<kvc::half> f16;
    every_eviction([&](const std::string& spec, const auto& scorer, const auto& selector, const e::budget& keep) {
        evicting(f16, scorer, spec, selector, keep);
    });
    // Selectors the registry does not spell.
    evicting(f16, e::score::h2o{}, "top_p", e::top_p{});
    evicting(f16, e::score::knorm{}, "threshold", e::threshold{});
}

// B6: the static policy (streaming scores, the heads' roles selecting)
// against the registry's head_roles built from the same profile.
TEST(RunTimeComposition, HeadRolesMatchesItsStaticPolicy) {
    kvc::calibration::artifact roles;
    roles.kind = "head_roles";
    roles.tensors.push_back({"retrieval", {2, 2}, {1.0f, 0.0f, 0.0f, 1.0f}});
    using fixed_policy = e::policy<e::score::streaming, e::by_head_role>;
    kvc::compressed_cache<fixed_policy, kvc::merge::none, q::none<kvc::half>, kvc::project::none> fixed(
        shape(), fixed_policy(e::budget::ratio(0.25), e::schedule{true, 0}, {}, e::by_head_role::from(roles)));
    kvc::cache_options options;
    options.artifacts["head_roles"] = roles;
    kvc::dynamic_cache chosen = kvc::make_cache(shape(), "head_roles:0.25", options);
    const run_record a = run(fixed), b = run(chosen);
    expect_same_results(a, b, "head_roles");
    EXPECT_LT(a.tokens[1], a.tokens[0]) << "a streaming head kept fewer tokens than a retrieval head";
}

// The lists above and the mergers below name every method of the registry
// (projections: think here, pca, loki and cskv in registry_test's
// CalibratedProjectionsMatchTheirStaticCaches), so a method added to the
// registry without its static twin here fails.
TEST(RunTimeComposition, TheComparisonsCoverEveryRegistryMethod) {
    std::set<std::string> covered = {"none", "merge:none", "compensation", "zero_merge", "similarity",
                                     "cam", "think", "pca", "loki", "cskv", "head_roles"};
    const auto method = [](const std::string& spec) { return kvc::parse_spec(spec).front().method->name; };
    every_codec([&](const std::string& spec, const auto&) { covered.insert(method(spec)); });
    every_eviction([&](const std::string& spec, const auto&, const auto&, const e::budget&) {
        covered.insert(method(spec));
    });
    for (const kvc::method_info& m : kvc::methods())
        EXPECT_EQ(1u, covered.count(m.name)) << m.name << " has no static comparison here";
}

TEST(RunTimeComposition, CodecsUnderEvictionMatchTheirStaticCache) {
    evicting(q::q4_0{}, e::score::snapkv{}, "q4_0 + snapkv");
    evicting(q::kivi<2>{}, e::score::h2o{}, "kivi:2 + h2o");
    evicting(q::rotated<q::q4_0>{}, e::score::knorm{}, "hadamard:q4_0 + knorm");
    evicting(q::none<float>{}, e::score::keydiff{}, "none:f32 + keydiff");
}

TEST(RunTimeComposition, ColumnsTheHeldScorerDoesNotUseHoldNothing) {
    // streaming uses no column: the run-time cache keeps none of the three
    // a scorer may declare, so it holds what the static cache holds but for
    // the store blocks, also per token.
    const e::budget budget = e::budget::ratio(0.5);
    run_time_cache chosen(shape(), e::any(budget, {}, e::score::any(e::score::streaming{})), {},
                          q::any(q::none<kvc::half>{}));
    EXPECT_EQ(nullptr, chosen.attention_statistic(0, 0));
    EXPECT_EQ(nullptr, chosen.external_scores(0, 0));
    run_time_cache heavy(shape(), e::any(budget, {}, e::score::any(e::score::h2o{})), {}, q::any(q::none<kvc::half>{}));
    const kvc::cache_config c = shape();
    std::vector<float> rows = kvc_test::random_floats(8 * c.kv_heads * c.head_dim, 3);
    chosen.append(0, token_major(rows.data(), 8, c.kv_heads, c.head_dim), token_major(rows.data(), 8, c.kv_heads, c.head_dim), 0);
    heavy.append(0, token_major(rows.data(), 8, c.kv_heads, c.head_dim), token_major(rows.data(), 8, c.kv_heads, c.head_dim), 0);
    EXPECT_NE(nullptr, heavy.attention_statistic(0, 0));
    // h2o's running attention: one float per token per head more.
    EXPECT_EQ(heavy.bytes() - chosen.bytes(), 8 * c.kv_heads * sizeof(float));
}

TEST(RunTimeComposition, WhatTheHeldCodecCannotDoIsRefusedAtConstruction) {
    e::any rerotating(e::budget::ratio(0.5), {}, e::score::any(e::score::streaming{}));
    rerotating.rerotate.enabled = true;
    const std::string message = kvc_test::error_of([&] { run_time_cache(shape(), rerotating, {}, q::any(q::q4_0{})); });
    EXPECT_NE(std::string::npos, message.find("re-rotation")) << message;
    EXPECT_EQ("(no kvc::error)",
              kvc_test::error_of([&] { run_time_cache(shape(), rerotating, {}, q::any(q::none<kvc::half>{})); }));
    e::any adaptive(e::budget::ratio(0.5), {}, e::score::any(e::score::snapkv{}), e::select::any(e::adakv{}));
    adaptive.rerotate.enabled = true;
    EXPECT_NE(std::string::npos,
              kvc_test::error_of([&] { run_time_cache(shape(), adaptive, {}, q::any(q::none<kvc::half>{})); })
                  .find("same kept length"));
}

// kvc::dynamic_cache: the same results as the static composition for a
// codec alone, eviction with a merger, and a projection; copies continue as
// the original; unsupported pairings and moved-from caches are errors.
TEST(DynamicCache, MatchesTheStaticCompositions) {
    {
        kvc::compressed_cache<e::none, kvc::merge::none, q::kivi<2>, kvc::project::none> fixed(shape());
        kvc::dynamic_cache chosen(shape(), q::any(q::kivi<2>{}));
        expect_same_results(run(fixed), run(chosen), "kivi:2");
    }
    {
        const e::streaming policy(e::budget::ratio(0.3), e::schedule{true, 8});
        kvc::compressed_cache<e::streaming, kvc::merge::compensation, q::none<kvc::half>, kvc::project::none> fixed(
            shape(), policy);
        kvc::dynamic_cache chosen(shape(), q::any(q::none<kvc::half>{}), e::to_any(policy), kvc::merge::compensation{});
        expect_same_results(run(fixed), run(chosen), "streaming + compensation");
        using held = kvc::compressed_cache<e::any, kvc::merge::compensation, q::any, kvc::project::none>;
        EXPECT_NE(nullptr, chosen.target<held>());
    }
    {
        kvc::compressed_cache<e::none, kvc::merge::none, q::none<kvc::half>, kvc::project::think> fixed(
            shape(), {}, {}, {}, kvc::project::think(0.4, 32));
        kvc::dynamic_cache chosen(shape(), q::any(q::none<kvc::half>{}), std::nullopt, kvc::merge::none{},
                                  kvc::project::think(0.4, 32));
        const run_record a = run(fixed), b = run(chosen);
        expect_same_results(a, b, "think:0.4");
        EXPECT_EQ(a.bytes, b.bytes) << "the same cache type inside: the same bytes";
    }
}

// Every merger through dynamic_cache against its static composition (H2O
// keeps 0.3 of the tokens, compressing during decode too).
template <class Merger>
void merger_matches(const std::string& name) {
    const e::h2o policy(e::budget::ratio(0.3), e::schedule{true, 8});
    kvc::compressed_cache<e::h2o, Merger, q::none<kvc::half>, kvc::project::none> fixed(shape(), policy);
    kvc::dynamic_cache chosen(shape(), q::any(q::none<kvc::half>{}), e::to_any(policy), Merger{});
    const run_record a = run(fixed), b = run(chosen);
    expect_same_results(a, b, name);
    // bytes() counts each head's slot (its store object and its columns'
    // buffers, the layout of compressed_cache's head_slot) and, for a
    // run-time store, the block the codec's store lives in.
    using held = kvc::compressed_cache<e::any, Merger, q::any, kvc::project::none>;
    struct fixed_slot {
        typename decltype(fixed)::head_storage rows;
        typename decltype(fixed)::columns_type columns;
    };
    struct held_slot {
        typename held::head_storage rows;
        typename held::columns_type columns;
    };
    const std::size_t heads = shape().layers * shape().kv_heads;
    EXPECT_EQ(a.bytes + heads * (sizeof(kvc::dense_rows) + sizeof(held_slot)), b.bytes + heads * sizeof(fixed_slot))
        << name << ": the same cache but for the run-time stores' blocks and slots";
}

TEST(DynamicCache, EveryMergerMatchesItsStaticComposition) {
    merger_matches<kvc::merge::compensation>("compensation");
    merger_matches<kvc::merge::zero_merge>("zero_merge");
    merger_matches<kvc::merge::similarity>("similarity");
    merger_matches<kvc::merge::cam>("cam");
}

TEST(DynamicCache, ACopyContinuesAsTheOriginal) {
    const e::snapkv policy(e::budget::ratio(0.3), e::schedule{true, 8});
    kvc::dynamic_cache original(shape(), q::any(q::q4_0{}), e::to_any(policy));
    kvc::dynamic_cache fork = original;
    expect_same_results(run(original), run(fork), "fork");
    EXPECT_EQ(original.bytes(), fork.bytes());
    kvc::dynamic_cache moved = std::move(original);
    EXPECT_NE(std::string::npos, kvc_test::error_of([&] { (void)original.tokens(0); }).find("moved-from"));
    EXPECT_EQ(0u, original.bytes());
}

TEST(DynamicCache, UnsupportedPairingsAreRefused) {
    EXPECT_NE(std::string::npos,
              kvc_test::error_of([&] {
                  kvc::dynamic_cache(shape(), q::any(q::q4_0{}), std::nullopt, kvc::merge::compensation{});
              }).find("expected an eviction policy"));
    EXPECT_NE(std::string::npos,
              kvc_test::error_of([&] {
                  kvc::dynamic_cache(shape(), q::any(q::q4_0{}), std::nullopt, kvc::merge::none{},
                                     kvc::project::think(0.4));
              }).find("expected the codec none:f32, none:f16 or none:bf16"));
    EXPECT_NE(std::string::npos,
              kvc_test::error_of([&] {
                  kvc::dynamic_cache(shape(), q::any(q::kivi<2>{}), e::to_any(e::h2o(e::budget::ratio(0.5))),
                                     kvc::merge::compensation{});
              }).find("re-encode a row"))
        << "KIVI's store has no store_row; the merger needs it";
}

} // namespace
