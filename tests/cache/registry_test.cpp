// The library's registry (kvc/registry.hpp): every method by name, caches
// built from a spec, and specs refused with messages that say what was
// expected, what was given and which names are close.
#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/all.hpp"
#include "kvc/registry.hpp"

namespace {

kvc::cache_config shape() {
    return kvc_test::shape_of(2, 2, 4, 64);
}

// A 96-token prompt in two chunks then 24 decode steps; every output, in order.
template <class Cache>
std::vector<float> outputs_of(Cache& cache) {
    return kvc_test::prompt_then_decode(cache, shape(), 96, 48, 24, 21);
}

TEST(Registry, ListsEveryFamilyWithUniqueNamesAndSummaries) {
    std::set<std::string> names;
    std::set<kvc::method_family> families;
    for (const kvc::method_info& m : kvc::methods()) {
        EXPECT_TRUE(names.insert(m.name).second) << "duplicate name " << m.name;
        families.insert(m.family);
        EXPECT_FALSE(m.summary.empty()) << m.name;
        EXPECT_TRUE(m.parameter.empty() || !m.default_value.empty()) << m.name << ": a parameter without a default";
    }
    EXPECT_EQ(4u, families.size());
    for (const char* name : {"q4_0", "kivi", "snapkv", "h2o", "compensation", "think", "head_roles", "cq:c4b8"})
        EXPECT_EQ(1u, names.count(name)) << name;
}

// Every method that needs no calibration builds a cache from its name alone
// (with eviction, for the mergers) and runs a prompt and decode steps.
TEST(Registry, EveryUncalibratedMethodRunsFromItsName) {
    for (const kvc::method_info& m : kvc::methods()) {
        if (m.calibrated) continue;
        std::string spec = m.name;
        if (m.family == kvc::method_family::merging) spec = "h2o:0.3 + " + spec;
        SCOPED_TRACE(spec);
        kvc::dynamic_cache cache = kvc::make_cache(shape(), spec);
        const std::vector<float> out = outputs_of(cache);
        for (float x : out) ASSERT_TRUE(std::isfinite(x));
    }
}

// stored_bytes(layer) is what one attention over the layer reads, from the
// layouts at 2 KV heads of dim 64: fp16 rows 2 x 64 x 2 bytes a token for K
// and V each; q4_0 18 bytes per 32 values (fp16 scale + 16 bytes of nibbles),
// so 36 bytes a row; q4_0+sinks keeps its first 4 tokens in fp16.
TEST(Registry, StoredBytesAreWhatOneAttentionReads) {
    const kvc::cache_config c = shape();
    constexpr std::size_t tokens = 40, heads = 2, fp16_token = 2 * 64 * 2, q4_token = 2 * 36;
    const std::vector<float> rows = kvc_test::random_floats(tokens * heads * 64, 3);
    const kvc::kv_view<const float> view(rows.data(), tokens, heads, 64);
    kvc::full_cache full(c);
    full.append(0, view, view, 0);
    EXPECT_EQ(heads * tokens * fp16_token, full.stored_bytes(0));
    EXPECT_EQ(0u, full.stored_bytes(1));
    EXPECT_THROW(full.stored_bytes(2), kvc::error);
    const struct {
        const char* spec;
        std::size_t bytes;
    } cases[] = {{"none:f16", heads * tokens * fp16_token},
                 {"q4_0", heads * tokens * q4_token},
                 {"q4_0+sinks", heads * (4 * fp16_token + (tokens - 4) * q4_token)}};
    for (const auto& expected : cases) {
        kvc::dynamic_cache cache = kvc::make_cache(c, expected.spec);
        cache.append(0, view, view, 0);
        EXPECT_EQ(expected.bytes, cache.stored_bytes(0)) << expected.spec;
        EXPECT_EQ(0u, cache.stored_bytes(1)) << expected.spec;
        EXPECT_THROW(cache.stored_bytes(2), kvc::error) << expected.spec;
    }
}

// A spec's cache is the static composition it names, bit for bit.
TEST(Registry, ASpecBuildsTheCompositionItNames) {
    {
        kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::q4_0, kvc::project::none> fixed(
            shape(), kvc::evict::snapkv(kvc::evict::budget::ratio(0.25)));
        kvc::dynamic_cache chosen = kvc::make_cache(shape(), "q4_0 + snapkv:0.25");
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        ASSERT_EQ(a.size(), b.size());
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        EXPECT_EQ(fixed.tokens(0), chosen.tokens(0));
    }
    {
        // Order does not matter; q4_0+sinks is one codec although it holds a '+'.
        kvc::compressed_cache<kvc::evict::h2o, kvc::merge::compensation, kvc::quant::block<kvc::quant::int4_sym, 32, 4>,
                              kvc::project::none>
            fixed(shape(), kvc::evict::h2o(kvc::evict::budget::ratio(0.5)));
        kvc::dynamic_cache chosen = kvc::make_cache(shape(), " compensation+ h2o:0.5 + q4_0+sinks ");
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
    }
    {
        // No codec: the rows as they are, in config.storage (fp16 here); defaults fill missing values.
        kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::kivi<2>, kvc::project::none> fixed(shape());
        kvc::dynamic_cache chosen = kvc::make_cache(shape(), "kivi");
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        kvc::full_cache full(shape());
        kvc::dynamic_cache plain = kvc::make_cache(shape(), "");
        const std::vector<float> c = outputs_of(full), d = outputs_of(plain);
        EXPECT_EQ(0, std::memcmp(c.data(), d.data(), c.size() * sizeof(float)));
    }
}

TEST(Registry, BadSpecsNameWhatWasExpectedAndWhatIsClose) {
    const auto error = [](const char* spec) {
        return kvc_test::error_of([&] { (void)kvc::make_cache(shape(), spec); });
    };
    const std::string typo = error("q4_0 + snapvk:0.25");
    EXPECT_NE(std::string::npos, typo.find("unknown method 'snapvk:0.25'")) << typo;
    EXPECT_NE(std::string::npos, typo.find("snapkv")) << typo;
    const std::string range = error("snapkv:1.5");
    EXPECT_NE(std::string::npos, range.find("keep_ratio with a number in (0, 1], got '1.5'")) << range;
    const std::string two = error("q4_0 + q8_0");
    EXPECT_NE(std::string::npos, two.find("expected one quantization method, got 'q4_0' and 'q8_0'")) << two;
    const std::string empty = error("q4_0 + ");
    EXPECT_NE(std::string::npos, empty.find("empty term")) << empty;
    const std::string kivi = error("kivi:3");
    EXPECT_NE(std::string::npos, kivi.find("expected kivi:2 or kivi:4")) << kivi;
    const std::string learnt = error("cq:c4b8");
    EXPECT_NE(std::string::npos, learnt.find("cache_options::artifacts[\"cq:c4b8\"]")) << learnt;
    const std::string merge_alone = error("compensation");
    EXPECT_NE(std::string::npos, merge_alone.find("expected an eviction policy")) << merge_alone;
}

// The struct form is the string form: the same cache, field by field, and a
// field naming another family's method refused with the field's name.
TEST(Registry, ASpecStructBuildsWhatItsStringBuilds) {
    kvc::cache_spec spec;
    spec.quantization = "q4_0";
    spec.eviction = "h2o:0.5";
    spec.merging = "compensation";
    kvc::dynamic_cache by_struct = kvc::make_cache(shape(), spec);
    kvc::dynamic_cache by_string = kvc::make_cache(shape(), "q4_0 + h2o:0.5 + compensation");
    const std::vector<float> a = outputs_of(by_struct), b = outputs_of(by_string);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
    EXPECT_EQ(by_string.bytes(), by_struct.bytes());
    EXPECT_EQ(by_string.tokens(0), by_struct.tokens(0));

    const auto error = [](const kvc::cache_spec& bad) {
        return kvc_test::error_of([&] { (void)kvc::make_cache(shape(), bad); });
    };
    kvc::cache_spec swapped;
    swapped.quantization = "snapkv:0.25";
    const std::string wrong = error(swapped);
    EXPECT_NE(std::string::npos,
              wrong.find("cache_spec::quantization: expected a method of the quantization family, got 'snapkv:0.25', "
                         "a method of the eviction family"))
        << wrong;
    kvc::cache_spec two;
    two.eviction = "h2o + q4_0";
    const std::string both = error(two);
    EXPECT_NE(std::string::npos, both.find("cache_spec::eviction: expected one method, got 'h2o + q4_0'")) << both;
}

TEST(Registry, HeadRolesPicksTheHeadsAttendingFarthestBack) {
    // 2 layers x 2 heads; far mass ranks (1, 0) then (0, 1): a share of 0.5 makes those two retrieval heads.
    kvc::calibration::artifact profile;
    profile.kind = "head_roles";
    profile.tensors.push_back({"far_mass", {2, 2}, {0.1f, 0.6f, 0.9f, 0.5f}});
    kvc::cache_options options;
    options.artifacts["head_roles"] = profile;
    kvc::dynamic_cache cache = kvc::make_cache(shape(), "head_roles:0.5", options);
    (void)outputs_of(cache); // compresses after the prompt
    // Retrieval heads keep all 120 tokens; the others sinks (4) + window (16) after the prompt, then the 24 decoded.
    EXPECT_EQ(44u, cache.tokens(0, 0));
    EXPECT_EQ(120u, cache.tokens(0, 1));
    EXPECT_EQ(120u, cache.tokens(1, 0));
    EXPECT_EQ(44u, cache.tokens(1, 1));
}

// The calibrated projections from a spec are the static compositions with
// the same artifact, bit for bit: PCA at rank 16 and Loki at rank 16 over a
// quarter of the tokens (both over fp16 rows).
TEST(Registry, CalibratedProjectionsMatchTheirStaticCaches) {
    const kvc::cache_config c = shape();
    const std::vector<float> sample = kvc_test::random_floats(256 * c.kv_heads * c.head_dim, 31);
    const kvc::kv_view<const float> rows(sample.data(), 256, c.kv_heads, c.head_dim);
    const std::vector<kvc::kv_view<const float>> per_layer(c.layers, rows);
    const kvc::calibration::artifact bases = kvc::calibration::calibrate_pca(c, per_layer, per_layer);
    kvc::cache_options options;
    options.artifacts["pca"] = bases;
    options.artifacts["loki"] = bases;
    options.artifacts["cskv"] = bases;
    {
        kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::pca> fixed(
            c, {}, {}, {}, kvc::project::pca(bases, 16));
        kvc::dynamic_cache chosen = kvc::make_cache(c, "none:f16 + pca:16", options);
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        // The run-time cache keeps the latents in the held codec's store: the
        // same bytes, and the block the held store lives in.
        using held = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::any, kvc::project::pca>;
        const held* inside = chosen.target<held>();
        ASSERT_NE(nullptr, inside);
        for (std::size_t l = 0; l < c.layers; ++l)
            for (std::size_t h = 0; h < c.kv_heads; ++h)
                EXPECT_EQ(fixed.head(l, h).bytes() + sizeof(kvc::dense_rows), inside->head(l, h).bytes());
    }
    {
        // Latents in q8_0 (rank 32: its blocks are 32 wide), with and without eviction.
        kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::q8_0, kvc::project::pca> fixed(
            c, {}, {}, {}, kvc::project::pca(bases, 32));
        kvc::dynamic_cache chosen = kvc::make_cache(c, "q8_0 + pca:32", options);
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::q8_0, kvc::project::pca> evicting(
            c, kvc::evict::snapkv(kvc::evict::budget::ratio(0.5)), {}, {}, kvc::project::pca(bases, 32));
        kvc::dynamic_cache chosen_evicting = kvc::make_cache(c, "q8_0 + snapkv:0.5 + pca:32", options);
        const std::vector<float> d = outputs_of(evicting), e = outputs_of(chosen_evicting);
        EXPECT_EQ(0, std::memcmp(d.data(), e.data(), d.size() * sizeof(float)));
        EXPECT_EQ(evicting.tokens(0), chosen_evicting.tokens(0));
        EXPECT_LT(chosen_evicting.tokens(0), chosen.tokens(0)) << "the eviction kept every token";
        const std::string narrow = kvc_test::error_of([&] { (void)kvc::make_cache(c, "q8_0 + pca:16", options); });
        EXPECT_NE(std::string::npos, narrow.find("the projection stores 16 channels a row")) << narrow;
    }
    {
        // CSKV: rank-32 latents in q8_0 (its rows are 32 wide), a window of 8 tokens, under H2O.
        kvc::compressed_cache<kvc::evict::h2o, kvc::merge::none, kvc::quant::q8_0, kvc::project::cskv> fixed(
            c, kvc::evict::h2o(kvc::evict::budget::ratio(0.5)), {}, {},
            kvc::project::cskv(kvc::project::pca(bases, 32), 8));
        kvc::dynamic_cache chosen = kvc::make_cache(c, "q8_0 + h2o:0.5 + cskv:32:8", options);
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        EXPECT_EQ(fixed.tokens(1), chosen.tokens(1));
        const std::string bad = kvc_test::error_of([&] { (void)kvc::make_cache(c, "cskv:32", options); });
        EXPECT_NE(std::string::npos, bad.find("expected cskv:rank:window")) << bad;
    }
    {
        // ThinK after SnapKV, as its paper runs it.
        kvc::compressed_cache<kvc::evict::snapkv, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::think>
            fixed(c, kvc::evict::snapkv(kvc::evict::budget::ratio(0.5)), {}, {}, kvc::project::think(0.5));
        kvc::dynamic_cache chosen = kvc::make_cache(c, "none:f16 + snapkv:0.5 + think:0.5", options);
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
        EXPECT_EQ(fixed.tokens(1), chosen.tokens(1));
    }
    {
        kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::loki> fixed(
            c, {}, {}, {}, kvc::project::loki(kvc::project::pca(bases), 16, 0.25));
        kvc::dynamic_cache chosen = kvc::make_cache(c, "loki:16:0.25", options);
        const std::vector<float> a = outputs_of(fixed), b = outputs_of(chosen);
        EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
    }
    const std::string bad = kvc_test::error_of([&] { (void)kvc::make_cache(c, "loki:16", options); });
    EXPECT_NE(std::string::npos, bad.find("expected loki:rank:ratio")) << bad;
    const std::string fractional = kvc_test::error_of([&] { (void)kvc::make_cache(c, "pca:2.5", options); });
    EXPECT_NE(std::string::npos, fractional.find("a whole number")) << fractional;
}

} // namespace
