// The host serves every family, not only eviction: a merging policy that asks
// for attention statistics composes with evict::none and receives them, and a projection that
// asks for recent queries gets them (both were broken while the host wired
// statistics and queries to the eviction slot alone).
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "cache_test_util.hpp"
#include "kvc/cache/compressed_cache.hpp"
#include "kvc/cache/full_cache.hpp"
#include "kvc/policy/eviction/none.hpp"
#include "kvc/policy/merging/none.hpp"
#include "kvc/policy/projection/none.hpp"
#include "kvc/policy/quantization/none.hpp"
#include "kvc/view/kv_view.hpp"

namespace {

using token_major = kvc::kv_view<const float, kvc::layout_token_major>;

// Policies that only declare what they need from the host.
struct merger_with_statistics {
    using family = kvc::merging_family;
    static constexpr bool merges = false;
    static constexpr bool needs_attention_stats = true;
    double* received = nullptr; // sum of every mass handed to observe()
    std::size_t* calls = nullptr;
    template <class Layer>
    void observe(const Layer& layer, const float* mass, std::size_t /*query_tokens*/) const noexcept {
        std::size_t held = 0;
        for (std::size_t h = 0; h < layer.config().kv_heads; ++h) held += layer.held(h);
        for (std::size_t t = 0; t < held; ++t) *received += mass[t];
        ++*calls;
    }
};
struct projection_with_queries {
    using family = kvc::projection_family;
    static constexpr bool projects = false;
    static constexpr bool needs_queries = true;
    static constexpr std::size_t query_window = 3;
};

kvc::cache_config shape() {
    kvc::cache_config c;
    c.layers = 2;
    c.kv_heads = 2;
    c.query_heads = 4;
    c.head_dim = 16;
    c.storage = kvc::dtype::f32;
    return c;
}

// Runs `steps` decode steps on layer 0 of both caches and requires identical outputs.
template <class Cache>
void decode_like_full_cache(Cache& cache, std::size_t steps) {
    const kvc::cache_config c = shape();
    kvc::full_cache full(c);
    const std::size_t row = c.kv_heads * c.head_dim, qrow = c.query_heads * c.head_dim;
    const auto keys = kvc_test::random_floats(steps * row, 5), values = kvc_test::random_floats(steps * row, 6);
    const auto queries = kvc_test::random_floats(steps * qrow, 7);
    for (std::size_t t = 0; t < steps; ++t) {
        const token_major k(keys.data() + t * row, 1, c.kv_heads, c.head_dim);
        const token_major v(values.data() + t * row, 1, c.kv_heads, c.head_dim);
        full.append(0, k, v, static_cast<std::int64_t>(t));
        cache.append(0, k, v, static_cast<std::int64_t>(t));
        std::vector<float> expected(qrow), got(qrow);
        full.attend(0, queries.data() + t * qrow, expected.data());
        cache.attend(0, queries.data() + t * qrow, got.data());
        ASSERT_EQ(std::memcmp(expected.data(), got.data(), qrow * sizeof(float)), 0) << "step " << t;
    }
}

TEST(Composition, MergerAskingForStatisticsComposesWithoutEviction) {
    using cache_type = kvc::compressed_cache<kvc::evict::none, merger_with_statistics, kvc::quant::none<float>,
                                             kvc::project::none>;
    static_assert(cache_type::collects_attention_stats, "the merger's request is honoured");
    double received = 0.0;
    std::size_t calls = 0;
    merger_with_statistics merger;
    merger.received = &received;
    merger.calls = &calls;
    cache_type cache(shape(), {}, merger);
    decode_like_full_cache(cache, 9);
    // Every decode step's probabilities reach the merger: each of the 4 query
    // heads' distributions sums to 1, so 9 steps hand over 9 x 4 in all.
    EXPECT_EQ(calls, 9u);
    EXPECT_NEAR(received, 9.0 * shape().query_heads, 1e-4);
}

TEST(Composition, ProjectionAskingForQueriesGetsItsWindow) {
    using cache_type = kvc::compressed_cache<kvc::evict::none, kvc::merge::none, kvc::quant::none<float>,
                                             projection_with_queries>;
    static_assert(cache_type::collects_queries);
    cache_type cache(shape());
    decode_like_full_cache(cache, 5);
    const kvc::cache_config c = shape();
    // The ring of layer 0 holds the projection's 3 queries of query_heads x head_dim floats; layer 1 none yet.
    EXPECT_EQ(cache.query_window_bytes(), 3 * c.query_heads * c.head_dim * sizeof(float));
}

} // namespace
