// Eviction: cases where the right answer is known.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>

#include "../cache/cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/policy/eviction/cur.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/eviction/keydiff.hpp"
#include "kvc/policy/eviction/knorm.hpp"
#include "kvc/policy/eviction/random.hpp"
#include "kvc/policy/eviction/snapkv.hpp"
#include "kvc/policy/eviction/streaming.hpp"
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

kvc::cache_config shape(std::size_t kv_heads, std::size_t query_heads, std::size_t dim) {
    kvc::cache_config c;
    c.layers = 1;
    c.kv_heads = kv_heads;
    c.query_heads = query_heads;
    c.head_dim = dim;
    c.storage = kvc::dtype::f32;
    return c;
}

template <class Cache>
std::vector<std::int32_t> kept_positions(const Cache& cache, std::size_t layer, std::size_t h) {
    return std::vector<std::int32_t>(cache.positions(layer, h), cache.positions(layer, h) + cache.tokens(layer, h));
}

// Double-precision attention of each query head over only the rows its KV
// head kept (found by position in the engine data): the oracle for ragged storage.
std::vector<double> oracle_over_kept(const kvc::cache_config& c, const std::vector<float>& keys,
                                     const std::vector<float>& values, const float* queries,
                                     const std::vector<std::vector<std::int32_t>>& kept) {
    const std::size_t dim = c.head_dim, group = c.group();
    std::vector<double> out(c.query_heads * dim, 0.0);
    for (std::size_t j = 0; j < c.query_heads; ++j) {
        const std::size_t h = j / group;
        std::vector<double> logits;
        for (std::int32_t p : kept[h]) {
            double dot = 0;
            for (std::size_t d = 0; d < dim; ++d) dot += double(queries[j * dim + d]) * keys[(p * c.kv_heads + h) * dim + d];
            logits.push_back(dot * c.logit_scale());
        }
        const double max = *std::max_element(logits.begin(), logits.end());
        double sum = 0;
        for (double& l : logits) sum += (l = std::exp(l - max));
        for (std::size_t i = 0; i < kept[h].size(); ++i)
            for (std::size_t d = 0; d < dim; ++d)
                out[j * dim + d] += logits[i] / sum * values[(kept[h][i] * c.kv_heads + h) * dim + d];
    }
    return out;
}

template <class Cache>
void fill(Cache& cache, const kvc::cache_config& c, const std::vector<float>& keys, const std::vector<float>& values,
          std::size_t tokens) {
    cache.append(0, token_major(keys.data(), tokens, c.kv_heads, c.head_dim),
                 token_major(values.data(), tokens, c.kv_heads, c.head_dim), 0);
}

TEST(Eviction, RaggedAttentionEqualsFullAttentionOverTheKeptTokens) {
    const auto c = shape(3, 6, 32);
    const std::size_t tokens = 400;
    const auto keys = random_floats(tokens * 3 * 32, 1), values = random_floats(tokens * 3 * 32, 2);
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::ratio(0.25)));
    fill(cache, c, keys, values, tokens);
    cache.compress();
    std::vector<std::vector<std::int32_t>> kept;
    for (std::size_t h = 0; h < 3; ++h) {
        kept.push_back(kept_positions(cache, 0, h));
        EXPECT_EQ(kept.back().size(), 100u); // ceil(0.25 * 400), exactly
        EXPECT_TRUE(std::is_sorted(kept.back().begin(), kept.back().end()));
    }
    EXPECT_NE(kept[0], kept[1]); // heads choose independently: storage is ragged per head
    const auto q = random_floats(6 * 32, 3);
    std::vector<float> out(6 * 32);
    cache.attend(0, q.data(), out.data());
    EXPECT_LT(kvc_test::relative_error(out, oracle_over_kept(c, keys, values, q.data(), kept)), 1e-5);
}

TEST(Eviction, KnormKeepsTheLowNormKeyAndDropsTheHighNormOne) {
    const auto c = shape(1, 1, 16);
    const std::size_t tokens = 200;
    auto keys = random_floats(tokens * 16, 4);
    const auto values = random_floats(tokens * 16, 5);
    for (std::size_t d = 0; d < 16; ++d) keys[77 * 16 + d] *= 0.01f, keys[120 * 16 + d] *= 100.0f;
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::absolute(30, 4, 8)));
    fill(cache, c, keys, values, tokens);
    cache.compress();
    const auto kept = kept_positions(cache, 0, 0);
    ASSERT_EQ(kept.size(), 30u);
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), 77));
    EXPECT_FALSE(std::count(kept.begin(), kept.end(), 120));
    // Every kept middle token has a norm no larger than any evicted middle token.
    auto norm = [&](std::int32_t p) {
        double s = 0;
        for (std::size_t d = 0; d < 16; ++d) s += double(keys[p * 16 + d]) * keys[p * 16 + d];
        return s;
    };
    double worst_kept = 0, best_evicted = 1e300;
    const std::set<std::int32_t> kept_set(kept.begin(), kept.end());
    for (std::int32_t p = 4; p < std::int32_t(tokens - 8); ++p)
        (kept_set.count(p) ? worst_kept = std::max(worst_kept, norm(p)) : best_evicted = std::min(best_evicted, norm(p)));
    EXPECT_LE(worst_kept, best_evicted);
}

// knorm's norms are taken at append and must follow their tokens through
// every compaction: under a decode-time schedule (many compressions), the
// kept middle tokens are still exactly the lowest-norm ones, since a token is
// only ever displaced by a better one. Misaligned scores would break this.
TEST(Eviction, KnormScoresMadeAtAppendFollowTheirTokensThroughRepeatedCompaction) {
    const auto c = shape(2, 2, 16);
    const std::size_t tokens = 600, sinks = 4, window = 8;
    const auto keys = random_floats(tokens * 2 * 16, 31), values = random_floats(tokens * 2 * 16, 32);
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::absolute(64, sinks, window), {false, 8}));
    std::size_t compressions = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
        const std::size_t before = cache.tokens(0, 0);
        cache.append(0, token_major(keys.data() + t * 2 * 16, 1, 2, 16), token_major(values.data() + t * 2 * 16, 1, 2, 16),
                     static_cast<std::int64_t>(t));
        compressions += cache.tokens(0, 0) < before + 1;
    }
    EXPECT_GT(compressions, 50u);
    cache.compress(); // every token before the final window has now been compared
    for (std::size_t h = 0; h < 2; ++h) {
        const auto kept = kept_positions(cache, 0, h);
        const std::set<std::int32_t> kept_set(kept.begin(), kept.end());
        auto norm = [&](std::int32_t p) {
            double s = 0;
            for (std::size_t d = 0; d < 16; ++d) s += double(keys[(p * 2 + h) * 16 + d]) * keys[(p * 2 + h) * 16 + d];
            return s;
        };
        const std::int32_t window_start = kept.back() - static_cast<std::int32_t>(window) + 1;
        double worst_kept = 0, best_evicted = 1e300;
        for (std::int32_t p = sinks; p < window_start; ++p)
            (kept_set.count(p) ? worst_kept = std::max(worst_kept, norm(p)) : best_evicted = std::min(best_evicted, norm(p)));
        EXPECT_LE(worst_kept, best_evicted) << "head " << h;
    }
}

TEST(Eviction, SinksAndRecentWindowAlwaysSurvive) {
    const auto c = shape(2, 2, 8);
    const std::size_t tokens = 300;
    const auto keys = random_floats(tokens * 2 * 8, 6), values = random_floats(tokens * 2 * 8, 7);
    for (double ratio : {0.5, 0.2, 0.1}) {
        evicting_cache<evict::random> cache(c, evict::random(evict::budget::ratio(ratio, 4, 16)));
        fill(cache, c, keys, values, tokens);
        cache.compress();
        for (std::size_t h = 0; h < 2; ++h) {
            const auto kept = kept_positions(cache, 0, h);
            EXPECT_EQ(kept.size(), static_cast<std::size_t>(std::ceil(ratio * tokens)));
            for (std::int32_t p = 0; p < 4; ++p) EXPECT_TRUE(std::count(kept.begin(), kept.end(), p)) << p;
            for (std::int32_t p = tokens - 16; p < std::int32_t(tokens); ++p)
                EXPECT_TRUE(std::count(kept.begin(), kept.end(), p)) << p;
        }
    }
}

TEST(Eviction, StreamingKeepsExactlyTheSinksAndTheNewestTokens) {
    const auto c = shape(1, 1, 8);
    const auto keys = random_floats(100 * 8, 8);
    evicting_cache<evict::streaming> cache(c, evict::streaming(evict::budget::absolute(24, 4, 4)));
    fill(cache, c, keys, keys, 100);
    cache.compress();
    std::vector<std::int32_t> expected = {0, 1, 2, 3};
    for (std::int32_t p = 80; p < 100; ++p) expected.push_back(p);
    EXPECT_EQ(kept_positions(cache, 0, 0), expected);
}

// Fills two heads with 512 tokens, compresses to 0.25 and checks bytes()
// against the layout (K and V rows of 64 fp32, an int32 position and one
// float of policy state per token: H2O's statistic, knorm's norm made at
// append) and against a counting resource: the memory really goes back.
// `then(cache, counter, held_bytes)` runs before the cache is destroyed.
template <class Policy, class Then>
void expect_exact_bytes_through_compaction(std::uint32_t seed, Then then) {
    kvc_test::counting_resource counter;
    auto c = shape(2, 4, 64);
    c.resource = &counter;
    {
        evicting_cache<Policy> cache(c, Policy(evict::budget::ratio(0.25)));
        const std::size_t metadata = counter.in_use;
        const std::size_t tokens = 512;
        const auto keys = random_floats(tokens * 2 * 64, seed);
        cache.reserve(tokens);
        fill(cache, c, keys, keys, tokens);
        const std::size_t per_token = 2 * 64 * 4 + 4 + 4;
        EXPECT_EQ(cache.bytes(), metadata + 2 * tokens * per_token);
        EXPECT_EQ(cache.bytes(), counter.in_use);
        cache.compress();
        EXPECT_EQ(cache.tokens(0, 0), 128u);
        EXPECT_EQ(cache.bytes(), metadata + 2 * 128 * per_token);
        EXPECT_EQ(cache.bytes(), counter.in_use); // really returned to the resource
        then(cache, counter, metadata + 2 * 128 * per_token);
    }
    EXPECT_EQ(counter.in_use, 0u);
}

TEST(Eviction, CompressionFreesTheMemoryExactly) {
    expect_exact_bytes_through_compaction<evict::h2o>(9, [](auto& cache, const auto& counter, std::size_t held) {
        // A decode attend without a caller buffer puts H2O's statistics in the
        // cache's scratch (one float per held token of the layer), followed by
        // the kernels' logits (group 2 x the longest head's 128 tokens): counted too.
        const auto q = random_floats(4 * 64, 10);
        std::vector<float> out(4 * 64);
        cache.attend(0, q.data(), out.data());
        EXPECT_EQ(cache.bytes(), held + (2 * 128 + 2 * 128) * sizeof(float));
        EXPECT_EQ(cache.bytes(), counter.in_use);
        const std::size_t after_first = counter.in_use;
        cache.attend(0, q.data(), out.data());
        EXPECT_EQ(counter.in_use, after_first); // the scratch is reused, not reallocated per call
    });
}

// knorm's per-token norm, made at append, is memory the cache holds: counted and freed with the rows.
TEST(Eviction, ScoresMadeAtAppendAreCountedAndFreed) {
    expect_exact_bytes_through_compaction<evict::knorm>(33, [](auto&, const auto&, std::size_t) {});
}

TEST(Eviction, H2OKeepsTheTokenThatDrewOverwhelmingAttention) {
    const auto c = shape(1, 2, 16);
    const std::size_t tokens = 256;
    auto keys = random_floats(tokens * 16, 10, 0.1f);
    const auto values = random_floats(tokens * 16, 11);
    // Token 90's key points along every query: it draws most of the attention.
    auto queries = random_floats(tokens * 2 * 16, 12, 0.1f);
    for (std::size_t d = 0; d < 16; ++d) keys[90 * 16 + d] = 3.0f;
    for (std::size_t i = 0; i < tokens * 2; ++i)
        for (std::size_t d = 0; d < 16; ++d) queries[i * 16 + d] += 1.0f;
    evicting_cache<evict::h2o> cache(c, evict::h2o(evict::budget::absolute(24, 4, 4)));
    fill(cache, c, keys, values, tokens);
    std::vector<float> out(tokens * 2 * 16);
    cache.attend_chunk(0, queries.data(), tokens, out.data());
    // The statistic is the attention mass: every query's probabilities sum to 1 over its group of 2.
    double total = 0;
    for (std::size_t t = 0; t < tokens; ++t) total += cache.attention_statistic(0, 0)[t];
    EXPECT_NEAR(total, 2.0 * tokens, 1e-2);
    cache.compress();
    const auto kept = kept_positions(cache, 0, 0);
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), 90));
}

TEST(Eviction, SnapKVKeepsTheFarBackNeedleTheLastQueriesLookFor) {
    const auto c = shape(1, 1, 32);
    const std::size_t tokens = 500;
    auto keys = random_floats(tokens * 32, 13, 0.3f);
    const auto values = random_floats(tokens * 32, 14);
    auto queries = random_floats(tokens * 32, 15, 0.3f);
    const auto needle = random_floats(32, 16);
    for (std::size_t d = 0; d < 32; ++d) keys[40 * 32 + d] = 2.0f * needle[d];
    for (std::size_t i = tokens - 64; i < tokens; ++i)
        for (std::size_t d = 0; d < 32; ++d) queries[i * 32 + d] = needle[d];
    evicting_cache<evict::snapkv> cache(c, evict::snapkv(evict::budget::absolute(32, 4, 8)));
    fill(cache, c, keys, values, tokens);
    std::vector<float> out(tokens * 32);
    cache.attend_chunk(0, queries.data(), tokens, out.data());
    cache.compress();
    const auto kept = kept_positions(cache, 0, 0);
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), 40));
    // The same needle under random scores is very unlikely to survive at 32/500; not asserted, only logged.
}

// Issue 18: SnapKV's ring of recent queries is held only while a compression
// can still use it. With the after-prefill schedule alone it lives from the
// prompt's chunks to the compression at the first decode append, then is
// freed and decode steps do not write it; the kept tokens are those a cache
// that keeps the ring (a decode-time schedule that never fires) keeps.
TEST(Eviction, QueryWindowLivesOnlyUntilThePromptIsCompressed) {
    const auto c = shape(2, 4, 16);
    const std::size_t prompt = 128, window = evict::score::snapkv::query_window;
    const auto keys = random_floats((prompt + 8) * 2 * 16, 40);
    const auto queries = random_floats((prompt + 8) * 4 * 16, 41);
    evicting_cache<evict::snapkv> once(c, evict::snapkv(evict::budget::ratio(0.25)));
    evicting_cache<evict::snapkv> kept_ring(c, evict::snapkv(evict::budget::ratio(0.25), evict::schedule{true, SIZE_MAX}));
    std::vector<float> out(64 * 4 * 16);
    for (auto* cache : {&once, &kept_ring}) {
        for (std::size_t t0 = 0; t0 < prompt; t0 += 64) {
            cache->append(0, token_major(keys.data() + t0 * 32, 64, 2, 16),
                          token_major(keys.data() + t0 * 32, 64, 2, 16), static_cast<std::int64_t>(t0));
            cache->attend_chunk(0, queries.data() + t0 * 64, 64, out.data());
        }
        EXPECT_EQ(cache->query_window_bytes(), window * 4 * 16 * sizeof(float));
    }
    for (std::size_t t = prompt; t < prompt + 8; ++t)
        for (auto* cache : {&once, &kept_ring}) {
            cache->append(0, token_major(keys.data() + t * 32, 1, 2, 16), token_major(keys.data() + t * 32, 1, 2, 16),
                          static_cast<std::int64_t>(t));
            cache->attend(0, queries.data() + t * 64, out.data());
        }
    EXPECT_EQ(once.query_window_bytes(), 0u); // freed by the compression, not written since
    EXPECT_EQ(kept_ring.query_window_bytes(), window * 4 * 16 * sizeof(float));
    EXPECT_EQ(once.bytes() + window * 4 * 16 * sizeof(float), kept_ring.bytes());
    for (std::size_t h = 0; h < 2; ++h) {
        EXPECT_EQ(once.tokens(0, h), 32u + 8u); // ceil(0.25 * 128) after the prompt, then 8 decoded
        EXPECT_EQ(kept_positions(once, 0, h), kept_positions(kept_ring, 0, h));
    }
}

// Issue 18: the ring is stored at the cache's precision, so an fp16 cache
// holds half the bytes of an fp32 one. What SnapKV keeps is what an fp32
// cache keeps when the engine gives it the same rows and queries rounded to
// fp16: the queries lose nothing the keys had not already lost.
TEST(Eviction, QueryWindowIsStoredAtTheCachesPrecision) {
    auto c = shape(2, 4, 16);
    const std::size_t prompt = 128, window = evict::score::snapkv::query_window;
    auto keys = random_floats(prompt * 2 * 16, 42), queries = random_floats(prompt * 4 * 16, 43);
    using half_cache = kvc::compressed_cache<evict::snapkv, kvc::merge::none, kvc::quant::none<kvc::half>, kvc::project::none>;
    c.storage = kvc::dtype::f16;
    half_cache half(c, evict::snapkv(evict::budget::ratio(0.25)));
    c.storage = kvc::dtype::f32;
    evicting_cache<evict::snapkv> single(c, evict::snapkv(evict::budget::ratio(0.25)));
    std::vector<float> rounded_keys(keys.size()), rounded_queries(queries.size()), out(64 * 4 * 16);
    for (std::size_t i = 0; i < keys.size(); ++i) rounded_keys[i] = kvc::to_float(kvc::to_half(keys[i]));
    for (std::size_t i = 0; i < queries.size(); ++i) rounded_queries[i] = kvc::to_float(kvc::to_half(queries[i]));
    for (std::size_t t0 = 0; t0 < prompt; t0 += 64) {
        half.append(0, token_major(keys.data() + t0 * 32, 64, 2, 16), token_major(keys.data() + t0 * 32, 64, 2, 16),
                    static_cast<std::int64_t>(t0));
        half.attend_chunk(0, queries.data() + t0 * 64, 64, out.data());
        single.append(0, token_major(rounded_keys.data() + t0 * 32, 64, 2, 16),
                      token_major(rounded_keys.data() + t0 * 32, 64, 2, 16), static_cast<std::int64_t>(t0));
        single.attend_chunk(0, rounded_queries.data() + t0 * 64, 64, out.data());
    }
    EXPECT_EQ(half.query_window_bytes(), window * 4 * 16 * 2);
    EXPECT_EQ(single.query_window_bytes(), window * 4 * 16 * sizeof(float));
    half.compress();
    single.compress();
    for (std::size_t h = 0; h < 2; ++h) {
        EXPECT_EQ(half.tokens(0, h), 32u);
        EXPECT_EQ(kept_positions(half, 0, h), kept_positions(single, 0, h));
    }
}

// README "When compression runs": the after-prefill trigger takes a
// one-token chunk for the first decode token and compresses the prompt
// before that chunk is attended; with the trigger off (schedule{false, 0})
// the engine's explicit compress after the last chunk sees the whole prompt.
TEST(Eviction, AOneTokenLastChunkNeedsTheTriggerOff) {
    const auto c = shape(2, 2, 16);
    const auto keys = random_floats(64 * 2 * 16, 44), queries = random_floats(64 * 2 * 16, 45);
    evicting_cache<evict::knorm> automatic(c, evict::knorm(evict::budget::ratio(0.25)));
    evicting_cache<evict::knorm> explicit_only(c, evict::knorm(evict::budget::ratio(0.25), evict::schedule{false, 0}));
    std::vector<float> out(63 * 2 * 16);
    for (auto* cache : {&automatic, &explicit_only}) {
        cache->append(0, token_major(keys.data(), 63, 2, 16), token_major(keys.data(), 63, 2, 16), 0);
        cache->attend_chunk(0, queries.data(), 63, out.data());
        cache->append(0, token_major(keys.data() + 63 * 32, 1, 2, 16), token_major(keys.data() + 63 * 32, 1, 2, 16), 63);
    }
    EXPECT_LT(automatic.tokens(0, 0), 64u) << "the one-token chunk was taken for a decode token";
    EXPECT_EQ(explicit_only.tokens(0, 0), 64u);
    explicit_only.attend_chunk(0, queries.data() + 63 * 32, 1, out.data());
    explicit_only.compress(0);
    // ceil(0.25 * 64) = 16 is below the 4 sinks + 16 recent tokens the budget always keeps.
    for (std::size_t h = 0; h < 2; ++h) EXPECT_EQ(explicit_only.tokens(0, h), 20u);
}

TEST(Eviction, AfterPrefillTheFirstDecodeAppendCompresses) {
    const auto c = shape(2, 2, 16);
    const std::size_t prompt = 200;
    const auto keys = random_floats((prompt + 1) * 2 * 16, 17);
    const auto queries = random_floats(prompt * 2 * 16, 18);
    evicting_cache<evict::keydiff> cache(c, evict::keydiff(evict::budget::ratio(0.3)));
    for (std::size_t t0 = 0; t0 < prompt; t0 += 50) {
        cache.append(0, token_major(keys.data() + t0 * 32, 50, 2, 16), token_major(keys.data() + t0 * 32, 50, 2, 16),
                     static_cast<std::int64_t>(t0));
        std::vector<float> out(50 * 2 * 16);
        cache.attend_chunk(0, queries.data() + t0 * 32, 50, out.data());
        EXPECT_EQ(cache.tokens(0, 0), t0 + 50); // no compression inside the prompt
    }
    cache.append(0, token_major(keys.data() + prompt * 32, 1, 2, 16), token_major(keys.data() + prompt * 32, 1, 2, 16),
                 prompt);
    EXPECT_EQ(cache.tokens(0, 0), 60u + 1u); // ceil(0.3 * 200) kept, then the decode token
    EXPECT_EQ(cache.tokens_seen(0), prompt + 1);
}

TEST(Eviction, DecodeScheduleHoldsTheTargetThrough10KGeneratedTokens) {
    const auto c = shape(1, 2, 16);
    evicting_cache<evict::h2o> cache(c, evict::h2o(evict::budget::absolute(256, 4, 16), evict::schedule{true, 64}));
    const auto row = random_floats(16 * 64, 19);
    const auto q = random_floats(2 * 16, 20);
    std::vector<float> out(2 * 16);
    std::size_t compressions = 0, previous = 0, peak_bytes = 0;
    for (std::size_t t = 0; t < 10000; ++t) {
        const float* k = row.data() + (t % 64) * 16;
        cache.append(0, token_major(k, 1, 1, 16), token_major(k, 1, 1, 16), static_cast<std::int64_t>(t));
        cache.attend(0, q.data(), out.data());
        const std::size_t held = cache.tokens(0, 0);
        ASSERT_LE(held, 256u + 64u) << "token " << t;
        if (held < previous) {
            ++compressions;
            EXPECT_EQ(held, 256u); // back to the target exactly
        }
        previous = held;
        peak_bytes = std::max(peak_bytes, cache.bytes());
    }
    EXPECT_EQ(cache.tokens_seen(0), 10000u);
    EXPECT_EQ(compressions, (10000u - 321u) / 65u + 1u); // every 65 tokens once the head holds 321
    // Memory stays bounded by the budget, not the sequence: under 400 tokens' worth of storage per head.
    EXPECT_LT(peak_bytes, 400u * (2 * 16 * 4 + 8) + 4096u);
}

TEST(Eviction, NoTokenIsEvictedWhileTheBudgetIsNotExceeded) {
    const auto c = shape(1, 1, 8);
    const auto keys = random_floats(40 * 8, 21);
    evicting_cache<evict::knorm> cache(c, evict::knorm(evict::budget::absolute(64, 4, 16)));
    fill(cache, c, keys, keys, 40);
    const auto q = random_floats(8, 22);
    std::vector<float> before(8), after(8);
    cache.attend(0, q.data(), before.data());
    cache.compress();
    cache.attend(0, q.data(), after.data());
    EXPECT_EQ(cache.tokens(0, 0), 40u);
    EXPECT_EQ(before, after);
}

TEST(Eviction, RandomScoresAreDeterministicAndDifferFromKnorm) {
    const auto c = shape(1, 1, 8);
    const auto keys = random_floats(300 * 8, 23);
    evicting_cache<evict::random> a(c, evict::random(evict::budget::ratio(0.2))), b(c, evict::random(evict::budget::ratio(0.2)));
    evicting_cache<evict::knorm> k(c, evict::knorm(evict::budget::ratio(0.2)));
    fill(a, c, keys, keys, 300);
    fill(b, c, keys, keys, 300);
    fill(k, c, keys, keys, 300);
    a.compress();
    b.compress();
    k.compress();
    EXPECT_EQ(kept_positions(a, 0, 0), kept_positions(b, 0, 0));
    EXPECT_NE(kept_positions(a, 0, 0), kept_positions(k, 0, 0));
}

TEST(Eviction, CurKeepsLargeKeyValueProductsWithinEachWindow) {
    const auto c = shape(1, 1, 8);
    auto keys = random_floats(160 * 8, 24);
    const auto values = random_floats(160 * 8, 25);
    for (std::size_t d = 0; d < 8; ++d) keys[50 * 8 + d] *= 20.0f; // dominant product in window 48..63
    evicting_cache<evict::cur> cache(c, evict::cur(evict::budget::absolute(20, 4, 4)));
    fill(cache, c, keys, values, 160);
    cache.compress();
    const auto kept = kept_positions(cache, 0, 0);
    EXPECT_TRUE(std::count(kept.begin(), kept.end(), 50));
}

TEST(Eviction, BadBudgetsAreRejectedBeforeAnythingIsEvicted) {
    const auto c = shape(1, 1, 8);
    auto expect_error = [](auto make, const std::string& needle) {
        try {
            make();
            ADD_FAILURE() << "expected kvc::error mentioning " << needle;
        } catch (const kvc::error& e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
        }
    };
    expect_error([&] { evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::ratio(0.0))); }, "keep_ratio");
    expect_error([&] { evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::ratio(1.5))); }, "keep_ratio");
    expect_error([&] { evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::ratio(NAN))); }, "keep_ratio");
    expect_error([&] { evicting_cache<evict::knorm>(c, evict::knorm(evict::budget::absolute(10, 4, 16))); }, "sinks + window");
    evict::a2sf bad_forgetting;
    bad_forgetting.scorer.forgetting = 0.0f;
    expect_error([&] { evicting_cache<evict::a2sf>(c, bad_forgetting); }, "forgetting");
    evict::snapkv bad_pool(evict::budget::ratio(0.5));
    bad_pool.scorer.pool = 4;
    expect_error([&] { evicting_cache<evict::snapkv>(c, bad_pool); }, "pooling");
}

TEST(Eviction, CollectingStatisticsDoesNotChangeAttention) {
    const auto c = shape(2, 4, 32);
    const auto keys = random_floats(90 * 2 * 32, 26);
    const auto q = random_floats(4 * 32, 27);
    evicting_cache<evict::h2o> observed(c, evict::h2o(evict::budget::ratio(0.5)));
    kvc::compressed_cache<evict::none, kvc::merge::none, kvc::quant::none<float>, kvc::project::none> plain(c);
    fill(observed, c, keys, keys, 90);
    fill(plain, c, keys, keys, 90);
    std::vector<float> a(4 * 32), b(4 * 32);
    observed.attend(0, q.data(), a.data());
    plain.attend(0, q.data(), b.data());
    EXPECT_EQ(a, b);
    static_assert(evicting_cache<evict::h2o>::collects_attention_stats && !evicting_cache<evict::h2o>::collects_queries);
    static_assert(evicting_cache<evict::snapkv>::collects_queries && !evicting_cache<evict::snapkv>::collects_attention_stats);
    static_assert(!evicting_cache<evict::knorm>::collects_queries && !evicting_cache<evict::knorm>::collects_attention_stats);
}

} // namespace

namespace {

TEST(Eviction, DecodeScheduleNeverSplitsAPrefillChunk) {
    // Ratio budget with a decode interval: chunked prefill must stay whole
    // until attend_chunk has seen it; compression starts with decoding.
    const auto c = shape(1, 1, 16);
    evicting_cache<evict::h2o> cache(c, evict::h2o(evict::budget::ratio(0.25, 4, 8), evict::schedule{true, 16}));
    const auto keys = random_floats(300 * 16, 30);
    const auto q = random_floats(64 * 16, 31);
    std::vector<float> out(64 * 16);
    for (std::size_t t0 = 0; t0 < 256; t0 += 64) {
        cache.append(0, token_major(keys.data() + t0 * 16, 64, 1, 16), token_major(keys.data() + t0 * 16, 64, 1, 16),
                     static_cast<std::int64_t>(t0));
        EXPECT_EQ(cache.tokens(0, 0), t0 + 64);
        cache.attend_chunk(0, q.data(), 64, out.data());
    }
    for (std::size_t t = 256; t < 300; ++t) {
        cache.append(0, token_major(keys.data() + t * 16, 1, 1, 16), token_major(keys.data() + t * 16, 1, 1, 16),
                     static_cast<std::int64_t>(t));
        cache.attend(0, q.data(), out.data());
        EXPECT_LE(cache.tokens(0, 0), static_cast<std::size_t>(std::ceil(0.25 * (t + 1))) + 16u + 1u);
    }
}

} // namespace
