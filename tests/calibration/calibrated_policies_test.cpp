// E10 Q-Filters and B6 head roles: calibration finds what was planted, policies use it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/calibration/head_roles.hpp"
#include "kvc/calibration/query_filters.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using view = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;

template <class Policy>
using evicting_cache = kvc::compressed_cache<Policy, kvc::merge::none, kvc::quant::none<float>, kvc::project::none>;

kvc::cache_config shape(std::size_t layers, std::size_t kv_heads, std::size_t query_heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    return c;
}

TEST(QueryFilters, RecoverThePlantedDirectionOrientedTowardsTheQueries) {
    const auto c = shape(2, 2, 4, 16);
    const std::size_t samples = 300;
    // Queries = 3 * direction(layer, head) + noise; one direction per KV head.
    std::vector<std::vector<float>> directions, queries(2);
    for (std::size_t i = 0; i < 4; ++i) {
        auto d = random_floats(16, 100 + static_cast<std::uint32_t>(i));
        double n = 0;
        for (float x : d) n += double(x) * x;
        for (float& x : d) x = static_cast<float>(x / std::sqrt(n));
        directions.push_back(d);
    }
    std::vector<view> views;
    for (std::size_t l = 0; l < 2; ++l) {
        queries[l] = random_floats(samples * 4 * 16, 200 + static_cast<std::uint32_t>(l), 0.3f);
        for (std::size_t s = 0; s < samples; ++s)
            for (std::size_t j = 0; j < 4; ++j)
                for (std::size_t d = 0; d < 16; ++d) queries[l][(s * 4 + j) * 16 + d] += 3.0f * directions[l * 2 + j / 2][d];
        views.emplace_back(queries[l].data(), samples, 4, 16);
    }
    const auto artifact = kvc::calibration::query_filters(c, views);
    const auto& filters = artifact.get("filters", {2, 2, 16});
    for (std::size_t i = 0; i < 4; ++i) {
        double cosine = 0;
        for (std::size_t d = 0; d < 16; ++d) cosine += double(filters.values[i * 16 + d]) * directions[i][d];
        EXPECT_GT(cosine, 0.99) << "head " << i; // same direction and same sign
    }
}

TEST(QueryFilters, TheScorerKeepsKeysAlongTheFilterAndNeedsItsCalibration) {
    const auto c = shape(1, 1, 1, 8);
    evict::score::qfilter scorer;
    scorer.layers = 1;
    scorer.kv_heads = 1;
    scorer.dim = 8;
    scorer.filters = {1, 0, 0, 0, 0, 0, 0, 0};
    auto keys = random_floats(100 * 8, 1, 0.5f);
    keys[50 * 8] = 5.0f;  // along the filter: kept
    keys[60 * 8] = -5.0f; // against it: dropped
    evicting_cache<evict::qfilter> cache(c, evict::qfilter(evict::budget::absolute(20, 2, 2), {}, scorer));
    cache.append(0, view(keys.data(), 100, 1, 8), view(keys.data(), 100, 1, 8), 0);
    cache.compress(0);
    const std::vector<std::int32_t> kept(cache.positions(0, 0), cache.positions(0, 0) + cache.tokens(0, 0));
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), 50));
    EXPECT_FALSE(std::count(kept.begin(), kept.end(), 60));
    // Missing calibration, or calibration for another model, fails before anything is stored.
    EXPECT_THROW(evicting_cache<evict::qfilter>(c, evict::qfilter(evict::budget::ratio(0.5))), kvc::error);
    EXPECT_THROW(evicting_cache<evict::qfilter>(shape(2, 1, 1, 8), evict::qfilter(evict::budget::ratio(0.5), {}, scorer)),
                 kvc::error);
    kvc::calibration::artifact wrong_kind;
    wrong_kind.kind = "head_roles";
    EXPECT_THROW(evict::score::qfilter::from(wrong_kind), kvc::error);
}

TEST(HeadRoles, CalibrationSeparatesARetrievalHeadFromAStreamingHead) {
    // Head 0: every query looks for one far-back needle. Head 1: queries look
    // at their own recent neighbourhood (keys drift slowly, queries match the newest).
    const auto c = shape(1, 2, 2, 16);
    const std::size_t tokens = 200;
    std::vector<float> keys(tokens * 2 * 16), queries(tokens * 2 * 16);
    const auto noise_k = random_floats(tokens * 2 * 16, 3, 0.2f), noise_q = random_floats(tokens * 2 * 16, 4, 0.2f);
    const auto needle = random_floats(16, 5);
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t d = 0; d < 16; ++d) {
            keys[(t * 2 + 0) * 16 + d] = noise_k[(t * 2) * 16 + d] + (t == 10 ? 4.0f * needle[d] : 0.0f);
            queries[(t * 2 + 0) * 16 + d] = noise_q[(t * 2) * 16 + d] + 4.0f * needle[d];
            const float drift = std::sin(0.05f * static_cast<float>(t) + static_cast<float>(d));
            keys[(t * 2 + 1) * 16 + d] = 4.0f * drift + noise_k[(t * 2 + 1) * 16 + d];
            queries[(t * 2 + 1) * 16 + d] = 4.0f * drift + noise_q[(t * 2 + 1) * 16 + d];
        }
    kvc::calibration::head_role_options options;
    options.sinks = 4;
    options.window = 32;
    options.threshold = 0.5;
    const auto profile = kvc::calibration::head_roles(c, std::vector<view>{view(keys.data(), tokens, 2, 16)},
                                                      std::vector<view>{view(queries.data(), tokens, 2, 16)}, options);
    const auto& far = profile.get("far_mass", {1, 2});
    EXPECT_GT(far.values[0], 0.5f);
    EXPECT_LT(far.values[1], 0.5f);
    EXPECT_EQ(profile.get("retrieval", {1, 2}).values, (std::vector<float>{1.0f, 0.0f}));

    // The policy: the retrieval head keeps everything, the streaming head its sinks and window.
    const auto bytes = kvc::calibration::serialize(profile); // through the file format, as an engine would
    evict::head_roles policy(evict::budget::absolute(36, 4, 32), {}, {},
                             evict::by_head_role::from(kvc::calibration::deserialize(bytes.data(), bytes.size())));
    evicting_cache<evict::head_roles> cache(c, policy);
    cache.append(0, view(keys.data(), tokens, 2, 16), view(keys.data(), tokens, 2, 16), 0);
    cache.compress(0);
    EXPECT_EQ(cache.tokens(0, 0), tokens);
    EXPECT_EQ(cache.tokens(0, 1), 36u);
    EXPECT_THROW(evicting_cache<evict::head_roles>(shape(2, 2, 2, 16), policy), kvc::error); // profile shape
    EXPECT_THROW(evicting_cache<evict::head_roles>(c, evict::head_roles(evict::budget::ratio(0.5))), kvc::error);
}

} // namespace
