// The caches' promises under hostile or careless use (issue 19): every read
// checks its indices, a moved-from cache refuses calls instead of reading
// moved-from storage, a decode-time compression that fails to allocate leaves
// the new token out (and the append can be retried), and compress() over all
// layers is per layer, as documented.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/policy/eviction/external.hpp"
#include "kvc/policy/eviction/h2o.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using kvc_test::error_of;
using kvc_test::random_floats;
using token_major = kvc::kv_view<const float, kvc::layout_token_major>;
namespace evict = kvc::evict;

template <class Eviction>
using f32_cache = kvc::compressed_cache<Eviction, kvc::merge::none, kvc::quant::none<float>, kvc::project::none>;

kvc::cache_config shape(std::size_t layers, kvc::memory_resource* resource = nullptr) {
    kvc::cache_config c;
    c.layers = layers;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 16;
    c.storage = kvc::dtype::f32;
    c.resource = resource;
    return c;
}

// Appends tokens first..first+count-1 of `data` ([tokens][2][16]) to `layer`.
template <class Cache>
void append_tokens(Cache& cache, std::size_t layer, const std::vector<float>& data, std::size_t first,
                   std::size_t count) {
    cache.append(layer, token_major(data.data() + first * 32, count, 2, 16),
                 token_major(data.data() + first * 32, count, 2, 16), static_cast<std::int64_t>(first));
}

void expect_error(const std::function<void()>& call, const std::string& expected, const char* what) {
    const std::string message = error_of(call);
    EXPECT_NE(message.find(expected), std::string::npos) << what << ": " << message;
}

// Layer 2 of a 2-layer cache and KV head 2 of 2 are out of range for every read.
TEST(CacheReliability, EveryReadChecksItsLayerAndHead) {
    const auto data = random_floats(8 * 32, 1);
    {
        kvc::full_cache cache(shape(2));
        append_tokens(cache, 0, data, 0, 8);
        expect_error([&] { (void)cache.tokens(2); }, "layer 2 out of range, expected < 2", "full tokens");
        expect_error([&] { (void)cache.positions(2); }, "layer 2 out of range, expected < 2", "full positions");
        expect_error([&] { (void)cache.head(2, 0); }, "layer 2 out of range", "full head layer");
        expect_error([&] { (void)cache.head(0, 2); }, "KV head 2 out of range, expected < 2", "full head");
        EXPECT_EQ(cache.tokens(0), 8u); // in range: unchanged behaviour
        EXPECT_EQ(cache.positions(0)[7], 7);
    }
    {
        f32_cache<evict::h2o> cache(shape(2), evict::h2o(evict::budget::absolute(20)));
        append_tokens(cache, 0, data, 0, 8);
        const char* layer_message = "layer 2 out of range, expected < 2";
        const char* head_message = "KV head 2 out of range, expected < 2";
        expect_error([&] { (void)cache.tokens(2); }, layer_message, "tokens(layer)");
        expect_error([&] { (void)cache.tokens(2, 0); }, layer_message, "tokens(layer, head)");
        expect_error([&] { (void)cache.tokens(0, 2); }, head_message, "tokens(layer, head)");
        expect_error([&] { (void)cache.positions(2, 0); }, layer_message, "positions");
        expect_error([&] { (void)cache.positions(0, 2); }, head_message, "positions");
        expect_error([&] { (void)cache.head(0, 2); }, head_message, "head");
        expect_error([&] { (void)cache.next_position(2); }, layer_message, "next_position");
        expect_error([&] { (void)cache.tokens_seen(2); }, layer_message, "tokens_seen");
        expect_error([&] { (void)cache.attention_statistic(2, 0); }, layer_message, "attention_statistic");
        expect_error([&] { (void)cache.attention_statistic(0, 2); }, head_message, "attention_statistic");
        EXPECT_EQ(cache.tokens(0, 1), 8u);
        EXPECT_EQ(cache.tokens_seen(0), 8u);
        EXPECT_EQ(cache.next_position(0), 8);
    }
    {
        f32_cache<evict::external> cache(shape(2), evict::external(evict::budget::absolute(20)));
        append_tokens(cache, 0, data, 0, 8);
        expect_error([&] { (void)cache.external_scores(2, 0); }, "layer 2 out of range", "external_scores");
        expect_error([&] { (void)cache.external_scores(0, 2); }, "KV head 2 out of range", "external_scores");
        EXPECT_NE(cache.external_scores(0, 1), nullptr);
    }
}

// A moved-from cache holds no layer: each call that names one is refused with
// a kvc::error that says so; assigning a cache to it makes it usable again.
template <class Cache>
void expect_moved_from_refuses(Cache& moved_from, Cache replacement) {
    const auto data = random_floats(4 * 32, 2);
    std::vector<float> q(4 * 16), out(4 * 16);
    const char* message = "moved from";
    expect_error([&] { append_tokens(moved_from, 0, data, 0, 1); }, message, "append");
    expect_error([&] { moved_from.attend(0, q.data(), out.data()); }, message, "attend");
    expect_error([&] { moved_from.attend_chunk(0, q.data(), 1, out.data()); }, message, "attend_chunk");
    expect_error([&] { (void)moved_from.tokens(0); }, message, "tokens");
    expect_error([&] { (void)moved_from.head(0, 0); }, message, "head");
    expect_error([&] { moved_from.reserve(16); }, message, "reserve");
    moved_from.clear(); // nothing to clear: allowed
    moved_from.shrink_to_fit();
    moved_from = std::move(replacement);
    append_tokens(moved_from, 1, data, 0, 4);
    EXPECT_EQ(moved_from.tokens(1), 4u * (std::is_same_v<Cache, kvc::full_cache> ? 1u : 2u));
}

TEST(CacheReliability, MovedFromCachesRefuseCalls) {
    kvc_test::counting_resource other;
    const auto data = random_floats(4 * 32, 3);
    {
        kvc::full_cache source(shape(2));
        append_tokens(source, 0, data, 0, 4);
        kvc::full_cache target(std::move(source));
        EXPECT_EQ(target.tokens(0), 4u);
        expect_moved_from_refuses(source, kvc::full_cache(shape(2)));
        // Move assignment between caches on different resources leaves the source empty too.
        kvc::full_cache elsewhere(shape(2, &other));
        elsewhere = std::move(target);
        expect_moved_from_refuses(target, kvc::full_cache(shape(2)));
    }
    {
        using cache = f32_cache<evict::h2o>;
        cache source(shape(2), evict::h2o(evict::budget::absolute(20)));
        append_tokens(source, 0, data, 0, 4);
        cache target(std::move(source));
        EXPECT_EQ(target.tokens(0), 8u);
        expect_error([&] { source.compress(); }, "moved from", "compress()");
        expect_moved_from_refuses(source, cache(shape(2), evict::h2o(evict::budget::absolute(20))));
        cache elsewhere(shape(2, &other), evict::h2o(evict::budget::absolute(20)));
        elsewhere = std::move(target);
        expect_moved_from_refuses(target, cache(shape(2), evict::h2o(evict::budget::absolute(20))));
    }
    EXPECT_EQ(other.in_use, 0u);
}

// Decode-time compression that fails to allocate: the append throws, the new
// token is not in the cache, nothing stored changed, and the same append
// succeeds once memory is there, leaving each head exactly at its target.
TEST(CacheReliability, FailedDecodeTimeCompressionLeavesTheTokenOutAndCanBeRetried) {
    kvc_test::counting_resource counter;
    using cache_type = f32_cache<evict::h2o>;
    cache_type cache(shape(1, &counter), evict::h2o(evict::budget::absolute(40, 4, 16), evict::schedule{true, 8}));
    cache.reserve(64); // the appends themselves then need no memory: only compression does
    const auto data = random_floats(64 * 32, 4);
    std::vector<float> q(4 * 16), out(4 * 16);
    for (std::size_t t = 0; t < 48; ++t) { // 40 + 8: at the budget plus the interval
        append_tokens(cache, 0, data, t, 1);
        cache.attend(0, q.data(), out.data());
    }
    ASSERT_EQ(cache.tokens(0, 0), 48u);
    std::vector<std::int32_t> positions(cache.positions(0, 0), cache.positions(0, 0) + 48);
    const std::size_t bytes = cache.bytes();
    counter.limit = counter.in_use; // the 49th token puts the heads over: compaction must allocate
    EXPECT_THROW(append_tokens(cache, 0, data, 48, 1), std::bad_alloc);
    EXPECT_EQ(cache.tokens(0, 0), 48u);
    EXPECT_EQ(cache.tokens(0, 1), 48u);
    EXPECT_EQ(cache.tokens_seen(0), 48u);
    EXPECT_EQ(cache.next_position(0), 48);
    EXPECT_EQ(std::vector<std::int32_t>(cache.positions(0, 0), cache.positions(0, 0) + 48), positions);
    EXPECT_EQ(cache.bytes(), bytes);
    counter.limit = SIZE_MAX;
    append_tokens(cache, 0, data, 48, 1); // the retry is accepted
    EXPECT_EQ(cache.tokens(0, 0), 40u);     // back to the target exactly, the new token included
    EXPECT_EQ(cache.tokens(0, 1), 40u);
    EXPECT_EQ(cache.positions(0, 0)[39], 48);
    EXPECT_EQ(cache.tokens_seen(0), 49u);
    EXPECT_EQ(cache.bytes(), counter.in_use);
}

// compress() over all layers is per layer: when layer 1 cannot allocate,
// layer 0 stays compressed and layer 1 stays as it was (documented).
TEST(CacheReliability, CompressOfAllLayersIsPerLayer) {
    kvc_test::counting_resource counter;
    using cache_type = f32_cache<evict::h2o>;
    const auto data = random_floats(64 * 32, 5);
    auto filled = [&] {
        cache_type cache(shape(2, &counter), evict::h2o(evict::budget::absolute(24)));
        for (std::size_t l = 0; l < 2; ++l) append_tokens(cache, l, data, 0, 64);
        return cache;
    };
    std::size_t layer0_allocations = 0;
    {
        cache_type probe = filled();
        const std::size_t before = counter.allocations;
        probe.compress(0);
        layer0_allocations = counter.allocations - before;
    }
    ASSERT_GT(layer0_allocations, 0u);
    cache_type cache = filled();
    const std::size_t allowed = counter.allocations + layer0_allocations;
    counter.limit = SIZE_MAX;
    counter.fail_after = allowed;
    EXPECT_THROW(cache.compress(), std::bad_alloc);
    counter.fail_after = SIZE_MAX;
    EXPECT_EQ(cache.tokens(0, 0), 24u);
    EXPECT_EQ(cache.tokens(1, 0), 64u);
    EXPECT_EQ(cache.tokens(1, 1), 64u);
    EXPECT_EQ(cache.bytes(), counter.in_use);
    cache.compress();
    EXPECT_EQ(cache.tokens(1, 1), 24u);
}

} // namespace
