// Budgets and selectors (B1-B7 of docs/METHODS.md): lengths and totals where the answer is known.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>
#include <string>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/all.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;

template <class Policy>
using evicting_cache = kvc::compressed_cache<Policy, kvc::merge::none, kvc::quant::none<float>, kvc::project::none>;

kvc::cache_config shape(std::size_t layers, std::size_t kv_heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = kv_heads;
    c.query_heads = kv_heads;
    c.head_dim = dim;
    return c;
}

template <class Cache>
void fill_all(Cache& cache, const kvc::cache_config& c, std::size_t tokens, std::uint32_t seed) {
    const auto keys = random_floats(tokens * c.kv_heads * c.head_dim, seed);
    for (std::size_t l = 0; l < c.layers; ++l)
        cache.append(l, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                     token_major(keys.data(), tokens, c.kv_heads, c.head_dim), 0);
}

TEST(Budgets, AdaKVGivesHeadsDifferentLengthsAndTheLayerItsExactTotal) {
    const auto c = shape(1, 4, 16);
    using policy = evict::policy<evict::score::external, evict::adakv>;
    evicting_cache<policy> cache(c, policy(evict::budget::absolute(40, 2, 2)));
    fill_all(cache, c, 200, 1);
    // Head 0's tokens score high everywhere, head 3's low: AdaKV moves budget to head 0.
    for (std::size_t h = 0; h < 4; ++h) {
        float* scores = cache.external_scores(0, h);
        for (std::size_t t = 0; t < 200; ++t) scores[t] = static_cast<float>(4 - h) + 0.001f * static_cast<float>(t % 7);
    }
    cache.compress(0);
    std::size_t total = 0;
    for (std::size_t h = 0; h < 4; ++h) total += cache.tokens(0, h);
    EXPECT_EQ(total, 4u * 40u);                    // the layer's budget, exactly
    EXPECT_GT(cache.tokens(0, 0), cache.tokens(0, 3)); // ragged: the strong head keeps more
    // Each head kept at least alpha (0.2) of its fair share.
    for (std::size_t h = 0; h < 4; ++h) EXPECT_GE(cache.tokens(0, h), 8u) << h;
    // Head 0 takes everything the floors leave: 160 - 3 heads x 8.
    EXPECT_EQ(cache.tokens(0, 0), 160u - 3u * 8u);
}

TEST(Budgets, PerHeadTopKGivesEveryHeadTheSameLength) {
    const auto c = shape(1, 3, 8);
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::ratio(0.3)));
    fill_all(cache, c, 101, 2);
    cache.compress(0);
    for (std::size_t h = 0; h < 3; ++h) EXPECT_EQ(cache.tokens(0, h), 31u); // ceil(0.3 * 101)
}

TEST(Budgets, PyramidBudgetsFallLinearlyAndAverageTheTarget) {
    const auto c = shape(5, 1, 8);
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::absolute(100, 4, 4).with_layers(
                                                           evict::layer_allocation::pyramid(20.0))));
    fill_all(cache, c, 400, 3);
    cache.compress();
    // mean 100: first layer 2 - 1/20 = 1.95x, last 1/20 = 0.05x but at least sinks + window (8).
    const std::size_t expected[5] = {195, 148, 100, 53, 8};
    for (std::size_t l = 0; l < 5; ++l) EXPECT_EQ(cache.tokens(l, 0), expected[l]) << "layer " << l;
    for (std::size_t l = 1; l < 5; ++l) EXPECT_LT(cache.tokens(l, 0), cache.tokens(l - 1, 0));
}

TEST(Budgets, LayerWeightsSplitTheBudgetProportionally) {
    const auto c = shape(4, 1, 8);
    evicting_cache<evict::knorm> cache(
        c, evict::knorm(evict::budget::absolute(50, 2, 2).with_layers(evict::layer_allocation::by_weights({1, 2, 3, 2}))));
    fill_all(cache, c, 300, 4);
    cache.compress();
    const std::size_t expected[4] = {25, 50, 75, 50}; // 200 tokens split 1:2:3:2
    for (std::size_t l = 0; l < 4; ++l) EXPECT_EQ(cache.tokens(l, 0), expected[l]);
}

TEST(Budgets, LayerWeightsThatDoNotMatchTheModelAreRejected) {
    const auto c = shape(4, 1, 8);
    EXPECT_THROW(evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::ratio(0.5).with_layers(
                                                      evict::layer_allocation::by_weights({1, 2, 3})))),
                 kvc::error);
    EXPECT_THROW(evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::ratio(0.5).with_layers(
                                                      evict::layer_allocation::by_weights({1, -2, 3, 1})))),
                 kvc::error);
    EXPECT_THROW(evicting_cache<evict::knorm>(
                     c, evict::knorm(evict::budget::ratio(0.5).with_layers(evict::layer_allocation::pyramid(0.5)))),
                 kvc::error);
    using ada = evict::policy<evict::score::knorm, evict::adakv>;
    ada bad(evict::budget::ratio(0.5));
    bad.selector.alpha = 1.5;
    EXPECT_THROW(evicting_cache<ada>(c, bad), kvc::error);
}

TEST(Budgets, TopPKeepsTheSmallestSetReachingTheShare) {
    const auto c = shape(1, 1, 8);
    using policy = evict::policy<evict::score::external, evict::top_p>;
    policy p(evict::budget::absolute(2, 1, 1));
    p.selector.p = 0.5;
    evicting_cache<policy> cache(c, p);
    fill_all(cache, c, 10, 5);
    // Scores 0..9 (shifted minimum 0): total 45; the best 9+8+7 = 24 < 22.5? 9+8 = 17 < 22.5, 9+8+7 = 24 >= 22.5.
    float* scores = cache.external_scores(0, 0);
    for (std::size_t t = 0; t < 10; ++t) scores[t] = static_cast<float>(t);
    cache.compress(0);
    const std::vector<std::int32_t> kept(cache.positions(0, 0), cache.positions(0, 0) + cache.tokens(0, 0));
    // Sink 0 and window 9 are protected; top-p adds 9, 8, 7.
    EXPECT_EQ(kept, (std::vector<std::int32_t>{0, 7, 8, 9}));
}

TEST(Budgets, ThresholdKeepsEveryTokenAboveTau) {
    const auto c = shape(1, 1, 8);
    using policy = evict::policy<evict::score::external, evict::threshold>;
    policy p(evict::budget::absolute(2, 1, 1));
    p.selector.tau = 0.5f;
    evicting_cache<policy> cache(c, p);
    fill_all(cache, c, 12, 6);
    float* scores = cache.external_scores(0, 0);
    for (std::size_t t = 0; t < 12; ++t) scores[t] = (t % 3 == 0) ? 1.0f : 0.0f;
    cache.compress(0);
    const std::vector<std::int32_t> kept(cache.positions(0, 0), cache.positions(0, 0) + cache.tokens(0, 0));
    EXPECT_EQ(kept, (std::vector<std::int32_t>{0, 3, 6, 9, 11}));
}

TEST(Budgets, ExternalScoresFollowTheirTokensThroughCompaction) {
    const auto c = shape(1, 1, 8);
    evicting_cache<evict::external> cache(c, evict::external(evict::budget::absolute(20, 2, 2)));
    fill_all(cache, c, 60, 7);
    float* scores = cache.external_scores(0, 0);
    for (std::size_t t = 0; t < 60; ++t) scores[t] = static_cast<float>((t * 37) % 60);
    cache.compress(0);
    ASSERT_EQ(cache.tokens(0, 0), 20u);
    for (std::size_t i = 0; i < 20; ++i) {
        const auto p = static_cast<std::size_t>(cache.positions(0, 0)[i]);
        EXPECT_EQ(cache.external_scores(0, 0)[i], static_cast<float>((p * 37) % 60));
    }
}

} // namespace

namespace {

// RoPE of a raw key at a position, in double (llama2.c pairing), as the oracle.
std::vector<float> rope_at(const float* raw, std::size_t dim, std::int64_t position, double theta = 10000.0) {
    std::vector<float> out(raw, raw + dim);
    for (std::size_t i = 0; i < dim / 2; ++i) {
        const double angle = static_cast<double>(position) * std::pow(theta, -2.0 * double(i) / double(dim));
        const double x = raw[2 * i], y = raw[2 * i + 1];
        out[2 * i] = static_cast<float>(x * std::cos(angle) - y * std::sin(angle));
        out[2 * i + 1] = static_cast<float>(x * std::sin(angle) + y * std::cos(angle));
    }
    return out;
}

template <class Element>
void check_rerotation(double tolerance) {
    const std::size_t dim = 64, tokens = 3000;
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 2;
    c.head_dim = dim;
    const auto raw = random_floats(tokens * 2 * dim, 40);
    std::vector<float> keys(raw.size());
    for (std::size_t t = 0; t < tokens; ++t)
        for (std::size_t h = 0; h < 2; ++h) {
            const auto rotated = rope_at(&raw[(t * 2 + h) * dim], dim, static_cast<std::int64_t>(t));
            std::copy(rotated.begin(), rotated.end(), &keys[(t * 2 + h) * dim]);
        }
    using cache_type = kvc::compressed_cache<evict::streaming, kvc::merge::none, kvc::quant::none<Element>, kvc::project::none>;
    evict::streaming policy(evict::budget::absolute(100, 4, 0));
    policy.rerotate.enabled = true;
    cache_type cache(c, policy);
    cache.append(0, token_major(keys.data(), tokens, 2, dim), token_major(keys.data(), tokens, 2, dim), 0);
    cache.compress(0);
    ASSERT_EQ(cache.tokens(0, 0), 100u);
    EXPECT_EQ(cache.next_position(0), 100);
    std::vector<float> stored(dim);
    for (std::size_t h = 0; h < 2; ++h)
        for (std::size_t i = 0; i < 100; ++i) {
            EXPECT_EQ(cache.positions(0, h)[i], static_cast<std::int32_t>(i));
            // Kept token i was originally at 0..3 (sinks) or at tokens - 96 + (i - 4).
            const std::size_t original = i < 4 ? i : tokens - 96 + (i - 4);
            const auto expected = rope_at(&raw[(original * 2 + h) * dim], dim, static_cast<std::int64_t>(i));
            cache.head(0, h).decode_keys(kvc::kernels::active(), i, 1, stored.data());
            EXPECT_LT(kvc_test::relative_error(stored, expected), tolerance) << "head " << h << " kept token " << i;
        }
    // Generation goes on from the contiguous positions.
    cache.append(0, token_major(keys.data(), 1, 2, dim), token_major(keys.data(), 1, 2, dim), cache.next_position(0));
    EXPECT_EQ(cache.next_position(0), 101);
}

// The selector's fast path (radix select over integer keys) against the
// definition: sort every open token by selection::better and take the first
// `count`. Scores with NaN, +-0, +-inf and many ties, some tokens already chosen.
TEST(Selection, TakeBestEqualsSortingByTheSelectorsOrder) {
    std::mt19937 rng(41);
    const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f, 1e-30f, -1e30f};
    for (int trial = 0; trial < 300; ++trial) {
        const std::size_t held = 1 + rng() % 300;
        std::vector<float> scores(held);
        for (float& s : scores) {
            const unsigned pick = rng() % 4;
            s = pick == 0 ? specials[rng() % 9] : pick == 1 ? float(int(rng() % 5)) : std::normal_distribution<float>()(rng);
        }
        std::vector<std::int32_t> positions(held);
        std::iota(positions.begin(), positions.end(), 0);
        evict::head_candidates head;
        head.scores = scores.data();
        head.positions = positions.data();
        head.held = head.target = held;
        std::vector<char> chosen(held, 0);
        for (std::size_t t = 0; t < held; ++t) chosen[t] = rng() % 7 == 0;
        const std::size_t count = rng() % (held + 2);
        std::vector<std::uint32_t> open;
        for (std::size_t t = 0; t < held; ++t)
            if (!chosen[t]) open.push_back(std::uint32_t(t));
        std::sort(open.begin(), open.end(), [&](std::uint32_t a, std::uint32_t b) {
            return evict::selection::better(scores.data(), a, b);
        });
        std::vector<char> expected = chosen;
        for (std::size_t i = 0; i < std::min(count, open.size()); ++i) expected[open[i]] = 1;
        evict::selection::take_best(head, count, chosen);
        ASSERT_EQ(chosen, expected) << "trial " << trial << ", held " << held << ", count " << count;
    }
}

TEST(KeyRerotation, ARerotatedKeyEqualsTheKeyComputedAtItsNewPosition) {
    check_rerotation<float>(1e-6);          // fp32: rounding of one rotation
    check_rerotation<kvc::half>(2e-3);      // fp16: the storage's own rounding, twice
}

TEST(KeyRerotation, NeedsEqualHeadLengthsAndAValidTheta) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 1;
    c.query_heads = 1;
    c.head_dim = 8;
    using ada = evict::policy<evict::score::knorm, evict::adakv>;
    ada ragged(evict::budget::ratio(0.5));
    ragged.rerotate.enabled = true;
    EXPECT_THROW(evicting_cache<ada>(c, ragged), kvc::error);
    evict::knorm bad_theta(evict::budget::ratio(0.5));
    bad_theta.rerotate.enabled = true;
    bad_theta.rerotate.rope.theta = 0.0;
    EXPECT_THROW(evicting_cache<evict::knorm>(c, bad_theta), kvc::error);
}

} // namespace

namespace {

TEST(ByteBudget, FewerBitsPerTokenBuyMoreTokensForTheSameBytes) {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 2;
    c.head_dim = 64;
    const std::size_t budget_bytes = 600 * 1024;
    // Per token and head: fp32 rows 2 x 256 B + 4 B position + 4 B knorm's score (made at append) = 520 B;
    // fp16 rows 2 x 128 B + 4 B + 4 B = 264 B.
    evicting_cache<evict::knorm> wide(c, evict::knorm(evict::budget::in_bytes(budget_bytes)));
    kvc::compressed_cache<evict::knorm, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::none> narrow(
        c, evict::knorm(evict::budget::in_bytes(budget_bytes)));
    fill_all(wide, c, 1000, 50);
    fill_all(narrow, c, 1000, 50);
    wide.compress();
    narrow.compress();
    EXPECT_EQ(wide.tokens(0, 0), budget_bytes / (4 * 520));
    EXPECT_EQ(narrow.tokens(0, 0), budget_bytes / (4 * 264));
    EXPECT_GT(narrow.tokens(1, 1), wide.tokens(1, 1));
    // The rows and positions the budget pays for fit in it.
    EXPECT_LE(4 * wide.tokens(0, 0) * 520, budget_bytes);
    EXPECT_THROW(evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::in_bytes(1000))), kvc::error);
}

} // namespace

namespace {

TEST(ChunkKV, KeepsWholeChunksChosenByTheirScoreOverAllHeads) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 2;
    c.query_heads = 2;
    c.head_dim = 8;
    using policy = evict::policy<evict::score::external, evict::chunkkv>;
    evicting_cache<policy> cache(c, policy(evict::budget::absolute(34, 4, 10)));
    fill_all(cache, c, 104, 60); // sinks 0-3, window 94-103, chunks of 10 positions: 0-9, 10-19, ...
    // Chunk 3 (30-39) scores high in head 0 only, chunk 7 (70-79) in head 1 only: both win on the layer's sum.
    for (std::size_t t = 0; t < 104; ++t) {
        cache.external_scores(0, 0)[t] = (t >= 30 && t < 40) ? 5.0f : 0.1f;
        cache.external_scores(0, 1)[t] = (t >= 70 && t < 80) ? 4.0f : 0.1f;
    }
    cache.compress(0);
    for (std::size_t h = 0; h < 2; ++h) {
        std::vector<std::int32_t> expected = {0, 1, 2, 3};
        for (std::int32_t p = 30; p < 40; ++p) expected.push_back(p);
        for (std::int32_t p = 70; p < 80; ++p) expected.push_back(p);
        for (std::int32_t p = 94; p < 104; ++p) expected.push_back(p);
        const std::vector<std::int32_t> kept(cache.positions(0, h), cache.positions(0, h) + cache.tokens(0, h));
        EXPECT_EQ(kept, expected) << "head " << h; // the same chunks in both heads, 34 tokens
    }
}

} // namespace

namespace {

// Issue 19, defect 2, through the cache: rotary_dims 4096 on a head of 64.
TEST(KeyRerotation, RotaryDimsBeyondTheHeadDimAreRejectedByTheCache) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = 1;
    c.query_heads = 1;
    c.head_dim = 64;
    evict::knorm wide(evict::budget::ratio(0.5));
    wide.rerotate.enabled = true;
    wide.rerotate.rope.rotary_dims = 4096;
    EXPECT_THROW(evicting_cache<evict::knorm>(c, wide), kvc::error);
}

// Issue 19, defect 5, through the cache: interval = SIZE_MAX (an engine's
// "never") must not compress on decode steps. compressed_cache::append has to
// ask schedule::due(held, target) (tests/policy/reliability_test.cpp checks
// it directly); until it does, target + interval wraps and this fails.
TEST(Schedule, AnIntervalOfSizeMaxNeverCompressesOnDecode_Wired) {
    const auto c = shape(1, 1, 8);
    evict::schedule never;
    never.after_prefill = false;
    never.interval = SIZE_MAX;
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::absolute(8, 2, 2), never));
    const auto keys = random_floats(8, 7);
    for (std::int64_t p = 0; p < 40; ++p)
        cache.append(0, token_major(keys.data(), 1, 1, 8), token_major(keys.data(), 1, 1, 8), p);
    EXPECT_EQ(cache.tokens(0, 0), 40u);
    cache.compress(0); // on demand it still runs
    EXPECT_EQ(cache.tokens(0, 0), 8u);
}

} // namespace
